"""One source of configuration: the Hydra tree in conf/, composed and validated the same way by every entry point
(`ditto-simulate`, `flwr run .`, and `ditto-config KEY` for scripts)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from functools import lru_cache

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from app.config.keys import ConfigError
from app.config.validate import validate
from app.paths import CONF_DIR


def composed(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml with Hydra `overrides`, not yet validated: Hydra's own errors (an unknown key or group
    option, a malformed override) raise here."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def compose_config(overrides: Sequence[str] = (), *, client: bool = False) -> DictConfig:
    """The validated config of conf/config.yaml with Hydra `overrides` (e.g. ["attack=none", "method.lam=0.5"]);
    `client`: as a client process validates it (app/config/validate.py)."""
    cfg = composed(overrides)
    validate(cfg, client=client)
    return cfg


@lru_cache(maxsize=8)
def config_from_overrides(overrides: str, *, client: bool = False) -> DictConfig:
    """`compose_config` for a space-separated override string (the `overrides` key of Flower's run config)."""
    return compose_config(shlex.split(overrides), client=client)


def frozen(cfg: DictConfig) -> DictConfig:
    """`cfg` with every interpolation resolved, read-only, built once per process for equal configs: what a device
    reads on every message (an interpolated key such as `num_clients: ${dataset.num_clients}` is parsed again on each
    read, and comparing two interpolated configs resolves both: half of a small device's round, before this)."""
    return frozen_text(OmegaConf.to_yaml(cfg, resolve=True))


@lru_cache(maxsize=8)
def frozen_text(text: str) -> DictConfig:
    """The read-only config of a resolved YAML `text` (`frozen`'s cache: a process keeps one object per config)."""
    cfg = OmegaConf.create(text)
    OmegaConf.set_readonly(cfg, True)
    return cfg


@lru_cache(maxsize=8)
def client_config(overrides: str) -> DictConfig:
    """`config_from_overrides(overrides, client=True)`, frozen: what a device of `flwr run` reads."""
    return frozen(config_from_overrides(overrides, client=True))


_MISSING = object()


def main(argv: Sequence[str]) -> int:
    """`ditto-config KEY [OVERRIDE ...]`: print one key of the composed, validated config. A bad key or value
    raises (the command prints it as one line, app/runners/cli.py)."""
    if not argv:
        print("usage: ditto-config KEY [OVERRIDE ...]", file=sys.stderr)
        return 2
    value = OmegaConf.select(compose_config(argv[1:]), argv[0], default=_MISSING)
    if value is _MISSING:
        raise ConfigError(
            f"no such key: '{argv[0]}' is not in the config (ditto-config KEY names a dotted key, e.g. num_rounds)"
        )
    print(value)
    return 0
