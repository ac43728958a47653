"""What a federation is made of: one device's tensors, the federation, and the pool of examples a loader
returns before the per-device split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from app.errors import UserError


class DataUnavailable(UserError, RuntimeError):
    """The data of a dataset cannot be read; the message says where it was looked for and what to do."""


@dataclass(frozen=True)
class DeviceData:
    """One device's data; labels are class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Federation:
    devices: Sequence[DeviceData]
    input_shape: tuple[int, ...]  # one example, no batch axis
    num_classes: int
    # each device's training count where the loader knows it without building the devices (a lazy federation):
    # what size-proportional sampling needs, so the server does not generate every device's data to learn it
    train_counts: Callable[[], list[int]] | None = None

    def training_counts(self) -> list[int]:
        """Each device's number of training samples."""
        if self.train_counts is not None:
            return self.train_counts()
        return [len(d.y_train) for d in self.devices]


class LazyDevices(Sequence[DeviceData]):
    """`n` devices, each built by `make(k)` when first asked for and kept in a bounded cache (least recently used
    out): memory bounded by the cache, not by the federation's size."""

    def __init__(self, n: int, make: Callable[[int], DeviceData], cache: int = 256) -> None:
        self._n = n
        self._get = lru_cache(maxsize=cache)(make)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k):  # int -> DeviceData (slices: a list)
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self._n))]
        if not -self._n <= k < self._n:
            raise IndexError(f"device {k} of a federation of {self._n}")
        return self._get(k % self._n)


@dataclass(frozen=True)
class Pool:
    """All examples of a federation and the indices each device holds (disjoint)."""

    x: np.ndarray  # float32, (N, *input_shape)
    y: np.ndarray  # int64 class indices (N,); point estimation: float32 targets (N, num_classes)
    num_classes: int  # point estimation: the dimension of the target
    parts: list[np.ndarray]
    test_parts: list[np.ndarray] | None = None  # a fixed test split per device (else split here, seeded)


def device_data(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> DeviceData:
    """Device tensors from the pooled arrays and the device's train and test indices."""
    return DeviceData(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x[train], y[train], x[test], y[test])))
