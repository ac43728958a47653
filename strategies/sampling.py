"""What a round does: which devices it trains (a function of (seed, round) alone) and whether every device
evaluates after it, so simulation, deployment, a resumed run and the plain-PyTorch reference loop of
benchmarks/overhead.py follow the same schedule."""

from __future__ import annotations

import numpy as np


def sample_devices(seed: int, server_round: int, num_clients: int, clients_per_round: int) -> list[int]:
    """`clients_per_round` distinct partition ids of 0..num_clients-1, drawn uniformly from (seed, round), sorted."""
    rng = np.random.default_rng([seed, server_round])
    return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())


def evaluates(server_round: int, eval_every: int, num_rounds: int) -> bool:
    """Whether every device evaluates after `server_round`: every `eval_every` rounds and after the last."""
    return server_round % eval_every == 0 or server_round == num_rounds
