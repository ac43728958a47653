"""A1-A3 on tiny examples, and who is malicious."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from omegaconf import OmegaConf

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.data.federation import load_federation
from app.records.persistence import MemoryStore
from app.threats.attacks import (
    aggregator_f,
    alie,
    alie_z,
    attack_update,
    gaussian_update,
    ipm,
    malicious_devices,
    poison_labels,
    scale_update,
    threat_model,
)


def test_malicious_devices_are_a_seeded_floor_fraction() -> None:
    assert len(malicious_devices(23, 0.5, 0)) == 11  # 11 of 23, as the paper's Vehicle script
    assert malicious_devices(20, 0.5, 3) == malicious_devices(20, 0.5, 3)
    assert malicious_devices(20, 0.5, 3) != malicious_devices(20, 0.5, 4)
    assert malicious_devices(10, 0.0, 0) == frozenset()
    assert all(0 <= k < 20 for k in malicious_devices(20, 0.8, 1))


def test_multiclass_labels_become_uniform_random_and_binary_labels_flip() -> None:
    y = torch.zeros(20000, dtype=torch.int64)
    poisoned = poison_labels(y, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(poisoned, minlength=10).double() / len(y)
    assert torch.allclose(counts, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)
    binary = torch.tensor([0, 1, 1, 0])
    assert poison_labels(binary, 2, torch.Generator()).tolist() == [1, 0, 0, 1]


def test_label_poisoning_touches_only_malicious_devices_training_labels() -> None:
    cfg = compose_config(["num_clients=6", "attack=label_poison", "attack.fraction=0.5"])
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    bad = malicious_devices(cfg.num_clients, cfg.attack.fraction, cfg.seed)
    assert len(bad) == 3
    for k in range(cfg.num_clients):
        client = DeviceClient(cfg, k, MemoryStore(RecordDict()))
        same = torch.equal(client.y_train, federation.devices[k].y_train)
        assert same == (k not in bad)
        assert torch.equal(client.y_test, federation.devices[k].y_test)  # test labels stay clean
    assert torch.equal(
        DeviceClient(cfg, min(bad), MemoryStore(RecordDict())).y_train,
        DeviceClient(cfg, min(bad), MemoryStore(RecordDict())).y_train,
    )  # fixed for the run


def test_gaussian_update_has_the_true_updates_std() -> None:
    rng = np.random.default_rng(0)
    update = [rng.normal(0.3, 2.0, size=(300, 100)).astype(np.float32), rng.normal(0, 0.1, 500).astype(np.float32)]
    noise = gaussian_update(update, np.random.default_rng(1))
    sigma = np.concatenate([u.ravel() for u in update]).std()
    flat = np.concatenate([n.ravel() for n in noise])
    assert flat.std() == pytest.approx(sigma, rel=0.02)
    assert abs(flat.mean()) < 0.05
    assert [n.shape for n in noise] == [u.shape for u in update] and all(n.dtype == np.float32 for n in noise)


def test_model_replacement_scales_by_boost_default_clients_per_round() -> None:
    update = [np.array([1.0, -2.0], dtype=np.float32)]
    attack = OmegaConf.create({"name": "model_replacement", "fraction": 0.5, "boost": None})
    out = attack_update(attack, update, np.random.default_rng(0), clients_per_round=7)
    np.testing.assert_array_equal(out[0], [7.0, -14.0])
    attack.boost = 2.5
    np.testing.assert_array_equal(attack_update(attack, update, np.random.default_rng(0), 7)[0], [2.5, -5.0])
    np.testing.assert_array_equal(scale_update(update, 3.0)[0], [3.0, -6.0])


def test_gaussian_attack_corrupts_labels_only_when_asked() -> None:
    for corrupt in (False, True):
        cfg = compose_config(["num_clients=6", "attack=gaussian_update", f"attack.corrupt_labels={corrupt}"])
        k = min(malicious_devices(cfg.num_clients, cfg.attack.fraction, cfg.seed))
        client = DeviceClient(cfg, k, MemoryStore(RecordDict()))
        clean = load_federation(cfg.dataset, cfg.num_clients, cfg.seed).devices[k].y_train
        assert torch.equal(client.y_train, clean) == (not corrupt)


def test_sign_flip_sends_minus_scale_times_the_update() -> None:
    attack = OmegaConf.create({"name": "sign_flip", "fraction": 0.5, "scale": 2.0})
    out = attack_update(attack, [np.array([1.0, -3.0], dtype=np.float32)], np.random.default_rng(0), 5)
    np.testing.assert_array_equal(out[0], [-2.0, 6.0])


def test_alie_and_ipm_follow_their_definitions() -> None:
    benign = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    torch.testing.assert_close(alie(benign, 1.5), benign.mean(0) - 1.5 * benign.std(0))
    torch.testing.assert_close(ipm(benign, 0.5), -0.5 * benign.mean(0))
    # Baruch et al.: n = 50, f = 24 -> s = 2, z = Phi^-1(48/50) ~ 1.75
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-3)


def test_threat_model_replaces_only_the_malicious_slots_with_the_benign_statistic() -> None:
    updates = torch.tensor([[1.0, 1.0], [3.0, 5.0], [100.0, -100.0], [2.0, 3.0]])
    mask = torch.tensor([False, False, True, False])
    simulate = threat_model(OmegaConf.create({"name": "ipm", "epsilon": 0.5}), num_malicious=1)
    out = simulate(updates, mask)
    torch.testing.assert_close(out[~mask], updates[~mask])
    torch.testing.assert_close(out[2], -0.5 * updates[~mask].mean(0))
    assert threat_model(OmegaConf.create({"name": "label_poison"}), 1) is None
    alie_sim = threat_model(OmegaConf.create({"name": "alie", "z": None}), num_malicious=1)
    torch.testing.assert_close(alie_sim(updates, mask)[2], alie(updates[~mask], alie_z(4, 1)))


def test_default_f_is_the_expected_number_of_attackers_per_round_as_the_official_code() -> None:
    assert aggregator_f(compose_config(["clients_per_round=5"])) == 2  # int(5 * 10 / 20)
    assert aggregator_f(compose_config(["clients_per_round=10"])) == 5
    assert aggregator_f(compose_config(["attack=none"])) == 0
    assert aggregator_f(compose_config(["aggregator.f=1"])) == 1
