"""A federation as the runs use it: every device's share split into train and test, built once per process."""

from __future__ import annotations

import weakref
from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

from app.data.loaders import DATASETS
from app.data.partition import split_device
from app.data.types import Federation, device_data


def load_federation(dataset: DictConfig, num_clients: int, seed: int) -> Federation:
    """The federation for this config; built once per process and reused (messages do not re-read data)."""
    kept = _TEXTS.get(id(dataset))
    if kept is not None and kept[0]() is dataset:
        return _load(kept[1], num_clients, seed)
    text = OmegaConf.to_yaml(dataset, resolve=True)
    if OmegaConf.is_readonly(dataset):
        _TEXTS[id(dataset)] = (weakref.ref(dataset, lambda _, key=id(dataset): _TEXTS.pop(key, None)), text)
    return _load(text, num_clients, seed)


# the YAML of read-only dataset configs (a device's frozen config, app/config/compose.py: it cannot change), by the
# object's id while it lives (a WeakKeyDictionary would compare configs by value on every lookup)
_TEXTS: dict[int, tuple[weakref.ref, str]] = {}


@lru_cache(maxsize=4)
def _load(dataset_yaml: str, num_clients: int, seed: int) -> Federation:
    dataset = OmegaConf.create(dataset_yaml)
    pool = DATASETS[dataset.name](dataset, num_clients, seed)
    if isinstance(pool, Federation):  # a loader that builds devices on demand
        return pool
    stratified = bool(dataset.get("stratified_split", False))
    devices = []
    for k, idx in enumerate(pool.parts):
        if pool.test_parts is not None:
            train, test = idx, pool.test_parts[k]
        else:
            train, test = split_device(idx, float(dataset.test_fraction), seed, k, pool.y[idx] if stratified else None)
        devices.append(device_data(pool.x, pool.y, train, test))
    return Federation(tuple(devices), tuple(pool.x.shape[1:]), pool.num_classes)
