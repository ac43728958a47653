"""One run, several lam: a lam list trains one personal model per lam on the same batches and the same global
trajectory, and each lam's numbers equal its single-lam run's bit for bit (dropout included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.records.kinds import personal_kind
from app.records.persistence import MemoryStore
from app.training.models import get_weights
from tests.system.test_end_to_end import _simulate

# the FEMNIST CNN has dropout: the personal steps must draw the same masks as in a single-lam run
TINY = ["num_clients=6", "local_steps=4", "batch_size=8", "dataset.model=cnn_femnist", "attack.fraction=0.5"]
LAMS = (0.1, 1.0, 2.0)


def _client(lam: str, device: int) -> DeviceClient:
    return DeviceClient(compose_config([*TINY, f"method.lam={lam}"]), device, MemoryStore(RecordDict()))


def _rounds(client: DeviceClient, rounds: int) -> tuple[list[list[np.ndarray]], list[dict]]:
    """Fit and evaluate `rounds` times, the received model moving by the client's own update (a one-device server)."""
    params = get_weights(client._build())
    updates, evals = [], []
    for r in range(1, rounds + 1):
        update, _, _ = client.fit(params, {"server_round": r})
        updates.append(update)
        params = [p + u for p, u in zip(params, update)]
        evals.append(client.evaluate(params, {"server_round": r})[2])
    return updates, evals


@pytest.mark.parametrize("device", [1])
def test_each_lam_of_a_list_equals_its_single_lam_client_bit_for_bit(device: int) -> None:
    multi = _client("[" + ",".join(map(str, LAMS)) + "]", device)
    updates, evals = _rounds(multi, 3)
    for i, lam in enumerate(LAMS):
        single = _client(str(lam), device)
        s_updates, s_evals = _rounds(single, 3)
        for ours, theirs in zip(updates, s_updates):  # the global trajectory does not depend on lam
            assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
        kind = personal_kind(lam)
        for ours, theirs in zip(evals, s_evals):
            assert ours[f"correct_{kind}"] == theirs["correct_personal"], (lam, ours, theirs)
            assert ours[f"loss_{kind}"] == theirs["loss_personal"], (lam, ours, theirs)
            assert ours["correct_global"] == theirs["correct_global"]
        n = len(s_updates[0])
        stored = multi.store.load(3).personal[i * n : (i + 1) * n]
        assert all(np.array_equal(a, b) for a, b in zip(stored, single.store.load(3).personal)), lam
    losses = {evals[-1][f"loss_{personal_kind(lam)}"] for lam in LAMS}
    assert len(losses) == len(LAMS), "the lam values must give different personal models, or the test shows nothing"


def test_a_lam_list_has_no_auto_no_duplicates_and_needs_ditto() -> None:
    for bad in ("[0.1,auto]", "[0.1,0.1]", "[]", "[-1,1]"):
        with pytest.raises(ConfigError, match="method.lam"):
            compose_config([f"method.lam={bad}"])
    with pytest.raises(ConfigError, match="method=local"):
        compose_config(["method=local", "+method.lam=[0.1,1]"])


@pytest.mark.slow
def test_a_lam_list_run_reports_each_lam_as_its_single_lam_run(tmp_path: Path) -> None:
    """The real simulation: one sweep of a list run and two single-lam runs; results.json per lam, bit for bit."""
    args = [
        "-m",
        "num_clients=5",
        "clients_per_round=3",
        "num_rounds=3",
        "eval_every=2",
        "local_steps=3",
        "method.lam=[0.1,1.0],0.1,1.0",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = _simulate(args, tmp_path)  # ditto-simulate, as the end-to-end tests run it
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi, single01, single1 = (json.loads((tmp_path / str(i) / "results.json").read_text()) for i in range(3))
    assert multi["config"]["method"]["lam"] == [0.1, 1.0] and multi["final"]["personal"] is None
    for lam, single in ((0.1, single01), (1.0, single1)):
        kind = personal_kind(lam)
        assert multi["final"][kind] == single["final"]["personal"]
        assert multi["final"]["global"] == single["final"]["global"]
        assert [c[f"acc_{kind}"] for c in multi["clients"]] == [c["acc_personal"] for c in single["clients"]]
        evaluated = [r for r in multi["rounds"] if r.get(kind)]
        assert [r[kind] for r in evaluated] == [r["personal"] for r in single["rounds"] if r["personal"]]
        assert len(evaluated) == 2  # rounds 2 and 3
    assert multi["final"][personal_kind(0.1)] != multi["final"][personal_kind(1.0)]
