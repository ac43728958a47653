"""The float32 distance bounds hold, and the Krum selections they speed up equal the exact float64 ones."""

from __future__ import annotations

import pytest
import torch

from strategies import distances
from strategies.distances import _exact_rows, _float32_bounds, krum_scores, krum_select, pairwise_sq_distances


def _direct(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def _stacks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    near = torch.randn(1, 3001, generator=g) + 1e-3 * torch.randn(12, 3001, generator=g)  # close rows, far from 0
    return [
        torch.randn(9, 1000, generator=g) + 5.0,
        torch.randn(20, 4096 * 2 + 70, generator=g),  # a partial chunk and a partial block
        near,
        torch.cat([torch.randn(7, 500, generator=g), 1e6 * torch.randn(2, 500, generator=g)]),
    ]


@pytest.mark.parametrize("x", _stacks())
def test_float32_bounds_contain_the_exact_distances(x: torch.Tensor) -> None:
    lower, upper = _float32_bounds(x)
    exact = _direct(x)
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    assert bool((lower[off] <= exact[off]).all()) and bool((exact[off] <= upper[off]).all())
    assert bool((lower.diagonal() == -torch.inf).all())
    # and they are tight enough to be of use: within 1e-4 of unrelated rows' distances
    if x.shape[0] == 20:
        assert float(((upper - lower)[off] / exact[off]).max()) < 1e-4


def test_exact_rows_are_the_rows_of_the_full_matrix() -> None:
    x = _stacks()[1]
    rows = torch.tensor([3, 0, 17])
    torch.testing.assert_close(_exact_rows(x, rows), pairwise_sq_distances(x)[rows], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(pairwise_sq_distances(x), _direct(x), rtol=1e-9, atol=1e-9)


def _exact_choice(x: torch.Tensor, f: int, keep: int) -> set[int]:
    scores = krum_scores(_direct(x), f)
    return {int(scores.argmin())} if keep == 1 else set(torch.topk(scores, keep, largest=False).indices.tolist())


def _near_pairs(seed: int) -> torch.Tensor:
    """12 random rows, each with a twin 1e-5 away: twins' Krum scores agree to about 1e-6, inside the float32
    bounds (about 1e-5) but far outside float64 rounding, so only the exact path can rank them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 20000, generator=g)
    return torch.cat([base, base + 1e-5 * torch.randn(12, 20000, generator=g)])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 3, 17])
def test_selection_equals_the_exact_one_on_near_ties(seed: int, keep: int) -> None:
    x = _near_pairs(seed)
    chosen = krum_select(x, 5, keep)
    assert len(chosen) == keep and set(chosen.tolist()) == _exact_choice(x, 5, keep)


def test_the_bounds_leave_near_ties_open_and_settle_clear_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    recomputed: list[int] = []
    real = distances._exact_rows

    def spy(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        recomputed.append(x.shape[0] if rows is None else len(rows))
        return real(x, rows)

    monkeypatch.setattr(distances, "_exact_rows", spy)
    g = torch.Generator().manual_seed(0)
    clear = torch.cat([torch.randn(8, 5000, generator=g) * 0.1, torch.randn(3, 5000, generator=g) * 10])
    krum_select(clear, 3, 8)
    assert recomputed == []  # the 8 inliers against 3 far outliers need no exact distance
    krum_select(_near_pairs(0), 5, 17)
    assert recomputed and 2 <= recomputed[0] < 24  # a split pair of twins is open; only open rows are recomputed


def test_exact_tie_picks_the_first_row() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 300, generator=g)
    x[5] = x[2]  # rows 2 and 5 have the same score; give them the best one
    x[[0, 1, 3, 4, 6, 7]] += 3 * torch.randn(6, 300, generator=g)
    assert int(krum_select(x, 1, 1)[0]) == int(krum_scores(pairwise_sq_distances(x), 1).argmin()) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mutual_nearest_neighbours_tie_and_krum_takes_the_first(dtype: torch.dtype) -> None:
    # n = 5, f = 2: Krum counts one neighbour, so two mutual nearest neighbours have the same score, d_14 = d_41.
    # Row 4 falls in GEMM's edge tile, which rounded G_14 and G_41 differently and broke the tie at random.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4810, generator=g) * 0.01 + torch.randn(5, 4810, generator=g) * 0.003
        x[4] = x[1] + 0.002 * torch.randn(4810, generator=g)
        x = x.to(dtype)
        dist = pairwise_sq_distances(x)
        assert bool((dist == dist.T).all())
        assert int(krum_select(x, 2, 1)[0]) == 1


def test_float32_route_stands_down_where_its_bound_does_not_hold() -> None:
    x = torch.randn(10, 400, generator=torch.Generator().manual_seed(2))
    assert _float32_bounds(x.double()) is None
    assert _float32_bounds(x * 1e20) is None  # squared norms overflow float32
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may use bfloat16 products: gamma_c would not hold
        assert _float32_bounds(x) is None
    finally:
        torch.set_float32_matmul_precision(previous)
    for stack in (x.double(), x * 1e20):
        assert set(krum_select(stack, 2, 6).tolist()) == _exact_choice(stack, 2, 6)
