"""Aggregation rules: pure functions over the stacked updates of one round (ByzFL style).

Every rule takes `updates` (n x d float32/float64 tensor, one row per accepted client update), `weights` (n sample
counts) and `num_malicious` (f, the number of malicious rows the rule should tolerate) and returns the aggregated
update (d,), never changing `updates`. Krum, Multi-Krum and Bulyan select exactly the rows brute-force float64
distances select, the first on a tie (strategies/rules/distances.py); coordinate-wise order statistics partition
cache-sized transposed copies of column blocks (no full sort, no copy of the stack), so peak extra memory stays
within a few copies of the stack. A stack no rule can aggregate (empty, not 2-D, not float32/float64, NaN or
infinite entries, f < 0) or one the rule cannot run on raises ValueError naming the problem; `check_aggregator`
checks a configuration before any round runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch

from strategies.rules.coordinate import mean, median, trimmed_mean
from strategies.rules.distances import check_stack
from strategies.rules.iterative import centered_clip, geomed
from strategies.rules.selection import bulyan, knorm, krum, multikrum


# composed from another registry rule, so it lives beside the registry
def norm_clip(
    updates: torch.Tensor,
    weights: torch.Tensor,
    num_malicious: int = 0,
    *,
    inner: str = "mean",
    radius: str = "median",
    **inner_options: Any,
) -> torch.Tensor:
    """Norm clipping (Sun et al. 2019): scale every update down to at most the round's median norm, then aggregate
    the clipped updates with the registry rule `inner` (with `inner_options`). With an even number of updates the
    median is a convention: radius="median" (the default: the mean of the two middle norms, as the official Ditto
    code's `l2_clip`, np.median in litian96/ditto flearn/utils/tf_utils.py) or "lower_median" (torch.median, the
    lower of the two middle norms, this project's rule before)."""
    check_stack(updates, num_malicious, "norm_clip")
    norms = updates.norm(dim=1)
    if radius == "lower_median":
        clip = norms.median()
    elif radius == "median":
        clip = norms.double().quantile(0.5).to(norms.dtype)
    else:
        raise ValueError(f"norm_clip: radius must be 'lower_median' or 'median', got {radius!r}")
    scale = (clip / norms.clamp_min(1e-12)).clamp_max(1.0)
    return AGGREGATORS[inner](updates * scale[:, None].to(updates.dtype), weights, num_malicious, **inner_options)


AGGREGATORS: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "knorm": knorm,
    "norm_clip": norm_clip,
    "geomed": geomed,
    "centered_clip": centered_clip,
}


def check_aggregator(options: Mapping[str, Any], clients_per_round: int, num_malicious: int) -> None:
    """Raise ValueError, naming the fix, when the rule cannot run on `clients_per_round` updates with f given or an
    option has no meaning: the configured rule runs once on a stack of zeros, so its own checks speak."""
    n = clients_per_round
    try:
        build_aggregator(options)(torch.zeros(n, 1), torch.ones(n, dtype=torch.float64), num_malicious)
    except TypeError as err:  # an option the rule does not take
        raise ValueError(f"{options['name']} does not take one of the options {dict(options)}: {err}") from None


class Rule:
    """A registry rule with its options bound, and its state between rounds: none here, so a checkpoint of a run
    with this rule holds no aggregator state (`state` is None)."""

    def __init__(self, rule: Callable[..., torch.Tensor]) -> None:
        self.rule = rule

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, num_malicious: int) -> torch.Tensor:
        return self.rule(updates, weights, num_malicious)

    def state(self) -> np.ndarray | None:
        """What a checkpoint keeps of the rule so that a resumed run aggregates as the uninterrupted one."""
        return None

    def load_state(self, state: np.ndarray | None) -> None:
        if state is not None:
            raise ValueError(
                "the checkpoint holds an aggregator state, but this rule keeps none: resume with the "
                "run's own aggregator"
            )


class FromPrevious(Rule):
    """A rule that restarts from the previous round's aggregate (centered clipping's centre): that aggregate is its
    state, and a checkpoint keeps it."""

    def __init__(self, rule: Callable[..., torch.Tensor]) -> None:
        super().__init__(rule)
        self.previous: torch.Tensor | None = None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, num_malicious: int) -> torch.Tensor:
        centre = None if self.previous is None else self.previous.to(updates.device)  # a checkpoint's is on the CPU
        self.previous = self.rule(updates, weights, num_malicious, center=centre)
        return self.previous

    def state(self) -> np.ndarray | None:
        return None if self.previous is None else self.previous.cpu().numpy()

    def load_state(self, state: np.ndarray | None) -> None:
        self.previous = None if state is None else torch.from_numpy(np.array(state))


STATEFUL: dict[str, type[Rule]] = {"centered_clip": FromPrevious}  # rules that carry a state from round to round


def build_aggregator(options: Mapping[str, Any]) -> Rule:
    """The registry rule named by `options["name"]` with its other options bound (`f` is the strategy's, not the
    rule's); a stateful rule (`STATEFUL`) carries its state from round to round."""
    name = options["name"]
    params = {k: v for k, v in options.items() if k not in ("name", "f")}
    return STATEFUL.get(name, Rule)(partial(AGGREGATORS[name], **params))
