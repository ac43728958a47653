"""Ditto: each device keeps a personal model v_k trained by the Ditto step (app/training/steps.py) against the
received w^t; the global model is trained by the configured aggregator. The device's lam plan (app/training/lam.py:
a fixed lam, auto, or one personal model per lam of a list) says what its personal models train with."""

from __future__ import annotations

import numpy as np
from flwr.common import Scalar
from torch import nn

from app.methods.base import Device, Method
from app.records.persistence import DeviceState


class Ditto(Method):
    keeps_personal = True
    scores_personal = True
    takes_lam = True
    lam_lists = True
    lam_auto = True

    def lam_counts(self, device: Device, stored: DeviceState | None, chosen: list[list[float]]) -> np.ndarray | None:
        """lam auto: how often each grid value was chosen, this round's choices included."""
        return device.plan.count_choices(None if stored is None else stored.lam_counts, chosen)

    def evaluated(
        self, device: Device, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        """The stored personal models, each under its kind in the plan."""
        return dict(zip(device.plan.kinds, personal))

    def report(self, device: Device, stored: DeviceState | None) -> dict[str, Scalar]:
        """The lam this device trains with: fixed, or (auto) the grid value chosen most often so far; none with a
        lam list (each personal model is reported under its own lam) or before an auto device first trained."""
        lam = device.plan.reported_lam(None if stored is None else stored.lam_counts)
        return {} if lam is None else {"lam": lam}
