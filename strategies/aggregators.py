"""Aggregation rules: pure functions over the stacked updates of one round (ByzFL style).

Every rule takes `updates` (n x d float32/float64 tensor, one row per accepted client update), `weights` (n sample
counts) and `num_malicious` (f, the number of malicious rows the rule should tolerate) and returns the aggregated
update (d,), never changing `updates`. Krum, Multi-Krum and Bulyan select exactly the rows brute-force float64
distances select, the first on a tie (strategies/distances.py); coordinate-wise order statistics partition
cache-sized transposed copies of column blocks (no full sort, no copy of the stack), so peak extra memory stays
within a few copies of the stack. A stack no rule can aggregate (empty, not 2-D, not float32/float64, NaN or
infinite entries, f < 0) or one the rule cannot run on raises ValueError naming the problem; `check_aggregator`
checks a configuration before any round runs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from strategies import kernels
from strategies.distances import bulyan_select, check_stack, krum_select

_LOG = logging.getLogger(__name__)
_GEOMED_BLOCK = 4096  # columns per float64 block in geomed: a block of the stack stays in cache


def _check_weights(updates: torch.Tensor, weights: torch.Tensor, rule: str) -> None:
    if (
        weights.shape != (updates.shape[0],)
        or not bool(torch.isfinite(weights).all())
        or bool((weights < 0).any())
        or not float(weights.sum()) > 0
    ):
        raise ValueError(
            f"{rule} needs one finite weight >= 0 per update, not all zero (got {weights.tolist()} for "
            f"{updates.shape[0]} updates)"
        )


def mean(
    updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, weighted: bool = False
) -> torch.Tensor:
    """Mean of the updates; weighted by sample count (FedAvg, McMahan et al. 2017) or uniform (official Ditto code)."""
    check_stack(updates, num_malicious, "mean")
    if not weighted:
        return updates.mean(dim=0)
    _check_weights(updates, weights, "mean")
    w = weights.to(updates.dtype)
    return (w / w.sum()) @ updates


_BLOCK_BYTES = 4 << 20  # a transposed column block of about 4 MiB stays in cache
_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))  # numpy's partition releases the GIL


def _by_column_blocks(
    x: torch.Tensor, reduce: Callable[[np.ndarray], np.ndarray], rows: torch.Tensor | None = None
) -> torch.Tensor:
    """One value per coordinate: `reduce` maps a C-contiguous (columns x rows) copy of a block of x[rows] (rows=None:
    all), which it may reorder in place, to one value per column. Cache-sized blocks, in parallel, so the extra memory
    is a few blocks, never a copy of the stack; the caller's stack is never reordered."""
    a = x.detach().cpu().numpy()
    picked = None if rows is None else rows.cpu().numpy()
    out = np.empty(a.shape[1], dtype=a.dtype)
    rows_bytes = (a.shape[0] if picked is None else len(picked)) * a.itemsize
    # at least 16 blocks, so that the blocks in flight stay small next to a small stack
    width = max(256, min(_BLOCK_BYTES // rows_bytes, -(-a.shape[1] // 16)))

    def work(start: int) -> None:
        # a C-contiguous transposed copy: np.partition on the strided view would copy in the view's (column) order
        # and then select along a stride of `width` elements, about 2x slower. Always a copy: where the transposed
        # view is already contiguous (d = 1), np.ascontiguousarray would hand `reduce` the caller's own rows
        cols = a[:, start : start + width] if picked is None else a[picked, start : start + width]
        out[start : start + width] = reduce(np.array(cols.T, order="C"))

    list(_POOL.map(work, range(0, a.shape[1], width)))
    return torch.from_numpy(out).to(x.device)


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


def _min_reach_windows(
    ordered: np.ndarray, med: np.ndarray, beta: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(smallest reach, first and last window start of that reach) per row, over the windows starting in lo..hi."""
    reach = np.maximum(
        np.abs(ordered[:, lo : hi + 1] - med[:, None]), np.abs(ordered[:, lo + beta - 1 : hi + beta] - med[:, None])
    )
    return reach.min(axis=1), lo + reach.argmin(axis=1), hi - reach[:, ::-1].argmin(axis=1)


def _row_means_closest_to_median(block: np.ndarray, beta: int) -> np.ndarray:
    """Per row, the mean of the `beta` values closest to the row's median, the first (in column order) on a tie.

    Distances to the median fall then rise along the sorted row, so the beta closest values are the window of the
    sorted row with the smallest reach (its farther end); one sort replaces a partition and a ranking of distances.
    Reach never rises while a window moves towards the median positions and never falls once it has passed them,
    so only the windows holding a median position (beta + 1 of the n - beta + 1) are searched; a row whose window
    just outside them reaches as little (equal values) is searched in full. Where the first and the last window of
    that reach hold different values (m - r and m + r tie for the last place), the row is ranked by a stable sort of
    its distances instead, as the definition asks. The mean sums the window one value after another in sorted order,
    in float64, as `kernels.bulyan_coordinates` does, so both give the same numbers."""
    ordered = np.sort(block, axis=1)
    n = ordered.shape[1]
    k = n // 2
    med = ordered[:, k] if n % 2 else (ordered[:, k - 1] + ordered[:, k]) / 2
    last_start = n - beta
    lo, hi = max(0, k - beta + n % 2), min(k, last_start)  # windows holding position k (odd n), k - 1 or k (even)
    outer_lo, outer_hi = max(0, lo - 1), min(last_start, hi + 1)
    best, first, last = _min_reach_windows(ordered, med, beta, lo, hi)
    spill = np.zeros(len(ordered), dtype=bool)
    for start in {outer_lo, outer_hi} - {lo, hi}:
        spill |= _min_reach_windows(ordered, med, beta, start, start)[0] == best
    spilled = np.nonzero(spill)[0]
    if len(spilled):
        _, first[spilled], last[spilled] = _min_reach_windows(ordered[spilled], med[spilled], beta, 0, last_start)
    rows = np.arange(len(ordered))
    window = np.take_along_axis(ordered, first[:, None] + np.arange(beta), axis=1)
    out = np.cumsum(window, axis=1, dtype=np.float64)[:, -1] / beta  # summed in sorted order, as the kernel does
    tied = np.nonzero((first != last) & (ordered[rows, first] != ordered[rows, last + beta - 1]))[0]
    if len(tied):
        closest = np.argsort(np.abs(block[tied] - med[tied, None]), axis=1, kind="stable")[:, :beta]
        out[tied] = np.take_along_axis(block[tied], closest, axis=1).mean(axis=1, dtype=np.float64)
    return out


def median(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Coordinate-wise median (Yin et al., ICML 2018, "Byzantine-robust distributed learning"); with an even number of
    updates, the mean of the two middle values (as numpy and Flower)."""
    check_stack(updates, num_malicious, "median")
    return _by_column_blocks(updates, _row_medians)


def trimmed_mean(
    updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, beta: float = 0.1, trim: str = "beta"
) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the k smallest and the k largest
    values and average the rest. trim="beta" (the default, as before): k = floor(beta n), as scipy.stats.trim_mean
    and Flower's aggregate_trimmed_avg; trim="f": k = f, the trimmed fraction tied to the number of malicious
    updates, as the robust-aggregation literature sets it (Yin et al. need beta >= f / n; ByzFL's TrMean trims f)."""
    check_stack(updates, num_malicious, "trimmed_mean")
    n = updates.shape[0]
    if trim == "beta":
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5 (got beta={beta}): beta >= 0.5 trims every update")
        k = int(beta * n)
    elif trim == "f":
        k = num_malicious
        if n - 2 * k < 1:
            raise ValueError(
                f"trimmed_mean with trim=f needs n >= 2f + 1 (got n={n} updates, f={k}): lower "
                f"aggregator.f or sample more clients (clients_per_round >= {2 * k + 1})"
            )
    else:
        raise ValueError(
            f"trimmed_mean: trim must be 'beta' (floor(beta n) per side) or 'f' (f per side), got {trim!r}"
        )
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
        raise ValueError(
            f"{rule} needs {condition} (got n={n} updates, f={f}): lower aggregator.f or sample more "
            f"clients (clients_per_round >= {need(f)})"
        )


def krum(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Krum (Blanchard et al., NeurIPS 2017): the update whose n - f - 2 nearest neighbours (itself excluded) are
    closest in summed squared distance (the first on a tie). Its guarantee assumes n >= 2f + 3; like the official
    Ditto code it runs whenever there is a neighbour to count (n >= f + 3). The choice is the one exact float64
    distances give, whatever the rows' magnitudes (`krum_select`)."""
    check_stack(updates, num_malicious, "krum")
    _needs("krum", updates.shape[0], num_malicious)
    return updates[int(krum_select(updates, num_malicious, 1)[0])].clone()


def multikrum(
    updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, m: int | None = None
) -> torch.Tensor:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the unweighted mean of the m updates with the best Krum scores
    (m = n - f when null). Runs when n >= f + 3, as Krum."""
    check_stack(updates, num_malicious, "multikrum")
    _needs("multikrum", updates.shape[0], num_malicious)
    n = updates.shape[0]
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"multikrum needs m to be null (n - f) or an integer >= 1 (got {m!r})")
    keep = n - num_malicious if m is None else min(m, n)
    share = torch.zeros(n, dtype=updates.dtype, device=updates.device)
    share[krum_select(updates, num_malicious, keep)] = 1.0 / keep
    return share @ updates  # the mean of the chosen rows without copying them out of the stack


def bulyan(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018): select theta = n - 2f updates by Krum repeatedly (each time on the
    remaining ones, removing the one chosen), then per coordinate average the beta = theta - 2f selected values
    closest to the selected values' median. Requires n >= 4f + 3."""
    n, f = updates.shape[0], num_malicious
    check_stack(updates, f, "bulyan")
    _needs("bulyan", n, f)
    if f == 0:
        return updates.mean(dim=0)  # theta = n: every update is selected, none is trimmed
    chosen = bulyan_select(updates, f, n - 2 * f)
    return _bulyan_coordinates(updates, chosen, len(chosen) - 2 * f)


def _bulyan_coordinates(x: torch.Tensor, chosen: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the `beta` values of x[chosen] closest to their median: the compiled sorting
    network (`kernels.bulyan_coordinates`, a few times faster) where it is available, numpy's sort otherwise; the
    columns where the kernel finds a tie at the window's far end go to the numpy path, which ranks them."""
    a = x.detach().cpu().numpy()
    if kernels.library() is None or not a.flags.c_contiguous:
        return _by_column_blocks(x, partial(_row_means_closest_to_median, beta=beta), rows=chosen)
    rows = chosen.cpu().numpy()
    out = np.empty(a.shape[1], dtype=a.dtype)
    width = max(4096, -(-a.shape[1] // 16))  # at least 16 ranges for the pool; the kernel streams each range

    def work(start: int) -> None:
        end = min(start + width, a.shape[1])
        means, tied = kernels.bulyan_coordinates(a, rows, beta, start, end)
        out[start:end] = means
        cols = start + np.nonzero(tied)[0]
        if len(cols):
            out[cols] = _row_means_closest_to_median(np.array(a[np.ix_(rows, cols)].T, order="C"), beta)

    list(_POOL.map(work, range(0, a.shape[1], width)))
    return torch.from_numpy(out).to(x.device)


def knorm(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """k-norm: drop the f updates of largest Euclidean norm and average the rest (the norm-filtering baseline of
    the official Ditto code; cf. Sun et al. 2019, "Can you really backdoor federated learning?"). Norms in float64;
    of equal norms the first rows are kept."""
    check_stack(updates, num_malicious, "knorm")
    _needs("knorm", updates.shape[0], num_malicious)
    n = updates.shape[0]
    norms = _distances_to(updates, torch.zeros(updates.shape[1], dtype=torch.float64, device=updates.device))
    share = torch.zeros(n, dtype=updates.dtype, device=updates.device)
    share[torch.argsort(norms, stable=True)[: n - num_malicious]] = 1.0 / (n - num_malicious)
    return share @ updates  # the mean of the kept rows without copying them out of the stack


def norm_clip(
    updates: torch.Tensor,
    weights: torch.Tensor,
    num_malicious: int = 0,
    *,
    inner: str = "mean",
    radius: str = "median",
    **inner_options: Any,
) -> torch.Tensor:
    """Norm clipping (Sun et al. 2019): scale every update down to at most the round's median norm, then aggregate
    the clipped updates with the registry rule `inner` (with `inner_options`). With an even number of updates the
    median is a convention: radius="median" (the default: the mean of the two middle norms, as the official Ditto
    code's `l2_clip`, np.median in litian96/ditto flearn/utils/tf_utils.py) or "lower_median" (torch.median, the
    lower of the two middle norms, this project's rule before)."""
    check_stack(updates, num_malicious, "norm_clip")
    norms = updates.norm(dim=1)
    if radius == "lower_median":
        clip = norms.median()
    elif radius == "median":
        clip = norms.double().quantile(0.5).to(norms.dtype)
    else:
        raise ValueError(f"norm_clip: radius must be 'lower_median' or 'median', got {radius!r}")
    scale = (clip / norms.clamp_min(1e-12)).clamp_max(1.0)
    return AGGREGATORS[inner](updates * scale[:, None].to(updates.dtype), weights, num_malicious, **inner_options)


def weiszfeld(
    updates: torch.Tensor, weights: torch.Tensor, *, max_iter: int = 1000, eps: float = 1e-8, tol: float = 1e-6
) -> tuple[torch.Tensor, int, float]:
    """(geometric median z, iterations used, certified relative gap) by smoothed Weiszfeld in float64:
    z <- sum_i b_i x_i / sum_i b_i, b_i = a_i / max(eps, ||z - x_i||), a_i the normalised weights, until the duality
    gap of the objective F(z) = sum_i a_i ||z - x_i|| is at most tol F(z).

    The gap is a proof, not a stall test. Any u_i with |u_i| <= a_i and g = sum_i u_i give the dual feasible
    v_i = (u_i - a_i g) / (1 + |g|) (|v_i| <= a_i, sum_i v_i = 0), hence F* >= sum_i v_i . (z - x_i)
    = (sum_i u_i . (z - x_i) - g . (z - xbar)) / (1 + |g|), xbar the weighted mean. Far rows take
    u_i = a_i (z - x_i) / ||z - x_i||; rows within eps of z (z sits on a data point, as the median in 1-D) share
    the job of cancelling the far rows' sum g_far: u_i = -a_i g_far / max(A_near, |g_far|)."""
    x = updates
    a = (weights / weights.sum()).to(torch.float64)
    mean = _weighted_rows(x, a[None, :])[0]
    z = mean
    gap = math.inf
    for iteration in range(1, max_iter + 1):
        dist = _distances_to(x, z)
        objective = float(a @ dist)
        far = dist > eps
        w = torch.where(far, a / dist.clamp_min(eps), 0.0)
        b = a / dist.clamp_min(eps)
        sums = _weighted_rows(x, torch.stack([w, b]))
        g = w.sum() * z - sums[0]
        inner = float(a[far] @ dist[far])
        near = torch.nonzero(~far).flatten()
        if len(near):
            share = float(a[near].sum())
            scale = max(share, float(g.norm()))
            inner -= float(a[near] @ ((z - x[near].to(torch.float64)) @ g)) / scale
            g = g * (1 - share / scale)
        lower = (inner - float(g @ (z - mean))) / (1 + float(g.norm()))
        gap = max(objective - lower, 0.0)
        if gap <= tol * objective:
            return z, iteration, gap / objective if objective > 0 else 0.0
        z = sums[1] / b.sum()
    return z, max_iter, gap / objective if objective > 0 else 0.0


def _weighted_rows(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """coefficients (k x n, float64) @ x in float64, one column block at a time (no float64 copy of the stack)."""
    out = torch.empty(coefficients.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], _GEOMED_BLOCK):
        out[:, start : start + _GEOMED_BLOCK] = coefficients @ x[:, start : start + _GEOMED_BLOCK].to(torch.float64)
    return out


def _distances_to(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||x_i - z|| in float64 for every row, one column block at a time."""
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], _GEOMED_BLOCK):
        diff = x[:, start : start + _GEOMED_BLOCK].to(torch.float64) - z[start : start + _GEOMED_BLOCK]
        sq += (diff * diff).sum(dim=1)
    return sq.sqrt()


def geomed(
    updates: torch.Tensor,
    weights: torch.Tensor,
    num_malicious: int = 0,
    *,
    max_iter: int = 1000,
    eps: float = 1e-8,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Geometric median, weighted by sample counts (RFA: Pillutla, Kakade, Harchaoui 2022), by smoothed Weiszfeld
    in float64 until the objective is within tol (relative) of its optimum, certified by a duality gap
    (`weiszfeld`); logs the iterations used, and warns when max_iter ends it first."""
    check_stack(updates, num_malicious, "geomed")
    _check_weights(updates, weights, "geomed")
    z, iterations, gap = weiszfeld(updates, weights, max_iter=max_iter, eps=eps, tol=tol)
    if gap > tol:
        _LOG.warning(
            "geomed: stopped at max_iter=%d with relative gap %.2e > tol=%.1e: raise aggregator.max_iter",
            iterations,
            gap,
            tol,
        )
    else:
        _LOG.info("geomed: relative gap %.2e after %d iterations", gap, iterations)
    return z.to(updates.dtype)


def centered_clip(
    updates: torch.Tensor,
    weights: torch.Tensor,
    num_malicious: int = 0,
    *,
    tau: float | None = None,
    iters: int = 3,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021): starting from `center` (the previous round's
    aggregate; zero at first), `iters` times v <- v + mean_i (x_i - v) min(1, tau / ||x_i - v||). tau = null uses
    the median distance of the updates to the starting point."""
    check_stack(updates, num_malicious, "centered_clip")
    v = (
        torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device)
        if center is None
        else center.to(updates.device, updates.dtype)
    )
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


def check_aggregator(options: Mapping[str, Any], clients_per_round: int, num_malicious: int) -> None:
    """Raise ValueError, naming the fix, when the rule cannot run on `clients_per_round` updates with f given or an
    option has no meaning: the configured rule runs once on a stack of zeros, so its own checks speak."""
    n = clients_per_round
    try:
        build_aggregator(options)(torch.zeros(n, 1), torch.ones(n, dtype=torch.float64), num_malicious)
    except TypeError as err:  # an option the rule does not take
        raise ValueError(f"{options['name']} does not take one of the options {dict(options)}: {err}") from None


class Rule:
    """A registry rule with its options bound, and its state between rounds: none here, so a checkpoint of a run
    with this rule holds no aggregator state (`state` is None)."""

    def __init__(self, rule: Callable[..., torch.Tensor]) -> None:
        self.rule = rule

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, num_malicious: int) -> torch.Tensor:
        return self.rule(updates, weights, num_malicious)

    def state(self) -> np.ndarray | None:
        """What a checkpoint keeps of the rule so that a resumed run aggregates as the uninterrupted one."""
        return None

    def load_state(self, state: np.ndarray | None) -> None:
        if state is not None:
            raise ValueError(
                "the checkpoint holds an aggregator state, but this rule keeps none: resume with the "
                "run's own aggregator"
            )


class FromPrevious(Rule):
    """A rule that restarts from the previous round's aggregate (centered clipping's centre): that aggregate is its
    state, and a checkpoint keeps it."""

    def __init__(self, rule: Callable[..., torch.Tensor]) -> None:
        super().__init__(rule)
        self.previous: torch.Tensor | None = None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, num_malicious: int) -> torch.Tensor:
        centre = None if self.previous is None else self.previous.to(updates.device)  # a checkpoint's is on the CPU
        self.previous = self.rule(updates, weights, num_malicious, center=centre)
        return self.previous

    def state(self) -> np.ndarray | None:
        return None if self.previous is None else self.previous.cpu().numpy()

    def load_state(self, state: np.ndarray | None) -> None:
        self.previous = None if state is None else torch.from_numpy(np.array(state))


STATEFUL: dict[str, type[Rule]] = {"centered_clip": FromPrevious}  # rules that carry a state from round to round


def build_aggregator(options: Mapping[str, Any]) -> Rule:
    """The registry rule named by `options["name"]` with its other options bound (`f` is the strategy's, not the
    rule's); a stateful rule (`STATEFUL`) carries its state from round to round."""
    name = options["name"]
    params = {k: v for k, v in options.items() if k not in ("name", "f")}
    return STATEFUL.get(name, Rule)(partial(AGGREGATORS[name], **params))
