"""What a node's reply may hold before the server uses it: a fit reply (`check_fit`, its update `check_update`) and
an evaluation reply (`check_evaluation`). Each says why the reply is refused, or None; the strategy logs and counts
refusals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.common import EvaluateRes, FitRes, NDArrays, parameters_to_ndarrays


def check_update(update: NDArrays, reference: NDArrays, max_norm: float | None = None) -> str | None:
    """Why `update` cannot be aggregated against the model `reference` (None when it can); with `max_norm`, an
    update whose Euclidean norm exceeds it is absurd (no SGD round moves a model that far) and refused too."""
    if len(update) != len(reference):
        return f"{len(update)} arrays, expected {len(reference)}"
    for i, (u, r) in enumerate(zip(update, reference)):
        if u.shape != r.shape:
            return f"array {i} has shape {u.shape}, expected {r.shape}"
        if u.dtype != r.dtype:
            return f"array {i} has dtype {u.dtype}, expected {r.dtype}"
        if not np.isfinite(u).all():
            return f"array {i} holds NaN or Inf"
    if max_norm is not None:
        norm = math.sqrt(sum(float(np.dot(u.ravel().astype(np.float64), u.ravel().astype(np.float64))) for u in update))
        if norm > max_norm:
            return f"norm {norm:.3g} exceeds max_update_norm={max_norm:g}"
    return None


def check_fit(
    res: FitRes, reference: NDArrays, max_norm: float | None, needs_loss: bool
) -> tuple[NDArrays, str | None]:
    """The decoded update of the fit reply `res` and why it cannot be aggregated (None when it can): undecodable
    or malformed (`check_update`), no training sample, or (`needs_loss`: a fair solver rescales by it) no usable
    `train_loss`."""
    try:
        update = parameters_to_ndarrays(res.parameters)
    except Exception as err:  # undecodable bytes are a malformed update like any other
        return [], f"undecodable parameters ({err})"
    reason = check_update(update, reference, max_norm)
    if reason is None and res.num_examples <= 0:
        reason = f"num_examples={res.num_examples}"
    loss = res.metrics.get("train_loss")
    if reason is None and needs_loss and not is_loss(loss):
        reason = f"train_loss={loss!r} (a finite number >= 0 is needed by the fair solver)"
    return update, reason


def is_loss(value: Any) -> bool:
    """A finite number >= 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_count(value: Any) -> bool:
    return is_loss(value) and float(value).is_integer()


def check_evaluation(res: EvaluateRes, device: int, required: frozenset[str]) -> str | None:
    """Why the evaluation reply `res` of the node the server asked as `device` is refused (None: usable).

    Conventions of the reply: `num_examples` = metric `n_test` > 0 (the test samples), `loss` and every `loss_*`
    finite and >= 0, every `correct_*` a whole number in 0..n_test, every `n_*` and `personal_*` a whole number
    >= 0, every other metric a finite number, and a `partition_id`, if sent, equal to `device` (a node that scores
    another device's data is not that device). `required` names the metrics the run needs from every device."""
    metrics = res.metrics
    missing = sorted(required - set(metrics))
    if missing:
        return f"metrics {missing} missing"
    if not _is_count(res.num_examples) or res.num_examples <= 0:
        return f"num_examples={res.num_examples!r}, expected a whole number > 0"
    if not is_loss(res.loss):
        return f"loss={res.loss!r}, expected a finite number >= 0"
    if "n_test" in metrics and metrics["n_test"] != res.num_examples:
        return f"n_test={metrics['n_test']!r} differs from num_examples={res.num_examples}"
    for key, value in metrics.items():
        if key == "partition_id":
            if value != device or isinstance(value, bool):
                return f"partition_id={value!r} in the reply of device {device}"
        elif key.startswith("correct_"):
            if not _is_count(value) or value > res.num_examples:
                return f"{key}={value!r}, expected a whole number in 0..{res.num_examples}"
        elif key.startswith(("n_", "personal_")):
            if not _is_count(value):
                return f"{key}={value!r}, expected a whole number >= 0"
        elif key.startswith("loss_"):
            if not is_loss(value):
                return f"{key}={value!r}, expected a finite number >= 0"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{key}={value!r}, expected a finite number"
    return None
