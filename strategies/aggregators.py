"""Aggregation rules: pure functions over the stacked updates of one round.

Each rule takes `updates` (n x d float tensor, one row per accepted client update), `weights` (n sample counts)
and `num_malicious` (f, the number of malicious rows the rule should tolerate; ignored by rules that need none)
and returns the aggregated update (d,). `build_aggregator` binds the rule's own options from `conf/aggregator/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

Aggregator = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def mean(updates: torch.Tensor, weights: torch.Tensor, num_malicious: int = 0, *, weighted: bool = False) -> torch.Tensor:
    """Mean of the updates; weighted by sample count (FedAvg, McMahan et al. 2017) or uniform (official Ditto code)."""
    del num_malicious  # the mean tolerates no malicious update
    if not weighted:
        return updates.mean(dim=0)
    w = weights.to(updates.dtype)
    return (w / w.sum()) @ updates


AGGREGATORS: dict[str, Callable[..., torch.Tensor]] = {"mean": mean}


def build_aggregator(options: Mapping[str, Any]) -> Aggregator:
    """The registry rule named by `options["name"]`, with the remaining options bound as keyword arguments."""
    params = {k: v for k, v in options.items() if k != "name"}
    return partial(AGGREGATORS[options["name"]], **params)
