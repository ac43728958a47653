"""Chaos on loopback: a SuperLink with TLS and SuperNode authentication, five devices, ten rounds, while a seeded
driver kills and restarts nodes, an impostor with a valid (registered) key claims another device's id, and one
device forges its evaluation counts. The run must finish, with its counts adding up, the impostor given nothing,
the forged evaluation out of the metrics and every device's personal-model history whole. Bounded: the run has a
deadline and every process is stopped by pid whatever happens."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from app.records.persistence import DiskStore
from app.runners.deploy import LocalDeployment
from app.runners.launch import session_pids
from strategies.sampling import sample_devices
from tests.system.test_deploy import _alive

pytestmark = pytest.mark.slow

SEED, N, PER_ROUND, ROUNDS = 18, 5, 2, 10
FORGER, VICTIM = 4, 1  # device 4 forges its evaluation; the impostor claims device 1
CONFIG = [
    f"num_clients={N}",
    f"clients_per_round={PER_ROUND}",
    f"num_rounds={ROUNDS}",
    f"eval_every={ROUNDS}",
    "local_steps=2",
    "attack=none",
    "personal_state=disk",
    f"seed={SEED}",
    "sampling=uniform",  # the schedule this seed was chosen for (_sampled: every device trains in some round)
]
RUN_DEADLINE = 1200  # s; the run took 10-14 min on 2 cores shared with five other test runs


def _sampled(k: int) -> list[int]:
    return [t for t in range(1, ROUNDS + 1) if k in sample_devices(SEED, t, N, PER_ROUND)]


def _chaos(deployment: LocalDeployment, rng: random.Random, started: float) -> dict:
    """Wait for round 1's first personal model, then kill two devices (the victim among them) at seeded moments,
    start the impostor while the victim is down, and bring both devices back (each restart is retried until the
    SuperLink lets the key in again)."""
    stores = [DiskStore(deployment.state_dir(k) / f"device-{k}") for k in range(N)]
    while not any(s.versions() for s in stores):
        if time.monotonic() - started > RUN_DEADLINE / 2:
            raise RuntimeError("no device trained round 1")
        time.sleep(0.5)
    killed = [VICTIM, rng.choice([k for k in range(N) if k not in (VICTIM, FORGER)])]
    for k in killed:
        time.sleep(rng.uniform(1.0, 8.0))
        deployment.kill_node(k)
    deployment.start_node(VICTIM, key=deployment.creds.node_keys[N], name="impostor")  # a valid, unlisted key
    time.sleep(rng.uniform(1.0, 5.0))
    deadline = time.monotonic() + 240
    starts = {}
    threads = [
        threading.Thread(target=lambda k=k: starts.__setitem__(k, deployment.restart_node(k, deadline))) for k in killed
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"killed": killed, "starts": starts}


def test_a_run_survives_kills_an_impostor_and_a_forged_evaluation(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    out: dict = {}
    with LocalDeployment(
        tmp_path, N, tls=True, spare_keys=1, node_config={FORGER: 'rogue="forge-evaluation"'}
    ) as deployment:

        def run() -> None:
            try:
                out["path"] = deployment.run(
                    [*CONFIG, f"device_keys={deployment.device_keys}"],
                    tmp_path / "results",
                    timeout=RUN_DEADLINE,
                    echo=False,
                )
            except Exception as err:  # reported by the assertion below
                out["error"] = err

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        chaos = _chaos(deployment, rng, started)
        runner.join(timeout=RUN_DEADLINE)
        processes = set().union(*(session_pids(p) for p in deployment._started))
    wall = time.monotonic() - started
    assert not _alive(processes), "every process the deployment started is stopped"
    assert "path" in out, out.get("error", "the run did not end")
    r = json.loads(out["path"].read_text())

    assert [x["round"] for x in r["rounds"]] == list(range(1, ROUNDS + 1))
    for x in r["rounds"]:  # what was sent is accounted for, round by round
        assert x["accepted_updates"] + x["rejected_updates"] + x["failed_clients"] == x["sent_updates"], x
        if "sent_evaluations" in x:
            assert x["evaluations"] + x["rejected_evaluations"] + x["failed_evaluations"] == x["sent_evaluations"], x
    exclusions = [e for x in r["rounds"] for e in x["exclusions"]]
    assert exclusions and all(
        e["claimed"] == VICTIM and "not listed in device_keys" in e["reason"] for e in exclusions
    ), exclusions
    assert r["excluded_nodes_total"] == len(exclusions)
    assert not DiskStore(tmp_path / "state" / "impostor" / f"device-{VICTIM}").versions(), "the impostor trained"

    assert r["rejected_evaluations_total"] == 1, "the forger's evaluation (after the last round) is refused"
    assert FORGER not in [c["client_id"] for c in r["clients"]]
    assert all(0 <= c["acc_global"] <= 1 and 0 <= c["acc_personal"] <= 1 for c in r["clients"])

    for k in range(N):  # every device's personal history: only rounds it was sampled in, in order, none lost
        state = DiskStore(tmp_path / "state" / f"node-{k}" / f"device-{k}").load(upto=ROUNDS)
        trained = () if state is None else state.trained_rounds
        assert list(trained) == sorted(set(trained)) and set(trained) <= set(_sampled(k)), (k, trained)
        if k not in chaos["killed"]:
            assert list(trained) == _sampled(k), f"device {k} was never killed yet lost a round: {trained}"
    print(
        f"\nchaos: {N} devices + 1 impostor, {ROUNDS} rounds, killed {chaos['killed']} (restarts needed "
        f"{chaos['starts']} starts), impostor refused {len(exclusions)}x, forged evaluations refused "
        f"{r['rejected_evaluations_total']}, failed fits {r['failed_clients_total']}, wall {wall:.0f} s"
    )
