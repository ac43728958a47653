"""Leaf helpers of the configuration: its error type, the keys that only say how a run is executed, and dotted
views of nested configs for comparing two of them."""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from app.errors import UserError

# keys that say how a run was executed, not what it computed: equal results whatever their values
EXECUTION_KEYS = frozenset(
    {
        "personal_state",
        "state_dir",
        "checkpoint_every",
        "resume",
        "ray_address",
        "round_timeout",
        "verbose",
        "skip_done",
    }
)


# top-level keys renamed since runs were recorded: old name -> current name
RENAMED = {"device": "accelerator"}


def current_names(config: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded config with its renamed keys (RENAMED) under their current names, so that a run folder written
    before a rename is still the same config to skip_done and resume, and the report does not split a setting on
    the old name."""
    out = dict(config)
    for old, new in RENAMED.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key and what is allowed."""


def dotted(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}), as Hydra overrides name them."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Set[str]) -> list[str]:
    """The dotted keys whose values differ between two configs, except those under a top-level key of
    `may_change`; a key missing on one side counts as null there (a record written before the key existed), and a
    renamed key counts under its current name (`current_names`)."""
    a, b = dotted(current_names(saved)), dotted(current_names(current))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k.split(".")[0] not in may_change)
