"""The closed form of app/analysis/theory.py against the official notebook's formulas, against Monte Carlo and
brute-force minimisation; the paper's trends; the data generator's two attacker models; and Ditto through DeviceClient
against the closed-form solution of each realisation."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from app.analysis.theory import (
    Setting,
    expected_loss,
    grid_argmin,
    lam_grid,
    lam_star,
    lam_star_variance,
    loss_variance,
    monte_carlo,
    mse,
    simulate,
    simulated_curves,
)
from app.config.compose import compose_config, composed
from app.config.keys import ConfigError
from app.data.federation import load_federation

CASES = [
    Setting(n=5, K=8, K_a=0, tau=0.7, d=2, m=4),
    Setting(n=10, K=12, K_a=3, tau=0.4, tau_a=1.5, d=2, m=4),
    Setting(n=10, K=12, K_a=3, tau=0.4, tau_a=1.5, d=2, m=4, attackers="shift"),
]
IDS = ["clean", "variance", "shift"]
# The notebook's two figure settings (point_estimation.ipynb, cell 3, lines 5 and 9), one coordinate.
NOTEBOOK = [
    Setting(sigma=0.8, n=30, tau=0.1, tau_a=0.1, K=8, d=1),
    Setting(sigma=0.8, n=30, tau=0.1, tau_a=0.5, K=16, K_a=8, d=1),
]


def _notebook(s: Setting) -> tuple[float, float]:
    """`optimal_lambda` and `sigma_w_square` as written in the official notebook (cell 2, lines 4 and 7-8)."""
    sigma, n, K, tau, tau_a, num_mali = s.sigma, s.n, s.K, s.tau, s.tau_a, s.K_a
    optimal_lambda = sigma**2 / n * (K / (K * tau**2 + num_mali * (tau_a**2 - tau**2) / (K - 1)))
    sigma_n_square = sigma**2 / n
    sigma_w_square = 1 / (
        1 / sigma_n_square + (K - 1) / (K * tau**2 + sigma_n_square + (num_mali * 1.0 / (K - 1)) * (tau_a**2 - tau**2))
    )
    return optimal_lambda, sigma_w_square


def test_lam_star_is_where_the_notebook_marks_it_on_its_figures() -> None:
    """The notebook's figure cell marks lambda* at 2.1333 (clean) and 1.1851 (adversarial): cell 6, lines 22, 37."""
    assert [lam_star(s) for s in NOTEBOOK] == pytest.approx([2.1333, 1.1851], abs=1e-4)


@pytest.mark.parametrize("s", [*NOTEBOOK, Setting(), Setting(K_a=6), Setting(K_a=24, tau_a=0.2), CASES[1]])
def test_lam_star_and_the_minimum_error_are_the_official_notebooks(s: Setting) -> None:
    optimal_lambda, sigma_w_square = _notebook(s)
    assert lam_star(s) == pytest.approx(optimal_lambda, rel=1e-12)
    assert mse(lam_star(s), s) == pytest.approx(sigma_w_square, rel=1e-12)


def _explicit_monte_carlo(s: Setting, lam: float, reps: int = 40_000) -> tuple[float, float]:
    """Every draw explicit (device means, training noise, each test point): the mean benign test loss and the mean
    (over realisations) variance of the test loss across benign devices."""
    rng = np.random.default_rng(1)
    spread = np.full(s.K, s.tau)
    if s.attackers == "variance":
        spread[: s.K_a] = s.tau_a
    theta_k = rng.normal(0, 1) + spread[:, None] * rng.standard_normal((reps, s.K, s.d))
    if s.attackers == "shift":
        theta_k[:, : s.K_a] += s.tau_a
    x_train = theta_k[:, :, None, :] + rng.normal(0, s.sigma, (reps, s.K, s.n, s.d))
    xbar = x_train.mean(axis=2)
    v = (xbar + lam * xbar.mean(axis=1, keepdims=True)) / (1 + lam)
    x_test = theta_k[:, s.K_a :, None, :] + rng.normal(0, s.sigma, (reps, s.K - s.K_a, s.m, s.d))
    losses = 0.5 * ((v[:, s.K_a :, None, :] - x_test) ** 2).sum(-1).mean(-1)
    return float(losses.mean()), float(losses.var(axis=1).mean())


@pytest.mark.parametrize("s", CASES, ids=IDS)
def test_expected_loss_and_its_variance_across_devices_match_an_explicit_monte_carlo(s: Setting) -> None:
    for lam in (0.0, 0.3, lam_star(s), 5.0):
        loss, variance = _explicit_monte_carlo(s, lam)
        assert loss == pytest.approx(expected_loss(lam, s), rel=0.01)
        assert variance == pytest.approx(loss_variance(lam, s), rel=0.03)


@pytest.mark.parametrize("s", [replace(c, m=1000) for c in CASES], ids=IDS)
def test_the_vectorised_monte_carlo_matches_the_closed_form(s: Setting) -> None:
    lams = np.array([0.0, 0.3, lam_star(s), 5.0])
    mc = monte_carlo(s, lams, reps=40_000)
    assert mc["loss"] == pytest.approx([expected_loss(lam, s) for lam in lams], rel=0.01)
    assert mc["variance"] == pytest.approx([loss_variance(lam, s) for lam in lams], rel=0.03)


@pytest.mark.parametrize("s", CASES, ids=IDS)
def test_lam_star_is_the_brute_force_minimiser_of_the_expected_loss(s: Setting) -> None:
    grid = np.geomspace(1e-4, 1e4, 400_001)
    coarse = grid[::100][int(np.argmin([expected_loss(lam, s) for lam in grid[::100]]))]
    fine = grid[(grid > coarse / 1.1) & (grid < coarse * 1.1)]
    assert fine[int(np.argmin([expected_loss(lam, s) for lam in fine]))] == pytest.approx(lam_star(s), rel=1e-4)


@pytest.mark.parametrize("s", [CASES[0], Setting(), replace(Setting(), m=10, d=1)], ids=["small", "default", "m=10"])
def test_without_attackers_the_variance_is_minimised_at_lam_star(s: Setting) -> None:
    assert lam_star_variance(s) == pytest.approx(lam_star(s), rel=1e-3)


@pytest.mark.parametrize(
    "s", [NOTEBOOK[1], Setting(K_a=6), Setting(K_a=24), *CASES[1:], replace(Setting(K_a=6), attackers="shift")]
)
def test_with_attackers_the_variance_is_minimised_between_lam_star_and_the_clean_optimum(s: Setting) -> None:
    """Between lam* and sigma^2 / (n tau^2); in these settings within 20 % of lam*, where the variance is within
    2 % of its minimum."""
    star, best, clean = lam_star(s), lam_star_variance(s), s.sigma**2 / (s.n * s.tau**2)
    assert min(star, clean) <= best * (1 + 1e-3) and best <= max(star, clean) * (1 + 1e-3)
    assert best == pytest.approx(star, rel=0.2)
    assert loss_variance(star, s) <= 1.02 * loss_variance(best, s)
    others = min(loss_variance(lam, s) for lam in np.geomspace(star / 100, star * 100, 2001))
    assert loss_variance(best, s) <= others * (1 + 1e-9)  # up to the grids' resolution (ratio 1.00014)


@pytest.mark.parametrize(
    "s",
    [Setting(K_a=6), replace(Setting(K_a=6), attackers="shift"), NOTEBOOK[1]],
    ids=["variance", "shift", "notebook"],
)
def test_monte_carlo_minimisers_of_loss_and_of_its_variance_are_the_closed_forms(s: Setting) -> None:
    """4,000 realisations on 33 lam from lam*/4 to 4 lam* (ratio 1.09 apart): each minimiser within one step."""
    grid = lam_grid(lam_star(s), 33)
    mc = monte_carlo(s, grid, reps=4000)
    assert grid_argmin(grid, mc["loss"]) == pytest.approx(lam_star(s), rel=0.1)
    assert grid_argmin(grid, mc["variance"]) == pytest.approx(lam_star_variance(s), rel=0.1)


def _decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("attackers", ["variance", "shift"])
def test_the_papers_trends_hold_in_closed_form(attackers: str) -> None:
    base = Setting(K_a=6, attackers=attackers)
    ns = [lam_star(replace(base, n=n)) for n in (2, 5, 10, 100, 10_000)]
    assert _decreasing(ns) and ns[-1] < 1e-3  # n -> infinity: lam* -> 0
    strengths = [lam_star(replace(base, tau_a=t)) for t in (0.6, 1, 2, 8, 1000)]
    assert _decreasing(strengths) and strengths[-1] < 1e-3  # tau_a -> infinity: lam* -> 0
    counts = [lam_star(replace(base, K_a=k)) for k in (0, 3, 6, 12, 24, 29)]
    assert _decreasing(counts)  # more attackers among K devices: lam* decreases
    unrelated = [lam_star(Setting(K_a=0, tau=t)) for t in (0.1, 0.25, 0.5, 1, 2)]
    assert _decreasing(unrelated)  # no attack: more unrelated tasks, smaller lam*


def test_many_attackers_next_to_a_fixed_benign_group_lower_lam_star_only_when_they_collude() -> None:
    shifted = [lam_star(Setting(K=6 + k, K_a=k, tau_a=50.0, attackers="shift")) for k in (10, 100, 10_000)]
    assert _decreasing(shifted) and shifted[-1] < 1e-3
    spread = [lam_star(Setting(K=6 + k, K_a=k, tau_a=2.0)) for k in (6, 100, 10_000, 10**7)]
    clean = Setting().sigma ** 2 / (Setting().n * Setting().tau ** 2)
    assert spread[0] < spread[1] < spread[2] < spread[3] and spread[-1] == pytest.approx(clean, rel=1e-3)


@pytest.mark.parametrize(
    "s", [Setting(), Setting(K_a=6), Setting(n=5, tau=1.0, K_a=3, tau_a=4.0), Setting(K_a=6, attackers="shift")]
)
def test_ditto_at_lam_star_beats_global_and_local_in_closed_form(s: Setting) -> None:
    star = expected_loss(lam_star(s), s)
    assert star < expected_loss(0.0, s) and star < expected_loss(math.inf, s)


def test_a_setting_with_an_unknown_attacker_model_or_no_benign_device_is_refused() -> None:
    with pytest.raises(ValueError, match="attackers"):
        Setting(attackers="colluding")
    with pytest.raises(ValueError, match="K_a"):
        Setting(K=4, K_a=4)
    with pytest.raises(ValueError, match="m = 0"):
        Setting(m=0)


def _device_means(attackers: str) -> np.ndarray:
    cfg = compose_config(
        [
            "dataset=gaussian_mean",
            "attack=none",
            "num_clients=200",
            "clients_per_round=10",
            "dataset.num_attackers=100",
            f"dataset.attackers={attackers}",
            "dataset.samples=2000",
            "dataset.test_samples=1",
            "dataset.tau=0.5",
            "dataset.tau_a=2.0",
            "dataset.sigma=1.0",
        ]
    )
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    return np.stack([device.y_train.double().mean(0).numpy() for device in federation.devices])


def test_the_generator_draws_attackers_means_with_spread_tau_a_by_default() -> None:
    means = _device_means("variance")  # 100 attackers, 100 benign devices, 5 coordinates, sample means of 2000
    spread = np.sqrt(np.array([0.5, 2.0]) ** 2 + 1 / 2000)
    assert means[100:].std(0).mean() == pytest.approx(spread[0], rel=0.1)
    assert means[:100].std(0).mean() == pytest.approx(spread[1], rel=0.1)
    assert np.abs(means[:100].mean(0) - means[100:].mean(0)).max() < 0.8  # no shift: 4 standard errors (0.2)


def test_the_generator_shifts_attackers_means_by_tau_a_in_the_shift_variant() -> None:
    means = _device_means("shift")
    assert means[:100].std(0).mean() == pytest.approx(np.sqrt(0.25 + 1 / 2000), rel=0.1)
    assert means[:100].mean(0) - means[100:].mean(0) == pytest.approx(np.full(5, 2.0), abs=0.3)


def test_the_generator_refuses_an_unknown_attacker_model() -> None:
    overrides = ["dataset=gaussian_mean", "attack=none", "dataset.attackers=colluding"]
    with pytest.raises(ConfigError, match="'dataset.attackers' = 'colluding'.*variance.*shift"):
        compose_config(overrides)  # refused with the config, before any data is drawn
    cfg = composed(overrides)  # and by the generator itself, for a config that skipped validation
    with pytest.raises(ValueError, match="dataset.attackers"):
        load_federation(cfg.dataset, cfg.num_clients, cfg.seed)


@pytest.mark.parametrize(
    "s",
    [Setting(K=20), Setting(K=20, K_a=5), Setting(K=20, K_a=5, attackers="shift")],
    ids=["clean", "variance", "shift"],
)
def test_ditto_through_ditto_client_reaches_the_closed_form_and_its_loss_is_smallest_near_lam_star(s: Setting) -> None:
    """One realisation, 5 lam from lam*/4 to 4 lam* (ratio 2 apart) and lam = 0. Every benign device's loss equals
    the closed-form solution of its realisation, so the client code solves the analysed problem; the loss is
    smallest at lam* and beats local training and the global model. (One realisation's variance across devices is
    too noisy to place its minimiser: test_monte_carlo_minimisers_... does that with 4,000.)"""
    star, grid = lam_star(s), lam_grid(lam_star(s), points=5)
    curves = simulated_curves(s, grid, seeds=(0,))
    assert grid_argmin(grid, curves["loss"]) == pytest.approx(star), curves
    runs = [simulate(s, float(lam), 0) for lam in (*grid, 0.0)]
    assert max(run["deviation"] for run in runs) < 1e-4
    at_star, local = runs[2], runs[-1]
    assert at_star["personal"] < local["personal"] and at_star["personal"] < at_star["global"]
    assert at_star["personal"] == pytest.approx(expected_loss(star, s), rel=0.05)
