"""The second fidelity pass against litian96/ditto (commit 26d9b29): each test fails on the behaviour before it.
docs/fidelity.md has the rows, with the official file and line of each."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.data.federation import load_federation
from app.records.persistence import MemoryStore
from app.rng import Stream
from app.training.lam import sampling_sizes, validation_size
from app.training.models import TF_BATCH_NORM_EPS, build_model, get_weights
from app.training.steps import minibatches
from strategies.rules.registry import AGGREGATORS, build_aggregator
from strategies.rules.selection import krum, multikrum
from strategies.sampling import sample_devices

SMALL = ["num_clients=6", "clients_per_round=3", "attack=none", "local_steps=3"]


def _store() -> MemoryStore:
    return MemoryStore(RecordDict())


# 1. fine-tuning's proximal term (flearn/trainers_global/finetuning.py 134-140; --lam=1, --decay_factor=1)


def test_finetune_steps_with_the_official_proximal_term_and_decay() -> None:
    cfg = compose_config([*SMALL, "method=finetune", "method.steps=6", "method.decay_factor=0.5", "batch_size=8"])
    assert (cfg.method.lam, compose_config(["method=finetune"]).method.decay_factor) == (1.0, 1.0)
    client = DeviceClient(cfg, 2, _store())
    w = client._build()
    for p in w.parameters():  # a global model away from the initial one, so the first steps move it
        p.data.add_(0.3)
    tuned = client.method.evaluated(client, w, [], server_round=4)["personal"]

    expected = copy.deepcopy(w)
    center = [p.detach().clone() for p in w.parameters()]
    step = float(cfg.lr) * 0.5
    for idx in minibatches(len(client.y_train), 8, 6, client.generator(4, Stream.FINETUNE)):
        expected.zero_grad()
        client.objective(expected, expected(client.x_train[idx]), client.y_train[idx]).backward()
        with torch.no_grad():
            for p, c in zip(expected.parameters(), center):
                p -= step * (p.grad + 1.0 * (p - c))
    for a, b in zip(tuned.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
    plain = compose_config([*SMALL, "method=finetune", "method.steps=6", "method.decay_factor=0.5", "method.lam=0"])
    untied = DeviceClient(plain, 2, _store()).method.evaluated(client, w, [], server_round=4)["personal"]
    assert any(not torch.allclose(a, b) for a, b in zip(untied.parameters(), tuned.parameters())), "lam matters"


def test_finetune_refuses_lam_auto_and_lists() -> None:
    for lam, words in (("auto", "lam auto"), ("[0.1,1]", "lam list")):
        with pytest.raises(ConfigError, match=f"'method.lam'.*{words}"):
            compose_config(["method=finetune", f"method.lam={lam}"])


def test_finetune_matched_takes_the_steps_of_dittos_personal_model() -> None:
    """local_steps for every round up to the evaluated one that samples the device, as the server samples."""
    cfg = compose_config([*SMALL, "method=finetune_matched", "num_rounds=8"])
    sizes = [len(d.y_train) for d in load_federation(cfg.dataset, 6, cfg.seed).devices]
    for k in range(6):
        client = DeviceClient(cfg, k, _store())
        for t in (1, 5, 8):
            sampled = sum(k in sample_devices(cfg.seed, r, 6, 3, sizes) for r in range(1, t + 1))
            assert client.method.finetune_steps(client, t) == 3 * sampled
    total = sum(
        DeviceClient(cfg, k, _store()).method.finetune_steps(DeviceClient(cfg, k, _store()), 8) for k in range(6)
    )
    assert total == 3 * 3 * 8, "every round samples 3 devices, each taking 3 steps"


# 3. FEMNIST scored with dropout on (flearn/models/femnist/cnn.py 54, 57: tf.nn.dropout, no training flag)


def test_femnist_evaluates_with_dropout_on_by_default_and_reproducibly() -> None:
    assert compose_config(["dataset=femnist"]).dataset.dropout_at_eval is True
    base = [*SMALL, "dataset=fake_images", "dataset.like=femnist", "dataset.model=cnn_femnist"]
    on = DeviceClient(compose_config([*base, "+dataset.dropout_at_eval=true"]), 1, _store())
    off = DeviceClient(compose_config(base), 1, _store())
    params = get_weights(on._build())
    scores = [on.evaluate(params, {"server_round": r})[0] for r in (2, 3, 2)]
    assert scores[0] != scores[1], "dropout at evaluation: another round, other masks"
    assert scores[0] == scores[2], "the same round, the same masks (seeded per device and round)"
    assert off.evaluate(params, {"server_round": 2})[0] == off.evaluate(params, {"server_round": 3})[0]


# 4. initialisation (tf.layers.conv2d / dense defaults: Glorot-uniform kernels, zero biases)


@pytest.mark.parametrize("name, shape, classes", [("cnn_femnist", (1, 28, 28), 62), ("cnn_fmnist", (1, 28, 28), 10)])
def test_the_paper_cnns_start_as_the_official_tf_models(name: str, shape: tuple, classes: int) -> None:
    official = build_model(name, shape, classes, seed=0)
    for module in official.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            fan_in = module.weight[0].numel()
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert float(module.weight.abs().max()) <= bound and float(module.weight.abs().max()) > 0.9 * bound
            assert not module.bias.any()
    first = next(m for m in build_model(name, shape, classes, seed=0, init="pytorch").modules() if hasattr(m, "bias"))
    assert first.bias.any(), "PyTorch's default init stays an option"
    assert compose_config(["dataset=fashion_mnist"]).dataset.init == "official"


def test_models_without_a_tf_layers_counterpart_are_the_same_under_both_inits() -> None:
    for name, shape, classes in (("svm", (5,), 2), ("cnn_small", (1, 8, 8), 10), ("logreg", (4,), 3)):
        a, b = (build_model(name, shape, classes, seed=3, init=i) for i in ("official", "pytorch"))
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# 5. Fashion-MNIST rows shuffled per device (data/fmnist/create_dataset.py 118-120)


def _single_class_validation_share(overrides: list[str]) -> float:
    cfg = compose_config(overrides)
    devices = load_federation(cfg.dataset, cfg.num_clients, cfg.seed).devices
    single = []
    for d in devices:
        n_val = validation_size(len(d.y_train), 0.1)
        if n_val >= 2 and len(d.y_train.unique()) > 1:
            single.append(len(d.y_train[len(d.y_train) - n_val :].unique()) == 1)
    return float(np.mean(single))


def test_class_by_class_partitions_leave_no_single_class_validation_tail() -> None:
    """The consecutive partition (digits here, Fashion-MNIST's scheme) and the stratified split dealt a device's
    rows class after class, so the last tenth held one class; shuffled, it rarely does."""
    consecutive = ["dataset.partitioner=consecutive", "num_clients=10", "dataset.classes_per_client=3"]
    assert _single_class_validation_share(consecutive) < 0.3
    assert _single_class_validation_share(["dataset.stratified_split=true", "num_clients=10"]) < 0.3


# 6. Krum and Multi-Krum where n < f + 3 (flearn/trainers_global/fedbase.py 194-198, 212-217)


def test_krum_where_no_neighbour_counts_refuses_by_default_and_takes_the_first_rows_officially() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(5, dtype=torch.float64)
    for f in (3, 4):  # n = f + 2 and f + 1: every official score is 0
        with pytest.raises(ValueError, match="n >= f \\+ 3"):
            krum(x, ones, f)
        assert torch.equal(krum(x, ones, f, small_n="official"), x[0])
        torch.testing.assert_close(multikrum(x, ones, f, small_n="official"), x[: 5 - f].mean(0))
    torch.testing.assert_close(krum(x, ones, 1, small_n="official"), krum(x, ones, 1), msg="n >= f + 3: unchanged")
    with pytest.raises(ValueError):
        krum(x, ones, 5, small_n="official")  # n <= f: refused (official Multi-Krum crashes there)
    cfg = compose_config(["aggregator=krum", "aggregator.small_n=official", "attack.fraction=0.8"])
    assert cfg.aggregator.small_n == "official"


# 7. no bound on updates: every rule finite on finite input


@pytest.mark.parametrize(
    "dtype, big",
    [
        (torch.float32, torch.finfo(torch.float32).max),  # what a float32 model can send at most
        (torch.float32, torch.finfo(torch.float32).max / 2),
        (torch.float64, 1e300),
        (torch.float64, torch.finfo(torch.float64).max),
    ],
)
@pytest.mark.parametrize(
    "rows, signs", [([3], [1]), ([3, 5], [1, 1]), ([1, 3, 5, 7, 9], [1] * 5), ([2, 4, 6], [1, -1, 1])]
)
def test_every_rule_returns_finite_values_for_huge_but_finite_rows(
    dtype: torch.dtype, big: float, rows: list[int], signs: list[int]
) -> None:
    """With the norm bound off (the official code has none) a finite stack gives a finite aggregate: the mean sums
    in float64 (as the official simple_average), the geometric median and the trimmed mean rescale what would
    overflow. Before: the float32 mean of two rows at float32's largest was inf, geomed of a 1e300 row was inf."""
    x = torch.randn(11, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for row, sign in zip(rows, signs):
        x[row] = sign * big
    ones = torch.ones(11, dtype=torch.float64)
    for name in AGGREGATORS:
        out = build_aggregator({"name": name})(x.clone(), ones, 2)
        assert bool(torch.isfinite(out).all()), name
    assert compose_config(["max_update_norm=null"]).max_update_norm is None


# sampling by size, every dataset's default: a lazy federation's counts without building its devices


def test_size_sampling_of_a_lazy_federation_builds_no_device() -> None:
    cfg = compose_config(["dataset=synthetic", "num_clients=300"])
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    sizes = sampling_sizes(cfg)
    assert federation.devices._get.cache_info().currsize == 0, "no device's data was drawn to learn its size"
    assert list(sizes) == [len(d.y_train) for d in federation.devices]


# 9. CelebA's batch norm epsilon (tf.layers.batch_normalization's default)


def test_celeba_batch_norm_uses_tfs_epsilon() -> None:
    model = build_model("cnn_celeba", (3, 84, 84), 2, seed=0)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {TF_BATCH_NORM_EPS} == {1e-3}
