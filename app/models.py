"""Model registry. Models are built from the seed, so every process builds the same initial weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def _mlp(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, 64), nn.ReLU(), nn.Linear(64, num_classes))


def _logreg(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))


MODELS: dict[str, Callable[[int, int], nn.Module]] = {"mlp": _mlp, "logreg": _logreg}


def build_model(name: str, num_features: int, num_classes: int, seed: int) -> nn.Module:
    """The registry model `name`, initialised from `seed` without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_features, num_classes)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's floating-point state (parameters and float buffers), in state_dict order: what is federated."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values() if t.is_floating_point()]


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays produced by `get_weights` (of a model of the same architecture)."""
    targets = [t for t in model.state_dict().values() if t.is_floating_point()]
    if len(targets) != len(arrays):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(targets)} floating-point tensors")
    with torch.no_grad():
        for t, a in zip(targets, arrays):
            t.copy_(torch.from_numpy(np.asarray(a)).reshape(t.shape))
