"""Every loader on small data built here with the real schema (columns, types, image sizes), read through the same
local-copy path a user without hub access takes. Each example's id is written into its pixels / features, so the
tests can check that no example is on two devices and that each device's train and test are disjoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from app.config.compose import compose_config
from app.data.federation import _load, load_federation
from app.data.types import DataUnavailable, Federation

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")


def _tagged_image(uid: int, group: int, size: tuple[int, int], mode: str, rng: np.random.Generator):
    """Random pixels with the example id in pixels (0,0), (0,1) and its group (writer, celebrity) in (0,2)."""
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    a[0, 0], a[0, 1], a[0, 2] = uid % 256, uid // 256, group
    return Image.fromarray(a, mode=mode)


def _ids(x: torch.Tensor) -> list[int]:
    """Decode the example ids back from the [0, 1] pixels (channel 0)."""
    px = (x[:, 0, 0, :3] * 255).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def _groups(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 2] * 255).round().long().tolist())


def _dataset_cfg(name: str, **overrides) -> OmegaConf:
    cfg = compose_config([f"dataset={name}"])
    return OmegaConf.merge(cfg.dataset, overrides)


def _assert_disjoint(fed: Federation) -> None:
    seen: set[int] = set()
    for d in fed.devices:
        train, test = _ids(d.x_train), _ids(d.x_test)
        assert len(train) >= 1 and len(test) >= 1
        assert not set(train) & set(test), "train and test of a device overlap"
        mine = set(train) | set(test)
        assert not mine & seen, "an example is on two devices"
        seen |= mine


@pytest.fixture(scope="module")
def femnist_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FEMNIST-shaped saved dataset: image (28x28 L), writer_id (str), character (62 classes), hsf_id."""
    rng = np.random.default_rng(0)
    rows = {"image": [], "writer_id": [], "character": [], "hsf_id": []}
    uid = 0
    for writer in range(12):
        for _ in range(int(rng.integers(6, 15))):
            rows["image"].append(_tagged_image(uid, writer, (28, 28), "L", rng))
            rows["writer_id"].append(f"f{writer:04d}_{writer % 7:02d}")
            rows["character"].append(int(rng.integers(0, 62)))
            rows["hsf_id"].append(int(rng.integers(0, 8)))
            uid += 1
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "writer_id": datasets.Value("string"),
            "character": datasets.ClassLabel(num_classes=62),
            "hsf_id": datasets.Value("int64"),
        }
    )
    folder = tmp_path_factory.mktemp("femnist")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(folder))
    return folder


def test_femnist_one_device_per_writer_subset_seeded(femnist_copy: Path) -> None:
    cfg = _dataset_cfg("femnist", path=str(femnist_copy))
    fed = load_federation(cfg, 8, seed=0)
    assert len(fed.devices) == 8 and fed.input_shape == (1, 28, 28) and fed.num_classes == 62
    _assert_disjoint(fed)
    writers = [_groups(torch.cat([d.x_train, d.x_test])) for d in fed.devices]
    assert all(len(w) == 1 for w in writers), "a device holds examples of more than one writer"
    assert len(set().union(*writers)) == 8
    assert all(d.y_train.dtype == torch.int64 and int(d.y_train.max()) < 62 for d in fed.devices)
    _load.cache_clear()  # rebuild from the files, not the per-process cache
    again = load_federation(cfg, 8, seed=0)
    assert [_ids(d.x_test) for d in again.devices] == [_ids(d.x_test) for d in fed.devices]
    other = load_federation(cfg, 8, seed=1)
    assert [_groups(d.x_train) for d in other.devices] != [_groups(d.x_train) for d in fed.devices]
    with pytest.raises(ValueError, match="num_clients=13 but this federation has only 12 writers"):
        load_federation(cfg, 13, seed=0)


def test_celeba_natural_partition_resized_and_smiling_task(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = {"image": [], "celeb_id": [], "Smiling": [], "Male": []}
    for uid in range(60):
        celeb = uid % 6
        rows["image"].append(_tagged_image(uid, celeb, (24, 30), "RGB", rng))
        rows["celeb_id"].append(100 + celeb)
        rows["Smiling"].append(bool(rng.integers(0, 2)))
        rows["Male"].append(bool(rng.integers(0, 2)))
    table = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "celeb_id": datasets.Value("int64"),
                "Smiling": datasets.Value("bool"),
                "Male": datasets.Value("bool"),
            }
        ),
    )
    datasets.DatasetDict({"train": table.select(range(40)), "valid": table.select(range(40, 60))}).save_to_disk(
        str(tmp_path)
    )
    # resizing mixes neighbouring pixels (the ids are unreadable): devices are checked by their sizes and labels
    fed = load_federation(_dataset_cfg("celeba", path=str(tmp_path), image_size=16), 6, seed=0)
    assert fed.input_shape == (3, 16, 16) and fed.num_classes == 2 and len(fed.devices) == 6
    smiling = {100 + (uid % 6): [] for uid in range(60)}
    for uid in range(60):
        smiling[100 + uid % 6].append(int(rows["Smiling"][uid]))
    sizes = sorted(len(d.y_train) + len(d.y_test) for d in fed.devices)
    assert sizes == [10] * 6
    positives = sorted(int(d.y_train.sum() + d.y_test.sum()) for d in fed.devices)
    assert positives == sorted(sum(v) for v in smiling.values())
    # raw 0-255 pixels by default, as the official loader feeds its model; pixels=unit scales to [0, 1]
    assert 1.0 < max(float(d.x_train.max()) for d in fed.devices) <= 255.0
    unit = load_federation(_dataset_cfg("celeba", path=str(tmp_path), image_size=16, pixels="unit"), 6, seed=0)
    assert max(float(d.x_train.max()) for d in unit.devices) <= 1.0
    assert torch.allclose(unit.devices[0].x_train * 255, fed.devices[0].x_train)


@pytest.fixture(scope="module")
def fashion_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST-shaped saved DatasetDict (train/test): image (28x28 L), label (10 classes)."""
    rng = np.random.default_rng(2)
    folder = tmp_path_factory.mktemp("fashion")
    splits, uid = {}, 0
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split, per_class in (("train", 60), ("test", 10)):
        rows = {"image": [], "label": []}
        for c in range(10):
            for _ in range(per_class):
                rows["image"].append(_tagged_image(uid, c, (28, 28), "L", rng))
                rows["label"].append(c)
                uid += 1
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_fashion_mnist_deals_the_official_counts_from_each_split(fashion_copy: Path) -> None:
    """Device k holds exactly classes k..k+4 (mod 10): int(share) + 1 training examples of each from the training
    split and int(share / 6) + 1 test examples from the test split (60 / 10 per class here), wrapping around."""
    from app.data.partition import consecutive_shares

    fed = load_federation(_dataset_cfg("fashion_mnist", path=str(fashion_copy)), 10, seed=0)
    assert fed.input_shape == (1, 28, 28) and fed.num_classes == 10 and len(fed.devices) == 10
    shares = consecutive_shares(10, 5, 600, seed=233)
    for k, d in enumerate(fed.devices):
        for j in range(5):
            c = (k + j) % 10
            assert int((d.y_train == c).sum()) == min(int(shares[k, j]) + 1, 60), (k, j)
            assert int((d.y_test == c).sum()) == min(int(shares[k, j] / 6) + 1, 10), (k, j)
        assert set(torch.cat([d.y_train, d.y_test]).tolist()) == {(k + j) % 10 for j in range(5)}


def test_fashion_mnist_is_standardised_with_training_statistics_only(fashion_copy: Path) -> None:
    """(x - mu) / (sigma + 0.001) per pixel on the raw 0-255 scale, mu and sigma of the training split alone (the
    official script); every device's test image is its test-split image under those statistics."""
    splits = datasets.load_from_disk(str(fashion_copy))
    raw = {n: np.stack([np.asarray(i, dtype=np.float32) for i in splits[n]["image"]]) for n in ("train", "test")}
    mu, sigma = raw["train"].mean(0), raw["train"].std(0)
    expected = torch.from_numpy((raw["test"] - mu) / (sigma + 0.001)).reshape(len(raw["test"]), -1)
    fed = load_federation(_dataset_cfg("fashion_mnist", path=str(fashion_copy)), 10, seed=0)
    for d in fed.devices[:3]:
        gaps = (d.x_test.reshape(len(d.x_test), 1, -1) - expected).abs().amax(dim=2).min(dim=1).values
        assert float(gaps.max()) < 1e-3, "a test image is not its test-split image under training statistics"


def test_cifar10_from_raw_parquet_files_with_dirichlet_skew(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = {"img": [], "label": []}
    for uid in range(400):
        rows["img"].append(_tagged_image(uid, uid % 10, (32, 32), "RGB", rng))
        rows["label"].append(uid % 10)
    table = datasets.Dataset.from_dict(
        rows, features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    )
    table.to_parquet(str(tmp_path / "train.parquet"))
    cfg = _dataset_cfg("cifar10", path=str(tmp_path), alpha=0.3)
    fed = load_federation(cfg, 5, seed=0)
    assert fed.input_shape == (3, 32, 32) and len(fed.devices) == 5
    _assert_disjoint(fed)
    assert sum(len(d.y_train) + len(d.y_test) for d in fed.devices) == 400
    shares = [
        np.bincount(torch.cat([d.y_train, d.y_test]).numpy(), minlength=10).max() / (len(d.y_train) + len(d.y_test))
        for d in fed.devices
    ]
    assert np.mean(shares) > 0.2, "Dirichlet(0.3) should skew the labels well above the uniform 0.1"


def test_missing_local_copy_says_what_to_do(tmp_path: Path) -> None:
    cfg = _dataset_cfg("femnist", path=str(tmp_path / "nowhere"))
    with pytest.raises(DataUnavailable, match=r"dataset 'femnist'.*nowhere.*save_to_disk.*dataset.path=DIR"):
        load_federation(cfg, 4, seed=0)


def test_unreachable_hub_says_what_to_do() -> None:
    """With the hub unreachable (offline mode, as on a machine without internet), the error names the hub id and
    the local-copy fix. Run in a child so the offline switch does not leak into other tests."""
    code = (
        "from app.config.compose import compose_config; from app.data.federation import load_federation\n"
        "from app.data.types import DataUnavailable\n"
        "cfg = compose_config(['dataset=celeba'])\n"
        "try:\n    load_federation(cfg.dataset, 4, 0)\nexcept DataUnavailable as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "flwrlabs/celeba" in out.stdout and "set dataset.path=DIR" in out.stdout, out.stdout + out.stderr


def _leaf(users: dict[str, int], rng: np.random.Generator) -> dict:
    data = {"users": list(users), "user_data": {}, "num_samples": list(users.values())}
    uid = 0
    for u, n in users.items():
        x = rng.normal(size=(n, 100))
        x[:, 0] = np.arange(uid, uid + n)
        uid += n
        data["user_data"][u] = {"x": x.tolist(), "y": [[1.0] if v else [-1.0] for v in rng.integers(0, 2, n)]}
    return data


def test_vehicle_reads_leaf_json_from_data_dir(tmp_path: Path) -> None:
    raw = _leaf({"s0": 12, "s1": 8, "s2": 20}, np.random.default_rng(4))
    (tmp_path / "mytrain.json").write_text(json.dumps(raw))
    cfg = _dataset_cfg("vehicle", data_dir=str(tmp_path))
    fed = load_federation(cfg, 3, seed=0)
    assert fed.input_shape == (100,) and fed.num_classes == 2 and len(fed.devices) == 3
    for d, u in zip(fed.devices, raw["users"]):
        ids = torch.cat([d.x_train[:, 0], d.x_test[:, 0]]).long().tolist()
        assert len(ids) == len(set(ids)) == raw["num_samples"][raw["users"].index(u)]
        truth = {int(row[0]): int(y[0] > 0) for row, y in zip(raw["user_data"][u]["x"], raw["user_data"][u]["y"])}
        got = dict(zip(ids, torch.cat([d.y_train, d.y_test]).tolist()))
        assert got == truth, "labels +1/-1 must become 1/0 and stay with their example"
    assert len(load_federation(cfg, 2, seed=0).devices) == 2
    with pytest.raises(ValueError, match="only 3 sensors"):
        load_federation(cfg, 4, seed=0)
    with pytest.raises(DataUnavailable, match="dataset.data_dir=DIR"):
        load_federation(_dataset_cfg("vehicle", data_dir=str(tmp_path / "missing")), 3, seed=0)


def test_synthetic_is_seeded_and_beta_moves_the_inputs() -> None:
    def fed(**kw) -> Federation:
        return load_federation(_dataset_cfg("synthetic", **kw), 30, seed=0)

    a, b = fed(), fed()
    assert len(a.devices) == 30 and a.input_shape == (60,) and a.num_classes == 10
    assert all(torch.equal(x.x_train, y.x_train) for x, y in zip(a.devices, b.devices))
    assert all(len(d.y_train) + len(d.y_test) >= 50 for d in a.devices)

    def spread(f: Federation) -> float:  # how far apart the devices' input means are
        return float(torch.stack([d.x_train.mean(0) for d in f.devices]).std(0).mean())

    assert spread(fed(alpha=0.0, beta=5.0)) > 2 * spread(fed(alpha=0.0, beta=0.0))


def test_real_vehicle_file_loads_23_sensors() -> None:
    cfg = compose_config(["dataset=vehicle"])
    try:
        fed = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    except DataUnavailable as err:
        pytest.skip(f"the shared Vehicle file is not on this machine: {err}")
    assert len(fed.devices) == 23 and fed.input_shape == (100,)
    assert sum(len(d.y_train) + len(d.y_test) for d in fed.devices) == 1860


def test_synthetic_devices_do_not_depend_on_the_federation_size() -> None:
    """Each device comes from its own stream: device k is the same in a federation of 30 and of 10,000, and the
    large one costs only the devices asked for (the cache is bounded)."""
    cfg = _dataset_cfg("synthetic")
    small, large = load_federation(cfg, 30, seed=0), load_federation(cfg, 10_000, seed=0)
    assert len(large.devices) == 10_000
    for k in (0, 7, 29):
        assert torch.equal(small.devices[k].x_train, large.devices[k].x_train)
        assert torch.equal(small.devices[k].y_test, large.devices[k].y_test)
    assert not torch.equal(large.devices[9_999].x_train[:1], large.devices[0].x_train[:1])
    assert large.devices[-1] is large.devices[9_999]
    with pytest.raises(IndexError, match="device 10000 of a federation of 10000"):
        large.devices[10_000]
    assert large.devices._get.cache_info().maxsize == 256
