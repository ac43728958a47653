"""The paper's attacks as small pure functions, and the registry the `attack` config group mirrors.

A1 `label_poison`: malicious devices train on corrupted labels (uniform random class; binary: flipped).
A2 `gaussian_update`: the sent update is N(0, sigma^2) per coordinate, sigma = std of the device's true update.
A3 `model_replacement`: A1, then the update is scaled by `boost` (default: clients per round).
Against robust aggregators: `sign_flip` sends -scale * its update; `alie` and `ipm` are omniscient (they use the
benign updates of the round) and are therefore simulated on the server, in the malicious devices' slots, after the
devices trained normally: a threat-model simulation, not something a real device could do without collusion.
Malicious devices are drawn once per run from the seed; test labels are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from omegaconf import DictConfig

from app.rng import Stream, round_generator, stream_seed


@dataclass(frozen=True)
class Attack:
    poisons_labels: bool  # always corrupts training labels (label_poison, model_replacement)
    update: str | None = None  # what the device does to its sent update: "gaussian", "scale" or "sign_flip"
    omniscient: str | None = None  # what the server-side simulation puts in its slot: "alie" or "ipm"


ATTACKS: dict[str, Attack] = {
    "none": Attack(poisons_labels=False),
    "label_poison": Attack(poisons_labels=True),
    "gaussian_update": Attack(poisons_labels=False, update="gaussian"),
    "model_replacement": Attack(poisons_labels=True, update="scale"),
    "sign_flip": Attack(poisons_labels=False, update="sign_flip"),
    "alie": Attack(poisons_labels=False, omniscient="alie"),
    "ipm": Attack(poisons_labels=False, omniscient="ipm"),
}


def malicious_devices(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """floor(fraction * num_clients) devices drawn uniformly without replacement from the run's seed."""
    count = int(fraction * num_clients + 1e-9)
    rng = np.random.default_rng([seed, 0xA77AC])
    return frozenset(int(k) for k in rng.choice(num_clients, size=count, replace=False))


def attackers(cfg: DictConfig) -> frozenset[int]:
    """The run's malicious devices: none under attack=none, whatever attack.fraction says (so sweeps can cross
    attack=none with corruption levels)."""
    if cfg.attack.name == "none":
        return frozenset()
    return malicious_devices(cfg.num_clients, cfg.attack.fraction, cfg.seed)


def aggregator_f(cfg: DictConfig) -> int:
    """f for the aggregator: `aggregator.f`, or the expected number of attackers among the sampled devices,
    int(clients_per_round * attackers / num_clients), as the official Ditto code."""
    if cfg.aggregator.get("f") is not None:
        return int(cfg.aggregator.f)
    return int(cfg.clients_per_round * len(attackers(cfg)) / cfg.num_clients)


def poison_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A1: binary labels flipped; otherwise every label replaced by a uniformly random class."""
    if num_classes == 2:
        return 1 - y
    return torch.randint(0, num_classes, y.shape, generator=generator, dtype=y.dtype)


def run_poisoned_labels(y: torch.Tensor, num_classes: int, seed: int, device: int) -> torch.Tensor:
    """A malicious device's training labels for the whole run: `poison_labels` from its label-poisoning stream."""
    return poison_labels(y, num_classes, round_generator(seed, device, 0, Stream.LABEL_POISON))


def gaussian_update(update: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """A2: noise N(0, sigma^2) shaped like `update`, sigma = std of all of the true update's coordinates."""
    sigma = float(np.concatenate([u.ravel() for u in update]).std())
    return [rng.normal(0.0, sigma, size=u.shape).astype(u.dtype) for u in update]


def scale_update(update: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """A3's boosting: the update multiplied by `factor`."""
    return [(u * factor).astype(u.dtype) for u in update]


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n)."""
    s = n // 2 + 1 - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def alie(benign: torch.Tensor, z: float) -> torch.Tensor:
    """ALIE, "a little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): mean - z * std of the benign updates,
    per coordinate (sample std; 0 with a single benign update)."""
    std = benign.std(dim=0) if benign.shape[0] > 1 else torch.zeros_like(benign[0])
    return benign.mean(dim=0) - z * std


def ipm(benign: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Inner-product manipulation (Xie, Koyejo, Gupta, UAI 2020): -epsilon times the mean of the benign updates."""
    return -epsilon * benign.mean(dim=0)


def threat_model(attack: DictConfig, num_malicious: int):  # -> Callable[[Tensor, Tensor], Tensor] | None
    """For an omniscient attack, the server-side simulation: (stacked updates, malicious-row mask) -> the stack with
    the malicious rows replaced by the attack vector computed from the benign rows. None for other attacks."""
    kind = ATTACKS[attack.name].omniscient
    if kind is None:
        return None

    def simulate(updates: torch.Tensor, malicious: torch.Tensor) -> torch.Tensor:
        if not malicious.any() or malicious.all():
            return updates
        benign = updates[~malicious]
        if kind == "alie":
            z = attack.get("z")
            vector = alie(benign, alie_z(updates.shape[0], num_malicious) if z is None else float(z))
        else:
            vector = ipm(benign, float(attack.epsilon))
        out = updates.clone()
        out[malicious] = vector.to(updates.dtype)
        return out

    return simulate


def corrupts_labels(attack: DictConfig) -> bool:
    """Whether malicious devices train on poisoned labels under this attack config."""
    return ATTACKS[attack.name].poisons_labels or bool(attack.get("corrupt_labels", False))


def attack_rng(seed: int, device: int, server_round: int) -> np.random.Generator:
    """The generator a malicious device's update attack draws from in a round."""
    return np.random.default_rng(stream_seed(seed, device, server_round, Stream.UPDATE_ATTACK))


def attack_update(
    attack: DictConfig, update: list[np.ndarray], rng: np.random.Generator, clients_per_round: int
) -> list[np.ndarray]:
    """The update a malicious device sends in place of its true `update`."""
    kind = ATTACKS[attack.name].update
    if kind == "gaussian":
        return gaussian_update(update, rng)
    if kind == "scale":
        boost = attack.get("boost")
        return scale_update(update, float(clients_per_round if boost is None else boost))
    if kind == "sign_flip":
        return scale_update(update, -float(attack.scale))
    return update
