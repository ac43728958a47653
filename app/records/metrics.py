"""Robustness and fairness over benign devices, as the paper reports them.

robustness: pooled benign accuracy (sum correct / sum n_test) and the mean of per-device accuracies;
fairness: population variance and std (ddof 0) of per-device accuracy, and the mean of the worst 10 % of devices.
Malicious devices are reported apart (pooled accuracy). Devices with no test sample have no accuracy.
"""

from __future__ import annotations

import math

import numpy as np

SUMMARY_KEYS = (
    "benign_acc",
    "benign_mean_acc",
    "benign_std_acc",
    "benign_var_acc",
    "benign_worst10_acc",
    "malicious_acc",
)


def worst_fraction_mean(acc: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the lowest ceil(fraction * n) accuracies (at least one)."""
    k = max(1, math.ceil(fraction * len(acc)))
    return float(np.sort(acc)[:k].mean())


def accuracy_summary(correct: np.ndarray, n_test: np.ndarray, malicious: np.ndarray) -> dict[str, float | None]:
    """The SUMMARY_KEYS for one model kind, from per-device correct counts, test sizes and malicious flags."""
    correct, n_test = np.asarray(correct, dtype=float), np.asarray(n_test, dtype=float)
    malicious = np.asarray(malicious, dtype=bool)
    benign = ~malicious & (n_test > 0)
    out: dict[str, float | None] = dict.fromkeys(SUMMARY_KEYS)
    if benign.any():
        acc = correct[benign] / n_test[benign]
        out.update(
            benign_acc=float(correct[benign].sum() / n_test[benign].sum()),
            benign_mean_acc=float(acc.mean()),
            benign_std_acc=float(acc.std(ddof=0)),
            benign_var_acc=float(acc.var(ddof=0)),
            benign_worst10_acc=worst_fraction_mean(acc),
        )
    bad = malicious & (n_test > 0)
    if bad.any():
        out["malicious_acc"] = float(correct[bad].sum() / n_test[bad].sum())
    return out
