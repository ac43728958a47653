"""Shared fixtures: small configs composed from the real Hydra tree."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig

from app.config import compose_config


@pytest.fixture
def small_cfg() -> DictConfig:
    return compose_config(["num_clients=6", "clients_per_round=3", "num_rounds=2", "eval_every=1", "local_steps=3"])
