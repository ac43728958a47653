"""Iterative rules: the geometric median by smoothed Weiszfeld with a certified gap, and centered clipping."""

from __future__ import annotations

import logging
import math

import torch

from strategies.rules.common import FLOAT64_BLOCK, check_weights, distances_to
from strategies.rules.distances import check_stack

_LOG = logging.getLogger(__name__)
HUGE = 2.0**500  # geomed: beyond this, squared distances and Weiszfeld's weighted sums could overflow float64


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
        dist = distances_to(x, z)
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
    for start in range(0, x.shape[1], FLOAT64_BLOCK):
        out[:, start : start + FLOAT64_BLOCK] = coefficients @ x[:, start : start + FLOAT64_BLOCK].to(torch.float64)
    return out


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
    (`weiszfeld`); logs the iterations used, and warns when max_iter ends it first. A float64 stack with entries
    beyond HUGE is solved divided by a power of two (exact; `eps` then applies to the divided rows) and multiplied
    back, so no square or weighted sum overflows."""
    check_stack(updates, num_malicious, "geomed")
    check_weights(updates, weights, "geomed")
    largest = float(updates.abs().max())
    scale = 2.0 ** (math.frexp(largest)[1] - 2) if largest > HUGE else 1.0  # entries then below 4
    z, iterations, gap = weiszfeld(
        updates / scale if scale > 1 else updates, weights, max_iter=max_iter, eps=eps, tol=tol
    )
    z = z * scale
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
