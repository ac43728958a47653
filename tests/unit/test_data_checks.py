"""Bad data in, a clear error out: each corruption of a small copy built here is refused with a message naming the
dataset, the file or column, the device, what was expected and what was found; and it stops a run before any process
starts. A valid LEAF file round-trips exactly."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from app.config.compose import compose_config
from app.data.checks import DataError
from app.data.federation import _load, load_federation
from app.data.loaders import standardize_device

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")


@lru_cache(maxsize=None)
def _dataset(name: str) -> OmegaConf:
    return compose_config([f"dataset={name}"]).dataset


def _vehicle_cfg(data_dir: Path, **overrides) -> OmegaConf:
    return OmegaConf.merge(_dataset("vehicle"), {"data_dir": str(data_dir), **overrides})


def _leaf(sizes: dict[str, int], features: int = 100, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {"users": list(sizes), "user_data": {}, "num_samples": list(sizes.values())}
    for u, n in sizes.items():
        data["user_data"][u] = {
            "x": rng.normal(size=(n, features)).round(4).tolist(),
            "y": [[1] if v else [-1] for v in rng.integers(0, 2, n)],
        }
    return data


def _set(path: list, value) -> Callable[[dict], None]:
    def apply(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value

    return apply


# (name, corruption of {"s0": 12, "s1": 20, "s2": 8}, what the message must say)
LEAF_CORRUPTIONS = [
    (
        "misaligned labels",
        _set(["user_data", "s1", "y"], lambda y: y[:-3]),
        r"device 's1': x has 20 rows but y has 17 labels: every sample needs exactly one label",
    ),
    (
        "ragged row",
        _set(["user_data", "s1", "x", 4], lambda r: r[:-1]),
        r"device 's1': x row 4 has 99 values, expected 100 numbers \(dataset.num_features\)",
    ),
    (
        "other feature count",
        lambda raw: [d.update(x=[r[:60] for r in d["x"]]) for d in raw["user_data"].values()],
        r"device 's0': x row 0 has 60 values, expected 100",
    ),
    (
        "string feature",
        _set(["user_data", "s2", "x", 2, 7], "0.5"),
        r"device 's2': x row 2, column 7 is '0.5' \(str\), expected a number",
    ),
    (
        "null feature",
        _set(["user_data", "s2", "x", 1, 0], None),
        r"device 's2': x row 1, column 0 is None \(NoneType\), expected a number",
    ),
    (
        "boolean feature",
        _set(["user_data", "s0", "x", 0, 3], True),
        r"device 's0': x row 0, column 3 is True \(bool\), expected a number",
    ),
    (
        "NaN feature",
        _set(["user_data", "s0", "x", 3, 5], float("nan")),
        r"device 's0': x holds 1 non-finite values \(first: row 3, column 5 = nan\), expected finite numbers",
    ),
    (
        "infinite feature",
        _set(["user_data", "s1", "x", 9, 99], float("inf")),
        r"device 's1': x holds 1 non-finite values \(first: row 9, column 99 = inf\)",
    ),
    ("label 0", _set(["user_data", "s0", "y", 5], [0]), r"device 's0': y row 5 is \[0\], expected one of \[-1, 1\]"),
    ("label 2", _set(["user_data", "s2", "y", 0], 2), r"device 's2': y row 0 is 2, expected one of \[-1, 1\]"),
    ("string label", _set(["user_data", "s2", "y", 1], ["1"]), r"device 's2': y row 1 is \['1'\], expected one of"),
    (
        "user without data",
        lambda raw: raw["user_data"].pop("s1"),
        r"'users' and the keys of 'user_data' differ: in users only \['s1'\], in user_data only \[\]",
    ),
    ("data without user", lambda raw: raw["users"].remove("s2"), r"in users only \[\], in user_data only \['s2'\]"),
    ("duplicate user", lambda raw: raw["users"].append("s0"), r"'users' must be a list of distinct names"),
    (
        "missing y",
        lambda raw: raw["user_data"]["s0"].pop("y"),
        r"device 's0': expected an object with keys x and y; found \['x'\]",
    ),
    ("x not a list", _set(["user_data", "s0", "x"], "oops"), r"device 's0': x must be a list of rows; found str"),
    ("num_samples off", _set(["num_samples", 1], 21), r"device 's1': num_samples says 21 but x and y hold 20 samples"),
    (
        "num_samples short",
        _set(["num_samples"], lambda n: n[:2]),
        r"'num_samples' must hold one count per user \(3\); found 2",
    ),
    (
        "no user_data",
        lambda raw: raw.pop("user_data"),
        r"expected a JSON object with keys users, user_data \(and num_samples\); found \['num_samples', 'users'\]",
    ),
    (
        "one sample",
        lambda raw: (
            raw["user_data"].update(s2={"x": raw["user_data"]["s2"]["x"][:1], "y": [[1]]}) or raw.pop("num_samples")
        ),
        r"devices \['s2'\]: fewer than 2 samples, expected at least 2",
    ),
]


@pytest.mark.parametrize("corrupt,message", [c[1:] for c in LEAF_CORRUPTIONS], ids=[c[0] for c in LEAF_CORRUPTIONS])
def test_each_corruption_of_a_leaf_file_is_refused_with_dataset_file_and_device_named(
    tmp_path: Path, corrupt: Callable[[dict], None], message: str
) -> None:
    raw = _leaf({"s0": 12, "s1": 20, "s2": 8})
    corrupt(raw)
    (tmp_path / "mytrain.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message) as err:
        load_federation(_vehicle_cfg(tmp_path), 3, seed=0)
    assert f"dataset 'vehicle', file {tmp_path / 'mytrain.json'}" in str(err.value)


def test_a_truncated_leaf_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    text = json.dumps(_leaf({"s0": 12, "s1": 20}))
    (tmp_path / "mytrain.json").write_text(text[: len(text) // 2])
    with pytest.raises(
        DataError,
        match=rf"dataset 'vehicle', file {tmp_path / 'mytrain.json'}: not valid JSON "
        r"\(.* at line 1, column \d+, character \d+ of \d+\): the file is truncated "
        r"or is not LEAF JSON. Copy it again",
    ):
        load_federation(_vehicle_cfg(tmp_path), 2, seed=0)


rows = st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=3)
devices = st.lists(
    st.lists(st.tuples(rows, st.sampled_from([-1, 1, -1.0, 1.0])), min_size=2, max_size=9), min_size=2, max_size=5
)


@settings(max_examples=25, deadline=None)
@given(devices=devices, nested=st.booleans())
def test_a_valid_leaf_file_round_trips_every_device_pair_for_pair(devices: list, nested: bool) -> None:
    """Every device's (x, y) pairs, train and test together, are exactly the file's: no pair lost, added or moved to
    another device's label."""
    raw = {"users": [f"u{k}" for k in range(len(devices))], "user_data": {}}
    for k, pairs in enumerate(devices):
        raw["user_data"][f"u{k}"] = {"x": [x for x, _ in pairs], "y": [[y] if nested else y for _, y in pairs]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "mytrain.json").write_text(json.dumps(raw))
        fed = load_federation(_vehicle_cfg(Path(folder), num_features=3), len(devices), seed=0)
        _load.cache_clear()
    for device, pairs in zip(fed.devices, devices):
        got = sorted(
            zip(
                map(tuple, torch.cat([device.x_train, device.x_test]).tolist()),
                torch.cat([device.y_train, device.y_test]).tolist(),
            )
        )
        assert got == sorted((tuple(x), int(y > 0)) for x, y in pairs)


def test_standardize_is_the_official_per_device_step_with_nan_to_zero(tmp_path: Path) -> None:
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    z = standardize_device(x)
    assert np.allclose(z[:, 0], [-1.224744871, 0.0, 1.224744871]) and np.all(z[:, 1] == 0.0)
    raw = _leaf({"s0": 6, "s1": 9}, features=3)
    (tmp_path / "mytrain.json").write_text(json.dumps(raw))
    fed = load_federation(_vehicle_cfg(tmp_path, num_features=3, preprocess="standardize"), 2, seed=0)
    pooled = torch.cat([fed.devices[1].x_train, fed.devices[1].x_test]).double()
    assert torch.allclose(pooled.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(pooled.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)


# ---------------------------------------------------------------------------------------------- Hugging Face tables


def _table(folder: Path, columns: dict, features: dict) -> Path:
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(folder))
    return folder


def _images(n: int, shape: tuple[int, ...], mode: str) -> list:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]


def _class(n: int = 10) -> datasets.ClassLabel:
    return datasets.ClassLabel(num_classes=n)


IMG, INT = datasets.Image(), datasets.Value("int64")
TABLE_CORRUPTIONS = [
    (
        "CIFAR-10 given for Fashion-MNIST",
        "fashion_mnist",
        lambda: (
            {"img": _images(20, (32, 32, 3), "RGB"), "label": [i % 10 for i in range(20)]},
            {"img": IMG, "label": _class()},
        ),
        r"column 'image' missing; found columns \['img', 'label'\], expected image \(image\), label \(class\)\. "
        r"Is this the fashion_mnist table\?",
    ),
    (
        "32x32 images for Fashion-MNIST",
        "fashion_mnist",
        lambda: (
            {"image": _images(20, (32, 32), "L"), "label": [i % 10 for i in range(20)]},
            {"image": IMG, "label": _class()},
        ),
        r"column 'image', row 0: an image of shape \(32, 32\) \(mode L\), expected \(28, 28\)",
    ),
    (
        "float labels",
        "fashion_mnist",
        lambda: (
            {"image": _images(20, (28, 28), "L"), "label": [float(i % 10) for i in range(20)]},
            {"image": IMG, "label": datasets.Value("float32")},
        ),
        r"column 'label' is Value\('float32'\), expected class values",
    ),
    (
        "labels outside 0..9",
        "cifar10",
        lambda: (
            {"img": _images(20, (32, 32, 3), "RGB"), "label": [10 + i % 10 for i in range(20)]},
            {"img": IMG, "label": INT},
        ),
        r"column 'label' holds 20 labels outside 0\.\.9 \(e\.g\. \[10, 11, 12, 13, 14\]\): expected 10 classes",
    ),
    (
        "a class missing for the consecutive partition",
        "fashion_mnist",
        lambda: (
            {"image": _images(18, (28, 28), "L"), "label": [i % 9 for i in range(18)]},
            {"image": IMG, "label": _class()},
        ),
        r"dataset 'fashion_mnist', training pool: classes \[9\] have no example, expected all of 0\.\.9",
    ),
    (
        "FEMNIST without writers",
        "femnist",
        lambda: ({"image": _images(6, (28, 28), "L"), "character": [1] * 6}, {"image": IMG, "character": _class(62)}),
        r"column 'writer_id' missing; found columns \['character', 'image'\]",
    ),
    (
        "FEMNIST with RGB 32x32 images",
        "femnist",
        lambda: (
            {"image": _images(6, (32, 32, 3), "RGB"), "writer_id": ["w0", "w1"] * 3, "character": [1] * 6},
            {"image": IMG, "writer_id": datasets.Value("string"), "character": _class(62)},
        ),
        r"column 'image', row 0: an image of shape \(32, 32\) \(mode L\), expected \(28, 28\)",
    ),
    (
        "CelebA target as text",
        "celeba",
        lambda: (
            {"image": _images(6, (30, 24, 3), "RGB"), "celeb_id": [1, 2] * 3, "Smiling": ["yes", "no"] * 3},
            {"image": IMG, "celeb_id": INT, "Smiling": datasets.Value("string")},
        ),
        r"column 'Smiling' is Value\('string'\), expected binary values",
    ),
    (
        "CelebA raw -1/+1 attributes",
        "celeba",
        lambda: (
            {"image": _images(6, (30, 24, 3), "RGB"), "celeb_id": [1, 2] * 3, "Smiling": [-1, 1] * 3},
            {"image": IMG, "celeb_id": INT, "Smiling": INT},
        ),
        r"column 'Smiling' holds \[-1, 1\], expected booleans \(or 0/1\)",
    ),
    (
        "CelebA without the target attribute",
        "celeba",
        lambda: (
            {"image": _images(6, (30, 24, 3), "RGB"), "celeb_id": [1, 2] * 3, "Male": [True, False] * 3},
            {"image": IMG, "celeb_id": INT, "Male": datasets.Value("bool")},
        ),
        r"column 'Smiling' missing; found columns \['Male', 'celeb_id', 'image'\]",
    ),
]


@pytest.mark.parametrize(
    "name,build,message", [c[1:] for c in TABLE_CORRUPTIONS], ids=[c[0] for c in TABLE_CORRUPTIONS]
)
def test_each_wrong_table_is_refused_with_dataset_and_column_named(
    tmp_path: Path, name: str, build, message: str
) -> None:
    folder = _table(tmp_path / "copy", *build())
    cfg = OmegaConf.merge(_dataset(name), {"path": str(folder)})
    with pytest.raises(DataError, match=message) as err:
        load_federation(cfg, 2, seed=0)
    assert f"dataset '{name}'" in str(err.value)


# ----------------------------------------------------------------------------------- before any process starts


@pytest.fixture
def broken_vehicle(tmp_path: Path) -> list[str]:
    raw = _leaf({"s0": 12, "s1": 20, "s2": 8})
    raw["user_data"]["s1"]["y"] = raw["user_data"]["s1"]["y"][:-3]
    (tmp_path / "mytrain.json").write_text(json.dumps(raw))
    return [
        "dataset=vehicle",
        f"dataset.data_dir={tmp_path}",
        "num_clients=3",
        "clients_per_round=3",
        "attack=none",
        "aggregator=mean",
        "num_rounds=1",
    ]


def _never(*args, **kwargs):
    raise AssertionError("a process was started before the data were checked")


def test_simulate_stops_on_bad_data_before_ray_starts(
    broken_vehicle: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.runners.simulate

    monkeypatch.setattr(app.runners.simulate, "tuned_engine", _never)  # the engine is not even prepared
    monkeypatch.setattr(app.runners.simulate, "run_simulation", _never)
    with pytest.raises(DataError, match="device 's1': x has 20 rows but y has 17 labels"):
        app.runners.simulate.simulate(compose_config(broken_vehicle), tmp_path)


def test_flwr_launch_stops_on_bad_data_before_the_superlink_starts(
    broken_vehicle: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.runners.launch

    monkeypatch.setattr(app.runners.launch.subprocess, "Popen", _never)
    with pytest.raises(DataError, match="device 's1': x has 20 rows but y has 17 labels"):
        app.runners.launch.run_flwr(broken_vehicle, tmp_path / "out", flwr_home=tmp_path / "flwr")
