"""The tuning of Flower's simulation engine (app/runners/engine.py): same messages, fewer questions, only inside the
block.

The assumption tests run against the installed Flower: each fails when Flower moves what app/runners/engine.py reaches.
"""

from __future__ import annotations

import importlib
import threading
import time
from queue import Empty, Queue
from types import SimpleNamespace
from uuid import uuid4

import flwr
import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from app.runners import engine

RUN_SIMULATION = importlib.import_module("flwr.simulation.run_simulation")


@pytest.fixture
def federation(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An in-memory LinkState with a run and 5 registered nodes, built as run_simulation's _main_loop builds it."""
    m = RUN_SIMULATION
    factory = m.LinkStateFactory(m.FLWR_IN_MEMORY_DB_NAME, m.NoOpFederationManager(), m.ObjectStoreFactory())
    state = factory.state()
    run = m.Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 9, m.NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = m.RunRecord(run=run)
    state.task_store[9] = m.Task(task_id=9, run_id=run.run_id)
    for name, value in (("_task_id", 1), ("_run_id", run.run_id), ("_node_id", m.SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)  # Message() reads the process's task identity
    nodes = vce_api._register_nodes(5, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return SimpleNamespace(factory=factory, state=state, nodes=list(nodes), grid=grid)


def _send(fed: SimpleNamespace, *node_indices: int) -> list[str]:
    return list(
        fed.grid.push_messages([Message(RecordDict(), fed.nodes[i], "train", group_id="1") for i in node_indices])
    )


def _record_asks(state: InMemoryLinkState, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    asked: list[int] = []
    original = state.get_message_ins

    def get_message_ins(node_id: int, limit: int | None, **kwargs: object) -> list:
        asked.append(node_id)
        return original(node_id=node_id, limit=limit, **kwargs)

    monkeypatch.setattr(state, "get_message_ins", get_message_ins)
    return asked


# -- the tuned dispatcher, on a real in-memory LinkState ----------------------------------------------------------


def test_pending_nodes_are_the_nodes_with_undelivered_messages(federation: SimpleNamespace) -> None:
    _send(federation, 1, 1, 3)
    federation.state.get_message_ins(node_id=federation.nodes[3], limit=1)  # delivered: no longer pending
    mapping = dict.fromkeys(federation.nodes[:3])  # node 3 is not in this run's mapping anyway
    assert engine.pending_nodes(federation.state, mapping) == [federation.nodes[1]]


def test_pending_nodes_refuse_a_state_that_is_not_in_memory() -> None:
    """The old code fell back silently to asking every node; a state it cannot read is now an error."""
    with pytest.raises(engine.EngineMismatch, match="InMemoryLinkState.*SimpleNamespace"):
        engine.pending_nodes(SimpleNamespace(get_message_ins=lambda **kw: []), {5: 0, 6: 1})


def test_the_dispatcher_queues_each_message_once_and_asks_only_pending_nodes(
    federation: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _send(federation, 1, 1, 3)
    asked = _record_asks(federation.state, monkeypatch)
    queue: Queue = Queue()
    stop = threading.Event()
    mapping = {**dict.fromkeys(range(1000)), **dict.fromkeys(federation.nodes)}
    thread = threading.Thread(target=engine.dispatcher(0.001), args=(federation.state, queue, mapping, stop))
    thread.start()
    got = [queue.get(timeout=5).metadata.message_id for _ in range(3)]
    time.sleep(0.05)  # more polls: nothing is queued twice
    stop.set()
    thread.join(timeout=5)
    assert sorted(got) == sorted(ids) and queue.empty()
    assert set(asked) == {federation.nodes[1], federation.nodes[3]}  # never the 1,003 nodes without messages


# -- the assumptions, against the installed Flower ----------------------------------------------------------------


def test_the_installed_flower_is_a_version_the_tuning_was_checked_against() -> None:
    engine.check_version()
    assert flwr.__version__ in engine.CHECKED


def test_flower_starts_its_dispatcher_thread_from_the_module_global() -> None:
    engine.check_dispatcher()


def test_run_simulation_builds_the_module_grid_which_polls_every_pull_interval() -> None:
    engine.check_grid()


def test_the_simulation_state_is_in_memory_with_a_readable_store() -> None:
    engine.check_state()


def _fake_run_api(*args: object) -> None:
    """A run_api that does not look add_messages_to_queue up."""


def _fake_main_loop(*args: object) -> None:
    """A _main_loop that builds neither the module's grid nor the in-memory state."""


def _fake_worker(*args: object) -> None:
    """A worker that waits on its queue in some other way."""


BREAKAGES = {
    "check_version": [(flwr, "__version__", "1.99.0")],
    "check_dispatcher": [(vce_api, "run_api", _fake_run_api)],
    "check_grid": [(InMemoryGrid, "send_and_receive", lambda self, messages, *, timeout=None: [])],
    "check_queues": [(vce_api, "worker", _fake_worker)],
    "check_nodes": [(vce_api, "_register_nodes", lambda nodes, factory: {})],
    "check_state": [(RUN_SIMULATION, "LinkStateFactory", lambda *a: SimpleNamespace(state=lambda: SimpleNamespace()))],
}


@pytest.mark.parametrize("check", list(BREAKAGES))
def test_each_assumption_fails_loudly_when_flower_breaks_it(check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for target, name, value in BREAKAGES[check]:
        monkeypatch.setattr(target, name, value)
    with pytest.raises(engine.EngineMismatch, match=f"(?s)cannot tune.*{check}: "):
        engine.check_assumptions()


def test_a_missing_flower_function_is_named_not_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(vce_api, "add_messages_to_queue")
    monkeypatch.setattr(RUN_SIMULATION, "_main_loop", _fake_main_loop)
    with pytest.raises(engine.EngineMismatch) as err:
        engine.check_assumptions()
    assert "check_dispatcher: " in str(err.value) and "check_grid: " in str(err.value)
    assert "check_state: " in str(err.value)


# -- the context: applied around a run, undone after --------------------------------------------------------------


def test_flowers_own_runtime_loop_runs_the_tuned_dispatcher_only_inside_the_block(
    federation: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vce_api.run_api (Flower's loop, with a backend that runs no workers) delivers a message; inside the block
    only the pending node is asked, after it Flower's dispatcher asks every node of the mapping again."""
    backend = SimpleNamespace(build=lambda app_fn: None, num_workers=0, terminate=lambda: None)
    mapping = dict.fromkeys(federation.nodes)

    def run_api_until_delivered() -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=vce_api.run_api, args=(None, lambda: backend, mapping, federation.factory, {}, stop, VceMetrics())
        )
        thread.start()
        deadline = time.monotonic() + 10
        while any(m.metadata.delivered_at == "" for m in federation.state.message_ins_store.values()):
            assert time.monotonic() < deadline, "run_api never dispatched the message"
            time.sleep(0.01)
        stop.set()
        thread.join(timeout=10)

    asked = _record_asks(federation.state, monkeypatch)
    with engine.tuned_engine(poll=0.001):
        _send(federation, 2)
        run_api_until_delivered()
    assert set(asked) == {federation.nodes[2]}
    asked.clear()
    _send(federation, 2)
    run_api_until_delivered()
    assert set(asked) == set(federation.nodes)


def test_inside_the_block_run_simulation_builds_a_grid_polling_every_poll(federation: SimpleNamespace) -> None:
    with engine.tuned_engine(poll=0.002):
        grid = RUN_SIMULATION.InMemoryGrid(state_factory=federation.factory)  # as _main_loop calls it
    assert isinstance(grid, InMemoryGrid) and grid.pull_interval == 0.002
    assert RUN_SIMULATION.InMemoryGrid(state_factory=federation.factory).pull_interval == 0.1  # Flower's own again


def test_the_tuned_grid_refuses_a_state_the_dispatcher_cannot_read() -> None:
    with pytest.raises(engine.EngineMismatch, match="InMemoryLinkState"):
        engine.TunedGrid(SimpleNamespace(state=lambda: SimpleNamespace()))


def test_the_block_restores_flowers_engine_on_exit_and_on_error() -> None:
    """The old tune() replaced both for good, process-wide."""
    originals = vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid
    with engine.tuned_engine():
        assert (vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid) != originals
    assert (vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid) == originals
    with pytest.raises(KeyError), engine.tuned_engine():
        raise KeyError("a failed run")
    assert (vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid) == originals


def test_a_broken_assumption_changes_nothing_and_the_block_does_not_nest(monkeypatch: pytest.MonkeyPatch) -> None:
    originals = vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    with pytest.raises(engine.EngineMismatch, match="1.99.0"), engine.tuned_engine():
        pass
    assert (vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid) == originals
    monkeypatch.undo()
    with engine.tuned_engine():
        with pytest.raises(engine.EngineMismatch, match="does not nest"), engine.tuned_engine():
            pass
    assert (vce_api.add_messages_to_queue, RUN_SIMULATION.InMemoryGrid) == originals


def test_the_engine_waits_on_its_queues_and_registers_its_nodes_as_the_tuning_assumes() -> None:
    engine.check_queues()
    engine.check_nodes()


def test_inside_the_block_registered_nodes_are_recorded_and_queues_wait_briefly(federation: SimpleNamespace) -> None:
    """The strategy names simulated nodes from the engine's own registration; an idle worker sees the end of the run
    within PromptQueue.wait instead of Flower's 1 s."""
    originals = vce_api._register_nodes, vce_api.Queue
    with engine.tuned_engine() as nodes:
        mapping = vce_api._register_nodes(3, federation.factory)  # as start_vce calls it
        queue = vce_api.Queue()
        began = time.monotonic()
        with pytest.raises(Empty):
            queue.get(timeout=1.0)  # as Flower's workers wait
        waited = time.monotonic() - began
    assert nodes == mapping and sorted(mapping.values()) == [0, 1, 2]
    assert waited < 0.5, f"an idle worker waited {waited:.2f} s"
    assert (vce_api._register_nodes, vce_api.Queue) == originals


def test_the_tuned_grid_wakes_on_a_stored_reply_and_still_honours_its_timeout(federation: SimpleNamespace) -> None:
    """With a pull interval of 5 s, a reply stored 0.2 s after the request ends the wait at once (Flower's grid
    would sleep out its interval); a request nobody answers ends at its timeout."""
    grid = engine.TunedGrid(federation.factory, pull_interval=5.0)
    grid.set_run(federation.grid._run)

    def answer() -> None:
        time.sleep(0.2)
        node = federation.nodes[1]
        for message in federation.state.get_message_ins(node_id=node, limit=1):
            reply = Message(RecordDict(), reply_to=message)
            reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's simulation worker names a reply
            federation.state.store_message_res(reply)

    helper = threading.Thread(target=answer)
    began = time.monotonic()
    helper.start()
    request = Message(RecordDict(), federation.nodes[1], "train", group_id="1")
    replies = list(grid.send_and_receive([request], timeout=20))
    helper.join()
    assert len(replies) == 1 and time.monotonic() - began < 2.0
    began = time.monotonic()
    assert (
        list(grid.send_and_receive([Message(RecordDict(), federation.nodes[2], "train", group_id="1")], timeout=0.3))
        == []
    )
    assert 0.25 < time.monotonic() - began < 2.0
