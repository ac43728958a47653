"""What a round does: which devices it trains (a function of (seed, round) alone) and whether every device
evaluates after it, so simulation, deployment, a resumed run and the plain-PyTorch reference loop of
benchmarks/overhead.py follow the same schedule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLING = ("size", "uniform")


def sample_devices(
    seed: int, server_round: int, num_clients: int, clients_per_round: int, sizes: Sequence[int] | None = None
) -> list[int]:
    """`clients_per_round` distinct partition ids of 0..num_clients-1 drawn from (seed, round), sorted.

    Without `sizes`, uniformly. With `sizes` (each device's training sample count), with probability proportional to
    n_k, without replacement: the official `select_clients` with sampling=2 (litian96/ditto
    flearn/trainers_MTL/fedbase.py lines 115-122, `np.random.choice(..., replace=False, p=n_k / sum n)`, which draws
    one device at a time from the renormalised probabilities of those not yet drawn). The official code reseeds with
    `round + 4` alone; here the stream is (seed, round), so seeds differ in their sampling too."""
    rng = np.random.default_rng([seed, server_round])
    if sizes is None:
        return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())
    n = np.asarray(sizes, dtype=np.float64)
    if n.shape != (num_clients,) or not np.all(n > 0):
        raise ValueError(
            f"sampling=size needs a positive training sample count for each of the {num_clients} "
            f"devices; got {n.shape[0] if n.ndim == 1 else n.shape} counts, smallest {n.min(initial=0):g}"
        )
    return sorted(rng.choice(num_clients, size=clients_per_round, replace=False, p=n / n.sum()).tolist())


def sampled_rounds(
    seed: int, num_rounds: int, num_clients: int, clients_per_round: int, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Per device, the rounds 1..num_rounds that sample it (`sample_devices`, in increasing order)."""
    rounds: list[list[int]] = [[] for _ in range(num_clients)]
    for server_round in range(1, num_rounds + 1):
        for k in sample_devices(seed, server_round, num_clients, clients_per_round, sizes):
            rounds[k].append(server_round)
    return rounds


def evaluates(server_round: int, eval_every: int, num_rounds: int) -> bool:
    """Whether every device evaluates after `server_round`: every `eval_every` rounds and after the last."""
    return server_round % eval_every == 0 or server_round == num_rounds
