"""The digits federation: disjoint devices, disjoint per-device train/test, label skew, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from app.data import load_federation, partition_indices, split_device


def _dataset(**kw) -> OmegaConf:
    base = {"name": "digits", "model": "mlp", "partitioner": "dirichlet", "alpha": 0.5, "classes_per_client": 3,
            "test_fraction": 0.25}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological", "iid"])
def test_partition_is_disjoint_and_covers_the_dataset(partitioner: str) -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, _dataset(partitioner=partitioner), 10, seed=0)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and len(joined) == len(set(joined.tolist()))
    if partitioner != "pathological":
        assert sorted(joined.tolist()) == list(range(1000))
    if partitioner == "pathological":
        assert all(len(np.unique(labels[p])) <= 3 for p in parts)


def test_dirichlet_is_label_skewed_and_iid_is_not() -> None:
    labels = np.repeat(np.arange(10), 100)

    def max_share(partitioner: str, alpha: float = 0.1) -> float:
        parts = partition_indices(labels, _dataset(partitioner=partitioner, alpha=alpha), 10, seed=0)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert max_share("dirichlet") > 0.5 > max_share("iid")


def test_federation_splits_each_device_and_is_seeded() -> None:
    fed = load_federation(_dataset(), 12, seed=3)
    assert len(fed.devices) == 12 and fed.input_shape == (1, 8, 8) and fed.num_classes == 10
    total = 0
    for d in fed.devices:
        assert len(d.y_test) >= 1 and len(d.y_train) >= 1
        assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
        total += len(d.y_train) + len(d.y_test)
        assert len(d.y_test) == pytest.approx(0.25 * (len(d.y_train) + len(d.y_test)), abs=1)
    assert total == 1797
    again = load_federation(_dataset(), 12, seed=3)
    other = load_federation(_dataset(), 12, seed=4)
    assert all(torch.equal(a.y_train, b.y_train) for a, b in zip(fed.devices, again.devices))
    assert any(len(a.y_train) != len(b.y_train) or not torch.equal(a.y_train, b.y_train)
               for a, b in zip(fed.devices, other.devices))


def test_device_split_is_disjoint_complete_and_seeded() -> None:
    idx = np.arange(100, 140)
    train, test = split_device(idx, 0.25, seed=0, device=2)
    assert len(test) == 10 and not set(train) & set(test) and sorted([*train, *test]) == idx.tolist()
    again = split_device(idx, 0.25, seed=0, device=2)
    assert np.array_equal(test, again[1]) and not np.array_equal(test, split_device(idx, 0.25, seed=0, device=3)[1])
    tiny_train, tiny_test = split_device(np.arange(2), 0.01, seed=0, device=0)
    assert len(tiny_train) == 1 and len(tiny_test) == 1
