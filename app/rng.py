"""The named random streams: every draw of a run comes from (seed, device, round, stream), so results do not depend
on which process or worker runs a device's round, and no two purposes share draws."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """The random streams of a device's round, one per purpose, so that no two purposes share draws. Round 0 holds
    what is drawn once per run (label poisoning, lam auto's validation split). The values are part of every
    result: changing one changes the numbers of every run that draws from it."""

    BATCHES = 0  # the mini-batches of the local steps
    LABEL_POISON = 1  # a malicious device's poisoned labels (round 0)
    UPDATE_ATTACK = 2  # a malicious device's update attack (numpy: app/threats/attacks.py attack_rng)
    DROPOUT = 3  # torch's global generators during the round (seed_global_rng)
    FINETUNE = 4  # the finetune baseline's mini-batches before an evaluation
    VALIDATION_SPLIT = 5  # lam auto's random validation split (method.val_split=random; round 0)
    EVALUATION = 6  # torch's global generators during an evaluation (dropout at evaluation, fine-tuning's dropout)


def stream_seed(seed: int, device: int, server_round: int, stream: Stream) -> list[int]:
    """The seed entropy of one stream of one device's round: results do not depend on which process or worker runs
    a device's round."""
    return [seed, device, server_round, int(stream)]


def round_generator(seed: int, device: int, server_round: int, stream: Stream) -> torch.Generator:
    """A torch RNG of one stream of one device's round (`Stream`)."""
    state = np.random.SeedSequence(stream_seed(seed, device, server_round, stream)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def seed_global_rng(seed: int, device: int, server_round: int, stream: Stream = Stream.DROPOUT) -> None:
    """Seed torch's global generators, CPU and CUDA (what dropout draws from), for this device's round (`stream`:
    its training, DROPOUT, or its evaluation, EVALUATION), so masks do not depend on which worker runs it (on a GPU
    they come from the CUDA generator: other masks than on the CPU, the same ones run after run)."""
    value = int(round_generator(seed, device, server_round, stream).initial_seed())
    if torch.cuda.is_available():
        torch.manual_seed(value)
    else:  # the same CPU seed; torch.manual_seed would also queue a lazy CUDA seed, with a stack trace, every call
        torch.default_generator.manual_seed(value)
