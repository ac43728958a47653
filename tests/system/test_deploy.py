"""Real Flower clients: a SuperLink and SuperNodes on 127.0.0.1, started and stopped by pid, bounded in time."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from app.records.persistence import DiskStore
from app.runners.deploy import LocalDeployment, make_credentials
from app.runners.launch import session_pids

pytestmark = pytest.mark.slow

THREE = ["num_clients=3", "clients_per_round=3", "eval_every=100", "local_steps=5", "personal_state=disk"]


def _alive(pids: set[int]) -> set[int]:
    return {
        p
        for p in pids
        if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    }


def _check_results(path: Path, deployment: LocalDeployment, rounds: int) -> dict:
    r = json.loads(path.read_text())
    assert [x["round"] for x in r["rounds"]] == list(range(1, rounds + 1))
    assert r["final"]["personal"] is not None and [c["client_id"] for c in r["clients"]] == [0, 1, 2]
    for k in range(3):  # each device's personal model on its own node's disk, never on the server
        assert DiskStore(deployment.state_dir(k) / f"device-{k}").versions(), f"device {k} has no personal model"
    assert not (path.parent / "personal_state").exists()
    return r


def test_tls_and_node_auth_refuse_an_unregistered_node_and_run_three_rounds(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path, 3, tls=True) as deployment:
        stranger = make_credentials(tmp_path / "stranger", 1).node_keys[0]
        intruder = deployment.start_node(0, key=stranger, name="intruder")
        assert intruder.wait(timeout=90) != 0, "a node with an unregistered key must be refused"
        assert "Failed to activate SuperNode" in deployment.log("intruder").read_text()
        listed = json.loads(deployment.flwr("supernode", "list", "deployment", "--format", "json").stdout)["nodes"]
        assert len(listed) == 3, "only the three registered nodes joined"
        path = deployment.run([*THREE, "num_rounds=3"], tmp_path / "results", timeout=600, echo=False)
        _check_results(path, deployment, 3)
        started = set().union(*(session_pids(p) for p in deployment._started))
    assert not _alive(started), "every process the deployment started is stopped"


def test_a_killed_node_costs_a_round_slot_and_restarts_with_its_personal_model(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path, 3) as deployment:
        out: dict = {}

        def run() -> None:
            try:
                out["path"] = deployment.run([*THREE, "num_rounds=4"], tmp_path / "results", timeout=900, echo=False)
            except Exception as err:  # reported by the assertion below
                out["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        store = DiskStore(deployment.state_dir(1) / "device-1")
        deadline = time.monotonic() + 300
        while not store.versions() and time.monotonic() < deadline:
            time.sleep(0.1)
        saved = store.load(upto=10**6)
        assert saved is not None, "device 1 never saved its personal model"
        deployment.kill_node(1)
        time.sleep(5)
        deployment.start_node(1)  # the same device, the same state-dir, a new node
        thread.join(timeout=900)
        assert "path" in out, out.get("error", "the run did not end")
        r = _check_results(out["path"], deployment, 4)
    assert sum(x["failed_clients"] for x in r["rounds"]) >= 1, "the killed node's reply was lost and counted"
    assert all(x["accepted_updates"] >= 2 for x in r["rounds"]), "every round went on with the live nodes"
    after = store.load(upto=10**6)
    assert after.trained_rounds[: len(saved.trained_rounds)] == saved.trained_rounds, "it continued, not restarted"
    assert after.round == 4 and len(after.trained_rounds) > len(saved.trained_rounds)
    assert r["clients"][1]["personal_round"] == 4


def test_session_pids_finds_children_that_start_a_session_of_their_own() -> None:
    """Flower's SuperExec calls setsid: stopping a SuperLink by its session alone left it and its ServerApp running."""
    import os
    import signal
    import subprocess
    import sys

    code = "import subprocess, time; subprocess.Popen(['setsid', 'sleep', '60']); time.sleep(60)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(session_pids(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = session_pids(leader.pid)
        assert len(found) == 2, "the leader and its setsid child"
    finally:
        for pid in session_pids(leader.pid):
            os.kill(pid, signal.SIGKILL)
        leader.wait()
