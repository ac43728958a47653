"""The dataset loaders, one per `dataset` config: each reads or generates its examples and says which device holds
which.

Each loader in DATASETS returns a `Pool` (the examples and which device holds which); `load_federation`
(app/data/federation.py) splits every device's share into train and test. Sources:
- `digits`: scikit-learn's handwritten digits (offline), partitioned by a flwr-datasets partitioner.
- `vehicle`: the paper's Vehicle federation, LEAF JSON in `dataset.data_dir` (one device per sensor).
- `synthetic`: Synthetic(alpha, beta) of the FedProx / q-FFL papers, generated from the seed one device at a time.
- `femnist`, `celeba`: natural federations (one device per writer / celebrity) of the Hugging Face tables
  `flwrlabs/femnist`, `flwrlabs/celeba`, partitioned with flwr-datasets' NaturalIdPartitioner.
- `fashion_mnist`: the paper's partition (each device `classes_per_client` consecutive classes, lognormal sizes).
- `cifar10`: Dirichlet(alpha) label skew.
- `gaussian_mean`: point estimation with attackers in the data, for the theory experiment (app/analysis/theory.py).
- `fake_images`: generated images of CIFAR-10's or FEMNIST's shape (class patterns plus noise), for benchmarks.
Hub-backed datasets read `dataset.path` instead of the hub when it is set: a folder written by `save_to_disk`, or a
folder of raw data files that `datasets.load_dataset` reads (parquet, arrow, csv, imagefolder).
Partitioners (`dataset.partitioner`): `dirichlet` (label skew, `alpha`), `pathological` (`classes_per_client`
classes per device), `iid` (these over the dataset shuffled by the seed), `consecutive` (the paper's Fashion-MNIST
scheme, drawn from `dataset.partition_seed`, else the seed).
Every loader checks what it reads (app/data/checks.py, docs/datasets.md). "Official" cites litian96/ditto at commit
26d9b29 (file:line).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from app.data.checks import (
    DataError,
    check_binary,
    check_classes,
    check_columns,
    column_values,
    decode_images,
    read_leaf,
)
from app.data.partition import (
    choose_devices,
    held_out_count,
    natural_partition,
    partition_indices,
    split_device,
    split_pool,
    test_pool,
)
from app.data.types import DataUnavailable, DeviceData, Federation, LazyDevices, Pool, device_data
from app.paths import PROJECT_DIR


def _digits(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    return Pool(x, y, 10, *split_pool(y, 10, dataset, num_clients, seed))


def data_file(dataset: DictConfig, filename: str) -> Path:
    """`filename` in `dataset.data_dir` (relative paths are taken from the project folder)."""
    root = dataset.get("data_dir")
    if not root:
        raise DataUnavailable(
            f"dataset '{dataset.name}' reads {filename} from dataset.data_dir, which is not set: "
            f"set dataset.data_dir=DIR or the environment variable DITTO_DATA_DIR"
        )
    path = Path(str(root)).expanduser()
    path = (path if path.is_absolute() else PROJECT_DIR / path) / filename
    if not path.is_file():
        raise DataUnavailable(
            f"dataset '{dataset.name}': {path} not found. Set dataset.data_dir=DIR to a folder that "
            f"holds {filename} (or DITTO_DATA_DIR to the folder above it)"
        )
    return path


def standardize_device(x: np.ndarray) -> np.ndarray:
    """The official Vehicle preprocessing, per device: (x - mean) / std, then NaN (a constant feature) -> 0
    (data/vehicle/create_dataset.py:12-19)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - x.mean(axis=0)) / x.std(axis=0)
    return np.where(np.isnan(z), 0.0, z)


def _vehicle(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """LEAF JSON {users, user_data: {u: {x, y}}}, checked (app/data/checks.py read_leaf); labels +-1 become 1/0 (the
    SVM's sign convention). Features are used as stored (`preprocess: none`): the official file is already
    standardised per sensor by the official script; `preprocess: standardize` applies that step here."""
    path = data_file(dataset, str(dataset.file))
    users = read_leaf(path, str(dataset.name), int(dataset.num_features), (-1, 1))
    chosen = choose_devices(list(users), num_clients, seed, "sensors")
    xs = [users[u][0] for u in chosen]
    if dataset.get("preprocess", "none") == "standardize":
        xs = [standardize_device(x) for x in xs]
    ys = [(users[u][1] > 0).astype(np.int64) for u in chosen]
    small = [u for u, y in zip(chosen, ys) if len(y) < 2]
    if small:
        raise DataError(
            f"dataset '{dataset.name}', file {path}, devices {small}: fewer than 2 samples, expected at "
            "least 2 (one to train on, one to test on)."
        )
    bounds = np.cumsum([0, *map(len, ys)])
    parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return Pool(np.concatenate(xs).astype(np.float32), np.concatenate(ys), 2, parts)


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

    def device_rng(k: int) -> tuple[np.random.Generator, int]:
        rng = np.random.default_rng([seed, 0x5E7, k])
        return rng, int(rng.lognormal(4, 2)) + 50

    def device(k: int) -> DeviceData:
        rng, size = device_rng(k)
        model_mean, input_mean = rng.normal(0, alpha), rng.normal(0, beta)
        w = rng.normal(model_mean, 1, (d, c))
        b = rng.normal(model_mean, 1, c)
        x = rng.normal(input_mean, 1, d) + rng.standard_normal((size, d)) * scale
        y = (x @ w + b).argmax(axis=1).astype(np.int64)
        train, test = split_device(np.arange(size), test_fraction, seed, k, y if stratified else None)
        return device_data(x.astype(np.float32), y, train, test)

    def counts() -> list[int]:  # the unstratified split's training counts, without drawing any device's data
        return [n - held_out_count(n, test_fraction) for n in (device_rng(k)[1] for k in range(num_clients))]

    return Federation(LazyDevices(num_clients, device), (d,), c, None if stratified else counts)


def _gaussian_device_means(dataset: DictConfig, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """theta_k = theta + tau z_k, theta ~ N(0, I), z_k ~ N(0, I); the first `num_attackers` devices are attackers:
    `attackers: variance` (the paper's, official point_estimation.ipynb): theta_k = theta + tau_a z_k;
    `attackers: shift` (a colluding mean shift): theta_k = theta + tau z_k + tau_a in every coordinate."""
    attackers, k_a, d = str(dataset.attackers), int(dataset.num_attackers), int(dataset.dim)
    if attackers not in ("variance", "shift"):
        raise ValueError(
            f"config key 'dataset.attackers' = {attackers!r} is not allowed; allowed: variance (the "
            "paper's: attackers' means drawn with spread tau_a) or shift (their means shifted by tau_a)"
        )
    theta = rng.normal(0, 1, d)
    spread = np.full((num_clients, 1), float(dataset.tau))
    if attackers == "variance":
        spread[:k_a] = float(dataset.tau_a)
    means = theta + spread * rng.standard_normal((num_clients, d))
    if attackers == "shift":
        means[:k_a] += float(dataset.tau_a)
    return means


def _gaussian_mean(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """Point estimation (the paper's simplified setting, see app/analysis/theory.py): device means from
    `_gaussian_device_means`; `samples` training and `test_samples` test points per device, x ~ N(theta_k,
    sigma^2 I). The inputs are empty (a constant); the targets are the points."""
    rng = np.random.default_rng([seed, 0x6A55])
    d, n, n_test = int(dataset.dim), int(dataset.samples), int(dataset.test_samples)
    means = _gaussian_device_means(dataset, num_clients, rng)
    y = means[:, None, :] + float(dataset.sigma) * rng.standard_normal((num_clients, n + n_test, d))
    starts = np.arange(num_clients) * (n + n_test)
    return Pool(
        np.zeros((num_clients * (n + n_test), 1), dtype=np.float32),
        y.reshape(-1, d).astype(np.float32),
        d,
        [s + np.arange(n) for s in starts],
        [s + n + np.arange(n_test) for s in starts],
    )


def hf_splits(dataset: DictConfig, required: Mapping[str, str]) -> tuple[dict, str]:
    """The dataset's splits {name: datasets.Dataset} from `dataset.path` when it is set, else from the hub
    (`dataset.hub_id`), each checked to have the `required` columns (app/data/checks.py check_columns); and the source,
    as error messages name it."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = dataset.get("path")
    source = f"dataset.path={path}" if path else f"the Hugging Face hub ('{dataset.hub_id}')"
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
        raise DataUnavailable(
            f"dataset '{dataset.name}': cannot load from {source} ({type(err).__name__}: {err}). Where the hub is "
            f"reachable, leave dataset.path=null; otherwise download it on a machine with internet ({fetch}), copy "
            f"DIR here and set dataset.path=DIR"
        ) from err
    splits = dict(table) if isinstance(table, DatasetDict) else {"train": table}
    for name, split in splits.items():
        check_columns(split, str(dataset.name), f"{source}, split '{name}'", required)
    return splits, source


def hf_table(dataset: DictConfig, required: Mapping[str, str]) -> tuple:  # -> (datasets.Dataset, source)
    """The dataset as one checked table, all splits in split-name order, and its source (`hf_splits`)."""
    from datasets import concatenate_datasets

    splits, source = hf_splits(dataset, required)
    return concatenate_datasets([splits[name].select_columns(list(required)) for name in sorted(splits)]), source


def _natural(dataset: DictConfig, num_clients: int, seed: int, required: Mapping[str, str], what: str):
    """The rows of `num_clients` natural devices (seeded subset; the id is the `id` column of `required`), their
    partition, and the table's source."""
    table, source = hf_table(dataset, required)
    ids = column_values(table, next(c for c, kind in required.items() if kind == "id"))
    chosen = choose_devices(np.unique(ids).tolist(), num_clients, seed, what)
    rows = np.flatnonzero(np.isin(ids, chosen))
    return table.select(rows), natural_partition(ids[rows]), source


def _pixels(x: np.ndarray, dataset: DictConfig) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, C, H, W): raw 0-255 (`pixels: raw`) or scaled to [0, 1] (`pixels: unit`)."""
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x.astype(np.float32) / (255.0 if dataset.get("pixels", "unit") == "unit" else 1.0)


def _femnist(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """LEAF FEMNIST (columns image 28x28 grayscale, writer_id, character 0..61), one device per writer; pixels in
    [0, 1] as LEAF's preprocessing stores them."""
    required = {"image": "image", "writer_id": "id", "character": "class"}
    table, parts, source = _natural(dataset, num_clients, seed, required, "writers")
    y = check_classes(column_values(table, "character"), 62, str(dataset.name), source, "character")
    return Pool(_pixels(decode_images(table, "image", str(dataset.name), source, (28, 28), "L"), dataset), y, 62, parts)


def _celeba(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """CelebA (columns image, celeb_id, 40 boolean attributes), one device per celebrity, task `dataset.target`;
    images resized to image_size, RGB, raw 0-255 by default as the official loader feeds them
    (flearn/utils/model_utils.py:59-65)."""
    target, size = str(dataset.target), int(dataset.image_size)
    table, parts, source = _natural(
        dataset, num_clients, seed, {"image": "image", "celeb_id": "id", target: "binary"}, "celebrities"
    )
    y = check_binary(column_values(table, target), str(dataset.name), source, target)
    x = decode_images(table, "image", str(dataset.name), source, (size, size, 3), "RGB", size)
    return Pool(_pixels(x, dataset), y, 2, parts)


def _pooled_images(
    dataset: DictConfig, column: str, shape: tuple[int, ...], mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images (uint8, checked to be `shape`) and labels (0..9) of every split, and whether each row is in the
    table's test split."""
    splits, source = hf_splits(dataset, {column: "image", "label": "class"})
    names = sorted(splits)
    x = np.concatenate(
        [decode_images(splits[n], column, str(dataset.name), f"{source}, split '{n}'", shape, mode) for n in names]
    )
    y = np.concatenate(
        [
            check_classes(column_values(splits[n], "label"), 10, str(dataset.name), f"{source}, split '{n}'", "label")
            for n in names
        ]
    )
    is_test = np.concatenate([np.full(len(splits[n]), n == "test") for n in names])
    return x, y, is_test


def _fashion_mnist(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """Fashion-MNIST (columns image 28x28 grayscale, label 0..9). Standardised per pixel with the training split's
    mean and std on the raw 0-255 scale, (x - mu) / (sigma + 0.001), as the official script
    (data/fmnist/create_dataset.py:40-45); with no test split in the table, the statistics of the seeded training
    pool. The consecutive partition takes its test examples from the test split, as the official script."""
    x, y, is_test = _pooled_images(dataset, "image", (28, 28), "L")
    if not is_test.any():
        is_test = test_pool(y, float(dataset.test_fraction), seed)
    train = x[~is_test].astype(np.float32)
    mu, sigma = np.mean(train, 0), np.std(train, 0)
    x = ((x.astype(np.float32) - mu) / (sigma + 0.001))[:, None]
    return Pool(x, y, 10, *split_pool(y, 10, dataset, num_clients, seed, is_test))


def _cifar10(dataset: DictConfig, num_clients: int, seed: int) -> Pool:
    """CIFAR-10 (columns img 32x32 RGB, label 0..9), all splits pooled; pixels in [0, 1]."""
    x, y, is_test = _pooled_images(dataset, "img", (32, 32, 3), "RGB")
    return Pool(
        _pixels(x, dataset), y, 10, *split_pool(y, 10, dataset, num_clients, seed, is_test if is_test.any() else None)
    )


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
