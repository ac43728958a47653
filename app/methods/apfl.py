"""APFL, Adaptive Personalized FL (Deng, Kamani, Mahdavi 2020), with a fixed mixing weight alpha: the device keeps v
and trains it through the mixed model alpha v + (1 - alpha) w; the evaluated personal model is that mixture with the
received w. Chosen as the extra baseline because it is the personalization method benchmarks (PFLlib, FL-bench) and
the Ditto paper's own comparison most often report, and it also interpolates local and global."""

from __future__ import annotations

import copy

import torch
from torch import nn

from app.methods.base import Device, Method
from app.training.models import Objective
from app.training.steps import minibatches, sgd_step


@torch.no_grad()
def mix_into(target: nn.Module, personal: nn.Module, global_model: nn.Module, alpha: float) -> nn.Module:
    """target <- alpha * personal + (1 - alpha) * global, over the trainable parameters (the whole state of every
    registry model: none keeps running statistics, see app/training/models.py)."""
    for t, v, w in zip(target.parameters(), personal.parameters(), global_model.parameters()):
        t.copy_(alpha * v + (1.0 - alpha) * w)
    return target


def apfl_round(
    global_model: nn.Module,
    personal_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    alpha: float,
    loss_fn: Objective,
    generator: torch.Generator,
) -> None:
    """APFL's local round (Deng et al. 2020, Algorithm 1), per step on one mini-batch b, both gradients at time t:
    w <- w - lr * grad F(w; b)
    v <- v - lr * alpha * grad F(alpha v + (1 - alpha) w; b)"""
    mixed = copy.deepcopy(personal_model)
    for idx in minibatches(len(y), batch_size, steps, generator, x.device):
        xb, yb = x[idx], y[idx]
        mix_into(mixed, personal_model, global_model, alpha)
        mixed.zero_grad(set_to_none=True)
        loss_fn(mixed, mixed(xb), yb).backward()
        sgd_step(global_model, xb, yb, lr, loss_fn)
        with torch.no_grad():
            for v, m in zip(personal_model.parameters(), mixed.parameters()):
                v.sub_(lr * alpha * m.grad)


class APFL(Method):
    keeps_personal = True
    scores_personal = True

    def train_round(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], steps: dict
    ) -> list[list[float]]:
        apfl_round(
            global_model, personal[0], device.x_train, device.y_train, alpha=float(self.cfg.method.alpha), **steps
        )
        return [[]]

    def evaluated(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        mixed = mix_into(copy.deepcopy(personal[0]), personal[0], global_model, float(self.cfg.method.alpha))
        return {"personal": mixed}
