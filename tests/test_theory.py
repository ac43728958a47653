"""The closed form of app/theory.py against Monte Carlo and brute-force minimisation, the paper's four trends, and
the simulated lam* (Ditto through DittoClient) against the closed form."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from app.theory import Setting, lam_grid, lam_star, loss_variance, mse, simulate, simulated_lam_star, expected_loss

CASES = [Setting(n=5, K=8, K_a=0, tau=0.7), Setting(n=10, K=12, K_a=3, tau=0.4, tau_a=1.5)]


def _monte_carlo_mse(s: Setting, lam: float, reps: int = 200_000) -> float:
    """Draw the generative model directly (one coordinate, many realisations) and measure a benign device's error."""
    rng = np.random.default_rng(0)
    delta = rng.normal(0, s.tau, (reps, s.K))
    delta[:, : s.K_a] += s.tau_a
    xbar = delta + rng.normal(0, s.sigma / math.sqrt(s.n), (reps, s.K))
    w = xbar.mean(axis=1)
    b = lam / (1 + lam)
    v = (1 - b) * xbar[:, -1] + b * w  # the last device is benign
    return float(np.mean((v - delta[:, -1]) ** 2))


@pytest.mark.parametrize("s", CASES)
def test_mse_formula_matches_monte_carlo(s: Setting) -> None:
    for lam in (0.0, 0.3, lam_star(s), 5.0):
        assert _monte_carlo_mse(s, lam) == pytest.approx(mse(lam, s), rel=0.02)


@pytest.mark.parametrize("s", CASES)
def test_lam_star_is_the_brute_force_minimiser_of_loss_and_of_its_variance(s: Setting) -> None:
    grid = np.geomspace(1e-4, 1e4, 400_001)
    losses = [expected_loss(lam, s) for lam in grid[::100]]
    coarse = grid[::100][int(np.argmin(losses))]
    fine = grid[(grid > coarse / 1.1) & (grid < coarse * 1.1)]
    best = fine[int(np.argmin([expected_loss(lam, s) for lam in fine]))]
    assert best == pytest.approx(lam_star(s), rel=1e-4)
    variances = np.array([loss_variance(lam, s) for lam in fine])
    assert fine[int(np.argmin(variances))] == pytest.approx(lam_star(s), rel=1e-4)


def _decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


def test_the_four_trends_hold_in_closed_form() -> None:
    base = Setting(K_a=6)
    ns = [lam_star(replace(base, n=n)) for n in (2, 5, 10, 100, 10_000)]
    assert _decreasing(ns) and ns[-1] < 1e-3  # n -> infinity: lam* -> 0
    strengths = [lam_star(replace(base, tau_a=t)) for t in (0.5, 1, 2, 8, 100)]
    assert _decreasing(strengths) and strengths[-1] < 1e-3  # tau_a -> infinity: lam* -> 0
    counts = [lam_star(replace(base, K_a=k)) for k in (0, 3, 6, 12, 24, 29)]
    assert _decreasing(counts)  # more attackers: lam* decreases
    more = [lam_star(Setting(K=6 + k, K_a=k, tau_a=50.0)) for k in (10, 100, 10_000)]
    assert _decreasing(more) and more[-1] < 1e-3  # K_a -> infinity with K_b fixed and a strong shift: lam* -> 0
    unrelated = [lam_star(Setting(K_a=0, tau=t)) for t in (0.1, 0.25, 0.5, 1, 2)]
    assert _decreasing(unrelated)  # no attack: more unrelated tasks, smaller lam*


@pytest.mark.parametrize("s", [Setting(), Setting(K_a=6), Setting(n=5, tau=1.0, K_a=3, tau_a=4.0)])
def test_ditto_at_lam_star_beats_global_and_local_in_closed_form(s: Setting) -> None:
    star = expected_loss(lam_star(s), s)
    assert star < expected_loss(0.0, s) and star < expected_loss(math.inf, s)


@pytest.mark.parametrize("s", [Setting(K=20), Setting(K=20, K_a=5, tau_a=2.0)], ids=["clean", "attacked"])
def test_simulated_lam_star_is_within_a_factor_two_of_the_closed_form(s: Setting) -> None:
    """Ditto through DittoClient on one realisation; the grid is 7 log-spaced points from lam*/4 to 4 lam*
    (ratio 1.59 apart), so a factor 2 is about one grid step either side."""
    star = lam_star(s)
    sim_star, curve = simulated_lam_star(s, lam_grid(star, points=7), seeds=(0,))
    assert 0.5 <= sim_star / star <= 2.0, curve
    at_star = simulate(s, float(lam_grid(star, points=7)[3]), 0)
    local = simulate(s, 0.0, 0)
    assert at_star["personal"] < local["personal"] and at_star["personal"] < at_star["global"]
    assert at_star["personal"] == pytest.approx(expected_loss(star, s), rel=0.05)  # the run reaches the closed form
