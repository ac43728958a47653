"""Aggregators against their definitions, against Flower's own functions (1.42, unchanged since 1.41), and their
properties."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from strategies.rules.coordinate import median, row_means_closest_to_median, trimmed_mean
from strategies.rules.distances import direct_sq_distances, krum_scores
from strategies.rules.iterative import centered_clip, geomed, weiszfeld
from strategies.rules.registry import AGGREGATORS, build_aggregator, check_aggregator, norm_clip
from strategies.rules.selection import bulyan, knorm, krum, multikrum

ONES = torch.ones


def _flower(x: torch.Tensor) -> list[tuple[list[np.ndarray], int]]:
    """The stacked updates as Flower's aggregate functions take them (one array per client)."""
    return [([row.numpy().copy()], 1) for row in x]


# -- hand-made cases ------------------------------------------------------------------------------------------
INLIERS = torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.05], [1.05, 1.0]])
OUTLIER = torch.tensor([[100.0, -100.0]])
WITH_OUTLIER = torch.cat([INLIERS, OUTLIER])


def test_median_ignores_an_outlier_and_averages_the_middle_pair() -> None:
    torch.testing.assert_close(median(torch.tensor([[1.0], [2.0], [100.0]]), ONES(3)), torch.tensor([2.0]))
    torch.testing.assert_close(median(torch.tensor([[1.0], [2.0], [4.0], [100.0]]), ONES(4)), torch.tensor([3.0]))


def test_trimmed_mean_equals_the_hand_value() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0], [-50.0], [5.0], [6.0], [7.0], [8.0]])
    # beta = 0.1, n = 10: drop one value per side (-50 and 100), mean of 1..8 = 4.5
    torch.testing.assert_close(trimmed_mean(x, ONES(10), beta=0.1), torch.tensor([4.5]))
    torch.testing.assert_close(trimmed_mean(x, ONES(10), beta=0.0), x.mean(0))
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(x, ONES(10), beta=0.5)


def test_krum_picks_an_inlier_and_counts_n_minus_f_minus_2_neighbours() -> None:
    out = krum(WITH_OUTLIER, ONES(6), 1)
    assert any(torch.equal(out, row) for row in INLIERS)
    dist = direct_sq_distances(WITH_OUTLIER)
    # n=6, f=1: 3 nearest neighbours of row 0, by hand
    x = WITH_OUTLIER.double()
    by_hand = sorted(float(((x[0] - x[j]) ** 2).sum()) for j in range(1, 6))[:3]
    assert float(krum_scores(dist.numpy(), 1)[0]) == pytest.approx(sum(by_hand), rel=1e-9)


def test_multikrum_averages_the_m_best_scored_updates() -> None:
    out = multikrum(WITH_OUTLIER, ONES(6), 1)  # m = n - f = 5: exactly the inliers
    torch.testing.assert_close(out, INLIERS.mean(0))
    assert multikrum(WITH_OUTLIER, ONES(6), 1, m=1).tolist() == krum(WITH_OUTLIER, ONES(6), 1).tolist()


def test_knorm_drops_the_largest_norms() -> None:
    torch.testing.assert_close(knorm(WITH_OUTLIER, ONES(6), 1), INLIERS.mean(0))


def test_norm_clip_clips_to_the_median_norm_then_applies_the_inner_rule() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])  # norms 5, 1, 2: median 2
    expected = torch.tensor([[1.2, 1.6], [0.0, 1.0], [0.0, 2.0]]).mean(0)
    torch.testing.assert_close(norm_clip(x, ONES(3), 0), expected)
    torch.testing.assert_close(norm_clip(x, ONES(3), 0, inner="median"), torch.tensor([0.0, 1.6]))


def test_geomed_matches_a_known_geometric_median() -> None:
    # the geometric median of the corners of a square and its centre is the centre
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(geomed(x, ONES(5, dtype=torch.float64), 0), expected)
    out = geomed(WITH_OUTLIER.double(), ONES(6, dtype=torch.float64), 0, tol=1e-12, max_iter=1000)
    assert (out - INLIERS.double().mean(0)).norm() < 0.2  # one far outlier barely moves it


def test_centered_clip_moves_at_most_tau_per_iteration_and_remembers_the_centre() -> None:
    x = torch.tensor([[10.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    out = centered_clip(x, ONES(3), 0, tau=1.0, iters=3)
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0]))
    rule = build_aggregator({"name": "centered_clip", "tau": 1.0, "iters": 1, "f": None})
    torch.testing.assert_close(rule(x, ONES(3), 0), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rule(x, ONES(3), 0), torch.tensor([2.0, 0.0]))  # restarts from the previous output


def test_bulyan_selects_then_trims_around_the_median() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(9, 4) * 0.1, torch.full((2, 4), 50.0)])  # n = 11 = 4f + 3 with f = 2
    out = bulyan(x, ONES(11), 2)
    assert out.abs().max() < 0.5
    with pytest.raises(ValueError, match="4f \\+ 3"):
        bulyan(x[:10], ONES(10), 2)


def test_configuration_check_names_the_fix() -> None:
    with pytest.raises(ValueError, match="clients_per_round >= 11"):
        check_aggregator({"name": "bulyan"}, 10, 2)
    check_aggregator({"name": "bulyan"}, 11, 2)
    check_aggregator({"name": "median"}, 2, 5)


# -- against Flower's own --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 8, 13])
def test_median_and_trimmed_mean_equal_flowers(n: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n))  # 16 column blocks, the last one partial
    np.testing.assert_allclose(median(x, ONES(n)).numpy(), aggregate_median(_flower(x))[0], atol=1e-6)
    np.testing.assert_allclose(
        trimmed_mean(x, ONES(n), beta=0.2).numpy(), aggregate_trimmed_avg(_flower(x), 0.2)[0], atol=1e-6
    )


@pytest.mark.parametrize(("n", "f"), [(7, 1), (10, 2), (12, 3)])
def test_krum_equals_flowers_and_multikrum_differs_only_in_weighting(n: int, f: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n + f))  # float64 blocks, float32 chunks
    np.testing.assert_allclose(krum(x, ONES(n), f).numpy(), aggregate_krum(_flower(x), f, 0)[0], atol=1e-6)
    # Flower's Multi-Krum is weighted by num_examples; with equal counts it is our unweighted mean
    np.testing.assert_allclose(
        multikrum(x, ONES(n), f, m=n - f).numpy(), aggregate_krum(_flower(x), f, n - f)[0], atol=1e-6
    )


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2)])
def test_bulyan_equals_flowers_with_krum_selection(n: int, f: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n))  # Bulyan's rows read block by block
    theirs = aggregate_bulyan(_flower(x), f, aggregate_krum, to_keep=0)[0]
    np.testing.assert_allclose(bulyan(x, ONES(n), f).numpy(), theirs, atol=1e-6)


# -- properties ---------------------------------------------------------------------------------------------------
RULES = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {},
    "multikrum": {},
    "bulyan": {},
    "knorm": {},
    "norm_clip": {},
    "geomed": {"tol": 1e-9, "max_iter": 500},
    "centered_clip": {"tau": 1.0},
}
ROBUST = ["median", "trimmed_mean", "krum", "multikrum", "bulyan", "knorm", "norm_clip", "geomed", "centered_clip"]


def test_every_registry_rule_is_covered_by_the_properties() -> None:
    assert set(RULES) == set(AGGREGATORS)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(7, 12), d=st.integers(1, 6), name=st.sampled_from(sorted(RULES)))
def test_permutation_invariance(seed: int, n: int, d: int, name: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    perm = torch.randperm(n, generator=g)
    f = 1
    if name == "bulyan":
        # Bulyan's last Krum stages count max(1, f - 1) neighbours; with one, two mutual nearest neighbours tie
        # exactly and the order breaks the tie (as in Flower). f = 3 keeps every stage at two or more.
        f, n = 3, n + 8
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        w, perm = torch.rand(n, generator=g, dtype=torch.float64) + 0.5, torch.randperm(n, generator=g)
    a = AGGREGATORS[name](x, w, f, **RULES[name])
    b = AGGREGATORS[name](x[perm], w[perm], f, **RULES[name])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 10), name=st.sampled_from(sorted(RULES)))
def test_identical_inputs_give_that_input(seed: int, n: int, name: str) -> None:
    v = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = v.repeat(n, 1)
    options = dict(RULES[name])
    if name == "centered_clip":
        options["tau"] = None  # tau = 0 distance -> the median radius; a fixed tau would need iterations
        options["center"] = v
    torch.testing.assert_close(AGGREGATORS[name](x, torch.ones(n, dtype=torch.float64), 0, **options), v)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(ROBUST), huge=st.sampled_from([1e6, -1e8, 1e10]))
def test_bounded_output_when_f_updates_are_huge(seed: int, name: str, huge: float) -> None:
    g = torch.Generator().manual_seed(seed)
    n, f = 11, 2
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x[:f] = huge
    out = AGGREGATORS[name](x, torch.ones(n, dtype=torch.float64), f, **RULES[name])
    bound = 10.0 if name != "centered_clip" else 3 * RULES[name]["tau"] + 10.0
    assert out.abs().max() < bound, (name, out)


# -- bad input, the caller's stack, options ----------------------------------------------------------------------
def _ok_stack() -> torch.Tensor:
    return torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


BAD = {
    "empty": (lambda: torch.empty(0, 3), 0, "at least one update"),
    "no coordinates": (lambda: torch.empty(11, 0), 0, "at least one update"),
    "1-D": (lambda: torch.zeros(11), 0, "n x d tensor"),
    "integer": (lambda: torch.zeros(11, 3, dtype=torch.int64), 0, "float32 or float64"),
    "bfloat16": (lambda: torch.zeros(11, 3, dtype=torch.bfloat16), 0, "float32 or float64"),
    "NaN": (lambda: _ok_stack().index_fill_(0, torch.tensor([4]), math.nan), 0, r"NaN or infinite .*\[4\]"),
    "Inf": (lambda: _ok_stack().index_fill_(0, torch.tensor([2]), math.inf), 0, r"NaN or infinite .*\[2\]"),
    "f < 0": (_ok_stack, -1, "integer >= 0"),
}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("case", sorted(BAD))
def test_every_rule_names_bad_input_in_a_value_error(name: str, case: str) -> None:
    make, f, message = BAD[case]
    x = make()
    with pytest.raises(ValueError, match=message):
        AGGREGATORS[name](x, torch.ones(x.shape[0], dtype=torch.float64), f, **RULES[name])


@pytest.mark.parametrize(
    ("name", "f", "message"),
    [
        ("krum", 9, "n >= f \\+ 3"),
        ("multikrum", 9, "n >= f \\+ 3"),
        ("bulyan", 3, "4f \\+ 3"),
        ("knorm", 12, "f \\+ 1"),
    ],
)
def test_f_beyond_what_the_rule_tolerates_is_a_value_error(name: str, f: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AGGREGATORS[name](_ok_stack(), ONES(11, dtype=torch.float64), f)


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("name", sorted(RULES))
def test_no_rule_changes_the_callers_stack(name: str, d: int) -> None:
    x = torch.randn(11, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    x[:2] *= 1e9
    before = x.clone()
    AGGREGATORS[name](x, ONES(11, dtype=torch.float64), 2, **RULES[name])
    assert torch.equal(x, before)  # median and trimmed_mean partitioned a d = 1 stack in place


def test_trimmed_mean_can_tie_its_trim_to_f() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0], [-50.0], [5.0], [6.0], [7.0], [8.0]])
    torch.testing.assert_close(trimmed_mean(x, ONES(10), 2, trim="f"), torch.tensor([4.5]))  # drops -50, 1, 8, 100
    assert trimmed_mean(x, ONES(10), 2).tolist() == trimmed_mean(x, ONES(10), 2, beta=0.1).tolist()  # default beta
    with pytest.raises(ValueError, match="n >= 2f \\+ 1"):
        trimmed_mean(x, ONES(10), 5, trim="f")
    with pytest.raises(ValueError, match="'beta' .* or 'f'"):
        trimmed_mean(x, ONES(10), 2, trim="half")


def test_norm_clip_names_its_median_convention() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [4.0, 0.0], [0.0, 10.0]])  # norms 1, 3, 4, 10: middle pair 3 and 4
    lower = torch.tensor([[1.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]]).mean(0)
    middle = torch.tensor([[1.0, 0.0], [0.0, 3.0], [3.5, 0.0], [0.0, 3.5]]).mean(0)
    torch.testing.assert_close(norm_clip(x, ONES(4), 0), middle)  # the default: np.median, as the official l2_clip
    torch.testing.assert_close(norm_clip(x, ONES(4), 0, radius="lower_median"), lower)
    with pytest.raises(ValueError, match="radius"):
        norm_clip(x, ONES(4), 0, radius="mean")


def test_configuration_check_runs_the_rules_own_checks() -> None:
    with pytest.raises(ValueError, match="n >= 2f \\+ 1"):
        check_aggregator({"name": "trimmed_mean", "trim": "f", "beta": 0.1}, 5, 3)
    with pytest.raises(ValueError, match="radius"):
        check_aggregator({"name": "norm_clip", "inner": "mean", "radius": "upper"}, 5, 0)
    with pytest.raises(ValueError, match="does not take"):
        check_aggregator({"name": "median", "beta": 0.1}, 5, 0)
    check_aggregator({"name": "trimmed_mean", "trim": "f", "beta": 0.1}, 7, 3)


# -- geometric median to its optimum ------------------------------------------------------------------------------
def _objective(x: torch.Tensor, z: torch.Tensor) -> float:
    return float((x.double() - z.double()).norm(dim=1).mean())


def _argmin(x: torch.Tensor) -> tuple[np.ndarray, float]:
    """(argmin, min) of z -> sum ||z - x_i|| / n by Nelder-Mead from the coordinate-wise median, then BFGS (an
    independent reference; the median itself where it is better, as in 1-D)."""
    a = x.double().numpy()
    objective = lambda z: np.linalg.norm(a - z, axis=1).mean()  # noqa: E731
    res = minimize(
        objective,
        np.median(a, axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 20000, "maxfev": 40000},
    )
    res = min([res, minimize(objective, res.x, method="BFGS", options={"gtol": 1e-13})], key=lambda r: r.fun)
    median = np.median(a, axis=0)
    return (median, objective(median)) if objective(median) <= res.fun else (res.x, float(res.fun))


def _optimum(x: torch.Tensor) -> float:
    return _argmin(x)[1]


@pytest.mark.parametrize("d", [1, 3])
def test_geomed_defaults_reach_the_optimum_with_far_outliers(d: int, caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(d)
    inliers = torch.randn(12, d, generator=g)
    x = torch.cat([inliers, 1e4 + torch.randn(3, d, generator=g)]).float()  # float32, as the server stacks them
    with caplog.at_level(logging.INFO, logger="strategies.rules.iterative"):
        z = geomed(x, ONES(15), 0)
    best, optimum = _argmin(x)
    # the old defaults (float32 distances, a stall test) stopped 6e-6 above the optimum at d = 1, and 0.09 of the
    # inliers' median distance away from it at d = 3
    assert _objective(x, z) <= optimum * (1 + 1e-6)
    spread = float((inliers.double() - torch.from_numpy(best)).norm(dim=1).median())
    assert float((z.double() - torch.from_numpy(best)).norm()) <= 1e-3 * spread
    assert "iterations" in caplog.text
    _, iterations, gap = weiszfeld(x, ONES(15))
    assert 1 <= iterations < 1000 and gap <= 1e-6


# -- properties against brute-force float64 references -------------------------------------------------------------
@st.composite
def _float_stacks(draw: st.DrawFn) -> torch.Tensor:
    """Rows with integer or continuous values, some duplicated, some scaled up to 1e12 (float64)."""
    n, d = draw(st.integers(5, 12)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if draw(st.booleans()):
        x = x.mul(2).round()  # integer values: ties everywhere
    for row, source in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2)):
        x[row] = x[source]
    for row in draw(st.lists(st.integers(0, n - 1), max_size=(n - 1) // 2)):
        x[row] *= draw(st.sampled_from([1e4, 1e8, 1e12]))
    return x


@settings(max_examples=40, deadline=None)
@given(x=_float_stacks(), f=st.integers(0, 2))
def test_median_trimmed_mean_and_knorm_equal_brute_force_float64(x: torch.Tensor, f: int) -> None:
    n, a = len(x), x.numpy()
    assert torch.equal(median(x, ONES(n)), torch.from_numpy(np.median(a, axis=0)))
    k = f if n - 2 * f >= 1 else 0
    kept = np.sort(a, axis=0)[k : n - k]
    np.testing.assert_allclose(
        trimmed_mean(x, ONES(n), f, trim="f").numpy(), kept.mean(axis=0), rtol=1e-12, atol=1e-12 * np.abs(kept).max()
    )
    norms = np.sqrt((a * a).sum(axis=1))
    keep = np.argsort(norms, kind="stable")[: n - f]
    np.testing.assert_allclose(
        knorm(x, ONES(n), f).numpy(), a[keep].mean(axis=0), rtol=1e-12, atol=1e-12 * np.abs(a[keep]).max()
    )


@settings(max_examples=40, deadline=None)
@given(x=_float_stacks(), f=st.integers(0, 2))
def test_krum_and_multikrum_equal_the_brute_force_rows(x: torch.Tensor, f: int) -> None:
    n = len(x)
    if n < f + 3:
        return
    diff = x[None, :, :] - x[:, None, :]
    dist = (diff * diff).sum(dim=2)
    k = min(max(1, n - f - 2), n - 1)
    scores = torch.sort(dist, dim=1).values[:, 1 : k + 1].sum(dim=1)
    order = torch.argsort(scores, stable=True)
    assert torch.equal(krum(x, ONES(n), f), x[order[0]])
    np.testing.assert_allclose(
        multikrum(x, ONES(n), f).numpy(),
        x[order[: n - f]].mean(dim=0).numpy(),
        rtol=1e-12,
        atol=1e-12 * float(x[order[: n - f]].abs().max()),
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(7, 12), d=st.integers(1, 4), huge=st.sampled_from([1.0, 1e8, 1e12]))
def test_bulyan_equals_the_brute_force_definition(seed: int, n: int, d: int, huge: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)  # continuous: no ties in the coordinate step
    f = (n - 3) // 4
    x[torch.randperm(n, generator=g)[:f]] *= huge
    diff = x[None, :, :] - x[:, None, :]
    dist, alive, chosen = (diff * diff).sum(dim=2), list(range(n)), []
    for _ in range(n - 2 * f):
        sub = dist[alive][:, alive]
        k = min(max(1, len(alive) - f - 2), len(alive) - 1)
        best = alive[int(torch.argmin(torch.sort(sub, dim=1).values[:, 1 : k + 1].sum(dim=1)))]
        chosen.append(best)
        alive.remove(best)
    sel = x[chosen].numpy()
    closest = np.argsort(np.abs(sel - np.median(sel, axis=0)), axis=0, kind="stable")[: len(chosen) - 2 * f]
    expected = np.take_along_axis(sel, closest, axis=0).mean(axis=0)
    np.testing.assert_allclose(bulyan(x, ONES(n), f).numpy(), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), theta=st.integers(1, 30), data=st.data(), spread=st.sampled_from([1, 2, 5, 1000]))
def test_bulyans_coordinate_step_breaks_distance_ties_by_row_order(
    seed: int, theta: int, data: st.DataObject, spread: int
) -> None:
    """The window of the sorted values equals the stable ranking of distances to the median, also where integer
    values tie at m - r and m + r for the last place (the row order decides which one counts)."""
    beta = data.draw(st.integers(1, theta))
    block = np.random.default_rng(seed).integers(-spread, spread + 1, size=(300, theta)).astype(np.float32)
    med = np.median(block, axis=1).astype(np.float32)
    closest = np.argsort(np.abs(block - med[:, None]), axis=1, kind="stable")[:, :beta]
    expected = np.take_along_axis(block, closest, axis=1).mean(axis=1, dtype=np.float64)
    original = block.copy()
    np.testing.assert_array_equal(row_means_closest_to_median(block, beta), expected)
    np.testing.assert_array_equal(block, original)


@settings(max_examples=20, deadline=None)
@given(x=_float_stacks())
def test_geomed_is_within_its_tolerance_of_the_optimum(x: torch.Tensor) -> None:
    z = geomed(x, ONES(len(x), dtype=torch.float64), 0)
    optimum = _optimum(x)
    assert _objective(x, z) <= optimum * (1 + 1e-6) + 1e-300
