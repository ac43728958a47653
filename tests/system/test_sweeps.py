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
from tests.system.test_end_to_end import _simulate

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
    """The sweep's last job (seed 0, lr 0.05) runs on actors that served three jobs with another seed, another
    learning rate or both, and on the same Ray; alone, it runs in a process of its own."""
    before = _ray_sessions()
    for args in (
        ["-m", *SMALL, "seed=1,0", "lr=0.2,0.05", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        [*SMALL, "seed=0", "lr=0.05", f"hydra.run.dir={tmp_path / 'alone'}"],
    ):
        proc = _simulate(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(4)]
    inside, single = jobs[3], json.loads((tmp_path / "alone" / "results.json").read_text())
    assert (inside["config"]["seed"], inside["config"]["lr"]) == (single["config"]["seed"], single["config"]["lr"])
    assert inside["final"] == single["final"] and inside["clients"] == single["clients"]
    assert [r["global"] for r in inside["rounds"]] == [r["global"] for r in single["rounds"]]
    assert all(job["final"] != inside["final"] for job in jobs[:3])  # other configs: the comparison could fail
    for job in range(4):
        record = json.loads((tmp_path / "sweep" / str(job) / "job.json").read_text())
        assert record["done"] is True and record["seconds"] > 0
    assert inside["timing"]["identification_seconds"] < inside["timing"]["training_seconds"]
    started = _ray_sessions() - before
    assert len(started) == 2, f"one Ray for the sweep and one for the single run; started {sorted(started)}"
    for session in started:
        assert not _processes_of(session), f"processes of Ray session {session} outlived their command"


@pytest.mark.slow
def test_in_one_process_runs_share_the_pool_a_dead_actor_is_not_reused_and_the_block_stops_ray(
    tmp_path: Path,
) -> None:
    cfg = compose_config([*SMALL, "num_rounds=2"])
    with runtime.kept_runtime():
        first = simulate(cfg, tmp_path / "1")
        pool = runtime._Kept.pool
        second = simulate(cfg, tmp_path / "2")
        assert runtime._Kept.pool is pool and runtime._Kept.runs == 2
        ray.kill(pool.pool[0])  # an actor dies between two jobs (out of memory, a crash)
        third = simulate(cfg, tmp_path / "3")
        assert runtime._Kept.pool is not pool and runtime._Kept.runs == 1  # a new pool, not the dead actor
        assert ray.is_initialized()
    assert first == second == third
    assert not ray.is_initialized() and runtime._Kept.pool is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_stops_at_once_with_every_process_it_started(sig: signal.Signals, tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM, which ray.init takes over for itself) in job 2 of 2: the command ends within a minute with
    status 128 + the signal, every process it had started (Ray, its agents, the actors) is gone, and job 1 keeps its
    results."""
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
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert not _alive(started), f"still running after the interrupt: {sorted(_alive(started))}"
    assert (tmp_path / "0" / "results.json").exists() and not (tmp_path / "1" / "results.json").exists()
