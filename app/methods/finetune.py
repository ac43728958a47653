"""The global model, fine-tuned on each device's training data before each evaluation; the fine-tuned copy is not
kept. The budget is the official one, max(int(finetune_iters * n_k / B), finetune_iters) SGD steps
(`method.finetune_iters`); `method.steps` fixes a count instead."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from app import ditto
from app.methods.base import Method

if TYPE_CHECKING:
    from app.client_app import DittoClient


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
        self, device: DittoClient, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        tuned = copy.deepcopy(global_model)
        ditto.local_round(
            tuned,
            None,
            device.x_train,
            device.y_train,
            steps=self.finetune_steps(len(device.y_train)),
            batch_size=self.cfg.batch_size,
            lr=float(self.cfg.lr),
            lam=0.0,
            loss_fn=device.objective,
            generator=device.generator(server_round, ditto.Stream.FINETUNE),
        )
        return {"personal": tuned}
