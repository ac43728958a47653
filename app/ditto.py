"""The Ditto round on one device, in plain PyTorch (no Flower), as the official code does it.

Per local step, on ONE mini-batch b:
    personal: v <- v - lr * (grad F(v; b) + lam * (v - w^t))     (w^t: the global model received this round, fixed)
    global:   w <- w - lr * grad F(w; b)                           (w starts at w^t)
Plain SGD with one learning rate for both. lam = 0 is local training; a large lam keeps v near w^t.

lam "auto" (the official code's dynamic lambda): at every personal step each candidate lam of a small grid gives a
candidate v, and the one with the lowest loss on the device's validation split is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch import nn

from app.models import Objective, predictions


class Stream(IntEnum):
    """The random streams of a device's round, one per purpose, so that no two purposes share draws. Round 0 holds
    what is drawn once per run (label poisoning, lam auto's validation split). The values are part of every
    result: changing one changes the numbers of every run that draws from it."""

    BATCHES = 0  # the mini-batches of the local steps
    LABEL_POISON = 1  # a malicious device's poisoned labels (round 0)
    UPDATE_ATTACK = 2  # a malicious device's update attack (numpy: app/attacks.attack_rng)
    DROPOUT = 3  # torch's global generators during the round (seed_global_rng)
    FINETUNE = 4  # the finetune baseline's mini-batches before an evaluation
    VALIDATION_SPLIT = 5  # lam auto's random validation split (method.val_split=random; round 0)


def stream_seed(seed: int, device: int, server_round: int, stream: Stream) -> list[int]:
    """The seed entropy of one stream of one device's round: results do not depend on which process or worker runs
    a device's round."""
    return [seed, device, server_round, int(stream)]


def round_generator(seed: int, device: int, server_round: int, stream: Stream) -> torch.Generator:
    """A torch RNG of one stream of one device's round (`Stream`)."""
    state = np.random.SeedSequence(stream_seed(seed, device, server_round, stream)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def seed_global_rng(seed: int, device: int, server_round: int) -> None:
    """Seed torch's global generators, CPU and CUDA (what dropout draws from), for this device's round,
    so masks do not depend on which worker runs it (on a GPU they come from the CUDA generator: other masks than on
    the CPU, the same ones run after run)."""
    torch.manual_seed(int(round_generator(seed, device, server_round, Stream.DROPOUT).initial_seed()))


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
    n: int, batch_size: int, steps: int, generator: torch.Generator, device: torch.device | None = None
) -> Iterator[torch.Tensor]:
    """`steps` index batches that walk through seeded shuffles of range(n), reshuffling after each pass. Shuffles are
    drawn on the CPU (the same batches on every device) and moved to `device` once per pass, not per batch."""
    perm, pos = torch.randperm(n, generator=generator).to(device), 0
    for _ in range(steps):
        if pos + min(batch_size, n) > n:
            perm, pos = torch.randperm(n, generator=generator).to(device), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


MIN_VALIDATION = 4  # lam auto: a device with fewer validation samples keeps all its data and a fixed lam


def validation_size(n: int, val_fraction: float) -> int:
    """lam auto: how many of a device's n training samples are held out for validation. The official client keeps
    the first int(0.9 n) for training and validates on the rest (litian96/ditto flearn/models/client.py lines
    12-16, val_fraction = 0.1); 0 when that leaves fewer than MIN_VALIDATION validation samples or no training
    sample (the official code has no such guard: it would validate on an empty set)."""
    n_val = n - int((1.0 - val_fraction) * n)
    return n_val if MIN_VALIDATION <= n_val < n else 0


def trained_count(n: int, method: Mapping[str, Any]) -> int:
    """How many of a device's n training samples it trains on under the `method` config: all of them, less the
    validation hold-out under lam auto. The server samples devices by this count, so it must be the client's."""
    if method.get("lam") != "auto":
        return n
    return n - validation_size(n, float(method["val_fraction"]))


@dataclass(frozen=True)
class LamSearch:
    """Per-step choice of lam among `grid` by the loss on a held-out validation split (x_val, y_val)."""

    grid: tuple[float, ...]
    x_val: torch.Tensor
    y_val: torch.Tensor


# lam auto (the paper): the grid and the fixed lam for devices with too little validation data, by attack strength
LAM_GRID = {True: (0.05, 0.1, 0.2), False: (0.1, 1.0, 2.0)}
LAM_FIXED = {True: 0.1, False: 1.0}
Lam = "float | LamSearch | tuple[float, ...]"  # fixed, auto, or a lam list (one personal model per lam)


def device_lam(
    cfg: Mapping[str, Any], partition_id: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Lam]:
    """(x_train, y_train, lam) of device `partition_id` from its training data (x, y) and `method.lam`: a fixed
    lam, a lam list (a tuple: one personal model per lam, multi_lam_round), or auto: the validation split (all but
    the first trained_count samples) is taken before any label corruption, as the official client, either the
    last samples (`method.val_split=last`, official) or a seeded random subset (`random`); devices with too little
    data keep all of it and the fixed lam."""
    lam = cfg["method"].get("lam", 0.0)
    if isinstance(lam, Sequence) and not isinstance(lam, str):
        return x, y, tuple(float(v) for v in lam)
    if lam != "auto":
        return x, y, float(lam)
    strong = bool(cfg["method"]["strong_attack"])
    n_train = trained_count(len(y), cfg["method"])
    if n_train == len(y):
        return x, y, LAM_FIXED[strong]
    if cfg["method"]["val_split"] == "last":
        order = torch.arange(len(y))
    else:
        split = round_generator(int(cfg["seed"]), partition_id, 0, Stream.VALIDATION_SPLIT)
        order = torch.randperm(len(y), generator=split)
    train, val = order[:n_train], order[n_train:]
    return x[train], y[train], LamSearch(LAM_GRID[strong], x[val], y[val])


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


def _dropout_rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on `device`: torch's CPU generator, or the device's CUDA one."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.random.get_rng_state()


def _set_dropout_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
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
