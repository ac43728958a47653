"""λ, read once: `method.lam` (a number, `auto`, or a list) becomes one plan with an entry per personal model, so
nothing downstream asks which form it was. Auto is the official code's dynamic λ: each personal step keeps the
candidate of a small grid with the lowest validation loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from app.data.federation import load_federation
from app.records.kinds import PERSONAL, personal_kind
from app.rng import Stream, round_generator


def validation_size(n: int, val_fraction: float, min_validation: int = 1) -> int:
    """lam auto: how many of a device's n training samples are held out for validation. The official client keeps
    the first int(0.9 n) for training and validates on the rest (litian96/ditto flearn/models/client.py lines
    12-16, val_fraction = 0.1), whatever n; 0 (no search: the fixed lam on all the data) when that leaves fewer than
    `min_validation` validation samples (`method.min_validation`, 1: the official behaviour) or no training sample
    (n = 1, where the official client would train on an empty set)."""
    n_val = n - int((1.0 - val_fraction) * n)
    return n_val if min_validation <= n_val < n else 0


def trained_count(n: int, method: Mapping[str, Any]) -> int:
    """How many of a device's n training samples it trains on under the `method` config: all of them, less the
    validation hold-out under lam auto. The server samples devices by this count, so it must be the client's."""
    if method.get("lam") != "auto":
        return n
    return n - validation_size(n, float(method["val_fraction"]), int(method["min_validation"]))


def sampling_sizes(cfg: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The counts the server samples devices by (`sampling=size`: each device's trained_count), None for uniform
    sampling; devices built from the run's federation."""
    if cfg["sampling"] != "size":
        return None
    federation = load_federation(cfg["dataset"], int(cfg["num_clients"]), int(cfg["seed"]))
    return tuple(trained_count(n, cfg["method"]) for n in federation.training_counts())


@dataclass(frozen=True)
class LamSearch:
    """Per-step choice of lam among `grid` by the loss on a held-out validation split (x_val, y_val)."""

    grid: tuple[float, ...]
    x_val: torch.Tensor
    y_val: torch.Tensor


# lam auto (the paper): the grid and the fixed lam for devices with too little validation data, by attack strength
LAM_GRID = {True: (0.05, 0.1, 0.2), False: (0.1, 1.0, 2.0)}
LAM_FIXED = {True: 0.1, False: 1.0}


def _raw_lams(method: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """`method.lam` as the values of its personal models, or None where it is one number or auto: the one place
    that tells the forms apart."""
    lam = method.get("lam", 0.0)
    return tuple(float(v) for v in lam) if isinstance(lam, Sequence) and not isinstance(lam, str) else None


def plan_kinds(method: Mapping[str, Any]) -> tuple[str, ...]:
    """The model kinds of a device's personal models under `method` (what the server expects each device to
    score): `personal`, or one kind per lam of a list (personal@lam=X)."""
    listed = _raw_lams(method)
    return (PERSONAL,) if listed is None else tuple(personal_kind(lam) for lam in listed)


@dataclass(frozen=True)
class LamPlan:
    """A device's personal models, one entry each: the lam of its personal steps (a number, or lam auto's search)
    and the model kind it is scored under. Built once, where the client reads `method.lam` (`device_plan`)."""

    lams: tuple[float | LamSearch, ...]
    kinds: tuple[str, ...]

    def to(self, accelerator: torch.device) -> LamPlan:
        """The plan with the searches' validation data on `accelerator`."""
        lams = tuple(
            replace(lam, x_val=lam.x_val.to(accelerator), y_val=lam.y_val.to(accelerator))
            if isinstance(lam, LamSearch)
            else lam
            for lam in self.lams
        )
        return replace(self, lams=lams)

    def count_choices(self, counts: np.ndarray | None, chosen: Sequence[Sequence[float]]) -> np.ndarray | None:
        """How often each searched grid value was chosen (the searched entries' grids one after another): the
        stored `counts` plus this round's choices (`chosen`: per personal model, the lam of each step); None where
        no entry searches."""
        grids = [(i, lam.grid) for i, lam in enumerate(self.lams) if isinstance(lam, LamSearch)]
        if not grids:
            return None
        total = counts.copy() if counts is not None else np.zeros(sum(len(grid) for _, grid in grids))
        offset = 0
        for i, grid in grids:
            for lam in chosen[i]:
                total[offset + grid.index(lam)] += 1
            offset += len(grid)
        return total

    def reported_lam(self, counts: np.ndarray | None) -> float | None:
        """The lam a device reports beside its scores: that of its one `personal` model, fixed or (auto) the grid
        value chosen most often so far (none before it first trained); none where each personal model is scored
        under its own lam."""
        if self.kinds != (PERSONAL,):
            return None
        (lam,) = self.lams
        if not isinstance(lam, LamSearch):
            return float(lam)
        return None if counts is None else float(lam.grid[int(np.argmax(counts))])


def device_plan(
    cfg: Mapping[str, Any], partition_id: int, x: torch.Tensor, y: torch.Tensor, personal_models: bool = True
) -> tuple[torch.Tensor, torch.Tensor, LamPlan]:
    """(x_train, y_train, plan) of device `partition_id` from its training data (x, y) and `method.lam`: a fixed
    lam, a lam list (one personal model per lam, multi_lam_round), or auto: the validation split (all but the
    first trained_count samples) is taken before any label corruption, as the official client, either the last
    samples (`method.val_split=last`, official) or a seeded random subset (`random`); devices with too little data
    keep all of it and the fixed lam. A method that keeps no personal model (`personal_models=False`) has an empty
    plan, and trains on the same samples."""
    method = cfg["method"]
    kinds = plan_kinds(method)
    listed = _raw_lams(method)
    lam = method.get("lam", 0.0)
    if listed is not None or lam != "auto":
        plan = LamPlan(listed if listed is not None else (float(lam),), kinds)
    else:
        strong = bool(method["strong_attack"])
        n_train = trained_count(len(y), method)
        if n_train == len(y):
            plan = LamPlan((LAM_FIXED[strong],), kinds)
        else:
            if method["val_split"] == "last":
                order = torch.arange(len(y))
            else:
                split = round_generator(int(cfg["seed"]), partition_id, 0, Stream.VALIDATION_SPLIT)
                order = torch.randperm(len(y), generator=split)
            train, val = order[:n_train], order[n_train:]
            plan = LamPlan((LamSearch(LAM_GRID[strong], x[val], y[val]),), kinds)
            x, y = x[train], y[train]
    return x, y, plan if personal_models else LamPlan((), ())
