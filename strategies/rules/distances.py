"""Krum selections that equal the brute-force float64 ones whatever the rows' magnitudes, at about the cost of one
float32 Gram product.

Squared distances are known as intervals [lower, upper] per pair, tightened row by row only where a selection needs
it, in three levels:

1. float32 stacks: a float32 Gram matrix of the rows minus a centre whose products are summed a few at a time in
   float32 and then in float64, with a proved error bound. A float32 dot product of c terms, summed in any order, is
   within gamma_c = c u / (1 - c u) of sum |a_k b_k| (u = 2^-24; Higham, "Accuracy and Stability of Numerical
   Algorithms", sec. 3.1), so gamma_c rather than gamma_d bounds every distance: c = 32 with the compiled kernel
   (`kernels.gram_f32`: the symmetric half, 0.7x the time of torch's GEMM), c = `_CHUNK` with torch's batched GEMMs
   over column chunks (about 1.2x) where no compiler is available or the stack is on a GPU.
2. rows left open: their Gram rows in float64 against every row (gamma_d with u = 2^-53), all of them in one pass
   over the stack (`kernels.gram_rows`, or torch's GEMM over float64 copies of column blocks). float64 stacks (and
   float32 ones whose squares overflow) start here instead with a float64 Gram matrix (`kernels.gram_f64`, or
   torch's).
3. rows still open (exact ties, clusters of huge rows): direct differences sum_k (x_ik - x_jk)^2 in float64, the
   brute-force value, summed in a fixed order.

The bounds are relative to the centred rows' norms, so the centre decides how tight they are: the column mean, which
a few huge rows drag far from the benign ones, would leave every benign distance in rounding noise. The centre here
is the mean of the rows that look most benign (best Krum scores) on a sample of columns, or zero when centring would
not shrink those rows (`_centre`). A bad centre costs time, never the result: the rows it leaves open go to levels 2
and 3. A row is settled once its Krum score's interval puts it certainly in or certainly out of the selection.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from strategies.rules import kernels

_CHUNK = 256  # float32 products are summed over at most this many terms before float64 takes over
_BLOCK = 8192  # columns per block: its float64 copy (level 2) stays in the L3 cache; fewer, larger batched products
_DIRECT_WIDTH = 2048  # columns per block of direct differences: fixed, so that every call sums in the same order
_SAMPLE_WINDOWS, _SAMPLE_WIDTH = 16, 64  # columns that choose the centre: 16 windows of 64, spread over the stack
_U32, _U64 = 2.0**-24, 2.0**-53  # unit roundoffs
_TINY32, _TINY64 = 2.0**-126, 2.0**-1022  # absolute error of a result that underflows (flushed or not)


def check_stack(updates: torch.Tensor, num_malicious: int, rule: str) -> None:
    """Raise ValueError naming the problem for a stack no rule can aggregate: not an n x d float32/float64 tensor
    with n, d >= 1, a NaN or infinite entry, or f < 0."""
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates).__name__
        raise ValueError(
            f"{rule} needs an n x d tensor of updates, one row per client (got {shape}): stack the "
            "flattened updates with torch.stack"
        )
    if updates.shape[0] == 0 or updates.shape[1] == 0:
        raise ValueError(
            f"{rule} needs at least one update of at least one coordinate (got shape {tuple(updates.shape)})"
        )
    if updates.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{rule} needs float32 or float64 updates (got {updates.dtype}): convert with "
            ".float() or .double(); reduced-precision and integer stacks are not aggregated as they are"
        )
    low, high = torch.aminmax(updates.detach())  # NaN propagates; one pass, 30x cheaper than isfinite(updates).all()
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise ValueError(
            f"{rule} got a NaN or infinite entry in the updates (rows "
            f"{torch.nonzero(~torch.isfinite(updates).all(dim=1)).flatten().tolist()}): reject "
            "those updates before aggregating"
        )
    if isinstance(num_malicious, bool) or not isinstance(num_malicious, int) or num_malicious < 0:
        raise ValueError(f"{rule} needs f (num_malicious) to be an integer >= 0 (got {num_malicious!r})")


def krum_scores(dist: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of each row of `dist` (rows x n, each row's own entry its smallest): the sum of squared distances
    to its n - f - 2 nearest other rows, the sorted values summed by torch, as the brute-force reference sums them
    (where huge rows make exact scores unrepresentable, the order of the sum decides near-ties). numpy sorts: on
    the small matrices of the selection loop it is 2-3x faster than torch's topk, per call."""
    n = dist.shape[1]
    k = min(max(1, n - num_malicious - 2), n - 1)  # at least one neighbour, as Flower (matters inside Bulyan)
    nearest = torch.from_numpy(np.sort(dist, axis=1))[:, 1 : k + 1]  # the row itself sorts first
    return nearest.sum(dim=1).numpy()


def direct_sq_distances(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances from `rows` (None: all) to every row by direct differences in float64: the brute-force
    value, summed in the same order whatever `rows` is, so d_ij and d_ji agree bit for bit."""
    x = x.detach()  # the numpy views below cannot hold a graph; distances are never differentiated
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    if _compiled(x):
        return torch.from_numpy(kernels.direct_rows(x.numpy(), rows.numpy()))  # one pass, no float64 copies
    n = x.shape[0]
    out = torch.zeros(len(rows), n, dtype=torch.float64, device=x.device)
    group = max(1, (1 << 20) // (n * _DIRECT_WIDTH))  # rows per (group, n, width) difference: about 8 MB
    for start in range(0, x.shape[1], _DIRECT_WIDTH):
        block = x[:, start : start + _DIRECT_WIDTH].to(torch.float64)
        for first in range(0, len(rows), group):
            diff = block[None, :, :] - block[rows[first : first + group], None, :]
            out[first : first + group] += (diff * diff).sum(dim=2)
    return out


def _centre(x: torch.Tensor, num_malicious: int) -> torch.Tensor | None:
    """The rows whose mean is a point near the benign rows: the (up to 8) rows with the best Krum scores on a sample
    of the columns; None (centre on zero) where their mean would not shrink those rows' norms by half."""
    n, d = x.shape
    if d <= _SAMPLE_WINDOWS * _SAMPLE_WIDTH:
        sample = x.to(torch.float64)
    else:
        starts = torch.linspace(0, d - _SAMPLE_WIDTH, _SAMPLE_WINDOWS).long().tolist()
        sample = torch.cat([x[:, s : s + _SAMPLE_WIDTH] for s in starts], dim=1).to(torch.float64)
    sample = sample - sample.median(dim=0).values  # a heuristic: float64 Gram distances suffice
    gram = sample @ sample.T
    dist = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).fill_diagonal_(-math.inf)
    scores = krum_scores(dist.cpu().numpy(), num_malicious)
    benign = torch.from_numpy(np.argsort(scores, kind="stable")[: max(1, min(8, n - 2 * num_malicious))])
    benign = benign.to(x.device)
    rows = sample[benign]
    return benign if float(((rows - rows.mean(dim=0)) ** 2).sum()) <= 0.5 * float((rows**2).sum()) else None


def _centred(
    x: torch.Tensor, start: int, benign: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Columns start : start + _BLOCK of the stack in `dtype`, minus the mean of the `benign` rows over them (in the
    stack's precision, so that every block of a stack is centred on the same representable point). `out` (n x
    _BLOCK of `dtype`) is reused for a copy rather than a fresh allocation per block (page faults on every block)."""
    block = x[:, start : start + _BLOCK]
    if out is not None:
        y = out[:, : block.shape[1]].copy_(block)
    elif benign is None:
        return block.to(dtype)
    else:
        y = block.to(dtype, copy=True)
    if benign is not None:
        y -= block[benign].mean(dim=0).to(dtype)
    return y


def _bounds(
    approx: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, gamma: float, u: float, tiny: float, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) on the exact squared distances from `rows` to every row, given computed Gram rows `approx`
    (rows x n) and squared norms `sq` of the centred rows, each within gamma of sum |y~_ik y~_jk|.

    Let y = x - c exactly and y~ = fl(x - c), |y~ - y| <= u |y| per entry, so the difference of two rows moves by at
    most e = u' (|y~_i| + |y~_j|) in norm (u' = u / (1 - u)). D~ = G~_ii + G~_jj - 2 G~_ij is within
    E1 = gamma s^2 of |y~_i - y~_j|^2, s = |y~_i| + |y~_j| (Cauchy-Schwarz), and | |a~|^2 - |a|^2 | <= e (2 |a~| + e).
    """
    norms = (sq.clamp_min(0.0) / (1 - gamma)).sqrt()  # upper bounds on |y~_i|
    s = norms[rows, None] + norms[None, :]
    dist = sq[rows, None] + sq[None, :] - 2 * approx
    e1 = gamma * s * s
    e = u / (1 - u) * s + 2 * math.sqrt(d) * tiny
    bound = (e1 + e * (2 * (dist.clamp_min(0.0) + e1).sqrt() + e)) * (1 + 1e-9) + 4 * d * tiny
    return (dist - bound).clamp_min_(0.0), dist + bound


def _compiled(x: torch.Tensor, symmetric: int = 0) -> bool:
    """Whether `kernels` can take this stack: on the CPU, contiguous (the C code reads rows d apart), a symmetric
    Gram of `symmetric` rows (0: none) within its memory budget, and a library built."""
    return (
        x.device.type == "cpu" and x.is_contiguous() and kernels.gram_fits(symmetric) and kernels.library() is not None
    )


def _centre_values(x: torch.Tensor, benign: torch.Tensor | None) -> np.ndarray | None:
    """The centre of `_centred` for every column at once, in the stack's dtype (None: zero), for the kernels."""
    return None if benign is None else x[benign].mean(dim=0).numpy()


def _float32_gram(x: torch.Tensor, benign: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(Gram matrix, squared norms, gamma) of fl(x - centre) from float32 products summed in float64 after a few
    terms, or None where the float32 route does not hold (reduced-precision matmul, an overflow). The compiled
    `kernels.gram_f32` sums 32 products per float32 lane (at 0.7x a float32 GEMM's time, bounds 8x tighter);
    torch's batched GEMMs sum chunks of `_CHUNK` columns (about 1.2x)."""
    n, d = x.shape
    if _compiled(x, n):
        gram, sums = kernels.gram_f32(x.numpy(), _centre_values(x, benign), torch.get_num_threads())
        gram, terms, sums = torch.from_numpy(gram), kernels.GRAM_LANE_TERMS, sums + 4  # + 4: D~'s additions
    elif torch.get_float32_matmul_precision() != "highest":
        return None  # products may be rounded to bfloat16: gamma_c would not hold
    else:
        gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for start in range(0, d, _BLOCK):
            y = _centred(x, start, benign, torch.float32)
            full = y.shape[1] // _CHUNK * _CHUNK
            if full:
                chunks = y[:, :full].view(n, -1, _CHUNK).transpose(0, 1)  # (chunks, n, c), no copy
                gram += torch.bmm(chunks, chunks.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
            if full < y.shape[1]:
                rest = y[:, full:]
                gram += (rest @ rest.T).double()
        # float64 additions of the chunks' products (each block is cut into chunks of its own), and D~'s 3
        terms, sums = _CHUNK, sum(-(-min(_BLOCK, d - start) // _CHUNK) for start in range(0, d, _BLOCK)) + 4
    if not bool(torch.isfinite(gram).all()):
        return None
    gamma32, gamma64 = terms * _U32 / (1 - terms * _U32), sums * _U64 / (1 - sums * _U64)
    return gram, gram.diagonal().clone(), gamma32 + gamma64 + gamma32 * gamma64  # (1 + g32)(1 + g64) - 1


def _float64_gram(
    x: torch.Tensor, benign: torch.Tensor | None, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(G[rows, :], squared norms of every row, gamma) of fl(x - centre) in float64 (rows=None: all), one column
    block at a time. Compiled where it can be (`kernels.gram_f64`: symmetric, about half the time of torch's
    float64 GEMM; `kernels.gram_rows`: a few rows in one pass over the stack read as it is, about 0.6x the time
    of float64 copies of its blocks and a GEMM), torch's otherwise."""
    n, d = x.shape
    gamma = (d + 8) * _U64 / (1 - (d + 8) * _U64)  # float64 products and sums of d terms in any order, D~, the norm
    if _compiled(x, n if rows is None else 0):
        centre = _centre_values(x, benign)
        if rows is None:
            gram = torch.from_numpy(kernels.gram_f64(x.numpy(), centre, torch.get_num_threads()))
            return gram, gram.diagonal().clone(), gamma
        gram_rows, sq_rows = kernels.gram_rows(x.numpy(), centre, rows.numpy(), torch.get_num_threads())
        return torch.from_numpy(gram_rows), torch.from_numpy(sq_rows), gamma
    gram = torch.zeros(n if rows is None else len(rows), n, dtype=torch.float64, device=x.device)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device) if rows is not None else None
    buffer = torch.empty(n, min(d, _BLOCK), dtype=torch.float64, device=x.device)
    for start in range(0, d, _BLOCK):
        block = _centred(x, start, benign, torch.float64, buffer)
        gram.addmm_(block if rows is None else block[rows], block.T)
        if sq is not None:  # |y|^2 as a norm squared: a sqrt and a square more than a sum of squares (+ 4)
            sq += torch.linalg.vector_norm(block, dim=1).square_()
    return gram, gram.diagonal().clone() if rows is None else sq, gamma


class _Intervals:
    """Lower and upper bounds on every squared distance of a stack (own entries -inf), tightened row by row."""

    def __init__(self, x: torch.Tensor, num_malicious: int, float32_first: bool = True) -> None:
        self.x = x
        n, d = x.shape
        self.benign = _centre(x, num_malicious)
        everything = torch.arange(n, device=x.device)
        # per row: 0 the first float32 bounds, 1 bounds from float64 Gram rows, 2 exact
        self.level = torch.zeros(n, dtype=torch.long, device=x.device)
        float32 = float32_first and x.dtype == torch.float32
        route = _float32_gram(x, self.benign) if float32 else None
        if route is None:
            gram, sq, gamma = _float64_gram(x, self.benign)
            self.lower, self.upper = _bounds(gram, sq, everything, gamma, _U64, _TINY64, d)
            self.level[:] = 1
        else:
            gram, sq, gamma = route
            self.lower, self.upper = _bounds(gram, sq, everything, gamma, _U32, _TINY32, d)
        self._set_own()

    def _set_own(self) -> None:
        self.lower.fill_diagonal_(-math.inf)
        self.upper.fill_diagonal_(-math.inf)

    def _store(self, rows: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, exact: bool = False) -> None:
        """Bounds on d_ij hold for d_ji: store them in the rows and the columns, intersected with the known ones;
        exact distances replace bounds and are never replaced."""
        if not exact:
            keep = (self.level == 2)[None, :]
            lower = torch.where(keep, self.lower[rows], torch.maximum(self.lower[rows], lower))
            upper = torch.where(keep, self.upper[rows], torch.minimum(self.upper[rows], upper))
        self.lower[rows], self.upper[rows] = lower, upper
        self.lower[:, rows], self.upper[:, rows] = lower.T, upper.T
        self._set_own()

    def tighten(self, rows: torch.Tensor) -> None:
        """Move `rows` one level up: to float64 Gram rows (one pass over the stack for all of them), then to exact
        distances."""
        first, second = rows[self.level[rows] == 0], rows[self.level[rows] == 1]
        if len(first):
            gram, sq, gamma = _float64_gram(self.x, self.benign, first)
            self._store(first, *_bounds(gram, sq, first, gamma, _U64, _TINY64, self.x.shape[1]))
            self.level[first] = 1
        if len(second):
            exact = direct_sq_distances(self.x, second)
            self._store(second, exact, exact, exact=True)
            self.level[second] = 2

    def select(self, num_malicious: int, keep: int, alive: np.ndarray) -> np.ndarray:
        """The `keep` rows of `alive` with the smallest exact Krum scores among `alive`, the first on a tie. On
        the host in numpy: n x n bounds, one selection stage after another (Bulyan: n - 2f of them)."""
        sub = np.ix_(alive, alive)
        while True:
            low = krum_scores(self.lower.cpu().numpy()[sub], num_malicious)
            high = krum_scores(self.upper.cpu().numpy()[sub], num_malicious)
            # certainly among the best `keep`: fewer than `keep` other rows can score as low; certainly out: `keep`
            # rows score strictly lower whatever the exact values are
            certainly_in = (low[None, :] <= high[:, None]).sum(axis=1) - 1 < keep
            certainly_out = (high[None, :] < low[:, None]).sum(axis=1) >= keep
            open_rows = np.nonzero(~certainly_in & ~certainly_out)[0]
            chosen = alive[certainly_in]
            if len(chosen) == keep:
                return chosen
            loose = open_rows[self.level.cpu().numpy()[alive[open_rows]] < 2]
            if len(loose) == 0:  # every open row's score is exact: rank them, the first row on a tie
                order = np.argsort(low[open_rows], kind="stable")[: keep - len(chosen)]
                return np.concatenate([chosen, alive[open_rows[order]]])
            self.tighten(torch.from_numpy(alive[loose]).to(self.x.device))


def krum_select(x: torch.Tensor, num_malicious: int, keep: int) -> torch.Tensor:
    """Indices of the `keep` rows with the smallest Krum scores from exact float64 distances (keep=1: Krum's
    choice, the first row on a tie); bounds settle every row they can, the rest is computed exactly."""
    chosen = _Intervals(x.detach(), num_malicious).select(num_malicious, keep, np.arange(x.shape[0]))
    return torch.from_numpy(chosen).to(x.device)


def bulyan_select(x: torch.Tensor, num_malicious: int, count: int) -> torch.Tensor:
    """Bulyan's selection: `count` times the Krum choice among the rows not chosen yet (exact, the first on a tie).
    Its n - 2f successive choices each need a clear winner, which float32 bounds leave open on about one stage in
    three (a pass over the stack each): the float64 Gram matrix, one pass, settles nearly all of them at once."""
    intervals = _Intervals(x.detach(), num_malicious, float32_first=False)
    alive = np.arange(x.shape[0])
    chosen = []
    for _ in range(count):
        best = int(intervals.select(num_malicious, 1, alive)[0])
        chosen.append(best)
        alive = alive[alive != best]
    return torch.tensor(chosen, device=x.device)
