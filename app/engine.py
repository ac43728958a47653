"""Flower 1.41's in-memory simulation engine, tuned for short rounds and many devices (`tune()`; the Hydra entry
point and the benchmarks apply it; deployment is untouched).

Two costs of the stock engine come from neither training nor messages (profiled with py-spy, measured with
benchmarks/overhead.py and benchmarks/scale.py):
- its dispatcher (`vce_api.add_messages_to_queue`) asks the LinkState for a message once per NODE every 0.1 s, and
  each ask scans every stored message: O(nodes x messages) work per poll under the state's lock, which grows with
  the federation although a round only talks to the sampled devices;
- the in-memory grid polls for replies every 0.1 s, so every message waits for two 0.1 s ticks.
`tune()` gives the dispatcher the nodes that have undelivered messages (one scan of the store per poll, then the
same per-node `get_message_ins(node, limit=1)` call as before) and shortens both poll intervals to `poll` seconds.
Messages, their order per node and the state's API are unchanged; only who is asked, and how often, changes.
"""

from __future__ import annotations

import importlib
import threading
from queue import Queue
from typing import Any

import flwr
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid

TUNED_FOR = "1.41.0"
POLL = 0.005


def _pending_nodes(state: Any, nodes: Any) -> list[int]:
    """Nodes (of `nodes`) with an undelivered message in `state`; all of them when the state does not expose its
    store (another LinkState than the in-memory one)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if store is None or lock is None:
        return list(nodes)
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [node for node in pending if node in nodes]


def _dispatcher(poll: float):  # -> the replacement of vce_api.add_messages_to_queue
    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Put undelivered messages in the workers' queue: at most one per node per poll, as Flower's own."""
        while not f_stop.is_set():
            for node_id in _pending_nodes(state, nodes_mapping):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(poll)

    return add_messages_to_queue


def tune(poll: float = POLL) -> None:
    """Apply the tuning to this process's simulation engine (idempotent); refuse another Flower version, whose
    internals this was not checked against."""
    if flwr.__version__ != TUNED_FOR:
        raise RuntimeError(f"app/engine.py tunes Flower {TUNED_FOR}'s engine; this is Flower {flwr.__version__}: "
                           "re-check its dispatcher and grid, then update TUNED_FOR")
    vce_api.add_messages_to_queue = _dispatcher(poll)

    class Grid(InMemoryGrid):
        def __init__(self, state_factory: Any, pull_interval: float = poll) -> None:
            super().__init__(state_factory, pull_interval)

    importlib.import_module("flwr.simulation.run_simulation").InMemoryGrid = Grid  # the grid _main_loop builds
