"""The paper's attacks as small pure functions, and the registry the `attack` config group mirrors.

A1 `label_poison`: malicious devices train on corrupted labels (uniform random class; binary: flipped).
A2 `gaussian_update`: the sent update is N(0, sigma^2) per coordinate, sigma = std of the device's true update.
A3 `model_replacement`: A1, then the update is scaled by `boost` (default: clients per round).
Malicious devices are drawn once per run from the seed; test labels are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig


@dataclass(frozen=True)
class Attack:
    poisons_labels: bool  # always corrupts training labels (label_poison, model_replacement)
    update: str | None  # what is done to the sent update: None, "gaussian" or "scale"


ATTACKS: dict[str, Attack] = {
    "none": Attack(poisons_labels=False, update=None),
    "label_poison": Attack(poisons_labels=True, update=None),
    "gaussian_update": Attack(poisons_labels=False, update="gaussian"),
    "model_replacement": Attack(poisons_labels=True, update="scale"),
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


def poison_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A1: binary labels flipped; otherwise every label replaced by a uniformly random class."""
    if num_classes == 2:
        return 1 - y
    return torch.randint(0, num_classes, y.shape, generator=generator, dtype=y.dtype)


def gaussian_update(update: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """A2: noise N(0, sigma^2) shaped like `update`, sigma = std of all of the true update's coordinates."""
    sigma = float(np.concatenate([u.ravel() for u in update]).std())
    return [rng.normal(0.0, sigma, size=u.shape).astype(u.dtype) for u in update]


def scale_update(update: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """A3's boosting: the update multiplied by `factor`."""
    return [(u * factor).astype(u.dtype) for u in update]


def corrupts_labels(attack: DictConfig) -> bool:
    """Whether malicious devices train on poisoned labels under this attack config."""
    return ATTACKS[attack.name].poisons_labels or bool(attack.get("corrupt_labels", False))


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
    return update
