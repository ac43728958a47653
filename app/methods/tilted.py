"""The official Ditto code's `q` option: the updates averaged with weights exp(q * loss_k) (exponential tilting)."""

from __future__ import annotations

from app.methods.base import LossReweighting
from strategies.fair import Reweight, tilted


class Tilted(LossReweighting):
    def reweight(self) -> Reweight:
        q = float(self.cfg.method.q)
        return lambda updates, losses: tilted(updates, losses, q)
