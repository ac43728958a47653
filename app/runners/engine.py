"""Flower's in-memory simulation engine, tuned for short rounds and many devices, inside `with tuned_engine():`
(the Hydra entry point wraps its `run_simulation` call in it; deployment and `flwr run .` are untouched).

Three costs of the stock engine come from neither training nor messages (profiled with py-spy, measured with
benchmarks/overhead.py, benchmarks/scale.py and benchmarks/sweep.py):
- its dispatcher (`vce_api.add_messages_to_queue`) asks the LinkState for a message once per NODE every 0.1 s, and
  each ask scans every stored message: O(nodes x messages) work per poll under the state's lock, which grows with
  the federation although a round only talks to the sampled devices;
- the in-memory grid polls for replies every 0.1 s, so every message waits for two 0.1 s ticks;
- its workers wait up to 1 s on an empty queue before they see that the run has ended.
Inside the block the dispatcher asks only the nodes that have undelivered messages (one scan of the store per look,
then the same per-node `get_message_ins(node, limit=1)` call as Flower's); it and the grid wake when a message is
stored (`signals`), polling every `poll` seconds only as the bound of each wait; the workers' waits are capped at
0.05 s (PromptQueue). The block also records the {node id: partition id} the engine registers, which the strategy
uses to name simulated nodes without a message.
Messages, their order per node and the state's API are unchanged; only who is asked, and how often, changes.

Every reach into Flower is listed in ASSUMPTIONS, checked on entry (EngineMismatch names each that fails) and tested
against the installed Flower in tests/contracts/test_engine.py. The fix belongs upstream
(docs/maintainers/upstream-engine.md); the day Flower takes it, this module goes.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from queue import Queue
from types import ModuleType
from typing import Any

import flwr
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.superlink.grid import InMemoryGrid

CHECKED = ("1.41.0", "1.42.0")  # Flower versions read for this (their dispatcher, grid and in-memory state: identical)
POLL = 0.005


class EngineMismatch(RuntimeError):
    """The installed Flower's simulation engine is not the one app/runners/engine.py was checked against."""


def _run_simulation_module() -> ModuleType:
    # `flwr.simulation.run_simulation` is both a module and, re-exported by the package, a function of that name.
    return importlib.import_module("flwr.simulation.run_simulation")


def _reads_global(func: Callable, name: str) -> bool:
    """Whether `func` looks `name` up in its module's globals at call time (so replacing the attribute reaches it)."""
    return name in getattr(getattr(func, "__code__", None), "co_names", ())


def _params(func: Callable) -> list[str]:
    return list(inspect.signature(func).parameters)


def _store(state: Any) -> tuple[dict, Any]:
    """(message_ins_store, lock) of an InMemoryLinkState; EngineMismatch for any other state."""
    # Reach: InMemoryLinkState keeps every stored instruction message in `message_ins_store` (message id -> Message)
    # and guards it with `lock` (an RLock); both are plain attributes set in its __init__.
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(state, InMemoryLinkState) or not isinstance(store, dict) or not hasattr(lock, "__enter__"):
        raise EngineMismatch(
            f"the tuned dispatcher needs an InMemoryLinkState with a message_ins_store dict and a "
            f"lock; got {type(state).__name__}: run outside tuned_engine()"
        )
    return store, lock


# -- the assumptions, each checked on entry and tested in tests/contracts/test_engine.py
# ---------------------------------------


def check_version() -> None:
    if flwr.__version__ not in CHECKED:
        raise EngineMismatch(
            f"app/runners/engine.py was checked against Flower {', '.join(CHECKED)}; this is Flower "
            f"{flwr.__version__}: re-read its dispatcher and grid, run tests/contracts/test_engine.py, then "
            "add the version to CHECKED"
        )


def check_dispatcher() -> None:
    # Reach: vce_api.run_api starts its dispatcher thread with `target=add_messages_to_queue`, a module global looked
    # up when run_api runs, called as (state, queue, nodes_mapping, f_stop).
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or _params(original) != ["state", "queue", "nodes_mapping", "f_stop"]:
        raise EngineMismatch(
            "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue(state, queue, nodes_mapping, f_stop) is gone"
        )
    if not _reads_global(getattr(vce_api, "run_api", None), "add_messages_to_queue"):
        raise EngineMismatch(
            "flwr.server.superlink.fleet.vce.vce_api.run_api no longer starts its dispatcher "
            "from the module global add_messages_to_queue"
        )


def check_grid() -> None:
    # Reach: run_simulation's _main_loop builds its grid as `InMemoryGrid(state_factory=...)` from the module global
    # (imported from flwr.superlink.grid); the grid sleeps `self.pull_interval` between polls for replies.
    module = _run_simulation_module()
    if getattr(module, "InMemoryGrid", None) is not InMemoryGrid:
        raise EngineMismatch(
            "flwr.simulation.run_simulation.InMemoryGrid is not Flower's InMemoryGrid "
            "(already replaced: tuned_engine() does not nest)"
        )
    if not _reads_global(getattr(module, "_main_loop", None), "InMemoryGrid"):
        raise EngineMismatch("flwr.simulation.run_simulation._main_loop no longer builds the module's InMemoryGrid")
    if (
        _params(InMemoryGrid.__init__)[1:] != ["state_factory", "pull_interval"]
        or "pull_interval" not in InMemoryGrid.send_and_receive.__code__.co_names
    ):
        raise EngineMismatch("InMemoryGrid(state_factory, pull_interval) no longer polls every pull_interval")


def check_queues() -> None:
    # Reach: vce_api.run_api builds its two message queues from the module global `Queue`; the workers and the reply
    # injector wait on them with `get(timeout=1.0)` and look at the stop event between waits.
    if not _reads_global(getattr(vce_api, "run_api", None), "Queue"):
        raise EngineMismatch("flwr.server.superlink.fleet.vce.vce_api.run_api no longer builds its queues from Queue")
    for name in ("worker", "put_message_into_state"):
        if "get(timeout=1.0)" not in inspect.getsource(getattr(vce_api, name)):
            raise EngineMismatch(f"vce_api.{name} no longer waits on its queue with get(timeout=1.0)")


def check_nodes() -> None:
    # Reach: vce_api.start_vce registers the simulation's nodes with the module global `_register_nodes(num_nodes,
    # state_factory)`, which returns {node id: partition id}: the partition id each node's context is given.
    original = getattr(vce_api, "_register_nodes", None)
    if original is None or _params(original) != ["num_nodes", "state_factory"]:
        raise EngineMismatch(
            "flwr.server.superlink.fleet.vce.vce_api._register_nodes(num_nodes, state_factory) is gone"
        )
    if not _reads_global(getattr(vce_api, "start_vce", None), "_register_nodes"):
        raise EngineMismatch("vce_api.start_vce no longer registers its nodes with the module global _register_nodes")


def check_state() -> None:
    # Reach: _main_loop's LinkStateFactory is built on FLWR_IN_MEMORY_DB_NAME, which gives an InMemoryLinkState;
    # `get_message_ins(node_id, limit)` hands out undelivered messages (metadata.delivered_at == "") and marks them.
    module = _run_simulation_module()
    if not _reads_global(getattr(module, "_main_loop", None), "FLWR_IN_MEMORY_DB_NAME"):
        raise EngineMismatch("flwr.simulation.run_simulation._main_loop no longer uses the in-memory LinkState")
    if _params(InMemoryLinkState.get_message_ins)[1:3] != ["node_id", "limit"]:
        raise EngineMismatch("InMemoryLinkState.get_message_ins(node_id, limit) is gone")
    _store(
        module.LinkStateFactory(
            module.FLWR_IN_MEMORY_DB_NAME, module.NoOpFederationManager(), module.ObjectStoreFactory()
        ).state()
    )


ASSUMPTIONS = (check_version, check_dispatcher, check_grid, check_queues, check_nodes, check_state)


def check_assumptions() -> None:
    """Raise EngineMismatch naming every assumption about Flower's engine that the installed Flower breaks."""
    failures = []
    for check in ASSUMPTIONS:
        try:
            check()
        except (EngineMismatch, AttributeError, TypeError, ValueError) as err:
            failures.append(f"{check.__name__}: {err}")
    if failures:
        raise EngineMismatch("cannot tune Flower's simulation engine:\n  " + "\n  ".join(failures))


# -- the tuning -----------------------------------------------------------------------------------------------------


def pending_nodes(state: Any, nodes: Any) -> list[int]:
    """Nodes (of `nodes`) with an undelivered message in the in-memory `state`."""
    store, lock = _store(state)
    # Reach: a stored message is undelivered while metadata.delivered_at == "" (get_message_ins's own test) and goes to
    # metadata.dst_node_id.
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [node for node in pending if node in nodes]


class Signal:
    """A counter that waiting threads watch: `wait(seen, timeout)` returns once it differs from `seen` (or after
    `timeout`), so a waiter wakes when something happened instead of polling."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = threading.Condition()

    def notify(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen, timeout)


def signals(state: Any) -> tuple[Signal, Signal]:
    """(instructions stored, replies stored) of an in-memory `state`: its two store methods, wrapped once on the
    instance, notify them after storing."""
    # Reach: the dispatcher's instructions come from state.store_message_ins and the replies the grid waits for from
    # state.store_message_res (Flower's put_message_into_state), both looked up on the instance at call time.
    kept = getattr(state, "_tuned_signals", None)
    if kept is not None:
        return kept
    kept = Signal(), Signal()
    for name, signal in zip(("store_message_ins", "store_message_res"), kept):
        store = getattr(state, name)

        def notifying(message: Any, *args: Any, _store: Callable = store, _signal: Signal = signal, **kw: Any) -> Any:
            try:
                return _store(message, *args, **kw)
            finally:
                _signal.notify()

        setattr(state, name, notifying)
    state._tuned_signals = kept
    return kept


def dispatcher(poll: float) -> Callable[[Any, Queue, Any, threading.Event], None]:
    """The replacement of vce_api.add_messages_to_queue: it looks for undelivered messages when one is stored, and
    every `poll` seconds at the latest."""

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Put undelivered messages in the workers' queue: at most one per node per look, as Flower's own."""
        stored, _ = signals(state)
        while not f_stop.is_set():
            seen = stored.version
            for node_id in pending_nodes(state, nodes_mapping):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            stored.wait(seen, poll)

    return add_messages_to_queue


class PromptQueue(Queue):
    """The engine's message queues, whose waits last at most `wait` seconds: Flower's workers wait up to 1 s on an
    empty queue before they see that the run has ended (half a second per run, on average, after the last round)."""

    wait = 0.05

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, self.wait if block and (timeout is None or timeout > self.wait) else timeout)


class TunedGrid(InMemoryGrid):
    """InMemoryGrid that refuses, in the caller's thread and before anything starts, a state the dispatcher cannot
    read (the simulation's dispatcher thread shares the grid's state: LinkStateFactory.state() is cached), and whose
    `send_and_receive` waits for a reply to be stored instead of polling: with a thread per device of a round (Flower's
    fit_clients), polling every few milliseconds cost the driver a core's share on 2 cores."""

    def __init__(self, state_factory: Any, pull_interval: float = POLL) -> None:
        super().__init__(state_factory, pull_interval)
        _store(self.state)
        self._replies = signals(self.state)[1]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list:
        """Flower's contract (flwr/superlink/grid/inmemory_grid.py, 1.41-1.42): push `messages`, then pull their
        replies until every one has come or `timeout` seconds have passed; a look at each stored reply, and every
        `pull_interval` seconds at the latest."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while waiting:
            seen = self._replies.version
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            left = None if end is None else end - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                break
            self._replies.wait(seen, self.pull_interval if left is None else min(self.pull_interval, left))
        return replies


def recording(register: Callable[[int, Any], dict[int, int]], into: dict[int, int]) -> Callable:
    """vce_api._register_nodes, also writing its {node id: partition id} into `into`."""

    def _register_nodes(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping = register(num_nodes, state_factory)
        into.update(mapping)
        return mapping

    return _register_nodes


@contextmanager
def tuned_engine(poll: float = POLL) -> Iterator[dict[int, int]]:
    """Within the block, `flwr.simulation.run_simulation` uses the tuned dispatcher, grid and queues; on exit (also on
    an error) Flower's own are back. Yields a dict that the simulation fills, once its engine starts, with each node's
    partition id (node id -> partition id: what the strategy would otherwise ask every node before round 1). Raises
    EngineMismatch before changing anything if the installed Flower breaks an assumption. The replacement is
    process-wide while the block runs (Flower reads them as module globals): one simulation at a time, and no
    nesting."""
    check_assumptions()
    module = _run_simulation_module()
    nodes: dict[int, int] = {}
    saved = vce_api.add_messages_to_queue, module.InMemoryGrid, vce_api.Queue, vce_api._register_nodes
    vce_api.add_messages_to_queue = dispatcher(poll)  # the thread target run_api looks up (check_dispatcher)
    module.InMemoryGrid = partial(TunedGrid, pull_interval=poll)  # the grid _main_loop builds (check_grid)
    vce_api.Queue = PromptQueue  # the queues run_api builds (check_queues)
    vce_api._register_nodes = recording(saved[3], nodes)  # what start_vce registers its nodes with (check_nodes)
    try:
        yield nodes
    finally:
        vce_api.add_messages_to_queue, module.InMemoryGrid, vce_api.Queue, vce_api._register_nodes = saved
