"""The Ditto round on one device, in plain PyTorch (no Flower), as the official code does it.

Per local step, on ONE mini-batch b:
    personal: v <- v - lr * (grad F(v; b) + lam * (v - w^t))     (w^t: the global model received this round, fixed)
    global:   w <- w - lr * grad F(w; b)                           (w starts at w^t)
Plain SGD with one learning rate for both. lam = 0 is local training; a large lam keeps v near w^t.

lam "auto" (the official code's dynamic lambda, app/training/lam.py): at every personal step each candidate lam of a
small grid gives a candidate v, and the one with the lowest loss on the device's validation split is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from app.training.lam import LamSearch
from app.training.models import Objective, predictions


def sgd_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: Objective,
    prox_center: Sequence[torch.Tensor] | None = None,
    lam: float = 0.0,
) -> float:
    """One SGD step on (x, y); with `prox_center`, the gradient of lam/2 ||theta - center||^2 is added."""
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, model(x), y)
    loss.backward()
    with torch.no_grad():
        for i, p in enumerate(params):
            grad = p.grad
            if prox_center is not None and lam != 0.0:
                grad = grad + lam * (p - prox_center[i])
            p.sub_(lr * grad)
    return float(loss.detach())


def minibatches(
    n: int, batch_size: int, steps: int, generator: torch.Generator, accelerator: torch.device | None = None
) -> Iterator[torch.Tensor]:
    """`steps` index batches that walk through seeded shuffles of range(n), reshuffling after each pass. Shuffles are
    drawn on the CPU (the same batches on every accelerator) and moved to `accelerator` once per pass, not per batch."""
    perm, pos = torch.randperm(n, generator=generator).to(accelerator), 0
    for _ in range(steps):
        if pos + min(batch_size, n) > n:
            perm, pos = torch.randperm(n, generator=generator).to(accelerator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def auto_lam_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: Objective,
    prox_center: Sequence[torch.Tensor],
    search: LamSearch,
) -> float:
    """One personal step whose lam is the grid value giving the lowest validation loss after the step (ties: the
    first in the grid); returns that lam."""
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss_fn(model, model(x), y).backward()
    start = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    best_lam, best_loss, best = search.grid[0], float("inf"), start
    with torch.no_grad():
        for lam in search.grid:
            for p, p0, g, c in zip(params, start, grads, prox_center):
                p.copy_(p0 - lr * (g + lam * (p0 - c)))
            val_loss = evaluate(model, search.x_val, search.y_val, loss_fn)[1]
            if val_loss < best_loss:
                best_lam, best_loss, best = lam, val_loss, [p.detach().clone() for p in params]
        for p, b in zip(params, best):
            p.copy_(b)
    return best_lam


def local_round(
    global_model: nn.Module,
    personal_model: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lam: float | LamSearch,
    loss_fn: Objective,
    generator: torch.Generator,
    train_global: bool = True,
) -> list[float]:
    """Train `global_model` (holding w^t on entry) and, if given, `personal_model` in place for one round; with
    `train_global=False` only the personal model trains (local training). Returns the lam of each personal step."""
    personal = [] if personal_model is None else [personal_model]
    chosen = multi_lam_round(
        global_model,
        personal,
        [lam] * len(personal),
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        loss_fn=loss_fn,
        generator=generator,
        train_global=train_global,
    )
    return chosen[0] if chosen else []


def _dropout_rng_state(accelerator: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on `accelerator`: torch's CPU generator, or its CUDA one."""
    return torch.cuda.get_rng_state(accelerator) if accelerator.type == "cuda" else torch.random.get_rng_state()


def _set_dropout_rng_state(accelerator: torch.device, state: torch.Tensor) -> None:
    if accelerator.type == "cuda":
        torch.cuda.set_rng_state(state, accelerator)
    else:
        torch.random.set_rng_state(state)


def multi_lam_round(
    global_model: nn.Module,
    personal_models: Sequence[nn.Module],
    lams: Sequence[float | LamSearch],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    loss_fn: Objective,
    generator: torch.Generator,
    train_global: bool = True,
) -> list[list[float]]:
    """Ditto with one personal model per lam, on the same batches and against the same w^t: per mini-batch each
    personal model takes its step, then the global step. The global trajectory does not depend on lam, so one run
    gives every lam's personal models: each personal step starts from the same state of torch's global generator
    (dropout; the models share an architecture, so each step draws alike and the state after any of them is the
    state after one), so personal model i ends as a single-lam run's for lams[i], bit for bit. Returns, per
    personal model, the lam of each of its steps."""
    if len(personal_models) != len(lams):
        raise ValueError(f"{len(personal_models)} personal models for {len(lams)} lam values: give one per lam")
    center = [p.detach().clone() for p in global_model.parameters()]
    chosen: list[list[float]] = [[] for _ in lams]
    for idx in minibatches(len(y), batch_size, steps, generator, x.device):
        xb, yb = x[idx], y[idx]
        rng = _dropout_rng_state(x.device) if len(lams) > 1 else None
        for i, (model, lam) in enumerate(zip(personal_models, lams)):
            if rng is not None:
                _set_dropout_rng_state(x.device, rng)
            if isinstance(lam, LamSearch):
                chosen[i].append(auto_lam_step(model, xb, yb, lr, loss_fn, center, lam))
            else:
                sgd_step(model, xb, yb, lr, loss_fn, prox_center=center, lam=lam)
                chosen[i].append(lam)
        if train_global:
            sgd_step(global_model, xb, yb, lr, loss_fn)
    return chosen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Objective) -> tuple[int, float]:
    """(number of correct predictions, mean loss) of `model` on (x, y); real-valued targets (point estimation)
    have no accuracy: 0 correct."""
    model.eval()
    out = model(x)
    loss = float(loss_fn(model, out, y))
    model.train()
    return (0 if y.is_floating_point() else int((predictions(out) == y).sum())), loss
