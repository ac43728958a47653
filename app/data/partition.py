"""Which device holds which examples: the partitioners (`dataset.partitioner`), the per-device test pools, and the
natural partitions of datasets whose devices are their writers or sensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig

from app.data.checks import DataError, require_split_classes

PARTITIONERS = ("consecutive", "dirichlet", "iid", "pathological")
SHUFFLE = 0x5F1E  # the stream that orders a device's training rows where a partitioner deals them class by class


def consecutive_shares(num_clients: int, classes_per_client: int, total: int, seed: int) -> np.ndarray:
    """(num_clients, classes_per_client): how many examples device k is meant to hold of its j-th class, drawn as the
    official Fashion-MNIST script does (data/fmnist/create_dataset.py:82-94): device sizes
    lognormal(3, 1) + 10 scaled to `total`, then per device lognormal(1, 1) class proportions, from one legacy
    RandomState(seed) stream (the script's np.random.seed(233) at line 82)."""
    rng = np.random.RandomState(seed)
    sizes = rng.lognormal(3, 1, num_clients) + 10
    sizes = total * sizes / sum(sizes)  # Python's sum, as the script (line 84): the same rounding
    shares = np.empty((num_clients, classes_per_client))
    for k in range(num_clients):
        props = rng.lognormal(1, 1, classes_per_client)
        shares[k] = props / sum(props) * sizes[k]
    return shares


def deal_consecutive(labels: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Device k gets counts[k, j] indices of class (k + j) mod C: the next ones of that class in `labels` order; a
    class with too few left starts again from its first example, so devices may share examples (the official
    wrap-around, data/fmnist/create_dataset.py:97-109). Every device gets every one of its classes."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    nxt = np.zeros(len(classes), dtype=np.int64)
    parts = []
    for k, row in enumerate(counts):
        mine = []
        for j, n in enumerate(row.tolist()):
            c = (k + j) % len(classes)
            if nxt[c] + n > len(members[c]):
                nxt[c] = 0
            mine.append(members[c][nxt[c] : nxt[c] + n])
            nxt[c] += n
        parts.append(np.concatenate(mine))
    return parts


def consecutive_partition(
    labels: np.ndarray, is_test: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The paper's Fashion-MNIST partition, as the official script builds it: device k holds classes k, k+1, ...
    (mod C), `classes_per_client` of them, int(share) + 1 training examples of each from the training pool
    (`~is_test`) and int(share / r) + 1 test examples from the test pool, r = training / test pool size (60,000 /
    10,000 = 6 there, create_dataset.py:94-95), both dealt with wrap-around (`deal_consecutive`). Each device's
    training rows are then shuffled, as the script does before saving (create_dataset.py:118-120; its test rows
    stay in class order), so that no split taken from the end of them (lam auto's validation) holds one class;
    the shuffle is seeded by (seed, device). Returns (train, test) indices into `labels` per device."""
    train_pool, test_pool = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    shares = consecutive_shares(num_clients, classes_per_client, len(train_pool), seed)
    ratio = len(train_pool) / len(test_pool)
    train = deal_consecutive(labels[train_pool], shares.astype(np.int64) + 1)
    test = deal_consecutive(labels[test_pool], (shares / ratio).astype(np.int64) + 1)
    shuffled = [np.random.default_rng([seed, k, SHUFFLE]).permutation(p) for k, p in enumerate(train)]
    return [train_pool[p] for p in shuffled], [test_pool[p] for p in test]


def test_pool(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded test pool for a table without a test split: `test_fraction` of each class (a mask over `labels`)."""
    rng = np.random.default_rng([seed, 0x7E57])
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        mask[members[: max(1, round(test_fraction * len(members)))]] = True
    return mask


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
        raise DataError(f"devices {small} got fewer than 2 samples: {hint}")
    return list(parts)


def partition_indices(labels: np.ndarray, dataset: DictConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Indices of `labels` held by each device under a flwr-datasets partitioner (dirichlet, pathological, iid):
    disjoint, every device at least 2."""
    from datasets import Dataset

    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels[order], "index": order})
    partitioner = _flwr_partitioner(dataset, num_clients, seed)
    partitioner.dataset = table
    try:
        parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as err:  # flwr-datasets' own refusals (more partitions than examples, ...)
        raise DataError(
            f"dataset={dataset.name} cannot be split into num_clients={num_clients} devices by "
            f"dataset.partitioner={dataset.partitioner} ({err}): use fewer num_clients or another partitioner"
        ) from None
    return _check_sizes(parts, "use fewer num_clients or another dataset.partitioner/alpha")


def split_pool(
    labels: np.ndarray,
    num_classes: int,
    dataset: DictConfig,
    num_clients: int,
    seed: int,
    is_test: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """(training indices per device, test indices per device, or None when each device is split later). The
    consecutive partition deals from a training and a test pool: `is_test` (the table's test split) or a seeded
    `test_fraction` of each class."""
    if dataset.partitioner != "consecutive":
        return partition_indices(labels, dataset, num_clients, seed), None
    if is_test is None:
        is_test = test_pool(labels, float(dataset.test_fraction), seed)
    for pool, mask in (("training pool", ~is_test), ("test pool", is_test)):
        require_split_classes(labels[mask], num_classes, str(dataset.name), pool)
    partition_seed = dataset.get("partition_seed")
    return consecutive_partition(
        labels,
        is_test,
        num_clients,
        int(dataset.classes_per_client),
        seed if partition_seed is None else int(partition_seed),
    )


def choose_devices(ids: Sequence, num_clients: int, seed: int, what: str) -> list:
    """`num_clients` of a natural federation's device ids: all of them in order, or a seeded subset (kept in order)."""
    if num_clients > len(ids):
        raise DataError(
            f"num_clients={num_clients} but this federation has only {len(ids)} {what}: "
            f"set num_clients to at most {len(ids)}"
        )
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
    return [
        np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(partitioner.num_partitions)
    ]


def held_out_count(size: int, test_fraction: float) -> int:
    """How many of a device's `size` samples the unstratified split tests on: at least one on each side."""
    return min(size - 1, max(1, round(test_fraction * size)))


def split_device(
    indices: np.ndarray, test_fraction: float, seed: int, device: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of one device's indices (at least one sample on each side). With `labels`
    (those of `indices`), each class is split in the same proportion (stratified), and the training rows are
    shuffled, not left class after class."""
    rng = np.random.default_rng([seed, device])
    if labels is None:
        perm = rng.permutation(indices)
        n_test = held_out_count(len(perm), test_fraction)
        return perm[n_test:], perm[:n_test]
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(indices[labels == c])
        n_test = round(test_fraction * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:])
    tr, te = rng.permutation(np.concatenate(train)), np.concatenate(test)  # training rows not in class order
    if len(te) == 0:
        tr, te = tr[1:], tr[:1]
    elif len(tr) == 0:
        tr, te = te[:1], te[1:]
    return tr, te
