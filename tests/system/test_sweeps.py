"""Sweeps share one Ray runtime and actor pool (app/runners/runtime.py): a job gives the numbers it gives alone, and
nothing the sweep started outlives it, also when it is interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray

from app.config.compose import compose_config
from app.runners import runtime
from app.runners.cli import installed
from app.runners.launch import flower_env, session_pids
from app.runners.simulate import simulate

SMALL = ["num_clients=5", "clients_per_round=3", "num_rounds=3", "eval_every=2", "local_steps=5"]


def _alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (a zombie waiting for its parent to reap it does not)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.add(pid)
    return running


def _ray_sessions() -> set[str]:
    root = Path("/tmp/ray")
    return {p.name for p in root.glob("session_2*")} if root.exists() else set()


def _processes_of(session: str) -> set[int]:
    """Running processes whose command line names the Ray session `session`."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if session in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return _alive(pids)


@pytest.mark.slow
def test_a_job_gives_the_same_numbers_inside_a_sweep_and_alone_and_the_sweep_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """Job 2 of the sweep (seed 0) runs on actors that served job 1 (seed 1) and on the same Ray; alone, seed 0 runs
    in a process of its own."""
    before = _ray_sessions()
    sweep = subprocess.run(
        [installed("ditto-simulate"), "-m", *SMALL, "seed=1,0", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=flower_env(tmp_path / ".flwr"),
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    alone = subprocess.run(
        [installed("ditto-simulate"), *SMALL, "seed=0", f"hydra.run.dir={tmp_path / 'alone'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=flower_env(tmp_path / ".flwr"),
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    inside = json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())
    single = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert inside["config"]["seed"] == single["config"]["seed"] == 0
    assert inside["final"] == single["final"] and inside["clients"] == single["clients"]
    assert [r["global"] for r in inside["rounds"]] == [r["global"] for r in single["rounds"]]
    first = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    assert first["final"] != inside["final"]  # another seed: the comparison could fail
    for job in ("0", "1"):
        record = json.loads((tmp_path / "sweep" / job / "job.json").read_text())
        assert record["done"] is True and record["seconds"] > 0
    assert inside["timing"]["identification_seconds"] < inside["timing"]["training_seconds"]
    started = _ray_sessions() - before
    assert len(started) == 2, f"one Ray for the sweep and one for the single run; started {sorted(started)}"
    for session in started:
        assert not _processes_of(session), f"processes of Ray session {session} outlived their command"


@pytest.mark.slow
def test_in_one_process_runs_share_the_pool_and_the_block_stops_ray() -> None:
    cfg = compose_config([*SMALL, "num_rounds=2"])
    with runtime.kept_runtime():
        first = simulate(cfg, Path("/tmp") / f"kept-{time.time_ns()}")
        pool = runtime._Kept.pool
        second = simulate(cfg, Path("/tmp") / f"kept-{time.time_ns()}")
        assert runtime._Kept.pool is pool and runtime._Kept.runs == 2
        assert ray.is_initialized()
    assert first == second
    assert not ray.is_initialized() and runtime._Kept.pool is None


@pytest.mark.slow
def test_an_interrupted_sweep_stops_at_once_with_every_process_it_started(tmp_path: Path) -> None:
    """Ctrl-C in job 2 of 2: the command ends within a minute with status 130, every process it had started
    (Ray, its agents, the actors) is gone, and job 1 keeps its results."""
    quick_then_long = [k for k in SMALL if not k.startswith("num_rounds=")] + ["num_rounds=3,3000", "eval_every=1000"]
    proc = subprocess.Popen(
        [installed("ditto-simulate"), "-m", *quick_then_long, f"hydra.sweep.dir={tmp_path}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=flower_env(tmp_path / ".flwr"),
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[sweep] job 2/"):
                break
        time.sleep(3)  # job 2 is training on the kept actors
        started = session_pids(proc.pid) - {proc.pid}
        assert started, "the sweep had started no process"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert not _alive(started), f"still running after the interrupt: {sorted(_alive(started))}"
    assert (tmp_path / "0" / "results.json").exists() and not (tmp_path / "1" / "results.json").exists()
