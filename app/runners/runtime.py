"""One Ray runtime and one pool of client actors for every simulation inside `with kept_runtime():` (a sweep's jobs,
a benchmark's runs), instead of a Ray start, fresh actors (each a process importing torch and Flower) and a shutdown
per run: on 2 cores these were 10-15 s of every job (docs/performance.md, "Sweeps").

Flower's simulation builds a `RayBackend` per run (vce_api.start_vce's backend_fn looks the class up in its module
at call time); inside the block that class is `KeptRayBackend`, which:
- starts Ray only when it is not running (Flower's own test) and keeps it running after the run;
- builds its actor pool once and hands the same pool to the next run when it asks for the same Ray (init arguments),
  the same client resources and the same process-wide settings of the actors (`deterministic`, `accelerator`), and
  when every actor is back in the pool and answers (a pool with an actor still busy with a failed run's message, or
  dead, is torn down and the next run builds a new one);
- on exit from the block (also on an error) kills the actors and shuts Ray down.
A client actor holds nothing of a run but its process's caches, which are keyed by the run's config
(app/client_app.py: a device's data, the initial model, at most 256 devices' data per process), so a run's numbers do
not depend on the runs before it: tests/system/test_sweeps.py compares a job inside a sweep with the same job alone.
Every reach into Flower is checked on entry (RuntimeMismatch names it) and in tests/contracts/test_runtime.py.
`stopped_on_signals()` (the `ditto-simulate` command) makes Ctrl-C and SIGTERM stop everything at once.
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

from app.runners.launch import send, session_pids


class RuntimeMismatch(RuntimeError):
    """The installed Flower's Ray backend is not the one app/runners/runtime.py was checked against."""


class _Kept:
    """What is kept between runs: the Ray (its init arguments), the pool and what it was built for."""

    ray_args: str | None = None  # the init arguments of the running Ray this block uses
    key: str | None = None  # the pool's client resources and its actors' process-wide settings
    pool: BasicActorPool | None = None
    started_ray: bool = False  # whether this block started Ray (one it found running is left running)
    runs: int = 0  # runs served by the kept pool (the first included)
    on_signals: bool = False  # a stopped_on_signals block is active: its SIGTERM handler must win over Ray's


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _idle(pool: BasicActorPool) -> bool:
    """Every actor of `pool` is back in it (no message of an earlier run still running on one)."""
    # Reach: BasicActorPool keeps its idle actors in the list `pool`, the busy ones in `_future_to_actor`, and their
    # number in `num_actors`.
    return not pool._future_to_actor and len(pool.pool) == pool.num_actors


def _answers(pool: BasicActorPool, timeout: float = 30.0) -> bool:
    """Every actor of `pool` is alive and answers (Flower puts an actor that died back into its pool)."""
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=timeout)
    except Exception:  # a dead actor (RayActorError) or one that does not answer in time
        return False
    return True


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
    _Kept.started_ray, _Kept.ray_args = False, None


class KeptRayBackend(raybackend.RayBackend):
    """Flower's RayBackend whose Ray runtime and actor pool serve the next run too (see the module). The backend
    config's `process` entry (ignored by Flower) names the actors' process-wide settings; a pool is shared only by
    runs with the same."""

    def __init__(self, backend_config: dict) -> None:
        ray_args = _json(backend_config.get("init_args") or {})
        if _Kept.ray_args is not None and _Kept.ray_args != ray_args:
            release()  # another Ray: start afresh
        started = not ray.is_initialized()
        super().__init__(backend_config)  # RayBackend.init_ray starts Ray only when it is not running
        if started and _Kept.on_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop_now)  # ray.init has just put its own (sys.exit) in place
        _Kept.started_ray = _Kept.started_ray or started
        _Kept.ray_args = ray_args
        self._kept_key = _json([backend_config.get("client_resources") or {}, backend_config.get("process") or {}])

    def build(self, app_fn: Any) -> None:
        """Take the kept pool (or build one), and put the run's ClientApp loader into Ray's object store once: Flower
        passes `self.app_fn` with every message, and a function Ray pickles by value (with the ClientApp and its
        config) cost the driver a fifth of its time per message; an object reference is resolved by the actor."""
        ref = ray.put(app_fn)
        kept = _Kept.pool
        if kept is not None and _Kept.key == self._kept_key and _idle(kept) and _answers(kept):
            self.pool, self.app_fn = kept, ref
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
    """Stop the command and every process it started, now, by pid, with SIGKILL, and exit 128 + the signal's number
    at once: Ray's own shutdown is no option here (once it has run, Ray ends the process the moment one of Flower's
    threads touches it), nor a grace period (the driver's Ray worker ends the process with status 1 as soon as it sees
    its raylet gone). The kept actors are killed through Ray first, which matters on a cluster of its own
    (`ray_address`)."""
    try:
        print(f"\n{signal.Signals(signum).name}: stopping, with every process this command started", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
    except (OSError, ValueError, RuntimeError):  # a closed pipe, or a write this signal interrupted
        pass
    started = session_pids(os.getpid()) - {os.getpid()}
    auto_init_hook.enable_auto_connect = False  # Flower's threads still call Ray: none may start a new Ray now
    killer = threading.Thread(target=_kill_actors, daemon=True)
    killer.start()
    killer.join(5)
    send(started, signal.SIGKILL)
    os._exit(128 + signum)


@contextmanager
def stopped_on_signals() -> Iterator[None]:
    """Within the block Ctrl-C (SIGINT) and SIGTERM end the process at once, after stopping what it started (the Ray
    runtime, its actors): Flower's simulation does not end on an interrupt (its ServerApp thread goes on waiting for
    replies), so a sweep must not rely on one. The jobs that finished keep their results; `skip_done=true` runs the
    rest. Main thread only."""
    saved = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Kept.on_signals = True  # KeptRayBackend puts SIGTERM's back once ray.init has replaced it
    try:
        yield
    finally:
        _Kept.on_signals = False
        for sig, handler in saved.items():
            signal.signal(sig, handler)
