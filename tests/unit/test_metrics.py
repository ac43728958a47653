"""Benign robustness and fairness metrics on hand-made per-device results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.records.metrics import SUMMARY_KEYS, accuracy_summary, worst_fraction_mean


def test_pooled_and_mean_accuracy_differ_and_malicious_are_apart() -> None:
    correct = np.array([9, 1, 30, 0])
    n_test = np.array([10, 10, 40, 5])
    malicious = np.array([False, False, False, True])
    s = accuracy_summary(correct, n_test, malicious)
    assert s["benign_acc"] == pytest.approx(40 / 60)  # pooled: sum correct / sum n
    accs = np.array([0.9, 0.1, 0.75])
    assert s["benign_mean_acc"] == pytest.approx(accs.mean())
    assert s["benign_var_acc"] == pytest.approx(((accs - accs.mean()) ** 2).mean())  # ddof 0
    assert s["benign_std_acc"] == pytest.approx(math.sqrt(s["benign_var_acc"]))
    assert s["benign_worst10_acc"] == pytest.approx(0.1)  # ceil(0.1 * 3) = 1 device
    assert s["malicious_acc"] == 0.0
    assert set(s) == set(SUMMARY_KEYS)


def test_worst_ten_percent_takes_ceil_of_the_devices() -> None:
    acc = np.linspace(0.0, 1.0, 21)  # 21 devices -> ceil(2.1) = 3 worst
    assert worst_fraction_mean(acc) == pytest.approx(acc[:3].mean())
    assert worst_fraction_mean(np.array([0.5, 0.2])) == pytest.approx(0.2)


def test_no_attackers_gives_null_malicious_accuracy_and_empty_devices_are_skipped() -> None:
    s = accuracy_summary(np.array([1, 0]), np.array([2, 0]), np.array([False, False]))
    assert s["malicious_acc"] is None
    assert s["benign_mean_acc"] == 0.5 and s["benign_std_acc"] == 0.0
