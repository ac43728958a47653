"""q-FFL (q-FedAvg's server step, L = 1/lr): devices with a higher loss weigh more; q = 0 is the plain mean."""

from __future__ import annotations

from app.methods.base import LossReweighting
from strategies.fair import Reweight, qffl


class QFFL(LossReweighting):
    def reweight(self) -> Reweight:
        q, lr = float(self.cfg.method.q), float(self.cfg.lr)
        return lambda updates, losses: qffl(updates, losses, q, lr)
