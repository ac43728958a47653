"""GPUs as a first-class target: the `accelerator`, `client_num_gpus` and `deterministic` keys, data and models placed
on the accelerator once, aggregation on the server's accelerator. Tests marked `cuda` run only where torch sees CUDA
(scripts/gpu_check.sh runs them on a GPU machine); the others hold on any machine."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

import app.runners.simulate
from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.config.validate import check_flwr_run
from app.records.persistence import MemoryStore
from app.training.compute import resolve_accelerator, set_deterministic
from app.training.models import get_weights
from strategies.robust import RobustStrategy
from strategies.rules.registry import AGGREGATORS, build_aggregator
from tests.unit.test_strategy import MODEL, FakeDevice, _manager

NO_CUDA = not torch.cuda.is_available()
# a conv net without dropout on the CIFAR-shaped workload: CPU and GPU runs differ only by float rounding
SMALL_IMAGES = [
    "dataset=fake_images",
    "dataset.num_samples=240",
    "dataset.partitioner=iid",
    "num_clients=3",
    "clients_per_round=3",
    "local_steps=3",
    "batch_size=8",
    "attack=none",
]


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda0", 3, "CPU"])
def test_a_bad_device_names_the_key_and_the_allowed_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"'accelerator'.*auto.*cpu.*cuda:N"):
        compose_config([f"accelerator={value}"])


@pytest.mark.skipif(not NO_CUDA, reason="checks a machine without CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_where_torch_sees_no_cuda(value: str) -> None:
    with pytest.raises(ConfigError, match=r"'accelerator'.*sees no CUDA device"):
        compose_config([f"accelerator={value}"])
    with pytest.raises(
        ValueError, match=r"'accelerator'.*sees no CUDA device"
    ):  # a process other than the validating one
        resolve_accelerator(value)


def test_auto_is_cuda_exactly_where_torch_sees_it() -> None:
    assert compose_config([]).accelerator == "auto"
    assert resolve_accelerator("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_accelerator("cpu") == torch.device("cpu")


@pytest.mark.parametrize("value", [-0.5, "half"])
def test_a_bad_client_gpu_share_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match="client_num_gpus"):
        compose_config([f"client_num_gpus={value}"])


@pytest.mark.skipif(not NO_CUDA, reason="checks a machine without CUDA")
def test_a_gpu_share_is_refused_on_a_machine_without_cuda_unless_the_ray_cluster_is_elsewhere() -> None:
    with pytest.raises(ConfigError, match=r"'client_num_gpus'.*no CUDA device.*client_num_gpus=0"):
        compose_config(["client_num_gpus=0.25"])
    assert compose_config(["client_num_gpus=0.25", "ray_address=10.0.0.5:6379"]).client_num_gpus == 0.25


def test_flwr_run_refuses_a_gpu_share_and_names_its_federation_option() -> None:
    cfg = compose_config(["client_num_gpus=0.25", "ray_address=10.0.0.5:6379"])
    cfg.ray_address = None
    with pytest.raises(ConfigError, match="client-resources-num-gpus=0.25"):
        check_flwr_run(cfg)
    check_flwr_run(compose_config([]))  # 0, the default, is what flwr run's own option leaves alone


def test_simulate_asks_ray_for_the_configured_gpu_share(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    seen = {}

    def fake_run_simulation(**kwargs) -> None:
        seen.update(kwargs["backend_config"]["client_resources"])

    monkeypatch.setattr(app.runners.simulate, "run_simulation", fake_run_simulation)
    cfg = compose_config(["client_num_gpus=0.25", "ray_address=10.0.0.5:6379"])
    with pytest.raises(RuntimeError, match="without writing"):  # the fake engine writes no results
        app.runners.simulate.simulate(cfg, tmp_path, tuned=False)
    assert seen == {"num_cpus": 1, "num_gpus": 0.25}
    with pytest.raises(RuntimeError, match="without writing"):
        app.runners.simulate.simulate(compose_config([]), tmp_path, tuned=False)
    assert seen["num_gpus"] == 0.0  # the default: today's CPU-only behaviour


def test_a_device_s_data_is_placed_once_per_process_and_reused_by_later_messages() -> None:
    """A ClientApp builds a client per message: the (held-out, poisoned) tensors must not be rebuilt and re-sent to
    the device each time."""
    cfg = compose_config(["num_clients=6", "method.lam=auto", "attack.fraction=0.5"])
    first, again = (DeviceClient(cfg, 1, MemoryStore(RecordDict())) for _ in range(2))
    for a, b in [
        (first.x_train, again.x_train),
        (first.y_train, again.y_train),
        (first.x_test, again.x_test),
        (first.plan.lams[0].x_val, again.plan.lams[0].x_val),
    ]:
        assert a is b
        assert a.device == first.accelerator == resolve_accelerator("auto")
    other = DeviceClient(
        compose_config(["num_clients=6", "method.lam=auto", "attack.fraction=0.5", "seed=1"]),
        1,
        MemoryStore(RecordDict()),
    )
    assert other.x_train is not first.x_train  # another config, other tensors


def test_the_strategy_builds_the_stack_on_its_device_and_runs_everything_there() -> None:
    seen: list[tuple[str, torch.device]] = []

    def rule(stack: torch.Tensor, weights: torch.Tensor, f: int) -> torch.Tensor:
        seen.extend([("rule stack", stack.device), ("rule weights", weights.device)])
        return stack.mean(dim=0)

    def threat(stack: torch.Tensor, malicious: torch.Tensor) -> torch.Tensor:
        seen.extend([("threat stack", stack.device), ("threat mask", malicious.device)])
        return stack

    def reweight(stack: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        seen.extend([("reweight stack", stack.device), ("reweight losses", losses.device)])
        return stack

    accelerator = resolve_accelerator("auto")
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=rule,
        num_clients=3,
        clients_per_round=3,
        num_rounds=1,
        eval_every=1,
        seed=0,
        threat_model=threat,
        reweight=reweight,
        accelerator=accelerator,
    )
    results = _fit_results(strategy, with_loss=True)
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert {name for name, _ in seen} == {
        "rule stack",
        "rule weights",
        "threat stack",
        "threat mask",
        "reweight stack",
        "reweight losses",
    }
    assert all(d == accelerator for _, d in seen)
    for a in parameters_to_ndarrays(parameters):  # the mean of 1, 2 and 3, back on the host
        np.testing.assert_allclose(a, 2.0)


def _fit_results(strategy: RobustStrategy, with_loss: bool = False, updates: list | None = None):
    devices = [FakeDevice(str(k), k, None if updates is None else updates[k]) for k in range(strategy.num_clients)]
    chosen = strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager(devices))
    results = [(proxy, proxy.fit(ins, None, 0)) for proxy, ins in chosen]
    if with_loss:
        for _, res in results:
            res.metrics["train_loss"] = 0.5
    return results


def test_the_deterministic_switch_sets_torch_and_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def _one_device_run(overrides: list[str]) -> tuple[list[np.ndarray], dict]:
    """Round 1 and 2 of device 0 (fit, then evaluate), in a fresh client with the config's determinism applied."""
    cfg = compose_config(overrides)
    set_deterministic(bool(cfg.deterministic))
    try:
        client = DeviceClient(cfg, 0, MemoryStore(RecordDict()))
        params = get_weights(client._build())
        for server_round in (1, 2):
            update, _, _ = client.fit(params, {"server_round": server_round})
            params = [p + u for p, u in zip(params, update)]
        _, _, metrics = client.evaluate(params, {"server_round": 2})
    finally:
        set_deterministic(False)
    return params, metrics


@pytest.mark.parametrize("accelerator", ["auto", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_same_seed_gives_the_same_metrics_with_deterministic_on(accelerator: str) -> None:
    overrides = [
        *SMALL_IMAGES,
        "dataset.model=cnn_femnist",
        "deterministic=true",
        f"accelerator={accelerator}",
    ]  # dropout too
    (a, metrics_a), (b, metrics_b) = _one_device_run(overrides), _one_device_run(overrides)
    assert metrics_a == metrics_b
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    _, other = _one_device_run([*overrides, "seed=1"])
    assert other != metrics_a


@pytest.mark.cuda
def test_a_round_on_the_gpu_matches_the_round_on_the_cpu() -> None:
    (cpu, metrics_cpu), (gpu, metrics_gpu) = (
        _one_device_run([*SMALL_IMAGES, f"accelerator={d}"]) for d in ("cpu", "cuda")
    )
    for x, y in zip(cpu, gpu):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    assert metrics_cpu["correct_global"] == metrics_gpu["correct_global"]
    assert metrics_cpu["correct_personal"] == metrics_gpu["correct_personal"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_rule_selects_on_the_gpu_what_it_selects_on_the_cpu(name: str) -> None:
    """Through the strategy: the same accepted updates give the same new global model with the stack on the GPU;
    a selecting rule (Krum) returns the very row it returns on the CPU."""
    rng = np.random.default_rng(7)
    updates = [[rng.standard_normal(a.shape).astype(np.float32) for a in MODEL] for _ in range(11)]
    updates[3] = [u * 50 for u in updates[3]]  # an outlier for the robust rules to leave out
    new = {}
    for accelerator in ("cpu", "cuda"):
        strategy = RobustStrategy(
            initial_parameters=ndarrays_to_parameters(MODEL),
            aggregate=build_aggregator({"name": name}),
            num_clients=11,
            clients_per_round=11,
            num_rounds=1,
            eval_every=1,
            seed=0,
            num_malicious=2,
            accelerator=accelerator,
        )
        parameters, _ = strategy.aggregate_fit(1, _fit_results(strategy, updates=updates), [])
        new[accelerator] = parameters_to_ndarrays(parameters)
    for x, y in zip(new["cpu"], new["cuda"]):
        if name == "krum":
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.slow
def test_a_short_simulation_on_the_gpu_ends_with_the_metrics_of_the_cpu_run(tmp_path) -> None:
    """The agreement check of scripts/gpu_check.sh: the same short run on the CPU and on the GPU (clients sharing it,
    the server aggregating on it) ends with the same accuracies, up to a prediction flipped by float rounding."""
    from app.runners.simulate import simulate

    base = [*SMALL_IMAGES, "dataset.num_samples=600", "num_rounds=3", "eval_every=3", "aggregator=krum"]
    cpu = simulate(compose_config([*base, "accelerator=cpu"]), tmp_path / "cpu")
    gpu = simulate(compose_config([*base, "accelerator=cuda", "client_num_gpus=0.5"]), tmp_path / "gpu")
    for kind in ("global", "personal"):
        print(f"{kind}: benign acc cpu {cpu[kind]['benign_acc']:.4f}, gpu {gpu[kind]['benign_acc']:.4f}")
        assert abs(cpu[kind]["benign_acc"] - gpu[kind]["benign_acc"]) <= 0.02
