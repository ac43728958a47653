"""The digits federation: disjoint devices, disjoint per-device train/test, label skew, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from app.data.federation import load_federation
from app.data.partition import consecutive_partition, partition_indices, split_device, split_pool


def _dataset(**kw) -> OmegaConf:
    base = {
        "name": "digits",
        "model": "mlp",
        "partitioner": "dirichlet",
        "alpha": 0.5,
        "classes_per_client": 3,
        "test_fraction": 0.25,
    }
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
    assert any(
        len(a.y_train) != len(b.y_train) or not torch.equal(a.y_train, b.y_train)
        for a, b in zip(fed.devices, other.devices)
    )


def test_device_split_is_disjoint_complete_and_seeded() -> None:
    idx = np.arange(100, 140)
    train, test = split_device(idx, 0.25, seed=0, device=2)
    assert len(test) == 10 and not set(train) & set(test) and sorted([*train, *test]) == idx.tolist()
    again = split_device(idx, 0.25, seed=0, device=2)
    assert np.array_equal(test, again[1]) and not np.array_equal(test, split_device(idx, 0.25, seed=0, device=3)[1])
    tiny_train, tiny_test = split_device(np.arange(2), 0.01, seed=0, device=0)
    assert len(tiny_train) == 1 and len(tiny_test) == 1


def _official_fmnist(train_labels: np.ndarray, test_labels: np.ndarray, seed: int, users: int = 500):
    """A line-by-line transcription of the official partition loop on indices (litian96/ditto@26d9b29
    data/fmnist/create_dataset.py:82-109): the reference the partition must match."""
    train = [list(np.flatnonzero(train_labels == c)) for c in range(10)]
    test = [list(np.flatnonzero(test_labels == c)) for c in range(10)]
    np.random.seed(seed)
    num_samples = np.random.lognormal(3, 1, users) + 10
    num_samples = 60000 * num_samples / sum(num_samples)
    idx_train, idx_test = np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64)
    out_train, out_test = [[] for _ in range(users)], [[] for _ in range(users)]
    for user in range(users):
        props = np.random.lognormal(1, 1, 5)
        props = props / sum(props)
        for j in range(5):
            c = (user + j) % 10
            n_train, n_test = int(props[j] * num_samples[user]) + 1, int(props[j] * num_samples[user] / 6) + 1
            if idx_train[c] + n_train > len(train[c]):
                idx_train[c] = 0
            if idx_test[c] + n_test > len(test[c]):
                idx_test[c] = 0
            out_train[user] += train[c][idx_train[c] : idx_train[c] + n_train]
            out_test[user] += test[c][idx_test[c] : idx_test[c] + n_test]
            idx_train[c] += n_train
            idx_test[c] += n_test
    return out_train, out_test


@pytest.fixture(scope="module")
def fmnist_labels() -> tuple[np.ndarray, np.ndarray]:
    """Labels with the real Fashion-MNIST class counts, in a shuffled order: 6,000 per class in the training split,
    1,000 in the test split (7,000 per class, 70,000 in all)."""
    rng = np.random.default_rng(7)
    return rng.permutation(np.repeat(np.arange(10), 6000)), rng.permutation(np.repeat(np.arange(10), 1000))


@pytest.mark.parametrize("seed", [0, 4, 233])
def test_consecutive_partition_is_the_official_script_on_the_real_class_counts(fmnist_labels, seed: int) -> None:
    train_labels, test_labels = fmnist_labels
    labels = np.concatenate([train_labels, test_labels])
    train, test = consecutive_partition(labels, np.arange(70000) >= 60000, 500, 5, seed)
    want_train, want_test = _official_fmnist(train_labels, test_labels, seed)
    assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(train, want_train)), "the same examples"
    assert all(np.array_equal(a - 60000, b) for a, b in zip(test, want_test)), "test rows stay in class order"
    reordered = sum(not np.array_equal(a, b) for a, b in zip(train, want_train))
    assert reordered > 450, "training rows shuffled as the script does before saving (create_dataset.py 118-120)"


@pytest.mark.parametrize("seed", range(10))
def test_consecutive_gives_every_device_its_five_classes_on_70000_pooled_labels(fmnist_labels, seed: int) -> None:
    """A table without a test split (70,000 pooled labels, 7,000 per class): every device holds exactly its classes
    k..k+4 (mod 10) on both sides, and no example is both a training and a test example."""
    labels = np.concatenate(fmnist_labels)
    cfg = OmegaConf.create(
        {
            "name": "fashion_mnist",
            "partitioner": "consecutive",
            "classes_per_client": 5,
            "test_fraction": 0.143,
            "partition_seed": None,
        }
    )
    train, test = split_pool(labels, 10, cfg, 500, seed)
    assert len(train) == len(test) == 500
    for k, (tr, te) in enumerate(zip(train, test)):
        mine = {(k + j) % 10 for j in range(5)}
        assert set(labels[tr].tolist()) == mine == set(labels[te].tolist()), k
    assert not set(np.concatenate(train).tolist()) & set(np.concatenate(test).tolist())
