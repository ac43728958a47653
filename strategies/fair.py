"""Fair global solvers as a rescaling of the round's updates by the devices' losses, applied before the aggregator.

Each returns rows whose plain mean is the solver's server step, so with the default (unweighted) `mean` aggregator
the step is exact, and with a robust aggregator the robust rule combines the rescaled updates.
Updates are u_k = w_k - w^t (the device's trained global model minus the one it received); losses are F_k(w^t) on
the device's training data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reweight = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (n x d updates, n losses) -> n x d


def qffl(updates: torch.Tensor, losses: torch.Tensor, q: float, lr: float) -> torch.Tensor:
    """q-FFL's server step (q-FedAvg; Li, Sanjabi, Beirami, Smith, ICLR 2020) with Lipschitz estimate L = 1/lr:
    Dw_k = L (w^t - w_k), D_k = F_k^q Dw_k, h_k = q F_k^(q-1) ||Dw_k||^2 + L F_k^q, w^(t+1) = w^t - sum D_k / sum h_k.
    As rows: n L F_k^q u_k / sum h. q = 0 is the plain mean."""
    L = 1.0 / lr
    f = losses.to(torch.float64).clamp_min(1e-10)  # as the reference code, so F^(q-1) stays finite
    fq = f.pow(q)
    sq_norms = updates.to(torch.float64).pow(2).sum(dim=1) * L * L
    h = q * f.pow(q - 1.0) * sq_norms + L * fq
    scale = updates.shape[0] * L * fq / h.sum()
    return updates * scale.to(updates.dtype)[:, None]


def tilted(updates: torch.Tensor, losses: torch.Tensor, q: float) -> torch.Tensor:
    """The official Ditto code's `q` option: the updates averaged with weights exp(q * F_k), i.e. exponential
    tilting (Li, Beirami, Sanjabi, Smith, ICLR 2021). As rows: n softmax(q F)_k u_k. q = 0 is the plain mean."""
    weights = torch.softmax(q * losses.to(torch.float64), dim=0)
    return updates * (updates.shape[0] * weights).to(updates.dtype)[:, None]
