"""Which devices a round trains: a function of (seed, round) alone, so simulation, deployment, a resumed run and
the plain-PyTorch reference loop of benchmarks/overhead.py sample the same devices."""

from __future__ import annotations

import numpy as np


def sample_devices(seed: int, server_round: int, num_clients: int, clients_per_round: int) -> list[int]:
    """`clients_per_round` distinct partition ids of 0..num_clients-1, drawn uniformly from (seed, round), sorted."""
    rng = np.random.default_rng([seed, server_round])
    return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())
