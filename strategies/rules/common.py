"""What the rules share: the checks of a stack's weights and of a rule's minimum number of updates, coordinate
work over cache-sized column blocks, and float64 distances to a point one block at a time."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

FLOAT64_BLOCK = 4096  # columns per float64 block (distances, geomed): a block of the stack stays in cache


def average(x: torch.Tensor) -> torch.Tensor:
    """The unweighted mean of the rows, summed in float64 as the official `simple_average` does (litian96/ditto
    flearn/trainers_global/fedbase.py 158-168) and cast back to the stack's dtype, so a float32 stack of finite rows
    has a finite mean; a float64 stack whose sum overflows is divided before it is summed."""
    mean = x.sum(dim=0, dtype=torch.float64) / x.shape[0]
    if not bool(torch.isfinite(mean).all()):
        mean = (x.to(torch.float64) / x.shape[0]).sum(dim=0)
    return mean.to(x.dtype)


def check_weights(updates: torch.Tensor, weights: torch.Tensor, rule: str) -> None:
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


BLOCK_BYTES = 4 << 20  # a transposed column block of about 4 MiB stays in cache
POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))  # numpy's partition releases the GIL


def by_column_blocks(
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
    width = max(256, min(BLOCK_BYTES // rows_bytes, -(-a.shape[1] // 16)))

    def work(start: int) -> None:
        # a C-contiguous transposed copy: np.partition on the strided view would copy in the view's (column) order
        # and then select along a stride of `width` elements, about 2x slower. Always a copy: where the transposed
        # view is already contiguous (d = 1), np.ascontiguousarray would hand `reduce` the caller's own rows
        cols = a[:, start : start + width] if picked is None else a[picked, start : start + width]
        out[start : start + width] = reduce(np.array(cols.T, order="C"))

    list(POOL.map(work, range(0, a.shape[1], width)))
    return torch.from_numpy(out).to(x.device)


# smallest number of updates a rule needs, given f
MIN_UPDATES: dict[str, tuple[Callable[[int], int], str]] = {
    "krum": (lambda f: f + 3, "n >= f + 3"),
    "multikrum": (lambda f: f + 3, "n >= f + 3"),
    "bulyan": (lambda f: 4 * f + 3, "n >= 4f + 3"),
    "knorm": (lambda f: f + 1, "n >= f + 1"),
}


def needs(rule: str, n: int, f: int) -> None:
    need, condition = MIN_UPDATES[rule]
    if n < need(f):
        raise ValueError(
            f"{rule} needs {condition} (got n={n} updates, f={f}): lower aggregator.f or sample more "
            f"clients (clients_per_round >= {need(f)})"
        )


def distances_to(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||x_i - z|| in float64 for every row, one column block at a time. A row whose sum of squares overflows (entries
    beyond about 1e154) is summed again scaled by a power of two, which is exact, so its distance stays finite
    wherever it is below float64's largest value; every other row keeps the bits of the plain sum."""
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], FLOAT64_BLOCK):
        diff = x[:, start : start + FLOAT64_BLOCK].to(torch.float64) - z[start : start + FLOAT64_BLOCK]
        sq += (diff * diff).sum(dim=1)
    dist = sq.sqrt()
    over = torch.nonzero(torch.isinf(sq)).flatten()
    if len(over):
        dist[over] = _scaled_distances(x[over], z)
    return dist


def _scaled_distances(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||x_i - z|| of rows whose squares overflow: each row divided by the power of two at or above its largest
    entry of x_i - z (exact), summed, and multiplied back."""
    biggest = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], FLOAT64_BLOCK):
        diff = x[:, start : start + FLOAT64_BLOCK].to(torch.float64) - z[start : start + FLOAT64_BLOCK]
        biggest = torch.maximum(biggest, diff.abs().amax(dim=1))
    scale = torch.ldexp(torch.ones_like(biggest), torch.frexp(biggest).exponent)
    sq = torch.zeros_like(biggest)
    for start in range(0, x.shape[1], FLOAT64_BLOCK):
        diff = (x[:, start : start + FLOAT64_BLOCK].to(torch.float64) - z[start : start + FLOAT64_BLOCK]) / scale[
            :, None
        ]
        sq += (diff * diff).sum(dim=1)
    return sq.sqrt() * scale
