"""Ditto: each device keeps a personal model v_k trained by the Ditto step (app/ditto.py) against the received
w^t; the global model is trained by the configured aggregator. lam is the device's (client_app: fixed, auto, or a
list: one personal model per lam)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.common import Scalar
from torch import nn

from app.ditto import LamSearch
from app.methods.base import Method
from app.persistence import DeviceState
from app.results import personal_kind

if TYPE_CHECKING:
    from app.client_app import DittoClient


class Ditto(Method):
    keeps_personal = True
    scores_personal = True
    lam_lists = True

    def lam_counts(
        self, device: DittoClient, stored: DeviceState | None, chosen: list[list[float]]
    ) -> np.ndarray | None:
        """lam auto: how often each grid value was chosen, this round's choices included."""
        if not isinstance(device.lam, LamSearch):
            return None
        grid = device.lam.grid
        counts = (
            stored.lam_counts.copy() if stored is not None and stored.lam_counts is not None else np.zeros(len(grid))
        )
        for lam in chosen[0] if chosen else []:
            counts[grid.index(lam)] += 1
        return counts

    def evaluated(
        self, device: DittoClient, global_model: nn.Module, personal: list[nn.Module], server_round: int
    ) -> dict[str, nn.Module]:
        """The stored personal model; with a lam list, one per lam, each under its own kind."""
        if isinstance(device.lam, tuple):
            return {personal_kind(lam): model for lam, model in zip(device.lam, personal)}
        return {"personal": personal[0]}

    def report(self, device: DittoClient, stored: DeviceState | None) -> dict[str, Scalar]:
        """The lam this device trains with: fixed, or (auto) the grid value chosen most often so far; none with a
        lam list (each personal model is reported under its own lam) or before an auto device first trained."""
        lam = device.lam
        if isinstance(lam, tuple):
            return {}
        if isinstance(lam, LamSearch):
            if stored is None or stored.lam_counts is None:
                return {}
            return {"lam": float(lam.grid[int(np.argmax(stored.lam_counts))])}
        return {"lam": float(lam)}
