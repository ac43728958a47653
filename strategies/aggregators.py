"""Aggregation rules: pure functions over the stacked updates of one round (ByzFL style).

Every rule takes `updates` (n x d float tensor, one row per accepted client update), `weights` (n sample counts)
and `num_malicious` (f, the number of malicious rows the rule should tolerate) and returns the aggregated update
(d,). Pairwise distances come from the Gram matrix, column block by column block (strategies/distances.py);
coordinate-wise order statistics partition cache-sized transposed column blocks (no full sort, no copy of the
stack), so peak extra memory stays within a few copies of the stack. A rule that cannot run on the rows it got
raises ValueError; `check_aggregator` says so for a configuration before any round runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from strategies.distances import krum_scores, krum_select, pairwise_sq_distances

Aggregator = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def mean(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, weighted: bool = False) -> torch.Tensor:
    """Mean of the updates; weighted by sample count (FedAvg, McMahan et al. 2017) or uniform (official Ditto code)."""
    if not weighted:
        return updates.mean(dim=0)
    w = weights.to(updates.dtype)
    return (w / w.sum()) @ updates


_BLOCK_BYTES = 4 << 20  # a transposed column block of about 4 MiB stays in cache
_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))  # numpy's partition releases the GIL


def _by_column_blocks(x: torch.Tensor, reduce: Callable[[np.ndarray], np.ndarray],
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """One value per coordinate: `reduce` maps a C-contiguous (columns x rows) block of x[rows] (rows=None: all), which
    it may reorder in place, to one value per column. Cache-sized blocks, in parallel, so the extra memory is a few
    blocks, never a copy of the stack."""
    a = x.detach().cpu().numpy()
    picked = None if rows is None else rows.numpy()
    out = np.empty(a.shape[1], dtype=a.dtype)
    rows_bytes = (a.shape[0] if picked is None else len(picked)) * a.itemsize
    # at least 16 blocks, so that the blocks in flight stay small next to a small stack
    width = max(256, min(_BLOCK_BYTES // rows_bytes, -(-a.shape[1] // 16)))

    def work(start: int) -> None:
        # a C-contiguous transposed copy: np.partition on the strided view would copy in the view's (column) order
        # and then select along a stride of `width` elements, about 2x slower
        cols = a[:, start : start + width] if picked is None else a[picked, start : start + width]
        out[start : start + width] = reduce(np.ascontiguousarray(cols.T))

    list(_POOL.map(work, range(0, a.shape[1], width)))
    return torch.from_numpy(out)


def _row_medians(block: np.ndarray) -> np.ndarray:
    """Median of each row, the mean of the two middle values when the length is even (as numpy); partitions in place."""
    n = block.shape[1]
    k = n // 2
    if n % 2:
        block.partition(k, axis=1)
        return block[:, k]
    block.partition([k - 1, k], axis=1)
    return (block[:, k - 1] + block[:, k]) / 2


def _trimmed_row_means(block: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean of the values left after dropping the k smallest and the k largest; partitions in place."""
    n = block.shape[1]
    block.partition([k, n - k - 1], axis=1)
    return block[:, k : n - k].mean(axis=1, dtype=np.float64)


def _row_means_closest_to_median(block: np.ndarray, beta: int) -> np.ndarray:
    """Per row, the mean of the `beta` values closest to the row's median."""
    med = _row_medians(block)  # reorders each row in place; the values, hence the answer, stay the same
    closest = np.argpartition(np.abs(block - med[:, None]), beta - 1, axis=1)[:, :beta]
    return np.take_along_axis(block, closest, axis=1).mean(axis=1, dtype=np.float64)


def median(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Coordinate-wise median (Yin et al., ICML 2018, "Byzantine-robust distributed learning")."""
    return _by_column_blocks(updates, _row_medians)


def trimmed_mean(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, beta: float = 0.1) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the floor(beta n) smallest and the
    floor(beta n) largest values and average the rest (as scipy.stats.trim_mean)."""
    n = updates.shape[0]
    k = int(beta * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimmed_mean with beta={beta} trims all of n={n} updates: use beta < 0.5")
    if k == 0:
        return updates.mean(dim=0)
    return _by_column_blocks(updates, partial(_trimmed_row_means, k=k))


# smallest number of updates a rule needs, given f
MIN_UPDATES: dict[str, tuple[Callable[[int], int], str]] = {
    "krum": (lambda f: f + 3, "n >= f + 3"),
    "multikrum": (lambda f: f + 3, "n >= f + 3"),
    "bulyan": (lambda f: 4 * f + 3, "n >= 4f + 3"),
    "knorm": (lambda f: f + 1, "n >= f + 1"),
}


def _needs(rule: str, n: int, f: int) -> None:
    need, condition = MIN_UPDATES[rule]
    if n < need(f):
        raise ValueError(f"{rule} needs {condition} (got n={n} updates, f={f}): lower aggregator.f or sample more "
                         f"clients (clients_per_round >= {need(f)})")


def krum(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Krum (Blanchard et al., NeurIPS 2017): the update whose n - f - 2 nearest neighbours (itself excluded) are
    closest in summed squared distance (the first on a tie). Its guarantee assumes n >= 2f + 3; like the official
    Ditto code it runs whenever there is a neighbour to count (n >= f + 3). The choice is the one exact float64
    distances give; float32 bounds settle it where they can (`krum_select`)."""
    _needs("krum", updates.shape[0], num_malicious)
    return updates[int(krum_select(updates, num_malicious, 1)[0])].clone()


def multikrum(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, m: int | None = None) -> torch.Tensor:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the unweighted mean of the m updates with the best Krum scores
    (m = n - f when null). Runs when n >= f + 3, as Krum."""
    n = updates.shape[0]
    _needs("multikrum", n, num_malicious)
    keep = n - num_malicious if m is None else min(m, n)
    share = torch.zeros(n, dtype=updates.dtype)
    share[krum_select(updates, num_malicious, keep)] = 1.0 / keep
    return share @ updates  # the mean of the chosen rows without copying them out of the stack


def bulyan(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018): select theta = n - 2f updates by Krum repeatedly (each time on the
    remaining ones, removing the one chosen), then per coordinate average the beta = theta - 2f selected values
    closest to the selected values' median. Requires n >= 4f + 3."""
    n, f = updates.shape[0], num_malicious
    _needs("bulyan", n, f)
    if f == 0:
        return updates.mean(dim=0)  # theta = n: every update is selected, none is trimmed
    dist = pairwise_sq_distances(updates)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        idx = torch.tensor(remaining)
        best = remaining[int(torch.argmin(krum_scores(dist[idx][:, idx], f)))]
        chosen.append(best)
        remaining.remove(best)
    beta = len(chosen) - 2 * f
    return _by_column_blocks(updates, partial(_row_means_closest_to_median, beta=beta), rows=torch.tensor(chosen))


def knorm(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """k-norm: drop the f updates of largest Euclidean norm and average the rest (the norm-filtering baseline of
    the official Ditto code; cf. Sun et al. 2019, "Can you really backdoor federated learning?")."""
    n = updates.shape[0]
    _needs("knorm", n, num_malicious)
    keep = torch.topk(updates.norm(dim=1), n - num_malicious, largest=False).indices
    return updates[keep].mean(dim=0)


def norm_clip(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, inner: str = "mean",
              **inner_options: Any) -> torch.Tensor:
    """Norm clipping (Sun et al. 2019): scale every update down to at most the median norm of the round, then
    aggregate the clipped updates with the registry rule `inner` (with `inner_options`)."""
    norms = updates.norm(dim=1)
    scale = (norms.median() / norms.clamp_min(1e-12)).clamp_max(1.0)
    return AGGREGATORS[inner](updates * scale[:, None].to(updates.dtype), weights, num_malicious, **inner_options)


def geomed(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, max_iter: int = 100,
           eps: float = 1e-6, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median by smoothed Weiszfeld (RFA: Pillutla, Kakade, Harchaoui 2022): z <- sum_i b_i x_i / sum_i b_i
    with b_i = a_i / max(eps, ||z - x_i||), a_i the sample weights, until the weighted objective stops improving by
    more than tol (relative)."""
    alpha = (weights / weights.sum()).to(torch.float64)
    z = (alpha.to(updates.dtype) @ updates)
    objective = math.inf
    for _ in range(max_iter):
        dist = torch.linalg.vector_norm(updates - z, dim=1).to(torch.float64)
        new_objective = float(alpha @ dist)
        if objective - new_objective <= tol * new_objective:
            break
        objective = new_objective
        b = alpha / dist.clamp_min(eps)
        z = (b / b.sum()).to(updates.dtype) @ updates
    return z


def centered_clip(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, tau: float | None = None,
                  iters: int = 3, center: torch.Tensor | None = None) -> torch.Tensor:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021): starting from `center` (the previous round's
    aggregate; zero at first), `iters` times v <- v + mean_i (x_i - v) min(1, tau / ||x_i - v||). tau = null uses
    the median distance of the updates to the starting point."""
    v = torch.zeros(updates.shape[1], dtype=updates.dtype) if center is None else center.to(updates.dtype)
    radius = tau
    for _ in range(iters):
        diff = updates - v
        dist = torch.linalg.vector_norm(diff, dim=1)
        if radius is None:
            radius = float(dist.median())
        scale = (radius / dist.clamp_min(1e-12)).clamp_max(1.0)
        v = v + (scale @ diff) / updates.shape[0]
    return v


AGGREGATORS: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "knorm": knorm,
    "norm_clip": norm_clip,
    "geomed": geomed,
    "centered_clip": centered_clip,
}

# rules that restart from the previous round's aggregate
STATEFUL = {"centered_clip"}


def check_aggregator(options: Mapping[str, Any], clients_per_round: int, num_malicious: int) -> None:
    """Raise ValueError, naming the fix, when the rule cannot run on `clients_per_round` updates with f given."""
    if options["name"] in MIN_UPDATES:
        _needs(options["name"], clients_per_round, num_malicious)


class WithPrevious:
    """A stateful rule, given the previous round's aggregate as its centre; `previous` is checkpointed with the run."""

    def __init__(self, rule: Callable[..., torch.Tensor]) -> None:
        self.rule = rule
        self.previous: torch.Tensor | None = None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, num_malicious: int) -> torch.Tensor:
        self.previous = self.rule(updates, weights, num_malicious, center=self.previous)
        return self.previous


def build_aggregator(options: Mapping[str, Any]) -> Aggregator:
    """The registry rule named by `options["name"]` with its other options bound (`f` is the strategy's, not the
    rule's); a stateful rule is given the previous aggregate as its centre."""
    name = options["name"]
    params = {k: v for k, v in options.items() if k not in ("name", "f")}
    rule = partial(AGGREGATORS[name], **params)
    return WithPrevious(rule) if name in STATEFUL else rule
