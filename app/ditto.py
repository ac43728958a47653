"""The Ditto round on one device, in plain PyTorch (no Flower), as the official code does it.

Per local step, on ONE mini-batch b:
    personal: v <- v - lr * (grad F(v; b) + lam * (v - w^t))     (w^t: the global model received this round, fixed)
    global:   w <- w - lr * grad F(w; b)                           (w starts at w^t)
Plain SGD with one learning rate for both. lam = 0 is local training; a large lam keeps v near w^t.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# method name -> whether the device keeps a personal model
METHODS: dict[str, bool] = {"ditto": True, "global": False}


def sgd_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: LossFn,
    prox_center: Sequence[torch.Tensor] | None = None,
    lam: float = 0.0,
) -> float:
    """One SGD step on (x, y); with `prox_center`, the gradient of lam/2 ||theta - center||^2 is added."""
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    with torch.no_grad():
        for i, p in enumerate(params):
            grad = p.grad
            if prox_center is not None and lam != 0.0:
                grad = grad + lam * (p - prox_center[i])
            p.sub_(lr * grad)
    return float(loss.detach())


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` index batches that walk through seeded shuffles of range(n), reshuffling after each pass."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + min(batch_size, n) > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def local_round(
    global_model: nn.Module,
    personal_model: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lam: float,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> None:
    """Train `global_model` (holding w^t on entry) and, if given, `personal_model` in place for one round."""
    center = [p.detach().clone() for p in global_model.parameters()]
    for idx in minibatches(len(y), batch_size, steps, generator):
        xb, yb = x[idx], y[idx]
        if personal_model is not None:
            sgd_step(personal_model, xb, yb, lr, loss_fn, prox_center=center, lam=lam)
        sgd_step(global_model, xb, yb, lr, loss_fn)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[int, float]:
    """(number of correct predictions, mean loss) of `model` on (x, y)."""
    model.eval()
    logits = model(x)
    model.train()
    return int((logits.argmax(dim=1) == y).sum()), float(loss_fn(logits, y))
