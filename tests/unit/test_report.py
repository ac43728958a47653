"""The collector on hand-made sweep folders (a complete, a failed and an incomplete run), and a real 2-job sweep in
which one job fails, collected and then analysed by the notebook."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.analysis.report import collect, label, main, statistics, summary_table
from app.analysis.summary import roles
from app.errors import UserError
from app.paths import PROJECT_DIR
from app.runners.simulate import sweep_size
from tests.system.test_end_to_end import _simulate


def _results(cfg: dict, rounds: int, final: dict) -> dict:
    return {
        "config": cfg,
        "final": final,
        "rounds": [{"round": r + 1} for r in range(rounds)],
        "clients": [
            {"client_id": 0, "malicious": False, "acc_global": 0.5, "acc_personal": 0.75},
            {"client_id": 1, "malicious": True, "acc_global": 0.25, "acc_personal": 0.0},
        ],
    }


def _cfg(method: str, fraction: float) -> dict:
    return {
        "num_rounds": 4,
        "seed": 0,
        "method": {"name": method, "lam": 1.0},
        "attack": {"name": "label_poison", "fraction": fraction},
        "aggregator": {"name": "mean"},
    }


def _metrics(acc: float) -> dict:
    return {
        "benign_acc": acc,
        "benign_mean_acc": acc,
        "benign_std_acc": 0.1,
        "benign_var_acc": 0.01,
        "benign_worst10_acc": acc / 2,
        "malicious_acc": 0.2,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(
        json.dumps(_results(_cfg("ditto", 0.5), 4, {"global": _metrics(0.6), "personal": _metrics(0.8)}))
    )
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- aggregator=krum\n- attack.fraction=0.8\n")
    (tmp_path / "1" / "failed.json").write_text(json.dumps({"error": "ConfigError: krum needs n >= f + 3"}))
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- method=global\n")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text(
        json.dumps(_results(_cfg("global", 0.5), 2, {"global": _metrics(0.5), "personal": None}))
    )
    return tmp_path


def test_collector_lists_failed_and_incomplete_runs(sweep: Path) -> None:
    runs, devices = collect(sweep)
    by_run = runs.groupby("run")["status"].first().to_dict()
    assert by_run == {"0": "ok", "1": "failed", "2": "incomplete", "3": "incomplete"}
    assert "krum needs" in runs[runs["run"] == "1"]["error"].item()
    assert runs[runs["run"] == "1"]["aggregator.name"].item() == "krum"  # the failed job's overrides as columns
    ok = runs[runs["status"] == "ok"].set_index("kind")
    assert ok.loc["personal", "benign_acc"] == 0.8 and ok.loc["global", "benign_acc"] == 0.6
    assert ok.loc["personal", "method.lam"] == 1.0 and ok.loc["personal", "attack.fraction"] == 0.5
    assert ok.loc["personal", "label"] == "ditto λ=1.0 (mean)"
    assert ok.loc["global", "label"] == "ditto:global (mean)"
    assert len(devices[devices["run"] == "0"]) == 4  # 2 devices x 2 model kinds
    table = summary_table(runs)
    assert "| ditto λ=1.0 (mean) | 1 | 0.800 | 0.100 | 0.400 |" in table  # one seed: means, no interval
    assert "| ditto:global (mean) | 1 | 0.600 | 0.100 | 0.300 |" in table
    assert "0.500" not in table  # the incomplete run is not averaged in


def test_collector_cli_writes_the_files_and_names_the_problems(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    out = sweep / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs: 1 complete, 1 failed, 2 incomplete" in printed and "failed: 1: ConfigError" in printed
    for name in (
        "runs.csv",
        "devices.csv",
        "summary.csv",
        "paired.csv",
        "table.md",
        "scatter.png",
        "lambda.png",
        "corruption.png",
        "per_device.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert set(pd.read_csv(out / "runs.csv")["status"]) == {"ok", "failed", "incomplete"}


T2 = 4.303  # t(0.975) with 2 degrees of freedom (3 seeds), from a t table
# three seeds of one setting: a lam-list Ditto run (personal@lam=0.1 and @lam=1.0) and a global run per seed
ACC = {"personal@lam=0.1": [0.80, 0.70, 0.90], "personal@lam=1.0": [0.85, 0.75, 0.92], "global": [0.60, 0.65, 0.80]}
STD = {"personal@lam=0.1": [0.05, 0.06, 0.07], "personal@lam=1.0": [0.08, 0.08, 0.08], "global": [0.10, 0.12, 0.13]}


def _seeded_sweep(root: Path) -> Path:
    for seed in range(3):
        base = {
            "num_rounds": 4,
            "seed": seed,
            "dataset": {"name": "digits"},
            "aggregator": {"name": "mean"},
            "attack": {"name": "label_poison", "fraction": 0.5},
        }
        finals = {kind: {**_metrics(ACC[kind][seed]), "benign_std_acc": STD[kind][seed]} for kind in ACC}
        jobs = {
            "ditto": (
                {**base, "method": {"name": "ditto", "lam": [0.1, 1.0]}},
                {"global": finals["global"], "personal": None, **{k: v for k, v in finals.items() if "@" in k}},
            ),
            "global": ({**base, "method": {"name": "global"}}, {"global": finals["global"], "personal": None}),
        }
        for name, (cfg, final) in jobs.items():
            (root / f"{name}{seed}").mkdir(parents=True)
            (root / f"{name}{seed}" / "results.json").write_text(json.dumps(_results(cfg, 4, final)))
    return root


def test_report_means_intervals_and_paired_differences_match_the_hand_computed_ones(tmp_path: Path) -> None:
    runs, _ = collect(_seeded_sweep(tmp_path / "sweep"))
    lam01 = runs[runs["label"] == "ditto λ=0.1 (mean)"]  # the lam-list entry is a row of its own
    assert sorted(lam01["benign_acc"]) == sorted(ACC["personal@lam=0.1"]) and set(lam01["kind"]) == {"personal"}
    setting, summary, pairs = statistics(runs)
    assert setting == ["dataset.name", "attack.name", "attack.fraction"]
    row = summary.set_index("label").loc["ditto λ=0.1 (mean)"]
    half = T2 * 0.1 / math.sqrt(3)  # mean 0.8, sample std 0.1
    assert row["n_seeds"] == 3 and row["benign_acc"] == pytest.approx(0.8)
    assert row["benign_acc_lo"] == pytest.approx(0.8 - half, abs=1e-3)
    assert row["benign_acc_hi"] == pytest.approx(0.8 + half, abs=1e-3)
    # the best fixed lam (1.0: mean 0.84 > 0.8), labelled as tuned on the test data
    tuned = summary.set_index("label").loc["ditto λ=best (tuned on test: λ=1) (mean)"]
    assert tuned["benign_acc"] == pytest.approx(np.mean(ACC["personal@lam=1.0"]))
    # the global model of the Ditto run is the global run's model: one baseline, "global (mean)"
    pair = pairs.set_index(["ditto", "baseline"])
    assert set(pair.index.get_level_values("baseline")) == {"global (mean)"}
    p = pair.loc[("ditto λ=0.1 (mean)", "global (mean)")]
    # accuracy differences 0.20, 0.05, 0.10: mean 0.11667, sample std 0.076376 -> interval contains 0
    assert p["d_benign_acc"] == pytest.approx(0.116667, abs=1e-6)
    assert p["d_benign_acc_lo"] == pytest.approx(0.116667 - T2 * 0.076376 / math.sqrt(3), abs=1e-3)
    assert not p["d_benign_acc_excludes_0"] and p["d_benign_acc_verdict"] == "n.s."
    # std differences -0.05, -0.06, -0.06: mean -0.05667, sample std 0.0057735 -> below 0: Ditto fairer
    assert p["d_benign_std_acc"] == pytest.approx(-0.056667, abs=1e-6)
    assert p["d_benign_std_acc_hi"] == pytest.approx(-0.056667 + T2 * 0.0057735 / math.sqrt(3), abs=1e-4)
    assert p["d_benign_std_acc_excludes_0"] and p["d_benign_std_acc_verdict"] == "better"
    table = summary_table(runs)
    assert "| ditto λ=0.1 (mean) | global (mean) | 3 | +0.117 [-0.073, +0.306] | no |" in table
    assert "-0.057 [-0.071, -0.042] | yes (better) |" in table


def test_report_regenerates_the_same_statistics_and_figures_from_the_collected_csvs(tmp_path: Path) -> None:
    sweep = _seeded_sweep(tmp_path / "sweep")
    assert main([str(sweep), "--out", str(tmp_path / "collected")]) == 0
    assert main(["--csv", str(tmp_path / "collected"), "--out", str(tmp_path / "again")]) == 0
    for name in ("summary.csv", "paired.csv", "table.md"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "collected" / name).read_text(), name
    for name in ("scatter.png", "lambda.png", "corruption.png", "per_device.png"):
        assert (tmp_path / "again" / name).stat().st_size > 1000, name
    with pytest.raises(UserError, match="no runs.csv in"):
        main(["--csv", str(sweep)])  # no runs.csv there: a clear error (the command prints it as one line, exit 2)


def test_ditto_is_compared_with_each_distinct_baseline_once() -> None:
    rows = [
        ("ditto λ=1.0 (mean)", "personal", "ditto"),
        ("ditto λ=auto (mean)", "personal", "ditto"),
        ("ditto:global (mean)", "global", "ditto"),
        ("ditto λ=auto:global (mean)", "global", "ditto"),
        ("finetune:global (mean)", "global", "finetune"),
        ("finetune (mean)", "personal", "finetune"),
        ("local:global (mean)", "global", "local"),
        ("local (mean)", "personal", "local"),
        ("qffl (mean)", "global", "qffl"),
        ("global (median)", "global", "global"),
    ]
    group = pd.DataFrame(rows, columns=["label", "kind", "method.name"]).assign(**{"aggregator.name": "mean"})
    group.loc[group["label"] == "global (median)", "aggregator.name"] = "median"
    dittos, bases = roles(group)
    assert sorted(dittos) == ["ditto λ=1.0 (mean)", "ditto λ=auto (mean)"]
    # no plain global run with the mean: the fixed-lam Ditto run's global model stands in for it, once
    assert sorted(bases) == ["ditto:global (mean)", "finetune (mean)", "global (median)", "local (mean)", "qffl (mean)"]
    plain = group.iloc[:1].assign(label="global (mean)", kind="global", **{"method.name": "global"})
    with_plain = pd.concat([group, plain])
    assert sorted(roles(with_plain)[1]) == [
        "finetune (mean)",
        "global (mean)",
        "global (median)",
        "local (mean)",
        "qffl (mean)",
    ]


def test_a_failed_job_of_an_experiment_arm_is_listed_with_its_composed_config(tmp_path: Path) -> None:
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- +experiment/arm=global_krum\n- attack.fraction=0.8\n")
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text(
        "seed: 3\nnum_rounds: ${dataset.num_rounds}\ndataset: {name: digits, num_rounds: 9}\n"
        "aggregator: {name: krum}\nmethod: {name: global}\nattack: {name: label_poison, fraction: 0.8}\n"
    )
    (tmp_path / "0" / "failed.json").write_text(json.dumps({"error": "ConfigError: krum needs n >= f + 3"}))
    run = collect(tmp_path)[0].iloc[0]
    assert (run["status"], run["aggregator.name"], run["attack.fraction"], run["seed"]) == ("failed", "krum", 0.8, 3)
    assert run["num_rounds"] == 9  # resolved


def test_sweep_size_counts_command_line_and_config_sweeps() -> None:
    assert sweep_size(["method=global,ditto", "seed=0"], {"attack": "none,label_poison", "seed": "0,1,2"}) == 4
    assert sweep_size(["seed=range(0,3)"], {}) == 3


@pytest.mark.slow
def test_a_real_sweep_with_a_failing_job_then_report_and_notebook(tmp_path: Path) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "num_clients=5",
        "clients_per_round=3",
        "num_rounds=2",
        "eval_every=2",
        "local_steps=3",
        "aggregator=mean,bulyan",
        f"hydra.sweep.dir={sweep}",
    ]  # bulyan needs 4f + 3 = 7 sampled updates: fails
    proc = _simulate(args, tmp_path)  # ditto-simulate, as the end-to-end tests run it
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "[sweep] job 1/2" in log and "[sweep] job 2/2" in log and "round 2/2" in log
    runs, _ = collect(sweep)
    assert runs.groupby("run")["status"].first().to_dict() == {"0": "ok", "1": "failed"}
    assert main([str(sweep)]) == 0
    notebook = nbformat.read(PROJECT_DIR / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["DITTO_REPORT_DIR"] = str(sweep / "report")
    try:
        nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["DITTO_REPORT_DIR"]
    for name in ("scatter.png", "lambda.png", "corruption.png", "per_device.png"):
        assert (sweep / "report" / "notebook" / name).stat().st_size > 1000, name


def test_fine_tuning_runs_are_labelled_by_their_proximal_weight() -> None:
    """finetune at lam 0 and 1 in one sweep are two baselines, not one averaged over both."""
    base = {"kind": "personal", "aggregator.name": "mean"}
    assert label({**base, "method.name": "finetune", "method.lam": 0.0}) == "finetune λ=0.0 (mean)"
    assert label({**base, "method.name": "finetune_matched", "method.lam": 1.0}) == "finetune_matched λ=1.0 (mean)"
    assert label({**base, "method.name": "finetune"}) == "finetune (mean)", "runs recorded before the key existed"
    assert label({**base, "method.name": "apfl", "method.lam": 1.0}) == "apfl (mean)"
