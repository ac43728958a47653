"""Pairwise squared distances between updates, and the Krum selections that rank them.

Two ways to the n x n distances of an n x d stack, both through the Gram matrix (no loop over pairs):

- `pairwise_sq_distances`: exact to float64 rounding. Per block of columns it centres a float64 copy of the block
  and adds its Gram product, so there is never an n x d float64 copy of the stack.
- `_float32_bounds`: a float32 Gram matrix (about 2x faster than float64 GEMM on CPU) with a proved bound on the
  error of every distance. A float32 dot product of c terms, summed in any order, is within
  gamma_c = c u / (1 - c u) of sum |a_k b_k| (u = 2^-24; Higham, "Accuracy and Stability of Numerical Algorithms",
  sec. 3.1). Products are taken over chunks of c = 64 columns and summed in float64, so the bound uses
  gamma_64 = 3.8e-6 instead of gamma_d (a distance is then known to about 1e-5 of itself for unrelated rows).

`krum_select` ranks the Krum scores with the bounds and computes exact float64 distances only for the rows whose
rank the bounds leave open. Its selection is the one exact float64 distances give, at about the float32 cost when
the scores are not tied to within about 1e-5.
"""

from __future__ import annotations

import math

import torch

_GRAM_COLUMNS = 4096  # columns per float64 block: n x 4096 doubles stay in cache
_CHUNK = 64  # float32 products are summed over at most this many terms before float64 takes over
_CHUNKS_PER_BLOCK = 64  # chunks centred and multiplied per batched product (n x 4096 floats)
_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53


def _centred_gram_rows(x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G[rows, :], squared norms of every row) of the rows centred per coordinate, in float64, one column block at
    a time; rows=None is all of them."""
    n = x.shape[0]
    gram = torch.zeros(n if rows is None else len(rows), n, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    for start in range(0, x.shape[1], _GRAM_COLUMNS):
        block = x[:, start : start + _GRAM_COLUMNS].to(torch.float64, copy=True)  # never centre the caller's rows
        block -= block.mean(dim=0)
        gram.addmm_(block if rows is None else block[rows], block.T)
        sq += (block * block).sum(dim=1)
    return gram, sq


def _exact_rows(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances from `rows` (None: all) to every row, float64; a row's distance to itself is 0."""
    gram, sq = _centred_gram_rows(x, rows)
    own = torch.arange(x.shape[0]) if rows is None else rows
    # GEMM need not give G_ij and G_ji the same rounding (MKL's edge tiles do not); average them so that d_ij == d_ji
    # bit for bit and a tie that symmetry makes (two mutual nearest neighbours, when Krum counts one) stays a tie
    among = gram[:, own]
    gram[:, own] = (among + among.T) / 2
    dist = (sq[own, None] + sq[None, :] - 2 * gram).clamp_min_(0.0)
    dist[torch.arange(len(own)), own] = 0.0
    return dist


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """n x n squared Euclidean distances between rows, from the Gram matrix of the centred rows (float64)."""
    return _exact_rows(x)


def krum_scores(dist: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Krum score of each row of `dist` (rows x n, each row's own entry its smallest): the sum of squared distances
    to its n - f - 2 nearest other rows."""
    n = dist.shape[1]
    k = min(max(1, n - num_malicious - 2), n - 1)  # at least one neighbour, as Flower (matters inside Bulyan)
    nearest = torch.topk(dist, k + 1, dim=1, largest=False).values  # includes the row itself
    return nearest[:, 1:].sum(dim=1)


def _float32_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lower, upper) float64 n x n bounds on the exact squared distances between the rows of a float32 stack, each
    row's own entry -inf; None where the float32 route does not apply (another dtype, reduced-precision matmul, an
    overflow), and then the caller computes exact distances.

    Let y = x - mu exactly and y~ = fl(x - mu) its float32 rounding, |y~ - y| <= u |y| per entry, so the
    difference of two rows moves by at most e = u' (|y~_i| + |y~_j|) in norm (u' = u / (1 - u)). The computed
    D~ = G~_ii + G~_jj - 2 G~_ij is within E1 = (gamma_c + eps) s^2 of |y~_i - y~_j|^2, s = |y~_i| + |y~_j|, by
    Cauchy-Schwarz on the per-chunk bounds (eps covers the float64 sums); and | |a~|^2 - |a|^2 | <= e (2 |a~| + e).
    """
    if x.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return None
    n, d = x.shape
    centre = x.mean(dim=0)  # any centre gives the same distances; the mean keeps the rows, hence the bound, small
    gram = torch.zeros(n, n, dtype=torch.float64)
    width = _CHUNK * _CHUNKS_PER_BLOCK
    for start in range(0, d, width):
        y = x[:, start : start + width] - centre[start : start + width]
        full = y.shape[1] // _CHUNK * _CHUNK
        if full:
            chunks = y[:, :full].view(n, -1, _CHUNK).transpose(0, 1)  # (chunks, n, c), no copy
            gram += torch.bmm(chunks, chunks.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
        if full < y.shape[1]:
            rest = y[:, full:]
            gram += (rest @ rest.T).double()
    if not bool(torch.isfinite(gram).all()):
        return None
    gamma = _CHUNK * _U32 / (1 - _CHUNK * _U32)
    sums = -(-d // _CHUNK) + -(-d // width) + 4  # float64 additions on any path, and the 3 operations of D~
    eps = sums * _U64 / (1 - sums * _U64)
    norms = (gram.diagonal().clamp_min(0.0) / (1 - gamma - eps)).sqrt()  # upper bounds on |y~_i|
    s = norms[:, None] + norms[None, :]
    approx = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    e1 = (gamma + eps) * s * s
    tiny = 2.0**-126  # the absolute error of a float32 result that underflows (flushed or not)
    e = _U32 / (1 - _U32) * s + 2 * math.sqrt(d) * tiny
    bound = (e1 + e * (2 * (approx.clamp_min(0.0) + e1).sqrt() + e)) * (1 + 1e-9) + 4 * d * tiny
    lower, upper = (approx - bound).clamp_min_(0.0), approx + bound
    lower.fill_diagonal_(-math.inf)
    upper.fill_diagonal_(-math.inf)
    return lower, upper


def krum_select(x: torch.Tensor, num_malicious: int, keep: int) -> torch.Tensor:
    """Indices of the `keep` rows with the smallest Krum scores computed from exact float64 distances (keep=1:
    Krum's choice, the first row on a tie). Rows whose rank the float32 bounds settle are never recomputed."""
    bounds = _float32_bounds(x)
    if bounds is None:
        scores = krum_scores(_exact_rows(x), num_malicious)
        return torch.topk(scores, keep, largest=False).indices if keep > 1 else torch.argmin(scores).reshape(1)
    low, high = (krum_scores(b, num_malicious) for b in bounds)
    # certainly among the best `keep`: fewer than `keep` other rows can score as low; certainly out: `keep` rows
    # score strictly lower whatever the exact values are
    others_as_low = (low[None, :] <= high[:, None]).sum(dim=1) - 1
    certainly_in = others_as_low < keep
    certainly_out = (high[None, :] < low[:, None]).sum(dim=1) >= keep
    open_rows = torch.nonzero(~certainly_in & ~certainly_out).flatten()
    chosen = torch.nonzero(certainly_in).flatten()
    slots = keep - len(chosen)
    if slots > 0:
        exact = krum_scores(_exact_rows(x, open_rows), num_malicious)
        if slots == 1:
            best = torch.argmin(exact).reshape(1)  # first of equal minima, as argmin over all rows
        else:
            best = torch.topk(exact, slots, largest=False).indices
        chosen = torch.cat([chosen, open_rows[best]])
    return chosen
