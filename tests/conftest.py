"""Shared fixtures: small configs composed from the real Hydra tree."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig

from app.config.compose import compose_config


@pytest.fixture
def small_cfg() -> DictConfig:
    return compose_config(["num_clients=6", "clients_per_round=3", "num_rounds=2", "eval_every=1", "local_steps=3"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA; torch {torch.__version__} sees no CUDA device here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
