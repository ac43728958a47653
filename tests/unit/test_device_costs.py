"""What a device pays per message (profiled in issue 33's note): its config resolved once per process, its federation
and initial model cached, its seeding without CUDA's lazy queue. None of it may change a number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from app.client_app import DeviceClient, make_client_fn
from app.config.compose import compose_config, frozen, frozen_text
from app.data.federation import load_federation
from app.records.persistence import MemoryStore
from app.rng import Stream, round_generator, seed_global_rng
from app.training.models import dataset_model

SMALL = ["num_clients=5", "clients_per_round=3", "local_steps=3"]


def test_a_frozen_config_is_the_resolved_config_read_only_and_one_object_per_process() -> None:
    cfg = compose_config(SMALL)
    fixed = frozen(cfg)
    assert OmegaConf.to_container(fixed) == OmegaConf.to_container(cfg, resolve=True)
    assert "${" not in OmegaConf.to_yaml(fixed)  # nothing left to parse on a read
    assert frozen(compose_config(SMALL)) is fixed  # an equal config: the same object (the caches key on it)
    with pytest.raises(ReadonlyConfigError):
        fixed.num_rounds = 3
    assert frozen_text(OmegaConf.to_yaml(cfg, resolve=True)) is fixed


def test_a_frozen_configs_federation_is_remembered_but_a_changed_config_is_never_served_a_stale_one() -> None:
    cfg = compose_config(SMALL)
    fixed = frozen(cfg)
    first = load_federation(fixed.dataset, fixed.num_clients, fixed.seed)
    assert load_federation(fixed.dataset, fixed.num_clients, fixed.seed) is first
    assert load_federation(cfg.dataset, cfg.num_clients, cfg.seed) is first  # equal config, same federation
    cfg.dataset.alpha = 0.05  # a config that can change is read afresh
    other = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    assert other is not first
    assert [len(d.y_train) for d in other.devices] != [len(d.y_train) for d in first.devices]


def test_seeding_the_global_rng_draws_what_torch_manual_seed_draws() -> None:
    seed_global_rng(3, 1, 7, Stream.DROPOUT)
    ours = torch.rand(5)
    torch.manual_seed(int(round_generator(3, 1, 7, Stream.DROPOUT).initial_seed()))
    assert torch.equal(ours, torch.rand(5))


def _fit(client: DeviceClient, parameters: list[np.ndarray]) -> list[np.ndarray]:
    update, _, _ = client.fit(parameters, {"server_round": 2})
    return update


def test_a_device_built_from_the_frozen_config_trains_exactly_as_from_the_composed_one() -> None:
    """The client function carries the resolved config as text and each process freezes it once."""
    cfg = compose_config(SMALL)
    composed = DeviceClient(cfg, 1, MemoryStore(RecordDict()))
    parameters = [p.detach().numpy() + 0.1 for p in composed._build().parameters()]
    built = make_client_fn(cfg, None)
    context = type("Context", (), {"node_config": {"partition-id": 1}, "run_config": {}, "state": RecordDict()})()
    through_fn = built(context)  # as Flower calls it for a message
    assert OmegaConf.is_readonly(through_fn.numpy_client.cfg)
    for a, b in zip(_fit(composed, parameters), through_fn.numpy_client.fit(parameters, {"server_round": 2})[0]):
        np.testing.assert_array_equal(a, b)
    first, second = composed._build(), composed._build()
    assert first is not second  # a message's models are copies: training one never touches the next
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    fresh = dataset_model(cfg.dataset, federation.input_shape, federation.num_classes, cfg.seed)
    for a, b, c in zip(first.parameters(), second.parameters(), fresh.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)  # the model a message builds from scratch
