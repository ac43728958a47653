"""The methods Ditto is compared with, one entry each; the `method` config group mirrors METHODS.

- `ditto`: personal model by the Ditto step (app/ditto.py), global model by the configured aggregator.
- `local`: the personal step with lam = 0 and no global step: each device trains only its own model and sends a
  zero update (w never moves). The same personal models as `ditto` with lam = 0, at no cost of global training.
- `global`: the global model alone.
- `finetune`: the global model, fine-tuned on each device's training data before each evaluation for the official
  budget of max(int(40 n_k / B), 40) SGD steps (`method.finetune_iters`; `method.steps` fixes a count instead);
  the fine-tuned copy is not kept.
- `qffl`, `tilted`: fair global solvers; the server rescales the round's updates by the devices' losses
  (strategies/fair.py) before the aggregator.
- `apfl`: Adaptive Personalized FL (Deng, Kamani, Mahdavi 2020), fixed mixing weight alpha: the device keeps v and
  trains it through the mixed model alpha v + (1 - alpha) w; the evaluated personal model is that mixture with
  the received w. Chosen as the extra baseline because it is the personalization method benchmarks (PFLlib,
  FL-bench) and the Ditto paper's own comparison most often report, and it also interpolates local and global.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from app.ditto import minibatches, sgd_step
from app.models import Objective


@dataclass(frozen=True)
class Method:
    personal: str | None = None  # how the personal model trains: "prox" (Ditto's step) or "apfl"; None: no model
    trains_global: bool = True  # runs the global step and sends its update (False: a zero update)
    evaluates: str | None = None  # the personal model scored: "stored", "mix" (APFL) or "finetune"
    server_rule: str | None = None  # "qffl" or "tilted": updates rescaled by device losses on the server


METHODS: dict[str, Method] = {
    "ditto": Method(personal="prox", evaluates="stored"),
    "local": Method(personal="prox", trains_global=False, evaluates="stored"),
    "global": Method(),
    "finetune": Method(evaluates="finetune"),
    "qffl": Method(server_rule="qffl"),
    "tilted": Method(server_rule="tilted"),
    "apfl": Method(personal="apfl", evaluates="mix"),
}


@torch.no_grad()
def mix_into(target: nn.Module, personal: nn.Module, global_model: nn.Module, alpha: float) -> nn.Module:
    """target <- alpha * personal + (1 - alpha) * global, over the trainable parameters (the whole state of every
    registry model: none keeps running statistics, see app/models.py)."""
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
