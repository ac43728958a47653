"""The methods Ditto is compared with, one small object each (app/methods/base.py: the hooks), registered in
METHODS; the `method` config group mirrors METHODS, so adding a method is one module, one entry and one conf file.

- `ditto`: personal model by the Ditto step (app/training/steps.py), global model by the configured aggregator.
- `local`: the personal step with lam = 0 and no global step (a zero update).
- `global`: the global model alone.
- `finetune`: the global model, fine-tuned on each device's data before each evaluation (not kept), with the
  official proximal term; `finetune_matched` (ours): the same at Ditto's compute.
- `qffl`, `tilted`: fair global solvers; the server rescales the round's updates by the devices' losses
  (strategies/fair.py) before the aggregator.
- `apfl`: Adaptive Personalized FL with a fixed mixing weight alpha.
"""

from __future__ import annotations

from app.methods.apfl import APFL
from app.methods.base import Method
from app.methods.ditto import Ditto
from app.methods.finetune import Finetune, FinetuneMatched
from app.methods.global_model import GlobalModel
from app.methods.local import Local
from app.methods.qffl import QFFL
from app.methods.tilted import Tilted

METHODS: dict[str, type[Method]] = {
    "ditto": Ditto,
    "local": Local,
    "global": GlobalModel,
    "finetune": Finetune,
    "finetune_matched": FinetuneMatched,
    "qffl": QFFL,
    "tilted": Tilted,
    "apfl": APFL,
}

__all__ = ["METHODS", "Method"]
