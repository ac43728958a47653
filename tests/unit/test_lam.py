"""λ is read once (app/training/lam.py): a number, auto or a list becomes one plan with an entry per personal model,
and nothing the run executes afterwards tells the forms apart."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from app.paths import PROJECT_DIR
from app.training.lam import LAM_FIXED, LAM_GRID, LamPlan, LamSearch, device_plan, plan_kinds

X = torch.arange(40, dtype=torch.float32).reshape(20, 2)
Y = torch.arange(20) % 3


def _cfg(lam: object, **method: object) -> dict:
    return {
        "seed": 0,
        "method": {"lam": lam, "strong_attack": False, "val_fraction": 0.2, "val_split": "last", "min_validation": 1}
        | method,
    }


def test_a_number_is_one_personal_model_with_that_lam() -> None:
    x, y, plan = device_plan(_cfg(0.5), 0, X, Y)
    assert plan == LamPlan((0.5,), ("personal",))
    assert x is X and y is Y


def test_a_list_is_one_personal_model_per_lam_each_under_its_own_kind() -> None:
    x, _, plan = device_plan(_cfg([0.1, 1]), 0, X, Y)
    assert plan.lams == (0.1, 1.0)
    assert plan.kinds == ("personal@lam=0.1", "personal@lam=1.0") == plan_kinds(_cfg([0.1, 1])["method"])
    assert x is X


def test_auto_holds_out_the_last_samples_and_searches_the_grid() -> None:
    x, y, plan = device_plan(_cfg("auto"), 0, X, Y)
    (search,) = plan.lams
    assert isinstance(search, LamSearch) and search.grid == LAM_GRID[False]
    assert torch.equal(x, X[:16]) and torch.equal(search.x_val, X[16:]) and torch.equal(search.y_val, Y[16:])
    assert plan.kinds == ("personal",)


def test_auto_with_too_little_validation_data_keeps_every_sample_and_the_fixed_lam() -> None:
    x, _, plan = device_plan(_cfg("auto", val_fraction=0.1, min_validation=2), 0, X[:10], Y[:10])
    assert plan == LamPlan((LAM_FIXED[False],), ("personal",)) and len(x) == 10
    x, _, plan = device_plan(_cfg("auto", val_fraction=0.1), 0, X[:1], Y[:1])
    assert plan == LamPlan((LAM_FIXED[False],), ("personal",)) and len(x) == 1, "one sample: nothing to hold out"


def test_a_method_without_personal_models_has_an_empty_plan() -> None:
    assert device_plan(_cfg(1.0), 0, X, Y, personal_models=False)[2] == LamPlan((), ())


def test_count_choices_adds_this_rounds_choices_to_the_stored_counts() -> None:
    _, _, plan = device_plan(_cfg("auto"), 0, X, Y)
    counts = plan.count_choices(None, [[0.1, 2.0, 2.0]])
    assert counts.tolist() == [1, 0, 2]
    assert plan.count_choices(counts, [[1.0]]).tolist() == [1, 1, 2]
    assert LamPlan((0.5,), ("personal",)).count_choices(None, [[0.5]]) is None


def test_the_reported_lam_is_the_fixed_one_or_the_most_chosen_and_none_for_a_list() -> None:
    _, _, auto = device_plan(_cfg("auto"), 0, X, Y)
    assert auto.reported_lam(None) is None, "an auto device that never trained has chosen nothing"
    assert auto.reported_lam(np.array([1.0, 3.0, 2.0])) == 1.0
    assert LamPlan((0.5,), ("personal",)).reported_lam(None) == 0.5
    assert device_plan(_cfg([0.1, 1]), 0, X, Y)[2].reported_lam(None) is None


def test_the_plan_moves_its_validation_data_to_the_accelerator() -> None:
    """(torch's `meta` device stands in for a GPU: tensors moved there keep their shape and lose their values.)"""
    _, _, plan = device_plan(_cfg("auto"), 0, X, Y)
    moved = plan.to(torch.device("meta")).lams[0]
    assert moved.x_val.device.type == moved.y_val.device.type == "meta" and moved.x_val.shape == (4, 2)
    assert plan.lams[0].x_val.device.type == "cpu", "the plan itself is unchanged"
    assert LamPlan((0.5,), ("personal",)).to(torch.device("meta")).lams == (0.5,)


FORM_CHECKS = re.compile(
    r"""lam\S*\s*[!=]=\s*["']auto["']|isinstance\([^)]*lam[^)]*,\s*(tuple|Sequence|ListConfig|list)"""
)


@pytest.mark.parametrize("root", ["app", "strategies"])
def test_only_the_lam_module_and_the_config_check_tell_the_forms_apart(root: str) -> None:
    """Where a run executes (everything but the analysis of recorded results), the raw forms of method.lam are
    told apart in app/training/lam.py (the plan) and app/config/validate.py (what is allowed) only."""
    allowed = {PROJECT_DIR / "app/training/lam.py", PROJECT_DIR / "app/config/validate.py"}
    found = [
        f"{path.relative_to(PROJECT_DIR)}:{i}"
        for path in (PROJECT_DIR / root).rglob("*.py")
        if path not in allowed and "analysis" not in path.parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if FORM_CHECKS.search(line)
    ]
    assert found == []
    assert FORM_CHECKS.search("if isinstance(device.lam, tuple):") and FORM_CHECKS.search('method.get("lam") != "auto"')
