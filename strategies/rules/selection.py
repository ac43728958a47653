"""Selection rules: Krum, Multi-Krum, Bulyan and k-norm keep the rows they trust. Krum, Multi-Krum and Bulyan select
exactly the rows brute-force float64 distances select, the first on a tie (strategies/rules/distances.py)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from strategies.rules import kernels
from strategies.rules.common import POOL, average, by_column_blocks, distances_to, needs
from strategies.rules.coordinate import row_means_closest_to_median
from strategies.rules.distances import bulyan_select, check_stack, krum_select

SMALL_N = ("refuse", "official")  # Krum and Multi-Krum where n < f + 3: refuse, or the official code's choice


def _scores_vanish(rule: str, n: int, f: int, small_n: str) -> bool:
    """Whether Krum's scores are all zero, as in the official code where n - f - 2 < 1 neighbours are counted
    (litian96/ditto flearn/trainers_global/fedbase.py lines 194-198 and 212-217: each score sums the k + 1 = n - f - 1
    smallest distances of a row, its own 0 included, so f + 1 <= n < f + 3 gives 0 for every row, and np.argsort of
    equal scores keeps the rows in order for n <= 16, every official script's clients_per_round). With
    `small_n=refuse` (the default) such an n is refused instead, naming the fix; n <= f is refused either way (there
    the official Krum scores by all but each row's largest distance and Multi-Krum's m = 0 averages nothing and
    crashes; the official code reaches it only when every device is corrupted)."""
    if small_n not in SMALL_N:
        raise ValueError(f"{rule}: small_n must be one of {', '.join(SMALL_N)}, got {small_n!r}")
    if small_n == "official" and f + 1 <= n < f + 3:
        return True
    needs(rule, n, f)
    return False


def krum(
    updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, small_n: str = "refuse"
) -> torch.Tensor:
    """Krum (Blanchard et al., NeurIPS 2017): the update whose n - f - 2 nearest neighbours (itself excluded) are
    closest in summed squared distance (the first on a tie). Its guarantee assumes n >= 2f + 3; like the official
    Ditto code it runs whenever there is a neighbour to count (n >= f + 3), and with `small_n=official` also where
    there is none, as the official code does: every score is 0 and the first update wins (`_scores_vanish`). The
    choice is the one exact float64 distances give, whatever the rows' magnitudes (`krum_select`)."""
    check_stack(updates, num_malicious, "krum")
    if _scores_vanish("krum", updates.shape[0], num_malicious, small_n):
        return updates[0].clone()
    return updates[int(krum_select(updates, num_malicious, 1)[0])].clone()


def multikrum(
    updates: torch.Tensor,
    weights: torch.Tensor,
    num_malicious: int = 0,
    *,
    m: int | None = None,
    small_n: str = "refuse",
) -> torch.Tensor:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the unweighted mean of the m updates with the best Krum scores
    (m = n - f when null). Runs when n >= f + 3, as Krum, or (`small_n=official`) where the official scores all
    vanish: the mean of the first m updates."""
    check_stack(updates, num_malicious, "multikrum")
    n = updates.shape[0]
    vanish = _scores_vanish("multikrum", n, num_malicious, small_n)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"multikrum needs m to be null (n - f) or an integer >= 1 (got {m!r})")
    keep = n - num_malicious if m is None else min(m, n)
    share = torch.zeros(n, dtype=updates.dtype, device=updates.device)
    share[torch.arange(keep) if vanish else krum_select(updates, num_malicious, keep)] = 1.0 / keep
    return share @ updates  # the mean of the chosen rows without copying them out of the stack


def bulyan(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018): select theta = n - 2f updates by Krum repeatedly (each time on the
    remaining ones, removing the one chosen), then per coordinate average the beta = theta - 2f selected values
    closest to the selected values' median. Requires n >= 4f + 3."""
    n, f = updates.shape[0], num_malicious
    check_stack(updates, f, "bulyan")
    needs("bulyan", n, f)
    if f == 0:
        return average(updates)  # theta = n: every update is selected, none is trimmed
    chosen = bulyan_select(updates, f, n - 2 * f)
    return _bulyan_coordinates(updates, chosen, len(chosen) - 2 * f)


def _bulyan_coordinates(x: torch.Tensor, chosen: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the `beta` values of x[chosen] closest to their median: the compiled sorting
    network (`kernels.bulyan_coordinates`, a few times faster) where it is available, numpy's sort otherwise; the
    columns where the kernel finds a tie at the window's far end go to the numpy path, which ranks them."""
    a = x.detach().cpu().numpy()
    if kernels.library() is None or not a.flags.c_contiguous:
        return by_column_blocks(x, partial(row_means_closest_to_median, beta=beta), rows=chosen)
    rows = chosen.cpu().numpy()
    out = np.empty(a.shape[1], dtype=a.dtype)
    width = max(4096, -(-a.shape[1] // 16))  # at least 16 ranges for the pool; the kernel streams each range

    def work(start: int) -> None:
        end = min(start + width, a.shape[1])
        means, tied = kernels.bulyan_coordinates(a, rows, beta, start, end)
        out[start:end] = means
        cols = start + np.nonzero(tied)[0]
        if len(cols):
            out[cols] = row_means_closest_to_median(np.array(a[np.ix_(rows, cols)].T, order="C"), beta)

    list(POOL.map(work, range(0, a.shape[1], width)))
    return torch.from_numpy(out).to(x.device)


def knorm(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """k-norm: drop the f updates of largest Euclidean norm and average the rest (the norm-filtering baseline of
    the official Ditto code; cf. Sun et al. 2019, "Can you really backdoor federated learning?"). Norms in float64;
    of equal norms the first rows are kept."""
    check_stack(updates, num_malicious, "knorm")
    needs("knorm", updates.shape[0], num_malicious)
    n = updates.shape[0]
    norms = distances_to(updates, torch.zeros(updates.shape[1], dtype=torch.float64, device=updates.device))
    share = torch.zeros(n, dtype=updates.dtype, device=updates.device)
    share[torch.argsort(norms, stable=True)[: n - num_malicious]] = 1.0 / (n - num_malicious)
    return share @ updates  # the mean of the kept rows without copying them out of the stack
