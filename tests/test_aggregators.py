"""Aggregators against their definitions, against Flower 1.41's own functions, and their properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregators import (
    AGGREGATORS,
    build_aggregator,
    bulyan,
    centered_clip,
    check_aggregator,
    geomed,
    knorm,
    krum,
    median,
    multikrum,
    norm_clip,
    trimmed_mean,
)
from strategies.distances import direct_sq_distances, krum_scores

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
    assert float(krum_scores(dist, 1)[0]) == pytest.approx(sum(by_hand), rel=1e-9)


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
    torch.testing.assert_close(geomed(x, ONES(5, dtype=torch.float64), 0), torch.tensor([1.0, 1.0], dtype=torch.float64))
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


# -- against Flower 1.41 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 8, 13])
def test_median_and_trimmed_mean_equal_flowers(n: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n))  # 16 column blocks, the last one partial
    np.testing.assert_allclose(median(x, ONES(n)).numpy(), aggregate_median(_flower(x))[0], atol=1e-6)
    np.testing.assert_allclose(trimmed_mean(x, ONES(n), beta=0.2).numpy(),
                               aggregate_trimmed_avg(_flower(x), 0.2)[0], atol=1e-6)


@pytest.mark.parametrize(("n", "f"), [(7, 1), (10, 2), (12, 3)])
def test_krum_equals_flowers_and_multikrum_differs_only_in_weighting(n: int, f: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n + f))  # float64 blocks, float32 chunks
    np.testing.assert_allclose(krum(x, ONES(n), f).numpy(), aggregate_krum(_flower(x), f, 0)[0], atol=1e-6)
    # Flower's Multi-Krum is weighted by num_examples; with equal counts it is our unweighted mean
    np.testing.assert_allclose(multikrum(x, ONES(n), f, m=n - f).numpy(),
                               aggregate_krum(_flower(x), f, n - f)[0], atol=1e-6)


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2)])
def test_bulyan_equals_flowers_with_krum_selection(n: int, f: int) -> None:
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n))  # Bulyan's rows read block by block
    theirs = aggregate_bulyan(_flower(x), f, aggregate_krum, to_keep=0)[0]
    np.testing.assert_allclose(bulyan(x, ONES(n), f).numpy(), theirs, atol=1e-6)


# -- properties ---------------------------------------------------------------------------------------------------
RULES = {
    "mean": {}, "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {}, "multikrum": {}, "bulyan": {},
    "knorm": {}, "norm_clip": {}, "geomed": {"tol": 1e-9, "max_iter": 500}, "centered_clip": {"tau": 1.0},
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
