"""The collector on hand-made sweep folders (a complete, a failed and an incomplete run), and a real 2-job sweep in
which one job fails, collected and then analysed by the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from app.launch import flower_env
from app.report import collect, main, summary_table
from app.simulate import sweep_size


def _results(cfg: dict, rounds: int, final: dict) -> dict:
    return {"config": cfg, "final": final, "rounds": [{"round": r + 1} for r in range(rounds)],
            "clients": [{"client_id": 0, "malicious": False, "acc_global": 0.5, "acc_personal": 0.75},
                        {"client_id": 1, "malicious": True, "acc_global": 0.25, "acc_personal": 0.0}]}


def _cfg(method: str, fraction: float) -> dict:
    return {"num_rounds": 4, "seed": 0, "method": {"name": method, "lam": 1.0},
            "attack": {"name": "label_poison", "fraction": fraction}, "aggregator": {"name": "mean"}}


def _metrics(acc: float) -> dict:
    return {"benign_acc": acc, "benign_mean_acc": acc, "benign_std_acc": 0.1, "benign_var_acc": 0.01,
            "benign_worst10_acc": acc / 2, "malicious_acc": 0.2}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps(
        _results(_cfg("ditto", 0.5), 4, {"global": _metrics(0.6), "personal": _metrics(0.8)})))
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- aggregator=krum\n- attack.fraction=0.8\n")
    (tmp_path / "1" / "failed.json").write_text(json.dumps({"error": "ConfigError: krum needs n >= f + 3"}))
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- method=global\n")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text(json.dumps(
        _results(_cfg("global", 0.5), 2, {"global": _metrics(0.5), "personal": None})))
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
    assert "0.800 ± 0.100" in table and "0.600 ± 0.100" in table
    assert "0.500" not in table  # the incomplete run is not averaged in


def test_collector_cli_writes_the_files_and_names_the_problems(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    out = sweep / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs: 1 complete, 1 failed, 2 incomplete" in printed and "failed: 1: ConfigError" in printed
    for name in ("runs.csv", "devices.csv", "table.md", "scatter.png", "lambda.png", "corruption.png",
                 "per_device.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(pd.read_csv(out / "runs.csv")["status"]) == {"ok", "failed", "incomplete"}


def test_sweep_size_counts_command_line_and_config_sweeps() -> None:
    assert sweep_size(["method=global,ditto", "seed=0"], {"attack": "none,label_poison", "seed": "0,1,2"}) == 4
    assert sweep_size(["seed=range(0,3)"], {}) == 3


@pytest.mark.slow
def test_a_real_sweep_with_a_failing_job_then_report_and_notebook(tmp_path: Path) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    sweep = tmp_path / "sweep"
    args = ["-m", "num_clients=5", "clients_per_round=3", "num_rounds=2", "eval_every=2", "local_steps=3",
            "aggregator=mean,bulyan", f"hydra.sweep.dir={sweep}"]  # bulyan needs 4f + 3 = 7 sampled updates: fails
    proc = subprocess.run([sys.executable, "-m", "app.simulate", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=flower_env(tmp_path / ".flwr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "[sweep] job 1/2" in log and "[sweep] job 2/2" in log and "round 2/2" in log
    runs, _ = collect(sweep)
    assert runs.groupby("run")["status"].first().to_dict() == {"0": "ok", "1": "failed"}
    assert main([str(sweep)]) == 0
    notebook = nbformat.read(Path(__file__).parent.parent / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["DITTO_REPORT_DIR"] = str(sweep / "report")
    try:
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["DITTO_REPORT_DIR"]
    for name in ("scatter.png", "lambda.png", "corruption.png", "per_device.png"):
        assert (sweep / "report" / "notebook" / name).stat().st_size > 1000, name
