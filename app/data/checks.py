"""What every loader checks in what it reads (docs/datasets.md lists it per dataset).

A loader refuses data it cannot read correctly instead of training on a guess: each error names the dataset, the
file or column, the device where one is involved, what was expected and what was found. The entry points load the
federation before any process starts (app/runners/simulate.py, app/runners/launch.py), so a bad copy stops a run at
once.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from app.errors import UserError


class DataError(UserError, ValueError):
    """The data of a dataset are not what its loader can use; the message says where, what, and what to do."""


def _where(dataset: str, source: str, device: str | None = None) -> str:
    return f"dataset '{dataset}', {source}" + ("" if device is None else f", device '{device}'")


def _is_number(v: object) -> bool:
    return type(v) in (int, float)  # JSON numbers only: not bool, str, None, list


# ------------------------------------------------------------------------------------------------------- LEAF JSON


def read_leaf(path: Path, dataset: str, num_features: int, labels: Collection[float]) -> dict[str, tuple]:
    """The devices of a LEAF JSON file `{users, user_data: {u: {x, y}}, num_samples}`, in the file's user order, as
    {user: (x float64 (n, num_features), y float64 (n,))}. Checked: valid JSON; `users` (unique names) and the keys
    of `user_data` are the same; per user, `x` rectangular with `num_features` numeric finite values per row, `y`
    one number (or a one-element list, as LEAF writes it) per row of `x`, each in `labels`; `num_samples`, where
    present, one count per user equal to its number of rows."""
    source = f"file {path}"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{_where(dataset, source)}: not valid JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}, character {err.pos} of {len(err.doc)}): the file is truncated or is not "
            "LEAF JSON. Copy it again from its source."
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{_where(dataset, source)}: not a text file ({err}): expected LEAF JSON.") from None
    if not isinstance(raw, dict) or not {"users", "user_data"} <= raw.keys():
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(
            f"{_where(dataset, source)}: expected a JSON object with keys users, user_data (and "
            f"num_samples); found {found}."
        )
    users, user_data = raw["users"], raw["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users) or len(set(users)) != len(users):
        raise DataError(f"{_where(dataset, source)}: 'users' must be a list of distinct names; found {users!r:.200}.")
    if not isinstance(user_data, dict):
        raise DataError(
            f"{_where(dataset, source)}: 'user_data' must be an object {{user: {{x, y}}}}; found "
            f"{type(user_data).__name__}."
        )
    missing, extra = [u for u in users if u not in user_data], [u for u in user_data if u not in set(users)]
    if missing or extra:
        raise DataError(
            f"{_where(dataset, source)}: 'users' and the keys of 'user_data' differ: in users only "
            f"{missing[:5]}, in user_data only {extra[:5]}. Each device needs both."
        )
    counts = raw.get("num_samples")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        found = len(counts) if isinstance(counts, list) else type(counts).__name__
        raise DataError(
            f"{_where(dataset, source)}: 'num_samples' must hold one count per user ({len(users)}); found {found}."
        )
    out = {}
    for k, user in enumerate(users):
        where = _where(dataset, source, user)
        entry = user_data[user]
        if not isinstance(entry, dict) or not {"x", "y"} <= entry.keys():
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: expected an object with keys x and y; found {found}.")
        x = _features(entry["x"], num_features, where)
        y = _labels(entry["y"], labels, where)
        if len(x) != len(y):
            raise DataError(
                f"{where}: x has {len(x)} rows but y has {len(y)} labels: every sample needs exactly "
                "one label (a shorter y would pair features with other samples' labels)."
            )
        if counts is not None and counts[k] != len(y):
            raise DataError(f"{where}: num_samples says {counts[k]!r} but x and y hold {len(y)} samples.")
        out[user] = (x, y)
    return out


def _features(rows: object, num_features: int, where: str) -> np.ndarray:
    if not isinstance(rows, list):
        raise DataError(f"{where}: x must be a list of rows; found {type(rows).__name__}.")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != num_features:
            found = f"{len(row)} values" if isinstance(row, list) else repr(row)[:40]
            raise DataError(
                f"{where}: x row {i} has {found}, expected {num_features} numbers (dataset.num_features)"
                ": the rows are ragged or the file is not this dataset."
            )
        for j, v in enumerate(row):
            if not _is_number(v):
                raise DataError(f"{where}: x row {i}, column {j} is {v!r} ({type(v).__name__}), expected a number.")
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), num_features)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        i, j = bad[0]
        raise DataError(
            f"{where}: x holds {len(bad)} non-finite values (first: row {i}, column {j} = {x[i, j]}), "
            "expected finite numbers. Repair the file; features are never guessed."
        )
    return x


def _labels(values: object, allowed: Collection[float], where: str) -> np.ndarray:
    if not isinstance(values, list):
        raise DataError(f"{where}: y must be a list of labels; found {type(values).__name__}.")
    flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
    for i, v in enumerate(flat):
        if not _is_number(v) or v not in allowed:
            shown = values[i]
            raise DataError(
                f"{where}: y row {i} is {shown!r}, expected one of {sorted(allowed)} (or a one-element list of it)."
            )
    return np.asarray(flat, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ Hugging Face tables


def check_columns(table, dataset: str, source: str, required: Mapping[str, str]) -> None:  # table: datasets.Dataset
    """The table has each `required` column with the expected kind of feature: `image` (an Image feature),
    `class` (integer class labels), `binary` (bool, or integers 0/1), `id` (string or integer ids). A table of
    another dataset (CIFAR-10's `img` given for Fashion-MNIST's `image`) fails here."""
    from datasets import ClassLabel, Image, Value

    features = table.features
    expected = ", ".join(f"{c} ({k})" for c, k in required.items())
    missing = [c for c in required if c not in features]
    if missing:
        raise DataError(
            f"{_where(dataset, source)}: column {', '.join(map(repr, missing))} missing; found columns "
            f"{sorted(features)}, expected {expected}. Is this the {dataset} table?"
        )
    ints = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    kinds = {
        "image": lambda f: isinstance(f, Image),
        "class": lambda f: isinstance(f, ClassLabel) or (isinstance(f, Value) and f.dtype in ints),
        "binary": lambda f: isinstance(f, Value) and f.dtype in ("bool", *ints),
        "id": lambda f: isinstance(f, ClassLabel) or (isinstance(f, Value) and f.dtype in ("string", *ints)),
    }
    for column, kind in required.items():
        if not kinds[kind](features[column]):
            raise DataError(
                f"{_where(dataset, source)}: column '{column}' is {features[column]}, expected {kind} "
                f"values ({expected})."
            )


def column_values(table, column: str) -> np.ndarray:  # table: datasets.Dataset
    """A non-image column as a numpy array, without decoding any other column."""
    return np.asarray(table.with_format("numpy", columns=[column])[:][column])


def check_classes(values: np.ndarray, num_classes: int, dataset: str, source: str, column: str) -> np.ndarray:
    """Integer class labels in 0..num_classes-1, as int64."""
    if not np.issubdtype(values.dtype, np.integer) and not values.dtype == bool:
        raise DataError(
            f"{_where(dataset, source)}: column '{column}' holds {values.dtype} values, expected "
            f"integer classes 0..{num_classes - 1}."
        )
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        raise DataError(
            f"{_where(dataset, source)}: column '{column}' holds {len(bad)} labels outside "
            f"0..{num_classes - 1} (e.g. {sorted(set(bad.tolist()))[:5]}): expected {num_classes} "
            f"classes. Is this the {dataset} table?"
        )
    return values.astype(np.int64)


def check_binary(values: np.ndarray, dataset: str, source: str, column: str) -> np.ndarray:
    """Booleans, or integers 0/1, as int64 class indices (raw CelebA's -1/+1 is refused: it is not a class)."""
    found = set(np.unique(values).tolist())
    if values.dtype != bool and not found <= {0, 1}:
        raise DataError(
            f"{_where(dataset, source)}: column '{column}' holds {sorted(found)[:5]}, expected booleans "
            "(or 0/1). Convert the attribute to booleans (e.g. -1/+1 -> False/True)."
        )
    return values.astype(np.int64)


def decode_images(
    table,
    column: str,
    dataset: str,
    source: str,
    shape: tuple[int, ...],
    mode: str | None = None,
    size: int | None = None,
) -> np.ndarray:  # table: datasets.Dataset
    """The images of `column` as uint8 (N, H, W) or (N, H, W, C), each resized to size x size and converted to `mode`
    when given (the official CelebA order, flearn/utils/model_utils.py:64), then checked to have `shape` (a CIFAR-10
    image given for Fashion-MNIST fails here)."""
    out = np.empty((len(table), *shape), dtype=np.uint8)
    for i, image in enumerate(table[column]):
        if size is not None:
            image = image.resize((size, size))
        if mode is not None and image.mode != mode:
            image = image.convert(mode)
        array = np.asarray(image)
        if array.shape != shape:
            raise DataError(
                f"{_where(dataset, source)}: column '{column}', row {i}: an image of shape "
                f"{array.shape} (mode {image.mode}), expected {shape}. Is this the {dataset} table?"
            )
        out[i] = array
    return out


def require_split_classes(labels: np.ndarray, num_classes: int, dataset: str, source: str) -> None:
    """Every class 0..num_classes-1 occurs (a partition that deals each device its classes needs all of them)."""
    absent = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if absent:
        raise DataError(
            f"{_where(dataset, source)}: classes {absent} have no example, expected all of "
            f"0..{num_classes - 1}: each device is dealt consecutive classes. Use the full table."
        )
