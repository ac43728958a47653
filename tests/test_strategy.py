"""RobustStrategy: reproducible sampling by partition id, malformed updates rejected and counted, aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies import RobustStrategy, build_aggregator
from strategies.robust import check_update

OK = Status(code=Code.OK, message="")
MODEL = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]


class FakeDevice(ClientProxy):
    """A device that answers get_properties and fits by returning a fixed update."""

    def __init__(self, cid: str, partition_id: int, update: list[np.ndarray] | None = None) -> None:
        super().__init__(cid)
        self.partition_id = partition_id
        self.update = update if update is not None else [np.full_like(a, partition_id + 1.0) for a in MODEL]
        self.fitted = 0

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(status=OK, properties={"partition_id": self.partition_id})

    def fit(self, ins, timeout, group_id):
        self.fitted += 1
        return FitRes(status=OK, parameters=ndarrays_to_parameters(self.update), num_examples=10 * (self.partition_id + 1), metrics={})

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def _strategy(n: int, per_round: int, seed: int = 0, weighted: bool = False) -> RobustStrategy:
    return RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=build_aggregator({"name": "mean", "weighted": weighted}),
        num_clients=n, clients_per_round=per_round, num_rounds=3, eval_every=100, seed=seed, connect_timeout=5,
    )


def _manager(devices: list[FakeDevice]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for d in devices:
        manager.register(d)
    return manager


def _picks(cids: str | list[str], server_round: int, seed: int = 5) -> list[int]:
    manager = _manager([FakeDevice(cid, k) for k, cid in enumerate(cids)])
    chosen = _strategy(6, 3, seed=seed).configure_fit(server_round, ndarrays_to_parameters(MODEL), manager)
    return sorted(proxy.partition_id for proxy, _ in chosen)


def test_sampling_depends_only_on_seed_and_round_not_on_node_ids() -> None:
    assert _picks("abcdef", 2) == _picks(["z9", "x1", "q7", "m2", "k5", "b0"], 2)
    assert len(_picks("abcdef", 2)) == 3
    assert len({tuple(_picks("abcdef", r)) for r in range(1, 9)}) > 1  # rounds sample different devices


def test_duplicate_partition_ids_are_refused_with_a_clear_error() -> None:
    strategy = _strategy(2, 1)
    with pytest.raises(RuntimeError, match="same partition-id"):
        strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager([FakeDevice("a", 0), FakeDevice("b", 0)]))


def test_a_restarted_device_replaces_its_old_node_and_rounds_go_on_without_a_dead_one() -> None:
    strategy = _strategy(3, 3)
    old = [FakeDevice("a", 0), FakeDevice("b", 1), FakeDevice("c", 2)]
    manager = _manager(old)
    assert len(strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)) == 3
    manager.unregister(old[1])  # node b died: round 2 goes on with the two others, without waiting
    chosen = strategy.configure_fit(2, ndarrays_to_parameters(MODEL), manager)
    assert sorted(p.cid for p, _ in chosen) == ["a", "c"]
    restarted = FakeDevice("b2", 1)
    manager.register(restarted)
    chosen = strategy.configure_fit(3, ndarrays_to_parameters(MODEL), manager)
    assert sorted(p.cid for p, _ in chosen) == ["a", "b2", "c"]
    manager.register(old[1])  # the old node still listed beside the new one: the newest node is device 1
    assert strategy._devices(manager)[1] is restarted


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([np.full((2, 3), np.nan, dtype=np.float32), np.zeros(3, dtype=np.float32)], "NaN or Inf"),
        ([np.full((2, 3), np.inf, dtype=np.float32), np.zeros(3, dtype=np.float32)], "NaN or Inf"),
        ([np.zeros((3, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)], "shape"),
        ([np.zeros((2, 3), dtype=np.float64), np.zeros(3, dtype=np.float32)], "dtype"),
        ([np.zeros((2, 3), dtype=np.float32)], "arrays"),
    ],
)
def test_check_update_names_the_problem(bad: list[np.ndarray], reason: str) -> None:
    assert reason in check_update(bad, MODEL)
    assert check_update([a.copy() for a in MODEL], MODEL) is None


def test_an_absurd_norm_is_refused_only_above_the_bound() -> None:
    big = [np.full((2, 3), 1e20, dtype=np.float32), np.zeros(3, dtype=np.float32)]  # its square overflows float32
    assert "exceeds max_update_norm=1e+06" in check_update(big, MODEL, max_norm=1e6)
    assert check_update(big, MODEL) is None
    unit = [np.full((2, 3), 1 / 6**0.5, dtype=np.float32), np.zeros(3, dtype=np.float32)]  # norm 1
    assert check_update(unit, MODEL, max_norm=1.001) is None and "norm" in check_update(unit, MODEL, max_norm=0.99)


class RaisingDevice(FakeDevice):
    def fit(self, ins, timeout, group_id):
        raise RuntimeError("the device's training crashed")


def test_a_client_that_raises_is_counted_as_failed_and_the_round_completes() -> None:
    devices = [FakeDevice("a", 0), RaisingDevice("b", 1), FakeDevice("c", 2)]
    strategy = _strategy(3, 3)
    server = Server(client_manager=_manager(devices), strategy=strategy)
    server.fit(num_rounds=2, timeout=None)
    assert [(r["accepted_updates"], r["failed_clients"]) for r in strategy.rounds] == [(2, 1), (2, 1)]
    for a in parameters_to_ndarrays(server.parameters):  # two rounds of the mean of 1 and 3
        np.testing.assert_allclose(a, 4.0)


def test_malformed_updates_are_rejected_counted_and_the_round_completes() -> None:
    nan = [np.full((2, 3), np.nan, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    wrong_shape = [np.zeros((3, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    devices = [FakeDevice("a", 0), FakeDevice("b", 1), FakeDevice("c", 2, nan), FakeDevice("d", 3, wrong_shape)]
    strategy = _strategy(4, 4)
    server = Server(client_manager=_manager(devices), strategy=strategy)
    history, _ = server.fit(num_rounds=2, timeout=None)
    assert [r["rejected_updates"] for r in strategy.rounds] == [2, 2]
    assert [r["accepted_updates"] for r in strategy.rounds] == [2, 2]
    assert history.metrics_distributed_fit["rejected_updates"] == [(1, 2), (2, 2)]
    final = parameters_to_ndarrays(server.parameters)
    # two rounds of the unweighted mean of the two valid updates (1 and 2 everywhere): 2 * 1.5
    for a in final:
        np.testing.assert_allclose(a, 3.0)


def test_undecodable_bytes_are_rejected_not_a_crash() -> None:
    strategy = _strategy(2, 2)
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager([FakeDevice("a", 0), FakeDevice("b", 1)]))
    good = FitRes(status=OK, parameters=ndarrays_to_parameters([a + 1 for a in MODEL]), num_examples=5, metrics={})
    garbage = FitRes(status=OK, parameters=Parameters(tensors=[b"not an array", b"x"], tensor_type="numpy.ndarray"),
                     num_examples=5, metrics={})
    params, metrics = strategy.aggregate_fit(1, [(FakeDevice("a", 0), good), (FakeDevice("b", 1), garbage)], [])
    assert metrics["rejected_updates"] == 1 and metrics["accepted_updates"] == 1
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 1.0)


def test_weighted_and_unweighted_mean() -> None:
    updates = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    weights = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(build_aggregator({"name": "mean", "weighted": False})(updates, weights, 0),
                               torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(build_aggregator({"name": "mean", "weighted": True})(updates, weights, 0),
                               torch.tensor([2.5, 3.0]))


def test_only_evaluation_rounds_ask_every_device() -> None:
    devices = [FakeDevice(c, k) for k, c in enumerate("abcd")]
    strategy = RobustStrategy(initial_parameters=ndarrays_to_parameters(MODEL),
                              aggregate=build_aggregator({"name": "mean"}), num_clients=4, clients_per_round=2,
                              num_rounds=7, eval_every=3, seed=0, connect_timeout=5)
    asked = {r: len(strategy.configure_evaluate(r, ndarrays_to_parameters(MODEL), _manager(devices)))
             for r in range(1, 8)}
    assert asked == {1: 0, 2: 0, 3: 4, 4: 0, 5: 0, 6: 4, 7: 4}


def test_a_round_the_rule_cannot_aggregate_keeps_the_global_model_and_is_counted() -> None:
    nan = [np.full((2, 3), np.nan, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    devices = [FakeDevice("a", 0), FakeDevice("b", 1, nan), FakeDevice("c", 2, nan), FakeDevice("d", 3)]
    strategy = RobustStrategy(initial_parameters=ndarrays_to_parameters(MODEL),
                              aggregate=build_aggregator({"name": "krum"}), num_clients=4, clients_per_round=4,
                              num_rounds=1, eval_every=10, seed=0, num_malicious=0, connect_timeout=5)
    server = Server(client_manager=_manager(devices), strategy=strategy)
    server.fit(num_rounds=1, timeout=None)  # krum needs n >= f + 3 = 3 updates; 2 are valid
    assert strategy.rounds[0]["skipped_aggregation"] == 1 and strategy.rounds[0]["rejected_updates"] == 2
    for a in parameters_to_ndarrays(server.parameters):
        np.testing.assert_array_equal(a, 0.0)


def test_threat_model_sees_the_malicious_devices_rows() -> None:
    seen = {}

    def record(updates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen["mask"] = mask.tolist()
        return torch.zeros_like(updates)

    devices = [FakeDevice(c, k) for k, c in enumerate("abcd")]
    strategy = RobustStrategy(initial_parameters=ndarrays_to_parameters(MODEL),
                              aggregate=build_aggregator({"name": "mean"}), num_clients=4, clients_per_round=4,
                              num_rounds=1, eval_every=10, seed=0, threat_model=record, malicious=frozenset({1, 3}),
                              connect_timeout=5)
    server = Server(client_manager=_manager(devices), strategy=strategy)
    server.fit(num_rounds=1, timeout=None)
    assert seen["mask"] == [False, True, False, True]  # rows sorted by partition id
    for a in parameters_to_ndarrays(server.parameters):
        np.testing.assert_array_equal(a, 0.0)  # the aggregator saw the threat model's stack
