"""Local training: the personal step with lam = 0 and no global step. Each device trains only its own model and sends
a zero update (w never moves): the same personal models as `ditto` with lam = 0, at no cost of global training."""

from __future__ import annotations

from app.methods.ditto import Ditto


class Local(Ditto):
    trains_global = False
    takes_lam = False  # its lam is 0
    lam_lists = False
    lam_auto = False
