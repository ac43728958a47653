"""The global model, fine-tuned on each device's training data before each evaluation; the fine-tuned copy is not
kept. The budget is the official one, max(int(finetune_iters * n_k / B), finetune_iters) SGD steps
(`method.finetune_iters`); `method.steps` fixes a count instead."""

from __future__ import annotations

import copy

from torch import nn

from app.methods.base import Device, Method
from app.rng import Stream
from app.training.steps import local_round


class Finetune(Method):
    scores_personal = True

    def finetune_steps(self, n_train: int) -> int:
        """`method.steps`, or (null) the official budget max(int(finetune_iters * n_k / B), finetune_iters)
        (litian96/ditto flearn/trainers_global/finetuning.py line 134)."""
        steps = self.cfg.method.get("steps")
        if steps is not None:
            return int(steps)
        iters = int(self.cfg.method.finetune_iters)
        return max(int(iters * n_train / self.cfg.batch_size), iters)

    def evaluated(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        tuned = copy.deepcopy(global_model)
        local_round(
            tuned,
            None,
            device.x_train,
            device.y_train,
            steps=self.finetune_steps(len(device.y_train)),
            batch_size=self.cfg.batch_size,
            lr=float(self.cfg.lr),
            lam=0.0,
            loss_fn=device.objective,
            generator=device.generator(server_round, Stream.FINETUNE),
        )
        return {"personal": tuned}
