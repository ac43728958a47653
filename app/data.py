"""Federations: a dataset split over devices, each device with a seeded train/test split, loaded once per process.

Each loader in DATASETS returns a `Pool` (the examples and which device holds which); `load_federation` splits every
device's share into train and test. Sources:
- `digits`: scikit-learn's handwritten digits (offline), partitioned by a flwr-datasets partitioner.
- `vehicle`: the paper's Vehicle federation, LEAF JSON in `dataset.data_dir` (one device per sensor).
- `synthetic`: Synthetic(alpha, beta) of the FedProx / q-FFL papers, generated from the seed one device at a time.
- `femnist`, `celeba`: natural federations (one device per writer / celebrity) of the Hugging Face tables
  `flwrlabs/femnist`, `flwrlabs/celeba`, partitioned with flwr-datasets' NaturalIdPartitioner.
- `fashion_mnist`: the paper's partition (each device `classes_per_client` consecutive classes, lognormal sizes).
- `cifar10`: Dirichlet(alpha) label skew.
- `gaussian_mean`: point estimation with attackers in the data, for the theory experiment (app/theory.py).
- `fake_images`: generated images of CIFAR-10's or FEMNIST's shape (class patterns plus noise), for benchmarks.
Hub-backed datasets read `dataset.path` instead of the hub when it is set: a folder written by `save_to_disk`, or a
folder of raw data files that `datasets.load_dataset` reads (parquet, arrow, csv, imagefolder).
Partitioners (`dataset.partitioner`): `dirichlet` (label skew, `alpha`), `pathological` (`classes_per_client`
classes per device), `iid`, `consecutive` (the paper's Fashion-MNIST scheme), over the dataset shuffled by the seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

PROJECT_DIR = Path(__file__).resolve().parent.parent


class DataUnavailable(RuntimeError):
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


# ---------------------------------------------------------------------------------------------------- partitioners

PARTITIONERS = ("consecutive", "dirichlet", "iid", "pathological")


def consecutive_classes(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """The paper's Fashion-MNIST partition: device k holds classes k, k+1, ... (mod C), `classes_per_client` of them,
    with lognormal(3, 1) + 10 device sizes scaled to the dataset and lognormal(1, 1) class proportions. Each class is
    dealt out without replacement (the official script wraps around and reuses samples; here a device whose class ran
    out gets fewer)."""
    rng = np.random.default_rng([seed, 0xC1A55])
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    taken = dict.fromkeys(classes.tolist(), 0)
    sizes = rng.lognormal(3, 1, num_clients) + 10
    sizes = sizes / sizes.sum() * len(labels)
    parts = []
    for k in range(num_clients):
        props = rng.lognormal(1, 1, classes_per_client)
        props /= props.sum()
        mine = []
        for j in range(classes_per_client):
            c = classes[(k + j) % len(classes)].item()
            n = int(props[j] * sizes[k]) + 1
            mine.append(pools[c][taken[c] : taken[c] + n])
            taken[c] += len(mine[-1])
        parts.append(np.concatenate(mine))
    return parts


def _flwr_partitioner(dataset: DictConfig, num_clients: int, seed: int):  # -> flwr_datasets Partitioner
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if dataset.partitioner == "dirichlet":
        return DirichletPartitioner(num_clients, "label", alpha=float(dataset.alpha), min_partition_size=10, seed=seed)
    if dataset.partitioner == "pathological":
        return PathologicalPartitioner(num_clients, "label", int(dataset.classes_per_client), seed=seed)
    return IidPartitioner(num_clients)


def _check_sizes(parts: Sequence[np.ndarray], hint: str) -> list[np.ndarray]:
    small = [i for i, p in enumerate(parts) if len(p) < 2]
    if small:
        raise ValueError(f"devices {small} got fewer than 2 samples: {hint}")
    return list(parts)


def partition_indices(labels: np.ndarray, dataset: DictConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Indices of `labels` held by each device (disjoint; every device at least 2)."""
    hint = "use fewer num_clients or another dataset.partitioner/alpha"
    if dataset.partitioner == "consecutive":
        return _check_sizes(consecutive_classes(labels, num_clients, int(dataset.classes_per_client), seed), hint)
    from datasets import Dataset

    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels[order], "index": order})
    partitioner = _flwr_partitioner(dataset, num_clients, seed)
    partitioner.dataset = table
    return _check_sizes([np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                         for i in range(num_clients)], hint)


def choose_devices(ids: Sequence, num_clients: int, seed: int, what: str) -> list:
    """`num_clients` of a natural federation's device ids: all of them in order, or a seeded subset (kept in order)."""
    if num_clients > len(ids):
        raise ValueError(f"num_clients={num_clients} but this federation has only {len(ids)} {what}: "
                         f"set num_clients to at most {len(ids)}")
    if num_clients == len(ids):
        return list(ids)
    chosen = np.sort(np.random.default_rng([seed, 0xD3F1CE]).choice(len(ids), size=num_clients, replace=False))
    return [ids[i] for i in chosen]


def natural_partition(ids: np.ndarray) -> list[np.ndarray]:
    """Row indices per natural id (writer, celebrity) with flwr-datasets' NaturalIdPartitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="device")
    partitioner.dataset = Dataset.from_dict({"device": ids.tolist(), "index": np.arange(len(ids))})
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(partitioner.num_partitions)]


# --------------------------------------------------------------------------------------------------------- sources


def _digits(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    return Pool(x, y, 10, partition_indices(y, dataset, num_clients, seed))


def data_file(dataset: DictConfig, filename: str) -> Path:
    """`filename` in `dataset.data_dir` (relative paths are taken from the project folder)."""
    root = dataset.get("data_dir")
    if not root:
        raise DataUnavailable(f"dataset '{dataset.name}' reads {filename} from dataset.data_dir, which is not set: "
                              f"set dataset.data_dir=DIR or the environment variable DITTO_DATA_DIR")
    path = Path(str(root)).expanduser()
    path = (path if path.is_absolute() else PROJECT_DIR / path) / filename
    if not path.is_file():
        raise DataUnavailable(f"dataset '{dataset.name}': {path} not found. Set dataset.data_dir=DIR to a folder that "
                              f"holds {filename} (or DITTO_DATA_DIR to the folder above it)")
    return path


def _vehicle(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """LEAF JSON {users, user_data: {u: {x, y}}}; labels +-1 become 1/0 (the SVM's sign convention)."""
    raw = json.loads(data_file(dataset, str(dataset.file)).read_text())
    users = choose_devices(list(raw["users"]), num_clients, seed, "sensors")
    xs = [np.asarray(raw["user_data"][u]["x"], dtype=np.float32) for u in users]
    ys = [(np.asarray(raw["user_data"][u]["y"]).reshape(-1) > 0).astype(np.int64) for u in users]
    bounds = np.cumsum([0, *map(len, ys)])
    parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return Pool(np.concatenate(xs), np.concatenate(ys), 2, _check_sizes(parts, "this sensor has too little data"))


def _synthetic(dataset: DictConfig, num_clients: int, seed: int) -> Federation:
    """Synthetic(alpha, beta) (Shamir et al. 2014, as in FedProx): device k has W_k ~ N(u_k, 1), b_k ~ N(u_k, 1),
    u_k ~ N(0, alpha); x ~ N(v_k, diag(j^-1.2)), v_k ~ N(B_k, 1), B_k ~ N(0, beta); y = argmax softmax(W_k x + b_k);
    lognormal(4, 2) + 50 samples per device. alpha: how much device models differ; beta: how much their inputs do.
    Device k is drawn from its own stream (seed, k) when first asked for: a federation of any size costs only the
    devices a process touches."""
    d, c = int(dataset.num_features), int(dataset.num_classes)
    alpha, beta = float(dataset.alpha), float(dataset.beta)
    test_fraction, stratified = float(dataset.test_fraction), bool(dataset.get("stratified_split", False))
    scale = np.sqrt(np.arange(1, d + 1, dtype=np.float64) ** -1.2)

    def device(k: int) -> DeviceData:
        rng = np.random.default_rng([seed, 0x5E7, k])
        size = int(rng.lognormal(4, 2)) + 50
        model_mean, input_mean = rng.normal(0, alpha), rng.normal(0, beta)
        w = rng.normal(model_mean, 1, (d, c))
        b = rng.normal(model_mean, 1, c)
        x = rng.normal(input_mean, 1, d) + rng.standard_normal((size, d)) * scale
        y = (x @ w + b).argmax(axis=1).astype(np.int64)
        train, test = split_device(np.arange(size), test_fraction, seed, k, y if stratified else None)
        return _device_data(x.astype(np.float32), y, train, test)

    return Federation(LazyDevices(num_clients, device), (d,), c)


def _gaussian_mean(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """Point estimation (the paper's simplified setting, see app/theory.py): device means theta_k = theta +
    N(0, tau^2 I), theta ~ N(0, I); the first `num_attackers` devices are attackers whose means are shifted by
    `tau_a` in every coordinate; `samples` training and `test_samples` test points per device, x ~ N(theta_k,
    sigma^2 I). The inputs are empty (a constant); the targets are the points."""
    rng = np.random.default_rng([seed, 0x6A55])
    d, n, n_test = int(dataset.dim), int(dataset.samples), int(dataset.test_samples)
    means = rng.normal(0, 1, d) + rng.normal(0, float(dataset.tau), (num_clients, d))
    means[: int(dataset.num_attackers)] += float(dataset.tau_a)
    y = (means[:, None, :] + float(dataset.sigma) * rng.standard_normal((num_clients, n + n_test, d)))
    starts = np.arange(num_clients) * (n + n_test)
    return Pool(np.zeros((num_clients * (n + n_test), 1), dtype=np.float32), y.reshape(-1, d).astype(np.float32), d,
                [s + np.arange(n) for s in starts], [s + n + np.arange(n_test) for s in starts])


def hf_table(dataset: DictConfig):  # -> datasets.Dataset
    """The dataset as one Hugging Face table, all splits in split-name order: from `dataset.path` when it is set,
    else from the hub (`dataset.hub_id`)."""
    from datasets import DatasetDict, concatenate_datasets, load_dataset, load_from_disk

    path = dataset.get("path")
    fetch = f"python -c \"import datasets; datasets.load_dataset('{dataset.hub_id}').save_to_disk('DIR')\""
    try:
        if path:
            folder = Path(str(path)).expanduser()
            if not folder.exists():
                raise FileNotFoundError(f"{folder} does not exist")
            saved = (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()
            table = load_from_disk(str(folder)) if saved else load_dataset(str(folder))
        else:
            table = load_dataset(str(dataset.hub_id))
    except Exception as err:  # network, missing files, unreadable folder: all end in the same advice
        source = f"dataset.path={path}" if path else f"the Hugging Face hub ('{dataset.hub_id}')"
        raise DataUnavailable(
            f"dataset '{dataset.name}': cannot load from {source} ({type(err).__name__}: {err}). Where the hub is "
            f"reachable, leave dataset.path=null; otherwise download it on a machine with internet ({fetch}), copy "
            f"DIR here and set dataset.path=DIR"
        ) from err
    if isinstance(table, DatasetDict):
        table = concatenate_datasets([table[split] for split in sorted(table)])
    return table


def images(table, column: str, size: int | None = None) -> np.ndarray:  # table: datasets.Dataset
    """The image column as float32 (N, C, H, W) in [0, 1], resized to size x size when given."""
    out = []
    for image in table[column]:
        if size is not None:
            image = image.resize((size, size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        out.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return np.stack(out)


def _natural(dataset: DictConfig, num_clients: int, seed: int, id_column: str, what: str):
    """The rows of `num_clients` natural devices (seeded subset) and their partition."""
    table = hf_table(dataset)
    ids = np.asarray(table[id_column])
    chosen = choose_devices(np.unique(ids).tolist(), num_clients, seed, what)
    rows = np.flatnonzero(np.isin(ids, chosen))
    return table.select(rows), natural_partition(ids[rows])


def _femnist(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """LEAF FEMNIST (columns image 28x28 grayscale, writer_id, character 0..61), one device per writer."""
    table, parts = _natural(dataset, num_clients, seed, "writer_id", "writers")
    return Pool(images(table, "image"), np.asarray(table["character"], dtype=np.int64), 62, parts)


def _celeba(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """CelebA (columns image, celeb_id, 40 boolean attributes), one device per celebrity, task `dataset.target`."""
    table, parts = _natural(dataset, num_clients, seed, "celeb_id", "celebrities")
    y = np.asarray(table[str(dataset.target)]).astype(np.int64)
    return Pool(images(table, "image", int(dataset.image_size)), y, 2, parts)


def _pooled_images(dataset: DictConfig, num_clients: int, seed: int, column: str, standardize: bool) -> Pool:
    table = hf_table(dataset)
    y = np.asarray(table["label"], dtype=np.int64)
    parts = partition_indices(y, dataset, num_clients, seed)
    rows = np.concatenate(parts)
    x = images(table.select(rows), column)
    if standardize:  # per-pixel, as the official Fashion-MNIST script
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-3)
    bounds = np.cumsum([0, *map(len, parts)])
    return Pool(x, y[rows], 10, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])


def _fashion_mnist(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """Fashion-MNIST (columns image 28x28 grayscale, label 0..9)."""
    return _pooled_images(dataset, num_clients, seed, "image", standardize=True)


def _cifar10(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """CIFAR-10 (columns img 32x32 RGB, label 0..9)."""
    return _pooled_images(dataset, num_clients, seed, "img", standardize=False)


FAKE_IMAGE_SHAPES = {"cifar10": (3, 32, 32), "femnist": (1, 28, 28)}  # dataset.like -> one image's shape


def _fake_images(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """Images shaped like a paper dataset (`dataset.like`), generated from the seed, for benchmarks and tests that
    must not download: class c is a fixed pattern (a random 4x4 grid of N(0, 1) per channel, scaled up to the image)
    plus N(0, noise^2) per pixel, divided by sqrt(1 + noise^2) (unit variance per pixel, as standardised images), so
    a model learns it; `num_samples` images, classes balanced, partitioned as the real datasets are
    (`dataset.partitioner`)."""
    channels, height, width = FAKE_IMAGE_SHAPES[str(dataset.like)]
    classes, n = int(dataset.num_classes), int(dataset.num_samples)
    rng = np.random.default_rng([seed, 0xFA4E])
    coarse = rng.standard_normal((classes, channels, 4, 4), dtype=np.float32)
    patterns = coarse.repeat(-(-height // 4), axis=2).repeat(-(-width // 4), axis=3)[:, :, :height, :width]
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)
    x = rng.standard_normal((n, channels, height, width), dtype=np.float32)
    x *= float(dataset.noise)
    x += patterns[y]
    x /= np.float32(np.sqrt(1.0 + float(dataset.noise) ** 2))
    return Pool(x, y, classes, partition_indices(y, dataset, num_clients, seed))


# A loader returns every example (a Pool, split per device by load_federation) or, when devices can be built one at a
# time, the Federation itself.
DATASETS: dict[str, Callable[[DictConfig, int, int], Pool | Federation]] = {
    "digits": _digits,
    "vehicle": _vehicle,
    "synthetic": _synthetic,
    "femnist": _femnist,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "celeba": _celeba,
    "gaussian_mean": _gaussian_mean,
    "fake_images": _fake_images,
}


# ------------------------------------------------------------------------------------------------- per-device split


def split_device(
    indices: np.ndarray, test_fraction: float, seed: int, device: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of one device's indices (at least one sample on each side). With `labels`
    (those of `indices`), each class is split in the same proportion (stratified)."""
    rng = np.random.default_rng([seed, device])
    if labels is None:
        perm = rng.permutation(indices)
        n_test = min(len(perm) - 1, max(1, round(test_fraction * len(perm))))
        return perm[n_test:], perm[:n_test]
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(indices[labels == c])
        n_test = round(test_fraction * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:])
    tr, te = np.concatenate(train), np.concatenate(test)
    if len(te) == 0:
        tr, te = tr[1:], tr[:1]
    elif len(tr) == 0:
        tr, te = te[:1], te[1:]
    return tr, te


def load_federation(dataset: DictConfig, num_clients: int, seed: int) -> Federation:
    """The federation for this config; built once per process and reused (messages do not re-read data)."""
    return _load(OmegaConf.to_yaml(dataset, resolve=True), num_clients, seed)


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
        devices.append(_device_data(pool.x, pool.y, train, test))
    return Federation(tuple(devices), tuple(pool.x.shape[1:]), pool.num_classes)


def _device_data(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> DeviceData:
    return DeviceData(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x[train], y[train], x[test], y[test])))
