"""Krum, Multi-Krum and Bulyan select what brute-force float64 distances select, whatever the rows' magnitudes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.rules import distances, kernels
from strategies.rules.distances import _Intervals, bulyan_select, direct_sq_distances, krum_select

# the compiled kernels (strategies/rules/kernels.py) and torch's products (no compiler, a GPU) must select alike
ROUTES = ["compiled", "torch"] if kernels.library() is not None else ["torch"]


@contextlib.contextmanager
def _route(name: str) -> Iterator[None]:
    with mock.patch.object(kernels, "library", lambda: None) if name == "torch" else contextlib.nullcontext():
        yield


@pytest.fixture(params=ROUTES)
def route(request: pytest.FixtureRequest) -> Iterator[str]:
    with _route(request.param):
        yield request.param


def _brute(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    diff = x[None, :, :] - x[:, None, :]
    return (diff * diff).sum(dim=2)


def _brute_scores(dist: torch.Tensor, f: int, alive: list[int]) -> torch.Tensor:
    sub = dist[alive][:, alive]
    k = min(max(1, len(alive) - f - 2), len(alive) - 1)
    return torch.sort(sub, dim=1).values[:, 1 : k + 1].sum(dim=1)  # the own entry (0) sorts first


def _brute_select(x: torch.Tensor, f: int, keep: int) -> list[int]:
    """The `keep` best Krum scores from brute-force float64 distances, the first row on a tie."""
    return torch.argsort(_brute_scores(_brute(x), f, list(range(len(x)))), stable=True)[:keep].tolist()


def _brute_bulyan(x: torch.Tensor, f: int) -> list[int]:
    dist, alive, chosen = _brute(x), list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        best = alive[int(torch.argmin(_brute_scores(dist, f, alive)))]  # argmin: the first of equal minima
        chosen.append(best)
        alive.remove(best)
    return chosen


ISSUE_HUGE = [[3e8, 4e8], [-1.3, -0.5], [1.0, -2.1], [-1.6, 0.8], [-0.1, -0.5], [0.5, -0.3]]
ISSUE_TIE = [[0, -2, 0], [2, -1, 2], [-2, -2, 0], [-2, -2, 2], [-1, -2, 0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_issue_examples_huge_row_and_exact_tie(dtype: torch.dtype, route: str) -> None:
    # exact scores [7.5e17, 6.5, 15.11, 11.34, 5.61, 7.17]: row 4 (the Gram route centred on the mean gave row 1)
    assert krum_select(torch.tensor(ISSUE_HUGE, dtype=dtype), 1, 1).tolist() == [4]
    # exact scores [1, 9, 1, 4, 1]: rows 0, 2 and 4 tie, the first wins
    assert krum_select(torch.tensor(ISSUE_TIE, dtype=dtype), 2, 1).tolist() == [0]


@pytest.mark.parametrize("scale", [1e8, 1e10, 1e12])
def test_random_stacks_with_two_huge_rows_select_as_brute_force(scale: float, route: str) -> None:
    for seed in range(8):  # the issue: 11 x 50, 2 rows scaled; 1 in 7 wrong at 1e8, most at 1e10
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(11, 50, generator=g, dtype=torch.float64)
        x[torch.randperm(11, generator=g)[:2]] *= scale
        for stack in (x, x.float()):
            assert krum_select(stack, 1, 1).tolist() == _brute_select(stack, 1, 1)
            assert sorted(krum_select(stack, 1, 9).tolist()) == sorted(_brute_select(stack, 1, 9))
            assert bulyan_select(stack, 2, 7).tolist() == _brute_bulyan(stack, 2)


def _stacks(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Integer-valued rows (ties everywhere), some duplicated, some scaled up to 1e12, float32 or float64."""
    n = draw(st.integers(5, 12))
    d = draw(st.integers(1, 5))
    pool = draw(st.lists(st.lists(st.integers(-3, 3), min_size=d, max_size=d), min_size=2, max_size=n))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    x = torch.tensor([pool[i] for i in picks], dtype=torch.float64)
    for row in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        x[row] *= draw(st.sampled_from([1e4, 1e8, 1e12]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return x.to(dtype), draw(st.integers(0, (n - 3) // 2))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_krum_and_multikrum_select_as_brute_force_float64(data: st.DataObject) -> None:
    x, f = _stacks(data.draw)
    keep = data.draw(st.integers(1, len(x)))
    with _route(data.draw(st.sampled_from(ROUTES))):
        assert krum_select(x, f, 1).tolist() == _brute_select(x, f, 1)
        assert sorted(krum_select(x, f, keep).tolist()) == sorted(_brute_select(x, f, keep))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bulyan_selects_as_brute_force_float64(data: st.DataObject) -> None:
    x, _ = _stacks(data.draw)
    f = data.draw(st.integers(1, (len(x) - 3) // 4)) if len(x) >= 7 else 0
    with _route(data.draw(st.sampled_from(ROUTES))):
        assert bulyan_select(x, f, len(x) - 2 * f).tolist() == _brute_bulyan(x, f)


def test_direct_distances_are_symmetric_bit_for_bit_and_the_brute_force_values(route: str) -> None:
    x = torch.randn(9, 5000, generator=torch.Generator().manual_seed(1)) * 1e6 + 3.0  # several blocks
    full = direct_sq_distances(x)
    assert bool((full == full.T).all())
    assert torch.equal(direct_sq_distances(x, torch.tensor([7, 2])), full[[7, 2]])
    torch.testing.assert_close(full, _brute(x), rtol=1e-13, atol=0)


def _near_pairs(seed: int) -> torch.Tensor:
    """12 random rows, each with a twin 1e-5 away: twins' scores agree to about 1e-6, inside the first float32 bounds
    (about 1e-4) but far outside float64 rounding."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 5000, generator=g)
    return torch.cat([base, base + 1e-5 * torch.randn(12, 5000, generator=g)])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("keep", [1, 3, 17])
def test_selection_equals_brute_force_on_near_ties(seed: int, keep: int, route: str) -> None:
    x = _near_pairs(seed)
    assert sorted(krum_select(x, 5, keep).tolist()) == sorted(_brute_select(x, 5, keep))


def test_bounds_contain_the_exact_distances_and_settle_clear_cases(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    g = torch.Generator().manual_seed(0)
    for x in (
        torch.randn(20, 4096 * 2 + 70, generator=g),  # a partial chunk and a partial block
        torch.cat([torch.randn(7, 500, generator=g), 1e6 * torch.randn(2, 500, generator=g)]),
        torch.randn(9, 1000, generator=g, dtype=torch.float64) + 5.0,
    ):
        intervals = _Intervals(x, 2)
        exact = _brute(x)
        off = ~torch.eye(len(x), dtype=torch.bool)
        assert bool((intervals.lower[off] <= exact[off]).all() and (exact[off] <= intervals.upper[off]).all())
        assert bool((intervals.lower.diagonal() == -math.inf).all())
    tightened: list[int] = []
    real = _Intervals.tighten
    monkeypatch.setattr(_Intervals, "tighten", lambda self, rows: (tightened.append(len(rows)), real(self, rows)))
    clear = torch.cat([torch.randn(8, 5000, generator=g) * 0.1, torch.randn(3, 5000, generator=g) * 1e9])
    krum_select(clear, 3, 8)
    assert tightened == []  # 8 inliers against 3 huge outliers: the first bounds settle everything
    krum_select(_near_pairs(0), 5, 17)
    assert tightened and tightened[0] < 24  # only the rows the bounds leave open are recomputed


def test_float32_route_stands_down_where_its_bound_does_not_hold(route: str) -> None:
    x = torch.randn(10, 400, generator=torch.Generator().manual_seed(2))
    assert distances._float32_gram(x * 1e20, None) is None  # squared norms overflow float32
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # torch may use bfloat16 products: gamma_c would not hold
        # the compiled products are float32 whatever torch's setting: that route stands
        assert (distances._float32_gram(x, None) is None) == (route == "torch")
        assert sorted(krum_select(x, 2, 6).tolist()) == sorted(_brute_select(x, 2, 6))
    finally:
        torch.set_float32_matmul_precision(previous)
    stack = x * 1e20
    assert sorted(krum_select(stack, 2, 6).tolist()) == sorted(_brute_select(stack, 2, 6))


def test_bounds_hold_after_tightening_across_column_blocks(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """The float64 rows that tighten open rows are summed over column blocks (a reused buffer, a narrow last block):
    they equal the full float64 Gram's rows, and the tightened bounds still contain the exact distances."""
    monkeypatch.setattr(distances, "_BLOCK", 64)
    g = torch.Generator().manual_seed(3)
    for x in (
        torch.randn(12, 209, generator=g),
        torch.cat([torch.randn(9, 209, generator=g), 1e7 * torch.ones(3, 209)]),
    ):
        rows = torch.tensor([5, 0, 11])
        full, _, _ = distances._float64_gram(x, None)
        part, sq, _ = distances._float64_gram(x, None, rows)
        torch.testing.assert_close(part, full[rows], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(sq, full.diagonal(), rtol=1e-12, atol=1e-9)
        intervals = _Intervals(x, 2)
        intervals.tighten(rows)
        assert bool((intervals.level[rows] == 1).all())
        exact, off = _brute(x), ~torch.eye(len(x), dtype=torch.bool)
        assert bool((intervals.lower[off] <= exact[off]).all() and (exact[off] <= intervals.upper[off]).all())


def test_huge_rows_leave_near_ties_to_the_references_sum_order(route: str) -> None:
    """Rows scaled by 1e8 make the exact scores unrepresentable: two of them differ only by how the float64 sum
    rounds, so the scores must be summed as the brute-force reference sums them (numpy's pairwise sum picked row 8
    before row 4 here)."""
    pool, picks = [[-3, 1], [-2, -1], [0, 0]], [0, 0, 0, 0, 0, 0, 1, 0, 1, 2]
    x = torch.tensor([pool[i] for i in picks], dtype=torch.float64)
    x[[0, 1, 6]] *= 1e8
    assert bulyan_select(x, 1, 8).tolist() == _brute_bulyan(x, 1) == [2, 3, 4, 8, 5, 7, 0, 1]
