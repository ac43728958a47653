"""The Ray runtime kept between runs (app/runners/runtime.py): each reach into Flower's Ray backend is checked against
the installed Flower, the block swaps the backend only while it runs, and a pool is reused only when every actor is
back. The real thing, with Ray, is in tests/system/test_sweeps.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from app.runners import runtime

FLOWERS = raybackend.RayBackend


def test_the_installed_flower_builds_and_ends_its_ray_backend_as_the_runtime_assumes() -> None:
    runtime.check_assumptions()


def _start_vce(*args: object) -> None:
    """A start_vce that builds its backend some other way."""


def _build(self, app_fn) -> None:
    """A build that keeps its pool elsewhere."""


def _pool_init(self, actor_type, client_resources, actor_kwargs) -> None:
    """An actor pool that keeps its actors elsewhere."""


@pytest.mark.parametrize(
    ("target", "name", "value", "named"),
    [
        (vce_api, "start_vce", _start_vce, "start_vce"),
        (FLOWERS, "build", _build, "RayBackend.build"),
        (BasicActorPool, "__init__", _pool_init, "BasicActorPool"),
    ],
)
def test_each_reach_fails_loudly_when_flower_moves_it(target, name, value, named, monkeypatch) -> None:
    monkeypatch.setattr(target, name, value)
    with pytest.raises(runtime.RuntimeMismatch, match=f"(?s)cannot keep.*{named}"):
        runtime.check_assumptions()
    with pytest.raises(runtime.RuntimeMismatch), runtime.kept_runtime():
        pass
    assert raybackend.RayBackend is FLOWERS  # a broken assumption changes nothing


def test_the_block_swaps_flowers_backend_only_while_it_runs_and_an_inner_block_is_part_of_it() -> None:
    with runtime.kept_runtime():
        assert raybackend.RayBackend is runtime.KeptRayBackend
        with runtime.kept_runtime():
            assert raybackend.RayBackend is runtime.KeptRayBackend
        assert raybackend.RayBackend is runtime.KeptRayBackend  # the inner block did not end the outer one
    assert raybackend.RayBackend is FLOWERS
    with pytest.raises(KeyError), runtime.kept_runtime():
        raise KeyError("a failed sweep")
    assert raybackend.RayBackend is FLOWERS


def _pool(idle: list, busy: dict) -> SimpleNamespace:
    return SimpleNamespace(pool=idle, _future_to_actor=busy, num_actors=len(idle) + len(busy))


def test_a_pool_is_kept_only_when_every_actor_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list = []
    monkeypatch.setattr(runtime.ray, "kill", killed.append)
    backend = object.__new__(runtime.KeptRayBackend)  # no Ray: only the keep-or-release decision
    idle = _pool(["a1", "a2"], {})
    monkeypatch.setattr(runtime._Kept, "pool", idle)
    monkeypatch.setattr(runtime._Kept, "key", "k")
    backend.pool = idle
    backend.terminate()
    assert runtime._Kept.pool is idle and killed == []  # kept for the next run
    busy = _pool(["a1"], {"future": "a2"})  # an actor still runs a failed run's message
    monkeypatch.setattr(runtime._Kept, "pool", busy)
    backend.pool = busy
    backend.terminate()
    assert runtime._Kept.pool is None and sorted(killed) == ["a1", "a2"]  # torn down, never reused
