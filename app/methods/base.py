"""What every method gives the device and the server: a few hooks, whose defaults are the global model alone (the
federated solver on its own: w trains, no personal model is kept or scored)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import numpy as np
import torch
from flwr.common import Scalar
from omegaconf import DictConfig
from torch import nn

from app.records.persistence import DeviceState
from app.rng import Stream
from app.training.lam import LamPlan
from app.training.models import Objective
from app.training.steps import evaluate, multi_lam_round
from strategies.fair import Reweight


class Device(Protocol):
    """What a method may read from the device it runs on (the client, app/client_app.py): its partition id, its
    training data (after lam auto's hold-out and any label poisoning), its lam plan (one entry per personal model),
    its objective, and its random streams."""

    partition_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    plan: LamPlan
    objective: Objective

    def generator(self, server_round: int, stream: Stream) -> torch.Generator: ...


class Method:
    """One method, built from the run's config. The client loads the stored personal models before `train_round`
    and `evaluated` when `keeps_personal`, and stores what `train_round` trained."""

    keeps_personal: ClassVar[bool] = False  # a personal model is kept on the device between rounds
    scores_personal: ClassVar[bool] = False  # each evaluation scores a personal model besides w
    trains_global: ClassVar[bool] = True  # the device runs the global step and sends its update (else: zero)
    takes_lam: ClassVar[bool] = False  # method.lam is read (Ditto's personal step, fine-tuning's proximal term)
    lam_lists: ClassVar[bool] = False  # method.lam may be a list: one personal model per lam, trained side by side
    lam_auto: ClassVar[bool] = False  # method.lam may be auto: the personal step chooses its lam per step

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @classmethod
    def required_metrics(cls, personal_kinds: Sequence[str]) -> frozenset[str]:
        """The evaluation metrics every device of a run of this method must send (the recorder reads them);
        `personal_kinds`: the kinds of a device's personal models (app/training/lam.plan_kinds)."""
        kinds = ("global", *personal_kinds) if cls.scores_personal else ("global",)
        personal = ("personal_round", "personal_updates") if cls.keeps_personal else ()
        return frozenset({"n_train", "n_test", *personal, *(f"{p}_{k}" for k in kinds for p in ("correct", "loss"))})

    def reweight(self) -> Reweight | None:
        """The server's rescaling of the round's updates by the devices' losses before the aggregator; None: none."""
        return None

    def fit_metrics(self, device: Device, global_model: nn.Module) -> dict[str, Scalar]:
        """What a device reports with its update, besides its partition id."""
        return {}

    def train_round(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], steps: dict
    ) -> list[list[float]]:
        """Train `global_model` (w^t on entry) and the `personal` models in place for one round (`steps`: the local
        round's keyword arguments); returns the lam of each personal step, per personal model. Here Ditto's round
        (app/training/steps.py), one personal model per entry of the device's lam plan."""
        return multi_lam_round(
            global_model,
            personal,
            device.plan.lams,
            device.x_train,
            device.y_train,
            train_global=self.trains_global,
            **steps,
        )

    def lam_counts(self, device: Device, stored: DeviceState | None, chosen: list[list[float]]) -> np.ndarray | None:
        """What the device keeps of the lams its personal steps chose (lam auto); None: nothing."""
        return None

    def evaluated(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        """The models scored besides the received w, by model kind (app/records/kinds.py)."""
        return {}

    def report(self, device: Device, stored: DeviceState | None) -> dict[str, Scalar]:
        """What a device's evaluation reply adds to the scores."""
        return {}


class LossReweighting(Method):
    """A fair global solver: the server rescales the round's updates by the losses F_k(w^t) the devices report
    (strategies/fair.py)."""

    def fit_metrics(self, device: Device, global_model: nn.Module) -> dict[str, Scalar]:
        return {"train_loss": evaluate(global_model, device.x_train, device.y_train, device.objective)[1]}
