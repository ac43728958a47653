"""Aggregation rules: pure functions over the stacked updates of one round (ByzFL style).

Every rule takes `updates` (n x d float tensor, one row per accepted client update), `weights` (n sample counts)
and `num_malicious` (f, the number of malicious rows the rule should tolerate) and returns the aggregated update
(d,). Pairwise distances come from the Gram matrix (no loop over pairs); coordinate-wise order statistics partition
cache-sized transposed column blocks (no full sort, no copy of the stack), so peak extra memory stays within a few
copies of the stack. A rule that cannot
run on the rows it got raises ValueError; `check_aggregator` says so for a configuration before any round runs.
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

Aggregator = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def mean(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, weighted: bool = False) -> torch.Tensor:
    """Mean of the updates; weighted by sample count (FedAvg, McMahan et al. 2017) or uniform (official Ditto code)."""
    if not weighted:
        return updates.mean(dim=0)
    w = weights.to(updates.dtype)
    return (w / w.sum()) @ updates


_BLOCK = 2048  # columns per block: a transposed block of n x 2048 floats stays in cache
_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))  # numpy's partition releases the GIL


def _by_column_blocks(x: torch.Tensor, kth: list[int], reduce: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Per coordinate, partition the n values at the positions `kth` and `reduce` each partitioned (block x n)
    array to one value per column. Works on cache-sized transposed column blocks, in parallel."""
    a = x.detach().cpu().numpy()
    out = np.empty(a.shape[1], dtype=a.dtype)

    def work(start: int) -> None:
        block = np.partition(a[:, start : start + _BLOCK].T, kth, axis=1)
        out[start : start + _BLOCK] = reduce(block)

    list(_POOL.map(work, range(0, a.shape[1], _BLOCK)))
    return torch.from_numpy(out)


def _coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; the mean of the two middle values when n is even (as numpy)."""
    n = x.shape[0]
    k = n // 2
    if n % 2:
        return _by_column_blocks(x, [k], lambda b: b[:, k])
    return _by_column_blocks(x, [k - 1, k], lambda b: (b[:, k - 1] + b[:, k]) / 2)


def median(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Coordinate-wise median (Yin et al., ICML 2018, "Byzantine-robust distributed learning")."""
    return _coordinate_median(updates)


def trimmed_mean(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, beta: float = 0.1) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the floor(beta n) smallest and the
    floor(beta n) largest values and average the rest (as scipy.stats.trim_mean)."""
    n = updates.shape[0]
    k = int(beta * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimmed_mean with beta={beta} trims all of n={n} updates: use beta < 0.5")
    if k == 0:
        return updates.mean(dim=0)
    return _by_column_blocks(updates, [k, n - k - 1], lambda b: b[:, k : n - k].mean(axis=1, dtype=np.float64))


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """n x n squared Euclidean distances between rows, from the Gram matrix of the centred rows (float64)."""
    centred = x.to(torch.float64, copy=True)  # never centre the caller's tensor in place
    centred -= centred.mean(dim=0)
    gram = centred @ centred.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Krum score of each row: the sum of squared distances to its n - f - 2 nearest other rows."""
    n = dist.shape[0]
    k = min(max(1, n - num_malicious - 2), n - 1)  # at least one neighbour, as Flower (matters inside Bulyan)
    nearest = torch.topk(dist, k + 1, dim=1, largest=False).values  # includes the row itself (distance 0)
    return nearest[:, 1:].sum(dim=1)


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
    closest in summed squared distance. Its guarantee assumes n >= 2f + 3; like the official Ditto code it runs
    whenever there is a neighbour to count (n >= f + 3)."""
    _needs("krum", updates.shape[0], num_malicious)
    return updates[int(torch.argmin(krum_scores(pairwise_sq_distances(updates), num_malicious)))].clone()


def multikrum(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, m: int | None = None) -> torch.Tensor:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the unweighted mean of the m updates with the best Krum scores
    (m = n - f when null). Runs when n >= f + 3, as Krum."""
    n = updates.shape[0]
    _needs("multikrum", n, num_malicious)
    keep = n - num_malicious if m is None else min(m, n)
    best = torch.topk(krum_scores(pairwise_sq_distances(updates), num_malicious), keep, largest=False).indices
    return updates[best].mean(dim=0)


def bulyan(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0) -> torch.Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018): select theta = n - 2f updates by Krum repeatedly (each time on the
    remaining ones, removing the one chosen), then per coordinate average the beta = theta - 2f selected values
    closest to the selected values' median. Requires n >= 4f + 3."""
    n, f = updates.shape[0], num_malicious
    _needs("bulyan", n, f)
    dist = pairwise_sq_distances(updates)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        idx = torch.tensor(remaining)
        best = remaining[int(torch.argmin(krum_scores(dist[idx][:, idx], f)))]
        chosen.append(best)
        remaining.remove(best)
    selected = updates[torch.tensor(chosen)]
    theta, beta = len(chosen), len(chosen) - 2 * f
    if beta == theta:
        return selected.mean(dim=0)
    # mean of the beta values closest to the median = (sum of all - sum of the 2f farthest) / beta
    far = torch.topk((selected - _coordinate_median(selected)).abs_(), theta - beta, dim=0).indices
    total = selected.sum(dim=0, dtype=torch.float64) - selected.gather(0, far).sum(dim=0, dtype=torch.float64)
    return (total / beta).to(updates.dtype)


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
