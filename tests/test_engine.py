"""The tuning of Flower 1.41's simulation engine (app/engine.py): same messages, fewer questions."""

from __future__ import annotations

import importlib
import threading
from queue import Queue
from types import SimpleNamespace

import pytest

from app import engine


class FakeState:
    """The part of InMemoryLinkState the dispatcher touches: the store, its lock and get_message_ins."""

    def __init__(self, messages: dict[str, tuple[int, str]]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(id=mid, metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered))
            for mid, (node, delivered) in messages.items()
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list:
        self.asked.append(node_id)
        found = [m for m in self.message_ins_store.values()
                 if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for m in found:
            m.metadata.delivered_at = "now"
        return found


def test_pending_nodes_are_the_nodes_with_undelivered_messages() -> None:
    state = FakeState({"a": (1, ""), "b": (2, "earlier"), "c": (3, ""), "d": (99, "")})
    assert sorted(engine._pending_nodes(state, {1: 0, 2: 1, 3: 2})) == [1, 3]  # 99 is not a node of this run


def test_pending_nodes_fall_back_to_every_node_without_a_store() -> None:
    assert engine._pending_nodes(object(), {5: 0, 6: 1}) == [5, 6]


def test_the_dispatcher_queues_each_message_once_and_asks_only_pending_nodes() -> None:
    state = FakeState({"a": (1, ""), "b": (1, ""), "c": (3, "")})
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=engine._dispatcher(0.001), args=(state, queue, dict.fromkeys(range(1000)), stop))
    thread.start()
    got = [queue.get(timeout=5).id for _ in range(3)]
    stop.set()
    thread.join(timeout=5)
    assert sorted(got) == ["a", "b", "c"] and queue.empty()
    assert set(state.asked) == {1, 3}  # never the 998 nodes without messages


def test_tune_replaces_the_dispatcher_and_the_grid_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    run_simulation = importlib.import_module("flwr.simulation.run_simulation")
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(run_simulation, "InMemoryGrid", run_simulation.InMemoryGrid)
    engine.tune(poll=0.002)
    assert vce_api.add_messages_to_queue.__qualname__.startswith("_dispatcher")
    grid = run_simulation.InMemoryGrid(state_factory=SimpleNamespace(state=lambda: None))
    assert grid.pull_interval == 0.002


def test_tune_refuses_another_flower_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.flwr, "__version__", "1.99.0")
    with pytest.raises(RuntimeError, match="1.41.0.*1.99.0"):
        engine.tune()
