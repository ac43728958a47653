"""What survives a restart: the personal-state stores, the server checkpoint, and resume in simulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.records.persistence import Checkpoint, DeviceState, DiskStore, MemoryStore, load_checkpoint, save_checkpoint
from app.runners.cli import installed
from app.server_app import build_components, check_resumable
from app.training.models import get_weights
from tests.system.test_end_to_end import _simulate

A = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]


def _state(round_: int) -> DeviceState:
    return DeviceState(round_, [a + round_ for a in A], np.array([round_, 0.0]), (1, round_))


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_store_returns_what_was_saved(store: str, tmp_path: Path) -> None:
    s = MemoryStore(RecordDict()) if store == "memory" else DiskStore(tmp_path / "device-0")
    assert s.load(upto=10) is None
    s.save(_state(3))
    got = s.load(upto=10)
    assert got.round == 3 and all(np.array_equal(a, b) for a, b in zip(got.personal, _state(3).personal))
    assert got.personal[0].dtype == np.float32 and np.array_equal(got.lam_counts, [3.0, 0.0])
    assert got.trained_rounds == (1, 3)
    s.save(DeviceState(5, A))
    assert s.load(upto=10).round == 5 and s.load(upto=10).lam_counts is None


def test_disk_store_keeps_what_a_resume_from_the_last_checkpoint_needs(tmp_path: Path) -> None:
    s = DiskStore(tmp_path)
    s.save(_state(1))
    s.save(_state(3))
    assert s.versions() == [1, 3], "without checkpoints the newest version and its fallback are kept"
    s.save(_state(6), checkpoint_round=5)
    s.save(_state(7), checkpoint_round=5)
    assert s.versions() == [3, 6, 7], "round 3 is the state as of the checkpoint of round 5"
    assert s.load(upto=5).round == 3 and s.load(upto=6).round == 6 and s.load(upto=2) is None
    s.save(_state(6), checkpoint_round=5)  # the run, killed after round 7, resumed from round 5: 7 is stale
    assert s.versions() == [3, 6]
    s.save(_state(9), checkpoint_round=8)
    assert s.versions() == [6, 9]


def test_an_interrupted_write_leaves_the_previous_version(tmp_path: Path) -> None:
    s = DiskStore(tmp_path)
    s.save(_state(2))
    (tmp_path / ".round-000004.npz.123.tmp").write_bytes(b"half a file")  # a process killed while writing
    assert s.versions() == [2] and s.load(upto=9).round == 2


def test_a_corrupted_or_truncated_version_falls_back_to_the_previous_good_one(tmp_path: Path, caplog) -> None:
    s = DiskStore(tmp_path)
    for r in (2, 5):
        s.save(_state(r))
    newest = tmp_path / "round-000005.npz"
    newest.write_bytes(newest.read_bytes()[:-40])  # truncated
    got = s.load(upto=9)
    assert got.round == 2 and np.array_equal(got.personal[0], _state(2).personal[0])
    assert s.versions() == [2] and (tmp_path / "round-000005.npz.corrupt").exists()
    assert "round-000005.npz is corrupted" in caplog.text
    s.save(_state(7))
    raw = bytearray((tmp_path / "round-000007.npz").read_bytes())
    raw[bytes(raw).index(_state(7).personal[0].tobytes()) + 5] ^= 0x01  # one flipped bit in the personal model
    (tmp_path / "round-000007.npz").write_bytes(bytes(raw))
    assert s.load(upto=9).round == 2
    with np.load(tmp_path / "round-000002.npz") as data:  # rewritten whole, with a changed model and the old checksum
        arrays = {k: data[k] for k in data.files}
    arrays["p0"] = arrays["p0"] + 1
    np.savez(tmp_path / "round-000002.npz", **arrays)
    assert s.load(upto=9) is None, "no good version left: the device starts from the initial model"
    assert "checksum mismatch" in caplog.text and "starts again from the initial model" in caplog.text


def test_a_restarted_device_continues_from_its_saved_personal_model(tmp_path: Path) -> None:
    cfg = compose_config(["num_clients=6", "local_steps=4", "attack=none", "personal_state=disk"])
    first = DeviceClient(cfg, 2, DiskStore(tmp_path / "device-2"))
    params = get_weights(first._build())
    first.fit(params, {"server_round": 1})
    first.fit(params, {"server_round": 4})
    # a fresh process (a restarted SuperNode) reading the same folder
    again = DeviceClient(cfg, 2, DiskStore(tmp_path / "device-2"))
    _, _, metrics = again.evaluate(params, {"server_round": 4})
    assert metrics["personal_round"] == 4 and metrics["personal_updates"] == 2
    again.fit(params, {"server_round": 6})
    # the same sequence in memory, uninterrupted, gives the same personal model
    mem = DeviceClient(cfg, 2, MemoryStore(RecordDict()))
    for r in (1, 4, 6):
        mem.fit(params, {"server_round": r})
    assert all(np.array_equal(a, b) for a, b in zip(again.store.load(upto=6).personal, mem.store.load(upto=6).personal))
    assert again.store.load(upto=6).trained_rounds == (1, 4, 6)
    fresh = DeviceClient(cfg, 2, DiskStore(tmp_path / "elsewhere"))
    assert fresh.evaluate(params, {"server_round": 6})[2]["personal_round"] == 0, "a new device starts from w^0"


def test_checkpoint_round_trip_and_config_check(tmp_path: Path) -> None:
    ckpt = Checkpoint(7, A, {"config": {"seed": 0}, "rounds": [{"round": 7}]}, np.ones(3))
    save_checkpoint(tmp_path, ckpt)
    got = load_checkpoint(tmp_path)
    assert got.round == 7 and got.meta == ckpt.meta and np.array_equal(got.aggregator_state, np.ones(3))
    assert all(np.array_equal(a, b) for a, b in zip(got.parameters, A))
    with pytest.raises(FileNotFoundError, match="checkpoint_every"):
        load_checkpoint(tmp_path / "nothing")
    check_resumable({"seed": 0, "num_rounds": 5, "resume": False}, {"seed": 0, "num_rounds": 9, "resume": True})
    with pytest.raises(ValueError, match=r"method\.lam \(1\.0 -> 0\.5\)"):
        check_resumable({"method": {"lam": 1.0}}, {"method": {"lam": 0.5}})
    # a checkpoint written before skip_done and the deployments' round_timeout existed resumes under today's config
    check_resumable({"seed": 0, "resume": False}, {"seed": 0, "resume": True, "skip_done": False, "round_timeout": 180})
    with pytest.raises(ValueError, match="personal_state"):  # where the personal models live may not change
        check_resumable({"personal_state": "disk"}, {"personal_state": "memory"})


def test_a_resumed_server_continues_centered_clipping_from_the_saved_centre(tmp_path: Path) -> None:
    overrides = [
        "num_clients=6",
        "clients_per_round=3",
        "method=global",
        "checkpoint_every=1",
        "aggregator=centered_clip",
        "aggregator.iters=1",
    ]
    stack, weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.ones(3, dtype=torch.float64)
    server = build_components(compose_config(overrides), tmp_path).server
    rule = server.strategy.aggregate
    server.parameters = server.strategy.initial_parameters
    rule(stack, weights, 0)
    server._checkpoint(1)
    resumed = build_components(compose_config([*overrides, "resume=true"]), tmp_path).server
    assert resumed._resume() == 1
    assert np.array_equal(resumed.strategy.aggregate.state(), rule.state())
    torch.testing.assert_close(resumed.strategy.aggregate(stack, weights, 0), rule(stack, weights, 0), rtol=0, atol=0)
    assert build_components(compose_config(["aggregator=median"]), tmp_path).server.strategy.aggregate.state() is None


def test_resume_needs_personal_models_on_disk() -> None:
    with pytest.raises(ConfigError, match="personal_state=disk"):
        compose_config(["resume=true"])
    compose_config(["resume=true", "method=global"])  # no personal model: nothing to lose
    with pytest.raises(ConfigError, match="checkpoint_every"):
        compose_config(["checkpoint_every=-1"])


RESUMABLE = [
    "num_clients=6",
    "clients_per_round=3",
    "num_rounds=40",
    "eval_every=10",
    "local_steps=3",
    "personal_state=disk",
    "checkpoint_every=5",
    "aggregator=centered_clip",
]


def _newest_version(run_dir: Path) -> int:
    folders = (run_dir / "personal_state").glob("device-*")
    return max((v for folder in folders for v in DiskStore(folder).versions()), default=0)


@pytest.mark.slow
def test_a_killed_run_resumed_ends_with_the_uninterrupted_runs_numbers(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    proc = _simulate([*RESUMABLE, f"hydra.run.dir={whole}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((whole / "results.json").read_text())

    cut = tmp_path / "cut"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / ".flwr")}
    with subprocess.Popen(
        [installed("ditto-simulate"), *RESUMABLE, f"hydra.run.dir={cut}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    ) as run:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:  # stop it between two checkpoints
            if (cut / "checkpoint.npz").exists() and _newest_version(cut) > load_checkpoint(cut).round >= 10:
                break
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # the whole simulation: driver, Ray and its workers
    stopped_at = load_checkpoint(cut).round
    assert 10 <= stopped_at < 40 and not (cut / "results.json").exists(), "the run was stopped before its end"
    assert _newest_version(cut) > stopped_at, "devices trained past the checkpoint: the resume must not use that"

    proc = _simulate([*RESUMABLE, "resume=true", f"hydra.run.dir={cut}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["final"] == expected["final"] and resumed["clients"] == expected["clients"]
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 41))
    assert [r["global"] for r in resumed["rounds"]] == [r["global"] for r in expected["rounds"]]
    devices = sorted(p.name for p in (whole / "personal_state").iterdir())
    assert devices == sorted(p.name for p in (cut / "personal_state").iterdir()) and len(devices) == 6
    for device in devices:  # every personal model, bit for bit
        ours, theirs = (DiskStore(run / "personal_state" / device).load(upto=40) for run in (cut, whole))
        assert ours.round == theirs.round
        assert all(np.array_equal(a, b) for a, b in zip(ours.personal, theirs.personal)), device
