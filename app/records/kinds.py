"""The names of the models a run scores: `global`, `personal`, and one `personal@lam=X` per lam of a lam list."""

from __future__ import annotations

from typing import Any

PERSONAL = "personal"
KINDS = ("global", PERSONAL)
LAM_TAG = "@lam="  # a run with a lam list (method.lam=[...]) reports each lam's personal models as personal@lam=X


def personal_kind(lam: float) -> str:
    """The model kind of the personal models trained with `lam` in a lam-list run, e.g. personal@lam=0.1."""
    return f"personal{LAM_TAG}{float(lam)!r}"


def model_kinds(row: dict[str, Any]) -> list[str]:
    """The model kinds one device's evaluation metrics hold: KINDS, then the per-lam kinds in the row's order."""
    return [*KINDS, *(k.removeprefix("correct_") for k in row if k.startswith(f"correct_personal{LAM_TAG}"))]
