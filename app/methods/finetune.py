"""The global model, fine-tuned on each device's training data before each evaluation; the fine-tuned copy is not
kept. As the official trainer (litian96/ditto flearn/trainers_global/finetuning.py lines 126-141), from the final
global model w, each step on one mini-batch is

    v <- v - lr * decay_factor * (grad F(v; b) + lam * (v - w))

with `method.lam` = 1 and `method.decay_factor` = 1 (every shipped run script: `--lam=1`, `--decay_factor=1`;
lam = 0 is plain fine-tuning), for max(int(finetune_iters * n_k / B), finetune_iters) steps (line 134;
`method.finetune_iters`, 40 in the scripts), or `method.steps` where it is set. `finetune_matched` (ours) gives each
device as many steps as its Ditto personal model takes in the same run: `local_steps` for every round up to the
evaluated one in which the device is sampled, so Ditto and fine-tuning compare at equal compute."""

from __future__ import annotations

import copy
from functools import lru_cache

from omegaconf import DictConfig
from torch import nn

from app.methods.base import Device, Method
from app.rng import Stream
from app.training.lam import sampling_sizes
from app.training.steps import multi_lam_round
from strategies.sampling import sampled_rounds


class Finetune(Method):
    scores_personal = True
    takes_lam = True  # the weight of its proximal term

    def finetune_steps(self, device: Device, server_round: int) -> int:
        """`method.steps`, or (null) the official budget max(int(finetune_iters * n_k / B), finetune_iters)."""
        steps = self.cfg.method.get("steps")
        if steps is not None:
            return int(steps)
        iters = int(self.cfg.method.finetune_iters)
        return max(int(iters * len(device.y_train) / self.cfg.batch_size), iters)

    def evaluated(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        tuned = copy.deepcopy(global_model)
        multi_lam_round(
            global_model,
            [tuned],
            [float(self.cfg.method.lam)],
            device.x_train,
            device.y_train,
            steps=self.finetune_steps(device, server_round),
            batch_size=self.cfg.batch_size,
            lr=float(self.cfg.lr) * float(self.cfg.method.decay_factor),
            loss_fn=device.objective,
            generator=device.generator(server_round, Stream.FINETUNE),
            train_global=False,
        )
        return {"personal": tuned}


@lru_cache(maxsize=4)
def _schedule(cfg: DictConfig) -> list[list[int]]:
    """Per device, the rounds that sample it: the run's schedule, computed once per process."""
    return sampled_rounds(cfg.seed, cfg.num_rounds, cfg.num_clients, cfg.clients_per_round, sampling_sizes(cfg))


class FinetuneMatched(Finetune):
    """Fine-tuning at Ditto's compute (ours, not an official baseline)."""

    def finetune_steps(self, device: Device, server_round: int) -> int:
        """`local_steps` for each round up to `server_round` that samples this device (the seeded schedule the
        server samples by, strategies/sampling.py): the steps its personal model takes in a Ditto run with a fixed
        lam (lam auto samples by the 90 % it trains on) where every sampled device replies."""
        rounds = _schedule(self.cfg)[device.partition_id]
        return int(self.cfg.local_steps) * sum(1 for r in rounds if r <= server_round)
