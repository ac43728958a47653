"""What every method gives the device and the server: a few hooks, whose defaults are the global model alone (the
federated solver on its own: w trains, no personal model is kept or scored)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from flwr.common import Scalar
from omegaconf import DictConfig
from torch import nn

from app import ditto
from app.persistence import DeviceState
from strategies.fair import Reweight

if TYPE_CHECKING:
    from app.client_app import DittoClient


class Method:
    """One method, built from the run's config. The client loads the stored personal models before `train_round`
    and `evaluated` when `keeps_personal`, and stores what `train_round` trained."""

    keeps_personal: ClassVar[bool] = False  # a personal model is kept on the device between rounds
    scores_personal: ClassVar[bool] = False  # each evaluation scores a personal model besides w
    trains_global: ClassVar[bool] = True  # the device runs the global step and sends its update (else: zero)
    lam_lists: ClassVar[bool] = False  # method.lam may be a list: one personal model per lam, trained side by side

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def reweight(self) -> Reweight | None:
        """The server's rescaling of the round's updates by the devices' losses before the aggregator; None: none."""
        return None

    def fit_metrics(self, device: DittoClient, global_model: nn.Module) -> dict[str, Scalar]:
        """What a device reports with its update, besides its partition id."""
        return {}

    def train_round(
        self, device: DittoClient, global_model: nn.Module, personal: list[nn.Module], steps: dict
    ) -> list[list[float]]:
        """Train `global_model` (w^t on entry) and the `personal` models in place for one round (`steps`: the local
        round's keyword arguments); returns the lam of each personal step, per personal model. Here Ditto's round
        (app/ditto.py), one personal model per lam of the device."""
        lam = device.lam
        lams = list(lam) if isinstance(lam, tuple) else [lam] * len(personal)
        return ditto.multi_lam_round(
            global_model, personal, lams, device.x_train, device.y_train, train_global=self.trains_global, **steps
        )

    def lam_counts(
        self, device: DittoClient, stored: DeviceState | None, chosen: list[list[float]]
    ) -> np.ndarray | None:
        """What the device keeps of the lams its personal steps chose (lam auto); None: nothing."""
        return None

    def evaluated(
        self, device: DittoClient, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        """The models scored besides the received w, by model kind (app/results.py)."""
        return {}

    def report(self, device: DittoClient, stored: DeviceState | None) -> dict[str, Scalar]:
        """What a device's evaluation reply adds to the scores."""
        return {}


class LossReweighting(Method):
    """A fair global solver: the server rescales the round's updates by the losses F_k(w^t) the devices report
    (strategies/fair.py)."""

    def fit_metrics(self, device: DittoClient, global_model: nn.Module) -> dict[str, Scalar]:
        return {"train_loss": ditto.evaluate(global_model, device.x_train, device.y_train, device.objective)[1]}
