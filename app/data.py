"""Federations: a dataset split over devices, each with a seeded train/test split, loaded once per process.

Partitioning uses flwr-datasets' partitioners (`dirichlet`: label skew with concentration `alpha`;
`pathological`: `classes_per_client` classes per device; `iid`) over the dataset shuffled with the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class DeviceData:
    """One device's data; labels are class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Federation:
    devices: tuple[DeviceData, ...]
    num_features: int
    num_classes: int


def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64), 10


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, int]]] = {"digits": _digits}


def _partitioner(dataset: DictConfig, num_clients: int, seed: int):  # -> flwr_datasets Partitioner
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if dataset.partitioner == "dirichlet":
        return DirichletPartitioner(num_clients, "label", alpha=float(dataset.alpha), min_partition_size=10, seed=seed)
    if dataset.partitioner == "pathological":
        return PathologicalPartitioner(num_clients, "label", int(dataset.classes_per_client), seed=seed)
    return IidPartitioner(num_clients)


PARTITIONERS = ("dirichlet", "iid", "pathological")


def partition_indices(labels: np.ndarray, dataset: DictConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Indices of `labels` held by each device (disjoint; every device non-empty)."""
    from datasets import Dataset

    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels[order], "index": order})
    partitioner = _partitioner(dataset, num_clients, seed)
    partitioner.dataset = table
    parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_clients)]
    empty = [i for i, p in enumerate(parts) if len(p) < 2]
    if empty:
        raise ValueError(
            f"devices {empty} got fewer than 2 samples: use fewer num_clients or another dataset.partitioner/alpha"
        )
    return parts


def split_device(indices: np.ndarray, test_fraction: float, seed: int, device: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of one device's indices (at least one sample on each side)."""
    perm = np.random.default_rng([seed, device]).permutation(indices)
    n_test = min(len(perm) - 1, max(1, round(test_fraction * len(perm))))
    return perm[n_test:], perm[:n_test]


def load_federation(dataset: DictConfig, num_clients: int, seed: int) -> Federation:
    """The federation for this config; built once per process and reused (messages do not re-read data)."""
    return _load(OmegaConf.to_yaml(dataset), num_clients, seed)


@lru_cache(maxsize=4)
def _load(dataset_yaml: str, num_clients: int, seed: int) -> Federation:
    dataset = OmegaConf.create(dataset_yaml)
    x, y, num_classes = DATASETS[dataset.name]()
    devices = []
    for k, idx in enumerate(partition_indices(y, dataset, num_clients, seed)):
        train, test = split_device(idx, float(dataset.test_fraction), seed, k)
        devices.append(DeviceData(*(torch.from_numpy(a) for a in (x[train], y[train], x[test], y[test]))))
    return Federation(tuple(devices), num_features=int(np.prod(x.shape[1:])), num_classes=num_classes)
