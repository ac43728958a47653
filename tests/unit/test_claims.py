"""The paper's claim per setting (app/analysis/claims.py): the outcome rule, the choice of the strongest baselines, and
the claims.md that the report writes with each dataset's budget, failures and compute time."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from app.analysis.claims import budget, claims, markdown, outcome
from app.analysis.report import main, run_seconds
from app.paths import PROJECT_DIR
from tests.unit.test_report import _seeded_sweep

SETTING = ["dataset.name", "attack.name", "attack.fraction"]
KEY = {"dataset.name": "digits", "attack.name": "label_poison", "attack.fraction": 0.5}


@pytest.mark.parametrize(
    ("acc", "std", "expected"),
    [
        ("better", "better", "holds"),
        ("better", "n.s.", "partly"),
        ("n.s.", "better", "partly"),
        ("n.s.", "n.s.", "n.s."),
        ("worse", "better", "reverses"),
        ("better", "worse", "reverses"),
        ("n.s.", "worse", "reverses"),
    ],
)
def test_outcome_names_what_the_intervals_say(acc: str, std: str, expected: str) -> None:
    assert outcome(acc, std) == expected


def _pair(ditto: str, baseline: str, d_acc: float, acc_verdict: str, d_std: float, std_verdict: str) -> dict:
    return {
        **KEY,
        "ditto": ditto,
        "baseline": baseline,
        "n_seeds": 5,
        "d_benign_acc": d_acc,
        "d_benign_acc_lo": d_acc - 0.01,
        "d_benign_acc_hi": d_acc + 0.01,
        "d_benign_acc_verdict": acc_verdict,
        "d_benign_std_acc": d_std,
        "d_benign_std_acc_lo": d_std - 0.01,
        "d_benign_std_acc_hi": d_std + 0.01,
        "d_benign_std_acc_verdict": std_verdict,
    }


def test_accuracy_is_tested_against_the_most_accurate_baseline_and_std_against_the_fairest() -> None:
    summary = pd.DataFrame(
        [
            {**KEY, "label": "global (median)", "benign_acc": 0.90, "benign_std_acc": 0.20},  # most accurate
            {**KEY, "label": "qffl (mean)", "benign_acc": 0.60, "benign_std_acc": 0.05},  # fairest
            {**KEY, "label": "global (krum)", "benign_acc": 0.70, "benign_std_acc": 0.10},
        ]
    )
    pairs = pd.DataFrame(
        [
            # λ = auto: more accurate than the median's model, less fair than q-FFL's: the claim reverses
            _pair("ditto λ=auto (mean)", "global (median)", 0.02, "better", -0.10, "better"),
            _pair("ditto λ=auto (mean)", "qffl (mean)", 0.30, "better", 0.05, "worse"),
            _pair("ditto λ=auto (mean)", "global (krum)", 0.20, "better", -0.02, "better"),
            # the tuned λ beats both: holds
            _pair("ditto λ=best (tuned on test: λ=1) (mean)", "global (median)", 0.05, "better", -0.15, "better"),
            _pair("ditto λ=best (tuned on test: λ=1) (mean)", "qffl (mean)", 0.35, "better", -0.01, "better"),
            _pair("ditto λ=best (tuned on test: λ=1) (mean)", "global (krum)", 0.25, "better", -0.05, "better"),
            # a point of the fixed-λ grid, and the λ-auto run's global model: not what the claim is tested on
            _pair("ditto λ=0.1 (mean)", "global (median)", -0.30, "worse", 0.2, "worse"),
            _pair("ditto λ=auto:global (mean)", "global (median)", -0.30, "worse", 0.2, "worse"),
        ]
    )
    rows = claims(summary, pairs, SETTING).set_index("ditto")
    assert list(rows.index) == ["ditto λ=auto (mean)", "ditto λ=best (tuned on test: λ=1) (mean)"]
    assert set(rows["acc_baseline"]) == {"global (median)"} and set(rows["std_baseline"]) == {"qffl (mean)"}
    auto, tuned = rows.loc["ditto λ=auto (mean)"], rows.loc["ditto λ=best (tuned on test: λ=1) (mean)"]
    assert (auto["d_acc"], auto["d_std"], auto["outcome"]) == (0.02, 0.05, "reverses")
    assert (tuned["d_acc"], tuned["d_std"], tuned["outcome"]) == (0.05, -0.01, "holds")


def test_budget_line_counts_jobs_compute_time_and_failures() -> None:
    runs = pd.DataFrame(
        [
            {"run": "0", "status": "ok", "error": "", "seed": 0, "num_rounds": 100, "seconds": 1800.0},
            {"run": "0", "status": "ok", "error": "", "seed": 0, "num_rounds": 100, "seconds": 1800.0},  # 2nd model
            {"run": "1", "status": "ok", "error": "", "seed": 1, "num_rounds": 100, "seconds": 5400.0},
            *(
                {
                    "run": f"f{i}",
                    "status": "failed",
                    "error": "ConfigError: krum needs n >= f + 3 (got n=5 updates, f=4): sample more clients",
                    "seed": i,
                    "num_rounds": 100,
                }
                for i in range(2)
            ),
        ]
    )
    text = budget(runs)
    assert "rounds 100;" in text and "seeds 0, 1." in text
    assert "2 finished, 2 failed, 0 incomplete; 2.0 h of run time" in text  # each run's time counted once
    assert "2 × krum needs n >= f + 3 (got n=5 updates, f=4)" in text


def test_report_writes_the_claims_and_regenerates_them_from_the_csvs(tmp_path: Path) -> None:
    sweep = _seeded_sweep(tmp_path / "sweep")
    for results in sweep.rglob("results.json"):  # each run took 36 s
        r = json.loads(results.read_text())
        r["rounds"][-1]["seconds"] = 36.0
        results.write_text(json.dumps(r))
    assert main([str(sweep), "--out", str(tmp_path / "collected")]) == 0
    assert main(["--csv", str(tmp_path / "collected"), "--out", str(tmp_path / "again")]) == 0
    for name in ("claims.csv", "claims.md"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "collected" / name).read_text(), name
    rows = pd.read_csv(tmp_path / "collected" / "claims.csv")
    # tests/unit/test_report.py's seeds: the tuned λ (1.0) against the global model, accuracy +0.157 [-0.046, +0.359]
    # and std -0.037 [-0.075, +0.001]: neither interval excludes 0
    assert rows["ditto"].tolist() == ["ditto λ=best (tuned on test: λ=1) (mean)"]
    assert rows["outcome"].tolist() == ["n.s."] and rows["d_acc"].iloc[0] == pytest.approx(0.156667, abs=1e-6)
    text = (tmp_path / "collected" / "claims.md").read_text()
    assert "Jobs: 6 finished, 0 failed, 0 incomplete; 0.1 h of run time" in text  # 6 x 36 s
    assert "- Ditto tuned λ, 1 attacked setting: 0 holds, 0 partly, 1 n.s., 0 reverses." in text
    table = (tmp_path / "collected" / "table.md").read_text()  # the budget beside the tables too
    assert table.startswith("# digits\n\nBudget: rounds 4;") and "Jobs: 6 finished" in table


def test_one_setting_without_setting_columns() -> None:
    summary = pd.DataFrame(
        [
            {"label": "global (median)", "benign_acc": 0.9, "benign_std_acc": 0.2},
            {"label": "qffl (mean)", "benign_acc": 0.6, "benign_std_acc": 0.05},
        ]
    )
    pairs = pd.DataFrame(
        [
            {k: v for k, v in _pair("ditto λ=auto (mean)", base, 0.1, "better", -0.1, "better").items() if k not in KEY}
            for base in ("global (median)", "qffl (mean)")
        ]
    )
    rows = claims(summary, pairs, [])
    assert rows["outcome"].tolist() == ["holds"] and rows["std_baseline"].tolist() == ["qffl (mean)"]
    assert "| ditto λ=auto (mean) | 5 | global (median) |" in markdown(rows, pd.DataFrame({"run": []}), [])


def test_a_baseline_without_a_mean_is_never_the_strongest() -> None:
    summary = pd.DataFrame(
        [
            {**KEY, "label": "global (median)", "benign_acc": 0.7, "benign_std_acc": 0.2},
            {**KEY, "label": "global (krum)", "benign_acc": float("nan"), "benign_std_acc": float("nan")},
        ]
    )
    pairs = pd.DataFrame(
        [
            _pair("ditto λ=auto (mean)", "global (median)", 0.1, "better", -0.1, "better"),
            _pair("ditto λ=auto (mean)", "global (krum)", float("nan"), "n.s.", float("nan"), "n.s."),
        ]
    )
    rows = claims(summary, pairs, SETTING)
    assert rows["acc_baseline"].tolist() == ["global (median)"] and rows["std_baseline"].tolist() == ["global (median)"]


def test_a_baseline_on_fewer_seeds_is_never_the_strongest() -> None:
    """An unfinished sweep: Multi-Krum on 2 of 5 seeds has the higher mean, but over other seeds than Ditto's."""
    summary = pd.DataFrame(
        [
            {**KEY, "label": "global (median)", "benign_acc": 0.7, "benign_std_acc": 0.2},
            {**KEY, "label": "global (multikrum)", "benign_acc": 0.9, "benign_std_acc": 0.1},
        ]
    )
    partial = {**_pair("ditto λ=auto (mean)", "global (multikrum)", 0.0, "n.s.", 0.0, "n.s."), "n_seeds": 2}
    pairs = pd.DataFrame([_pair("ditto λ=auto (mean)", "global (median)", 0.1, "better", -0.1, "better"), partial])
    rows = claims(summary, pairs, SETTING)
    assert rows["acc_baseline"].tolist() == ["global (median)"] and rows["std_baseline"].tolist() == ["global (median)"]
    assert rows["outcome"].tolist() == ["holds"] and rows["n_seeds"].tolist() == [5]


def test_clean_data_named_by_the_runs_when_the_attack_is_not_a_setting_column() -> None:
    summary = pd.DataFrame([{"label": "global (median)", "benign_acc": 0.9, "benign_std_acc": 0.2}])
    pair = _pair("ditto λ=auto (mean)", "global (median)", 0.0, "n.s.", 0.0, "n.s.")
    pairs = pd.DataFrame([{k: v for k, v in pair.items() if k not in KEY}])
    runs = pd.DataFrame(
        [
            {"run": "0", "status": "ok", "dataset.name": "digits", "attack.name": "none", "seed": 0},
            {"run": "1", "status": "failed", "dataset.name": "vehicle", "attack.name": "none", "seed": 0},
        ]
    )
    text = markdown(claims(summary, pairs, []), runs, [])
    assert "| n.s. | as accurate and fair (clean data) |" in text
    assert "attacked setting" not in text  # clean settings are not counted as attacked
    # a dataset whose runs gave no claim row still shows its budget and failures
    assert "## vehicle" in text and "0 finished, 1 failed" in text


def test_run_time_adds_the_sittings_of_a_resumed_run() -> None:
    # rounds 1-2 in a first sitting (up to 40 s), resumed: rounds 3-4 in a second (up to 25 s on a new clock)
    rounds = [{"round": 1, "seconds": 20.0}, {"round": 2, "seconds": 40.0}, {"round": 3, "seconds": 12.0}]
    assert run_seconds([*rounds, {"round": 4, "seconds": 25.0}]) == 65.0
    assert run_seconds([{"round": 1, "seconds": 3.0}, {"round": 2, "seconds": 7.5}]) == 7.5
    assert run_seconds([]) is None


def test_the_committed_results_page_is_what_its_committed_csvs_give(tmp_path: Path) -> None:
    results = PROJECT_DIR / "docs" / "results"
    if not (results / "runs.csv").exists():
        pytest.skip("no collected CSVs under docs/results")
    for name in ("runs.csv", "devices.csv"):
        (tmp_path / name).write_bytes((results / name).read_bytes())
    assert main(["--csv", str(tmp_path)]) == 0
    for name in ("claims.md", "claims.csv", "table.md", "summary.csv", "paired.csv"):
        assert (tmp_path / name).read_text() == (results / name).read_text(), (
            f"docs/results/{name} is stale: run ditto-report --csv docs/results"
        )
