"""dataset=fake_images: the paper's image shapes with no download, learnable, partitioned as the real datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.config.compose import compose_config
from app.config.keys import ConfigError
from app.data.federation import load_federation
from app.training.models import build_model, objective
from app.training.steps import evaluate, local_round

SMALL = ["dataset=fake_images", "dataset.num_samples=600", "num_clients=3", "clients_per_round=3"]


@pytest.mark.parametrize(("like", "shape"), [("cifar10", (3, 32, 32)), ("femnist", (1, 28, 28))])
def test_fake_images_have_the_shape_of_the_dataset_they_stand_for(like: str, shape: tuple[int, ...]) -> None:
    cfg = compose_config([*SMALL, f"dataset.like={like}", "dataset.partitioner=iid"])
    fed = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    assert fed.input_shape == shape and fed.num_classes == 10
    assert sum(len(d.y_train) + len(d.y_test) for d in fed.devices) == 600
    assert all(d.x_train.shape[1:] == shape and d.x_train.dtype == torch.float32 for d in fed.devices)


def test_a_model_learns_the_fake_images() -> None:
    cfg = compose_config([*SMALL, "dataset.like=femnist", "dataset.partitioner=iid", "dataset.model=cnn_femnist"])
    fed = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    device, loss_fn = fed.devices[0], objective(cfg.dataset)
    model = build_model(cfg.dataset.model, fed.input_shape, fed.num_classes, cfg.seed)
    before = evaluate(model, device.x_test, device.y_test, loss_fn)[0] / len(device.y_test)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)  # the dropout masks, whatever ran before
        local_round(
            model,
            None,
            device.x_train,
            device.y_train,
            steps=40,
            batch_size=16,
            lr=0.05,
            lam=0.0,
            loss_fn=loss_fn,
            generator=torch.Generator().manual_seed(0),
        )
    after = evaluate(model, device.x_test, device.y_test, loss_fn)[0] / len(device.y_test)
    assert before < 0.3 and after > 0.8  # chance is 0.1


def test_fake_images_are_partitioned_by_the_configured_partitioner_and_fixed_by_the_seed() -> None:
    def class_counts(overrides: list[str]) -> list[np.ndarray]:
        cfg = compose_config([*SMALL, *overrides])
        fed = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
        return [np.bincount(torch.cat([d.y_train, d.y_test]).numpy(), minlength=10) for d in fed.devices]

    skewed = class_counts(["dataset.partitioner=pathological", "dataset.classes_per_client=2"])
    assert all((c > 0).sum() <= 2 for c in skewed)  # each device holds 2 classes, as pathological deals them
    assert [c.tolist() for c in skewed] == [
        c.tolist() for c in class_counts(["dataset.partitioner=pathological", "dataset.classes_per_client=2"])
    ]
    assert [c.tolist() for c in class_counts(["dataset.partitioner=iid"])] != [c.tolist() for c in skewed]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dataset.like=mnist", "dataset.like"),
        ("dataset.num_samples=1", "dataset.num_samples"),
        ("dataset.noise=-1", "dataset.noise"),
    ],
)
def test_a_bad_fake_images_option_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([*SMALL, override])
