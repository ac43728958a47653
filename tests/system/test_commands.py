"""The commands a user runs ([project.scripts]): a bad config or bad data ends them with one line naming the key or
file, exit status 2 and no traceback; --debug shows the traceback. Each refusal comes before Ray or Flower starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from app.runners.cli import installed


def _run(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([installed(command), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _refused(out: subprocess.CompletedProcess, *words: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["aggregator=krumm"], ["aggregator", "krumm", "multikrum"]),  # Hydra: no such group option
        (["num_roundz=3"], ["num_roundz"]),  # Hydra: no such key
        (["num_rounds=0"], ["num_rounds", "an integer >= 1"]),  # ours: a value the code cannot run
        (["aggregator=krum", "clients_per_round=2"], ["aggregator", "krum"]),  # the rule's own check
    ],
)
def test_simulate_refuses_a_bad_config_in_one_line(args: list[str], words: list[str], tmp_path: Path) -> None:
    _refused(_run("ditto-simulate", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path), *words)
    assert not (tmp_path / "run").exists(), "refused before Hydra made the run's folder"


def test_simulate_refuses_missing_data_in_one_line_naming_the_file(tmp_path: Path) -> None:
    args = ["dataset=vehicle", f"dataset.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"]
    _refused(_run("ditto-simulate", *args, cwd=tmp_path), "nowhere")


@pytest.mark.parametrize(
    "args, words",
    [
        (["dataset.model=svm"], ["svm", "dataset.model=logreg"]),  # a model that cannot serve 10 classes
        (["num_clients=2000"], ["num_clients=2000", "fewer num_clients"]),  # more devices than the partitioner can fill
    ],
)
def test_simulate_refuses_data_the_model_or_partitioner_cannot_serve(
    args: list[str], words: list[str], tmp_path: Path
) -> None:
    _refused(_run("ditto-simulate", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path), *words)


def test_a_sweep_with_an_unknown_key_is_refused_before_any_job(tmp_path: Path) -> None:
    args = ["-m", "seed=0,1", "num_roundz=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    _refused(_run("ditto-simulate", *args, cwd=tmp_path), "num_roundz")
    assert not (tmp_path / "sweep").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = _run("ditto-simulate", "num_rounds=0", "--debug", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


@pytest.mark.parametrize("command", ["ditto-run", "ditto-deploy"])
@pytest.mark.parametrize(
    "override, words", [("method.lam=-1", ["method.lam"]), ("aggregator=krumm", ["aggregator", "krumm"])]
)
def test_the_flower_commands_refuse_a_bad_config_in_one_line(
    command: str, override: str, words: list[str], tmp_path: Path
) -> None:
    _refused(_run(command, override, cwd=tmp_path), *words)


def test_report_refuses_a_folder_without_results_in_one_line(tmp_path: Path) -> None:
    _refused(_run("ditto-report", "--csv", str(tmp_path), cwd=tmp_path), "runs.csv", str(tmp_path))
    _refused(_run("ditto-report", str(tmp_path), cwd=tmp_path), "no runs under")


def test_config_prints_a_key_and_refuses_a_bad_one(tmp_path: Path) -> None:
    ok = _run("ditto-config", "num_rounds", "dataset=vehicle", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip().isdigit()
    _refused(_run("ditto-config", "num_rounds", "method=fedfoo", cwd=tmp_path), "fedfoo", "ditto")
    _refused(_run("ditto-config", "num_round", cwd=tmp_path), "num_round", "no such key")
