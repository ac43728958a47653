"""The simulation on an existing Ray cluster (`ray_address`): a local head on 127.0.0.1, a short run against it, the
head stopped by pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.runners.cli import installed
from app.runners.launch import flower_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1:notaport", "127.0.0.1:0", ":6379", 6379])
def test_a_bad_ray_address_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match="ray_address"):
        compose_config([f"ray_address={value}"])


def test_ray_address_accepts_host_port_and_auto() -> None:
    assert compose_config(["ray_address=10.0.0.5:6379"]).ray_address == "10.0.0.5:6379"
    assert compose_config(["ray_address=auto"]).ray_address == "auto"
    assert compose_config([]).ray_address is None


@pytest.mark.slow
def test_the_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray is not None, "the ray CLI comes with flwr[simulation]"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    port = _free_port()
    env = flower_env(tmp_path / ".flwr")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(_free_port()),
            "--temp-dir",
            temp,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not listen within 60 s")
        out = tmp_path / "run"
        sim = subprocess.Popen(
            [
                installed("ditto-simulate"),
                "num_clients=5",
                "clients_per_round=3",
                "num_rounds=2",
                "eval_every=2",
                "local_steps=2",
                f"ray_address=127.0.0.1:{port}",
                f"hydra.run.dir={out}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log, _ = sim.communicate(timeout=300)
        assert sim.returncode == 0, log[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        assert results["final"]["personal"]["benign_acc"] is not None
        # the run's driver registered with this head (its core-driver log is in the head's session), not a new Ray
        logs = Path(temp) / "session_latest" / "logs"
        assert list(logs.glob(f"python-core-driver-*_{sim.pid}.log")), sorted(p.name for p in logs.iterdir())
        assert head.poll() is None, "the head must outlive the run that used it"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes when it is stopped
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.monotonic() + 30
        while _pids_mentioning(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _pids_mentioning(temp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the Ray head outlived it: {left}"


def test_flwr_run_refuses_ray_address(tmp_path: Path) -> None:
    from app.runners.launch import run_flwr

    with pytest.raises(ConfigError, match="ray_address.*ditto-simulate"):
        run_flwr(["ray_address=127.0.0.1:6379"], tmp_path, flwr_home=tmp_path / ".flwr", echo=False)
