"""Coordinate-wise rules: the mean, the median and the trimmed mean, and the per-row order statistics that Bulyan's
coordinate step shares. Order statistics partition cache-sized transposed copies of column blocks (no full sort, no
copy of the stack)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from strategies.rules.common import average, by_column_blocks, check_weights
from strategies.rules.distances import check_stack


def mean(
    updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, weighted: bool = False
) -> torch.Tensor:
    """Mean of the updates; weighted by sample count (FedAvg, McMahan et al. 2017) or uniform, summed in float64
    (official Ditto code: `average`)."""
    check_stack(updates, num_malicious, "mean")
    if not weighted:
        return average(updates)
    check_weights(updates, weights, "mean")
    w = weights.to(updates.dtype)
    return (w / w.sum()) @ updates


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
    """Per row, the mean of the values left after dropping the k smallest and the k largest, summed in float64;
    partitions in place. A row whose float64 sum overflows (values near float64's largest) is divided first."""
    n = block.shape[1]
    block.partition([k, n - k - 1], axis=1)
    kept = block[:, k : n - k]
    with np.errstate(over="ignore"):
        means = kept.mean(axis=1, dtype=np.float64)
    over = ~np.isfinite(means)
    if over.any():
        means[over] = (kept[over] / kept.shape[1]).sum(axis=1, dtype=np.float64)
    return means


def _min_reach_windows(
    ordered: np.ndarray, med: np.ndarray, beta: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(smallest reach, first and last window start of that reach) per row, over the windows starting in lo..hi."""
    reach = np.maximum(
        np.abs(ordered[:, lo : hi + 1] - med[:, None]), np.abs(ordered[:, lo + beta - 1 : hi + beta] - med[:, None])
    )
    return reach.min(axis=1), lo + reach.argmin(axis=1), hi - reach[:, ::-1].argmin(axis=1)


def row_means_closest_to_median(block: np.ndarray, beta: int) -> np.ndarray:
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
    return by_column_blocks(updates, _row_medians)


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
        return average(updates)
    return by_column_blocks(updates, partial(_trimmed_row_means, k=k))
