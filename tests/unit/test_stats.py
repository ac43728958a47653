"""Intervals over seeds against numbers worked by hand (t quantiles from a printed t table)."""

from __future__ import annotations

import math

import pytest

from app.analysis.stats import paired_interval, t_interval

T2 = 4.303  # t(0.975) with 2 degrees of freedom, from a t table (3 seeds)
T1 = 12.706  # t(0.975) with 1 degree of freedom (2 seeds)


def test_t_interval_of_three_seeds_by_hand() -> None:
    ci = t_interval([0.8, 0.7, 0.9])  # mean 0.8, sample std 0.1
    assert ci.n == 3 and ci.mean == pytest.approx(0.8)
    half = T2 * 0.1 / math.sqrt(3)  # 0.2484
    assert (ci.lo, ci.hi) == (pytest.approx(0.8 - half, abs=1e-3), pytest.approx(0.8 + half, abs=1e-3))
    assert ci.excludes_zero


def test_one_seed_has_no_interval_and_is_never_significant() -> None:
    ci = t_interval([0.42])
    assert ci.mean == 0.42 and math.isnan(ci.lo) and math.isnan(ci.hi) and not ci.excludes_zero
    assert t_interval([]).n == 0 and t_interval([math.nan, 0.5]).n == 1


def test_paired_difference_pairs_by_seed_and_leaves_out_unmatched_seeds() -> None:
    ditto = {0: 0.05, 1: 0.06, 2: 0.07, 3: 0.5}  # seed 3 has no baseline: left out
    base = {0: 0.10, 1: 0.12, 2: 0.13}
    ci = paired_interval(ditto, base)
    # differences -0.05, -0.06, -0.06: mean -0.05667, sample std sqrt(((1/150)^2 + 2 (1/300)^2) / 2) = 0.005774
    half = T2 * 0.0057735 / math.sqrt(3)  # 0.01434
    assert ci.n == 3 and ci.mean == pytest.approx(-0.056667, abs=1e-6)
    assert (ci.lo, ci.hi) == (pytest.approx(-0.056667 - half, abs=1e-4), pytest.approx(-0.056667 + half, abs=1e-4))
    assert ci.excludes_zero and ci.hi < 0
    assert paired_interval(ditto, {2: 0.13, 0: 0.10, 1: 0.12}) == ci  # paired by seed, not by position


def test_two_seeds_interval_by_hand() -> None:
    ci = paired_interval({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.7})  # differences 0.2, 0.1: mean 0.15, s = 0.0707
    half = T1 * math.sqrt(0.005) / math.sqrt(2)  # 0.6353
    assert (ci.lo, ci.hi) == (pytest.approx(0.15 - half, abs=1e-3), pytest.approx(0.15 + half, abs=1e-3))
    assert not ci.excludes_zero
