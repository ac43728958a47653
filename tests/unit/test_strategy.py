"""RobustStrategy: reproducible sampling by partition id, malformed updates rejected and counted, aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.replies import check_evaluation, check_update
from strategies.robust import RobustStrategy
from strategies.rules.registry import build_aggregator

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
        return FitRes(
            status=OK,
            parameters=ndarrays_to_parameters(self.update),
            num_examples=10 * (self.partition_id + 1),
            metrics={},
        )

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
        num_clients=n,
        clients_per_round=per_round,
        num_rounds=3,
        eval_every=100,
        seed=seed,
        connect_timeout=5,
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


class OddDevice(FakeDevice):
    """A node whose get_properties answer is `properties`, or raises when that is an exception."""

    def __init__(self, cid: str, properties) -> None:
        super().__init__(cid, -1)
        self.properties = properties

    def get_properties(self, ins, timeout, group_id):
        if isinstance(self.properties, Exception):
            raise self.properties
        return GetPropertiesRes(status=OK, properties=self.properties)


def test_duplicate_out_of_range_missing_malformed_and_silent_nodes_are_excluded_and_the_run_goes_on() -> None:
    good = [FakeDevice("a", 0), FakeDevice("b", 1), FakeDevice("c", 2)]
    odd = [
        FakeDevice("d", 3),
        FakeDevice("e", 3),
        FakeDevice("f", 7),
        OddDevice("g", {}),
        OddDevice("h", {"partition_id": "1"}),
        OddDevice("i", {"partition_id": 1.5}),
        OddDevice("j", TimeoutError("no reply")),
    ]
    strategy = _strategy(4, 2)
    strategy.nodes.connect_timeout = 1
    chosen = strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager(good + odd))
    assert {p.cid for p, _ in chosen} <= {"a", "b", "c"} and len(chosen) >= 1
    entry = strategy.rounds[0]
    assert entry["excluded_nodes"] == 7 and entry["sent_updates"] == len(chosen)
    reasons = {e["node"]: e["reason"] for e in entry["exclusions"]}
    assert "2 new nodes claim device 3" in reasons["d"] and "2 new nodes claim device 3" in reasons["e"]
    assert "outside 0..3" in reasons["f"] and "no partition_id" in reasons["g"]
    assert "not a whole number" in reasons["h"] and "not a whole number" in reasons["i"]
    assert "no answer" in reasons["j"]
    strategy.configure_fit(2, ndarrays_to_parameters(MODEL), _manager(good + odd))
    assert strategy.rounds[1]["excluded_nodes"] == 0, "a refused node is asked once per connection"


def test_too_few_identified_devices_stop_the_first_round_with_an_error_naming_them() -> None:
    strategy = _strategy(3, 2)
    strategy.nodes.connect_timeout = 1
    with pytest.raises(RuntimeError, match=r"only 1 of num_clients=3 .* missing: \[1, 2\].*node b: partition_id=5"):
        strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager([FakeDevice("a", 0), FakeDevice("b", 5)]))
    nobody = _strategy(3, 2)
    nobody.nodes.connect_timeout = 1
    with pytest.raises(RuntimeError, match=r"only 0 of num_clients=3 .* refused nodes: none"):
        nobody.configure_fit(1, ndarrays_to_parameters(MODEL), _manager([]))


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
    assert strategy._devices(manager, 4)[1] is restarted


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
    garbage = FitRes(
        status=OK,
        parameters=Parameters(tensors=[b"not an array", b"x"], tensor_type="numpy.ndarray"),
        num_examples=5,
        metrics={},
    )
    params, metrics = strategy.aggregate_fit(1, [(FakeDevice("a", 0), good), (FakeDevice("b", 1), garbage)], [])
    assert metrics["rejected_updates"] == 1 and metrics["accepted_updates"] == 1
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 1.0)


def test_weighted_and_unweighted_mean() -> None:
    updates = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    weights = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(
        build_aggregator({"name": "mean", "weighted": False})(updates, weights, 0), torch.tensor([2.0, 2.0])
    )
    torch.testing.assert_close(
        build_aggregator({"name": "mean", "weighted": True})(updates, weights, 0), torch.tensor([2.5, 3.0])
    )


def test_only_evaluation_rounds_ask_every_device() -> None:
    devices = [FakeDevice(c, k) for k, c in enumerate("abcd")]
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=build_aggregator({"name": "mean"}),
        num_clients=4,
        clients_per_round=2,
        num_rounds=7,
        eval_every=3,
        seed=0,
        connect_timeout=5,
    )
    asked = {
        r: len(strategy.configure_evaluate(r, ndarrays_to_parameters(MODEL), _manager(devices))) for r in range(1, 8)
    }
    assert asked == {1: 0, 2: 0, 3: 4, 4: 0, 5: 0, 6: 4, 7: 4}


def test_a_round_the_rule_cannot_aggregate_keeps_the_global_model_and_is_counted() -> None:
    nan = [np.full((2, 3), np.nan, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    devices = [FakeDevice("a", 0), FakeDevice("b", 1, nan), FakeDevice("c", 2, nan), FakeDevice("d", 3)]
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=build_aggregator({"name": "krum"}),
        num_clients=4,
        clients_per_round=4,
        num_rounds=1,
        eval_every=10,
        seed=0,
        num_malicious=0,
        connect_timeout=5,
    )
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
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=build_aggregator({"name": "mean"}),
        num_clients=4,
        clients_per_round=4,
        num_rounds=1,
        eval_every=10,
        seed=0,
        threat_model=record,
        malicious=frozenset({1, 3}),
        connect_timeout=5,
    )
    server = Server(client_manager=_manager(devices), strategy=strategy)
    server.fit(num_rounds=1, timeout=None)
    assert seen["mask"] == [False, True, False, True]  # rows sorted by partition id
    for a in parameters_to_ndarrays(server.parameters):
        np.testing.assert_array_equal(a, 0.0)  # the aggregator saw the threat model's stack


# -- identity bound to the authenticated key ---------------------------------------------------------------------
def _key_pair() -> tuple[str, bytes]:
    """An ECDSA node key: its OpenSSH public line (what the operator lists) and PEM form (what the SuperLink holds)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return (
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode(),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )


class FakeGrid:
    """The SuperLink's view of the nodes: node id -> the public key it authenticated the node with."""

    def __init__(self) -> None:
        self.keys: dict[int, bytes] = {}

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=node, public_key=key) for node, key in self.keys.items()]


def _node(grid: FakeGrid, node_id: int, key: bytes, claims: int) -> FakeDevice:
    grid.keys[node_id] = key
    device = FakeDevice(str(node_id), claims)
    device.grid = grid
    return device


def test_with_device_keys_a_node_is_the_device_of_its_key_and_an_impostor_gets_no_round(tmp_path) -> None:
    from strategies.identity import load_device_keys

    pairs = [_key_pair() for _ in range(5)]  # devices 0..2, a registered spare key, device 2's key again below
    (tmp_path / "keys.json").write_text(json.dumps({str(k): pairs[k][0] for k in range(3)}))
    grid = FakeGrid()
    honest = [_node(grid, 10 + k, pairs[k][1], k) for k in range(3)]
    strategy = _strategy(3, 3)
    strategy.nodes.device_keys = load_device_keys(tmp_path / "keys.json", 3)
    manager = _manager(honest)
    assert len(strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)) == 3
    manager.unregister(honest[1])  # device 1 is down; a node with a valid but unlisted key claims its place
    grid.keys.pop(11)
    impostor = _node(grid, 20, pairs[3][1], 1)
    manager.register(impostor)
    chosen = strategy.configure_fit(2, ndarrays_to_parameters(MODEL), manager)
    assert impostor.cid not in {p.cid for p, _ in chosen}
    assert strategy.rounds[1]["exclusions"] == [
        {"node": "20", "claimed": 1, "reason": "its key is not listed in device_keys"}
    ]
    back = _node(grid, 11, pairs[1][1], 1)  # device 1 restarts with its key: same node id, a new connection
    manager.unregister(impostor)
    manager.register(back)
    manager.register(impostor)
    chosen = strategy.configure_fit(3, ndarrays_to_parameters(MODEL), manager)
    assert sorted(p.cid for p, _ in chosen) == ["10", "11", "12"], "device 1 has its slot back, not the impostor"
    misnamed = _node(grid, 30, pairs[0][1], 2)  # device 0's key (say, a second connection) claiming device 2
    manager.register(misnamed)
    strategy.configure_fit(4, ndarrays_to_parameters(MODEL), manager)
    assert strategy.rounds[3]["exclusions"][0]["reason"] == "claims device 2 but its key is device 0's"


def test_without_device_keys_identity_is_the_nodes_claim() -> None:
    strategy = _strategy(2, 2)
    manager = _manager([FakeDevice("a", 0), FakeDevice("b", 1)])
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    claimant = FakeDevice("z", 1)  # no keys: a node that says it is device 1 is device 1 (the README says so)
    manager.register(claimant)
    assert strategy._devices(manager, 2)[1] is claimant


@pytest.mark.parametrize(
    ("listed", "error"),
    [
        ({"0": "A"}, "every partition id 0..1"),
        ({"0": "A", "1": "not a key"}, "device 1 is no OpenSSH public key"),
        ({"0": "A", "1": "A"}, "same key"),
    ],
)
def test_a_bad_device_keys_file_names_the_problem(tmp_path, listed: dict, error: str) -> None:
    from strategies.identity import load_device_keys

    line = _key_pair()[0]
    (tmp_path / "keys.json").write_text(json.dumps({k: line if v == "A" else v for k, v in listed.items()}))
    with pytest.raises(ValueError, match=error):
        load_device_keys(tmp_path / "keys.json", 2)


# -- evaluation replies ------------------------------------------------------------------------------------------
def _evaluation(n_test: int = 10, correct: float = 7, loss: float = 0.5, **changes) -> EvaluateRes:
    metrics = {"partition_id": 0, "n_train": 30, "n_test": n_test, "correct_global": correct, "loss_global": loss}
    metrics.update(changes)
    return EvaluateRes(
        status=OK, loss=loss, num_examples=n_test, metrics={k: v for k, v in metrics.items() if v is not None}
    )


NEEDED = frozenset({"n_train", "n_test", "correct_global", "loss_global"})


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (_evaluation(correct=11), "correct_global=11"),
        (_evaluation(correct=-1), "correct_global=-1"),
        (_evaluation(correct=2.5), "correct_global=2.5"),
        (_evaluation(loss=float("nan")), "loss=nan"),
        (_evaluation(n_test=0, correct=0), "num_examples=0"),
        (_evaluation(correct_global=None), "missing"),
        (_evaluation(partition_id=3), "partition_id=3 in the reply of device 0"),
        (_evaluation(n_train=-4), "n_train=-4"),
        (_evaluation(lam=float("inf")), "lam=inf"),
    ],
)
def test_check_evaluation_names_what_is_wrong(res: EvaluateRes, reason: str) -> None:
    assert reason in check_evaluation(res, 0, NEEDED)
    assert check_evaluation(_evaluation(), 0, NEEDED) is None


def test_evaluation_replies_count_for_the_device_asked_and_bad_ones_never_reach_the_metrics() -> None:
    seen = {}
    strategy = _strategy(4, 2)
    strategy.evaluate_metrics_fn = lambda r, rows: seen.setdefault("rows", rows) and {}
    strategy.evaluation_keys = NEEDED
    strategy.eval_every = 1
    devices = [FakeDevice(c, k) for k, c in enumerate("abcd")]
    sent = strategy.configure_evaluate(1, ndarrays_to_parameters(MODEL), _manager(devices))
    replies = {
        "a": _evaluation(partition_id=None),  # says nothing of who it is: it is device 0, asked as such
        "b": _evaluation(partition_id=0),  # device 1 claims device 0's row
        "c": _evaluation(correct=12, partition_id=2),  # more correct answers than test samples
        "d": _evaluation(partition_id=3, correct=4),
    }
    strategy.aggregate_evaluate(1, [(proxy, replies[proxy.cid]) for proxy, _ in sent], [RuntimeError("lost")])
    assert [(r["partition_id"], r["correct_global"]) for r in seen["rows"]] == [(0, 7), (3, 4)]
    entry = strategy.rounds[-1]
    assert (
        entry["sent_evaluations"],
        entry["evaluations"],
        entry["rejected_evaluations"],
        entry["failed_evaluations"],
    ) == (4, 2, 2, 1)


def test_a_node_forging_its_evaluation_is_refused() -> None:
    from flwr.client import NumPyClient

    from app.threats.rogue import rogue_client

    class Honest(NumPyClient):
        def evaluate(self, parameters, config):
            return 0.5, 10, dict(_evaluation().metrics)

    loss, n, metrics = rogue_client(Honest(), "forge-evaluation").evaluate([], {})
    assert (
        check_evaluation(EvaluateRes(status=OK, loss=loss, num_examples=n, metrics=metrics), 0, NEEDED)
        == "correct_global=11, expected a whole number in 0..10"
    )
    with pytest.raises(ValueError, match="rogue='lie' is unknown; allowed: forge-evaluation"):
        rogue_client(Honest(), "lie")


class SilentDevice(FakeDevice):
    """A node that must not be asked who it is."""

    def get_properties(self, ins, timeout, group_id):
        raise AssertionError(f"node {self.cid} was asked for its partition id")


def test_nodes_the_simulation_registered_are_named_without_a_message_and_others_are_asked() -> None:
    """In Flower's simulation the engine's {node id: partition id} names each node (no message per device before
    round 1); a node it does not name is identified as before."""
    registered = {11: 0, 12: 1, 13: 2}
    nodes = [SilentDevice("11", 0), SilentDevice("12", 1), SilentDevice("13", 2), FakeDevice("99", 3)]
    strategy = _strategy(4, 4)
    strategy.nodes.simulated = registered
    chosen = strategy.configure_fit(1, ndarrays_to_parameters(MODEL), _manager(nodes))
    assert sorted((p.cid, p.partition_id) for p, _ in chosen) == [("11", 0), ("12", 1), ("13", 2), ("99", 3)]
    assert strategy.rounds[0]["excluded_nodes"] == 0 and strategy.connected_after is not None
    asked = _strategy(4, 4)  # without the mapping every node is asked: SilentDevice refuses to answer
    asked.nodes.connect_timeout = 1
    with pytest.raises(RuntimeError, match="only 1 of num_clients=4 devices"):
        asked.configure_fit(1, ndarrays_to_parameters(MODEL), _manager(nodes))
