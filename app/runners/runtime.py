"""One Ray runtime and one pool of client actors for every simulation inside `with kept_runtime():` (a sweep's jobs,
a benchmark's runs), instead of a Ray start, fresh actors (each a process importing torch and Flower) and a shutdown
per run: on 2 cores these were 10-15 s of every job (docs/performance.md, "Sweeps").

Flower's simulation builds a `RayBackend` per run (vce_api.start_vce's backend_fn looks the class up in its module
at call time); inside the block that class is `KeptRayBackend`, which:
- starts Ray only when it is not running (Flower's own test) and keeps it running after the run;
- builds its actor pool once and hands the same pool to the next run when it asks for the same Ray (init arguments)
  and the same client resources, and when every actor is back in the pool (an actor still busy with a failed run's
  message is never reused: the pool is torn down and the next run builds a new one);
- on exit from the block (also on an error or Ctrl-C) kills the actors and shuts Ray down.
A client actor holds nothing of a run but its process's caches, which are keyed by the run's config
(app/client_app.py), so a run's numbers do not depend on the runs before it: tests/system/test_sweeps.py compares a
job inside a sweep with the same job alone. Every reach into Flower is checked on entry (RuntimeMismatch names it)
and in tests/contracts/test_runtime.py.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool
from ray._private import auto_init_hook

from app.runners.launch import session_pids, stop


class RuntimeMismatch(RuntimeError):
    """The installed Flower's Ray backend is not the one app/runners/runtime.py was checked against."""


class _Kept:
    """The runtime kept between runs: the pool, and the (init arguments, client resources) it was built for."""

    key: str | None = None
    pool: BasicActorPool | None = None
    started_ray: bool = False  # whether this block started Ray (one it found running is left running)
    runs: int = 0  # runs served by the kept pool (the first included)


def _key(backend_config: dict) -> str:
    return json.dumps(
        [backend_config.get("init_args") or {}, backend_config.get("client_resources") or {}],
        sort_keys=True,
        default=str,
    )


def _idle(pool: BasicActorPool) -> bool:
    """Every actor of `pool` is back in it (no message of an earlier run still running on one)."""
    # Reach: BasicActorPool keeps its idle actors in the list `pool`, the busy ones in `_future_to_actor`, and their
    # number in `num_actors`.
    return not pool._future_to_actor and len(pool.pool) == pool.num_actors


def release_pool() -> None:
    """Kill the kept actors, leaving Ray running."""
    pool, _Kept.pool, _Kept.key = _Kept.pool, None, None
    if pool is not None:
        for actor in [*pool.pool, *pool._future_to_actor.values()]:
            ray.kill(actor)


def _kill_actors() -> None:
    if _Kept.pool is not None and ray.is_initialized():
        release_pool()


def release() -> None:
    """Kill the kept actors and shut down the Ray this block started (no-op when nothing is kept)."""
    release_pool()
    if _Kept.started_ray and ray.is_initialized():
        ray.shutdown()
    _Kept.started_ray = False


class KeptRayBackend(raybackend.RayBackend):
    """Flower's RayBackend whose Ray runtime and actor pool serve the next run too (see the module)."""

    def __init__(self, backend_config: dict) -> None:
        key = _key(backend_config)
        if _Kept.key is not None and _Kept.key != key:
            release()  # another Ray or other client resources: start afresh
        started = not ray.is_initialized()
        super().__init__(backend_config)  # RayBackend.init_ray starts Ray only when it is not running
        _Kept.started_ray = _Kept.started_ray or started
        self._kept_key = key

    def build(self, app_fn: Any) -> None:
        """Take the kept pool (or build one), and put the run's ClientApp loader into Ray's object store once: Flower
        passes `self.app_fn` with every message, and a function Ray pickles by value (with the ClientApp and its
        config) cost the driver a fifth of its time per message; an object reference is resolved by the actor."""
        ref = ray.put(app_fn)
        if _Kept.pool is not None and _Kept.key == self._kept_key and _idle(_Kept.pool):
            self.pool, self.app_fn = _Kept.pool, ref
            _Kept.runs += 1
            return
        release_pool()
        super().build(ref)
        _Kept.pool, _Kept.key, _Kept.runs = self.pool, self._kept_key, 1

    def terminate(self) -> None:
        """Keep the pool for the next run when every actor is back; else tear it down (Ray stays up)."""
        if self.pool is not None and self.pool is _Kept.pool and _idle(self.pool):
            return
        release_pool()


def check_assumptions() -> None:
    """Raise RuntimeMismatch naming every reach into Flower's Ray backend that the installed Flower breaks."""
    failures = []
    # vce_api.start_vce builds its backend with `from .backend.raybackend import RayBackend` inside backend_fn: a
    # lookup of the module attribute at call time.
    source = inspect.getsource(vce_api.start_vce)
    if "from .backend.raybackend import RayBackend" not in source or "RayBackend(backend_config)" not in source:
        failures.append("vce_api.start_vce no longer builds raybackend.RayBackend(backend_config) at call time")
    backend = raybackend.RayBackend
    for name, params in (("__init__", ["backend_config"]), ("build", ["app_fn"]), ("terminate", [])):
        if list(inspect.signature(getattr(backend, name)).parameters)[1:] != params:
            failures.append(f"RayBackend.{name}({', '.join(params)}) changed")
    if "ray.is_initialized()" not in inspect.getsource(backend.init_ray):
        failures.append("RayBackend.init_ray no longer skips a running Ray")
    build = inspect.getsource(backend.build)
    if "self.pool = " not in build or "self.app_fn = app_fn" not in build:
        failures.append("RayBackend.build no longer sets self.pool and self.app_fn")
    if "(self.app_fn, message," not in inspect.getsource(backend.process_message):
        failures.append("RayBackend.process_message no longer passes self.app_fn to the actor as an argument")
    pool_init = inspect.getsource(BasicActorPool.__init__)
    if "self.pool" not in pool_init or "self._future_to_actor" not in pool_init or "self.num_actors" not in pool_init:
        failures.append("BasicActorPool no longer keeps pool, _future_to_actor and num_actors")
    if failures:
        raise RuntimeMismatch("cannot keep Flower's Ray runtime between runs:\n  " + "\n  ".join(failures))


@contextmanager
def kept_runtime() -> Iterator[None]:
    """Within the block every Flower simulation in this process shares one Ray runtime and actor pool; on exit (also
    on an error or an interrupt) the actors are killed and the Ray this block started is shut down. A block inside
    another is part of the outer one (a single run's own block, inside a sweep's)."""
    if raybackend.RayBackend is KeptRayBackend:
        yield
        return
    check_assumptions()
    raybackend.RayBackend = KeptRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = KeptRayBackend.__mro__[1]
        release()


def _stop_now(signum: int, frame: Any) -> None:
    """Stop the command and every process it started, now, by pid (Ray's own shutdown is no option here: once it has
    run, Ray ends the process the moment one of Flower's threads touches it); the kept actors are killed through Ray
    first, which matters on a Ray cluster of its own (`ray_address`). Exit 128 + the signal's number."""
    print(f"\n{signal.Signals(signum).name}: stopping, with every process this command started", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    started = session_pids(os.getpid()) - {os.getpid()}
    auto_init_hook.enable_auto_connect = False  # Flower's threads still call Ray: none may start a new Ray now
    killer = threading.Thread(target=_kill_actors, daemon=True)
    killer.start()
    killer.join(5)
    stop(started, grace=3)
    os._exit(128 + signum)


@contextmanager
def stopped_on_signals() -> Iterator[None]:
    """Within the block Ctrl-C (SIGINT) and SIGTERM end the process at once, after stopping what it started (the Ray
    runtime, its actors): Flower's simulation does not end on an interrupt (its ServerApp thread goes on waiting for
    replies), so a sweep must not rely on one. The jobs that finished keep their results; `skip_done=true` runs the
    rest. Main thread only."""
    saved = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
