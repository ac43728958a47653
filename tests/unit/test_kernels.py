"""The compiled kernels against their numpy paths and definitions, and the fallback where they cannot be built."""

from __future__ import annotations

import itertools
import logging
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.rules import distances, kernels
from strategies.rules.common import by_column_blocks
from strategies.rules.coordinate import row_means_closest_to_median
from strategies.rules.selection import _bulyan_coordinates, bulyan, krum, multikrum

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler here: the numpy path is used")


@pytest.fixture
def rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """library() rebuilt from scratch in an empty cache, and the cached one restored afterwards."""
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    kernels.library.cache_clear()


@pytest.mark.parametrize("n", range(1, 13))
def test_the_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    """The 0-1 principle: a comparator network that sorts every 0-1 sequence sorts every sequence."""
    pairs = kernels.sorting_network(n)
    values = np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int8).T  # n x 2^n, one input per column
    for i, j in pairs:
        values[i], values[j] = np.minimum(values[i], values[j]), np.maximum(values[i], values[j])
    assert (np.diff(values, axis=0) >= 0).all()


@pytest.mark.parametrize("n", [13, 17, 28, 33, 52, 64, 65, 100])
def test_the_sorting_network_sorts_random_values(n: int) -> None:
    values = np.random.default_rng(n).integers(-3, 4, size=(n, 500))
    for i, j in kernels.sorting_network(n):
        values[i], values[j] = np.minimum(values[i], values[j]), np.maximum(values[i], values[j])
    np.testing.assert_array_equal(values, np.sort(values, axis=0))


def _numpy_path(x: torch.Tensor, chosen: torch.Tensor, beta: int) -> torch.Tensor:
    return by_column_blocks(x, partial(row_means_closest_to_median, beta=beta), rows=chosen)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), theta=st.integers(1, 40), data=st.data(), spread=st.sampled_from([1, 2, 1000]))
def test_the_kernel_equals_the_numpy_path_bit_for_bit_with_ties(
    seed: int, theta: int, data: st.DataObject, spread: int
) -> None:
    """Integer-valued float32 stacks: ties at m - r and m + r, duplicates, equal windows; the kernel hands those
    columns to the numpy path, the rest it averages itself, and every coordinate equals the numpy path's."""
    beta = data.draw(st.integers(1, theta))
    rng = np.random.default_rng(seed)
    d = data.draw(st.integers(1, 300))
    x = torch.from_numpy(rng.integers(-spread, spread + 1, size=(theta + 2, d)).astype(np.float32))
    chosen = torch.from_numpy(rng.permutation(theta + 2)[:theta])
    original = x.clone()
    assert torch.equal(_bulyan_coordinates(x, chosen, beta), _numpy_path(x, chosen, beta))
    assert torch.equal(x, original)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("theta", "beta"), [(28, 6), (52, 4), (7, 7), (3, 1), (64, 20)])
def test_the_kernel_equals_the_numpy_path_on_real_valued_stacks(dtype: torch.dtype, theta: int, beta: int) -> None:
    """Across several column ranges (the pool's), rows of magnitudes 1e-3 to 1e3: bit for bit (both sum the window
    one value after another in sorted order, in float64)."""
    g = torch.Generator().manual_seed(theta * beta)
    x = (
        torch.randn(theta + 5, 70_001, generator=g, dtype=dtype)
        * torch.logspace(-3, 3, theta + 5, dtype=dtype)[:, None]
    )
    chosen = torch.randperm(theta + 5, generator=g)[:theta]
    got, expected = _bulyan_coordinates(x, chosen, beta), _numpy_path(x, chosen, beta)
    assert torch.equal(got, expected) and not torch.equal(got, torch.zeros_like(got))


def test_without_a_compiler_the_numpy_path_gives_the_same_bulyan(
    rebuilt, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.randn(23, 5000, generator=torch.Generator().manual_seed(3))
    with_kernel = bulyan(x, torch.ones(23), 5)
    kernels.library.cache_clear()
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(rebuilt / "empty"))
    monkeypatch.setenv("CC", str(rebuilt / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="strategies.rules.kernels"):
        assert kernels.library() is None
    assert "no-such-compiler" in caplog.text and "torch and numpy" in caplog.text
    assert not list((rebuilt / "empty").rglob("*.so"))
    assert torch.equal(bulyan(x, torch.ones(23), 5), with_kernel)


def test_ditto_kernels_0_turns_them_off(rebuilt, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITTO_KERNELS", "0")
    assert kernels.library() is None
    with pytest.raises(RuntimeError, match="library"):
        kernels.bulyan_coordinates(np.zeros((3, 4), dtype=np.float32), np.arange(3), 1, 0, 4)


@needs_kernels
def test_the_library_is_built_once_into_its_cache_and_reused(rebuilt) -> None:
    assert kernels.library() is not None
    (built,) = rebuilt.rglob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    kernels.library.cache_clear()
    assert kernels.library() is not None
    assert built.stat().st_mtime_ns == stamp and list(rebuilt.rglob("*.so")) == [built]


def test_a_non_contiguous_stack_takes_the_numpy_path() -> None:
    """The kernel reads rows d apart; a transposed view is not that layout and must not be read as if it were."""
    x = torch.randn(400, 9, generator=torch.Generator().manual_seed(1)).T  # 9 x 400, column-major
    chosen = torch.tensor([0, 2, 3, 5, 6, 8])
    assert torch.equal(_bulyan_coordinates(x, chosen, 2), _numpy_path(x.contiguous(), chosen, 2))


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "library", lambda: None)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize(
    ("n", "d", "rows"), [(9, 1, [0]), (12, 3000, [4, 0, 11]), (30, 5121, []), (5, 2048, [1, 1]), (13, 777, None)]
)
def test_float64_grams_agree_with_the_torch_pass_within_the_bound(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, centred: bool, n: int, d: int, rows: list[int] | None
) -> None:
    """`gram_rows` (a few rows) and `gram_f64` (rows=None: all, symmetric) against torch's float64 blocks. Both sides
    are float64 sums of the same exact products in different orders, each within gamma_d of sum |y_ik y_jk| of the
    exact value, so within 2 gamma_d of each other; partial blocks (1024 and 256 columns) and row tiles (4) included.
    """
    g = torch.Generator().manual_seed(n * d)
    x = torch.randn(n, d, generator=g, dtype=dtype) * torch.logspace(-4, 4, n, dtype=dtype)[:, None]
    benign = torch.tensor([1, 2, 3]) if centred else None
    index = None if rows is None else torch.tensor(rows, dtype=torch.long)
    gram, sq, gamma = distances._float64_gram(x, benign, index)
    _torch_path(monkeypatch)
    ref_gram, ref_sq, ref_gamma = distances._float64_gram(x, benign, index)
    index = torch.arange(n) if index is None else index
    assert gamma == ref_gamma and gram.shape == (len(index), n)
    y = x.double() - (0 if benign is None else x[benign].mean(dim=0).double())
    norms = y.norm(dim=1)
    assert bool(((sq - ref_sq).abs() <= 2 * gamma * norms**2).all())
    assert bool(((gram - ref_gram).abs() <= 2 * gamma * norms[index, None] * norms[None, :]).all())
    if rows is None:
        assert torch.equal(gram, gram.T)


@needs_kernels
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize(("n", "d"), [(1, 5), (6, 511), (13, 1537), (40, 4096)])
def test_the_float32_gram_is_symmetric_and_within_its_bound_of_the_exact_one(centred: bool, n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None]
    benign = torch.arange(min(n, 3)) if centred else None
    gram, sq, gamma = distances._float32_gram(x, benign)
    y = x - x[benign].mean(dim=0) if centred else x  # fl32(x - c): the rows the bound is about
    exact = y.double() @ y.double().T
    absolute = y.double().abs() @ y.double().abs().T
    assert torch.equal(gram, gram.T) and torch.equal(sq, gram.diagonal())
    assert bool(((gram - exact).abs() <= gamma * absolute + 4 * d * 2.0**-126).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(7, 16),
    d=st.sampled_from([3, 1500, 4099]),
    huge=st.sampled_from([1.0, 1e8, 1e12]),
    ties=st.booleans(),
)
def test_selections_are_the_same_with_and_without_the_kernels(
    monkeypatch: pytest.MonkeyPatch, seed: int, n: int, d: int, huge: float, ties: bool
) -> None:
    """Krum, Multi-Krum and Bulyan choose the brute-force float64 rows on either path, so the two agree: also with
    huge rows (the level-2 pass the kernel does) and integer-valued ties. (monkeypatch.context undoes the torch
    path within each example.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float() if ties else torch.randn(n, d, generator=g)
    f = (n - 3) // 4
    x[torch.randperm(n, generator=g)[:f]] *= huge
    rules = {"krum": krum, "multikrum": multikrum, "bulyan": bulyan}
    with monkeypatch.context() as patch:
        patch.setattr(distances, "_U32", 2.0**-12)  # loose float32 bounds (still bounds): most rows go to level 2
        with_kernels = {name: rule(x, torch.ones(n), f) for name, rule in rules.items()}
        _torch_path(patch)
        for name, rule in rules.items():
            assert torch.equal(rule(x, torch.ones(n), f), with_kernels[name]), name


@needs_kernels
def test_the_float32_gram_holds_its_bound_where_every_addition_rounds_the_same_way() -> None:
    """Rows of 1 and of 1 + 2^-20: every float32 lane addition rounds up by nearly half an ulp, the worst case the
    bound is for (about 8u here); the result stays within the documented gamma_32 + gamma_N."""
    x = np.ones((6, 3 * kernels.GRAM_BLOCK + 100), dtype=np.float32)
    x[1::2] = np.float32(1 + 2.0**-20)
    d = x.shape[1]
    gram, sums = kernels.gram_f32(x, None)
    assert sums == 16 * -(-d // kernels.GRAM_BLOCK)
    terms = kernels.GRAM_LANE_TERMS
    gamma = terms * 2.0**-24 / (1 - terms * 2.0**-24) + sums * 2.0**-53 / (1 - sums * 2.0**-53)
    exact = x.astype(np.float64) @ x.astype(np.float64).T  # float32 products are exact in float64
    error = np.abs(gram - exact) / exact  # all entries positive: exact = sum |y_ik y_jk|
    assert error.max() <= gamma
    assert error.max() > 4 * 2.0**-24  # the input does round one way: a bound for 4 products per lane would fail


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_rows_are_symmetric_bit_for_bit_across_parallel_ranges(dtype: type) -> None:
    """Several column ranges summed on the pool: d_ij = d_ji exactly, any subset of rows gives the same entries,
    and the values are the brute-force distances to float64 rounding."""
    x = np.random.default_rng(5).standard_normal((6, 2 * kernels.DIRECT_RANGE + 300)).astype(dtype)
    x[2] *= 1e6
    full = kernels.direct_rows(x, np.arange(6))
    assert (full == full.T).all() and (np.diag(full) == 0).all()
    np.testing.assert_array_equal(kernels.direct_rows(x, np.array([4, 1])), full[[4, 1]])
    y = x.astype(np.float64)
    exact = ((y[:, None, :] - y[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(full, exact, rtol=1e-13, atol=0)


@needs_kernels
def test_the_grams_split_over_threads_agree_with_one_thread_within_their_bounds() -> None:
    """Column ranges on the pool, partial Grams summed in order: the float64 term count grows by the ranges' partial
    blocks, and every entry stays within the bound of the single-thread value (both are within it of the exact)."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((7, 3 * 16 * 1024 + 333)) * np.logspace(-2, 2, 7)[:, None]).astype(np.float32)
    centre = x[:3].mean(axis=0)
    d = x.shape[1]
    assert len(kernels._column_ranges(d, 3, kernels.GRAM_BLOCK)) == 3
    one, terms_one = kernels.gram_f32(x, centre, threads=1)
    three, terms_three = kernels.gram_f32(x, centre, threads=3)
    assert terms_one == 16 * -(-d // kernels.GRAM_BLOCK) and terms_one <= terms_three <= terms_one + 3 * 16
    y = (x - centre).astype(np.float64)
    absolute = np.abs(y) @ np.abs(y).T
    gamma32 = 32 * 2.0**-24 / (1 - 32 * 2.0**-24) + terms_three * 2.0**-53 / (1 - terms_three * 2.0**-53)
    assert (np.abs(three - one) <= 2 * gamma32 * absolute).all() and (three == three.T).all()
    gamma64 = (d + 8) * 2.0**-53 / (1 - (d + 8) * 2.0**-53)
    assert (
        np.abs(kernels.gram_f64(x, centre, threads=3) - kernels.gram_f64(x, centre, threads=1))
        <= 2 * gamma64 * absolute
    ).all()
    rows = np.array([5, 0])
    (g1, s1), (g3, s3) = kernels.gram_rows(x, centre, rows, threads=1), kernels.gram_rows(x, centre, rows, threads=3)
    assert (np.abs(g3 - g1) <= 2 * gamma64 * absolute[rows]).all()
    assert (np.abs(s3 - s1) <= 2 * gamma64 * np.diag(absolute)).all()


@needs_kernels
@pytest.mark.parametrize(("theta", "beta"), [(28, 6), (9, 1), (8, 8), (1, 1)])
def test_the_kernels_own_means_are_the_definition(theta: int, beta: int) -> None:
    """Without ties (float64 values from a continuous distribution) the kernel averages every column itself: none
    is flagged for the numpy path, and each mean is that of the beta values closest to the median, summed in
    sorted order."""
    x = np.random.default_rng(theta).standard_normal((theta + 3, 5000))
    rows = np.arange(3, theta + 3)
    means, tied = kernels.bulyan_coordinates(x, rows, beta, 0, 5000)
    assert not tied.any()
    values = x[rows].T
    med = np.median(values, axis=1, keepdims=True)
    closest = np.sort(np.take_along_axis(values, np.argsort(np.abs(values - med), axis=1)[:, :beta], axis=1), axis=1)
    np.testing.assert_array_equal(means, np.cumsum(closest, axis=1)[:, -1] / beta)


@needs_kernels
def test_the_wrappers_refuse_what_the_c_code_would_misread() -> None:
    x = np.zeros((5, 40), dtype=np.float32)
    for bad in (x.astype(np.float16), x.T, x[:, ::2], np.zeros((0, 3), dtype=np.float32), np.zeros(7, np.float32)):
        with pytest.raises(ValueError, match="C-contiguous 2-d"):
            kernels.gram_rows(bad, None, np.array([0]))
    with pytest.raises(ValueError, match="float32"):
        kernels.gram_f32(x.astype(np.float64), None)
    with pytest.raises(ValueError, match="row indices"):
        kernels.direct_rows(x, np.array([5]))
    with pytest.raises(ValueError, match="row indices"):
        kernels.gram_rows(x, None, np.array([-1]))
    with pytest.raises(ValueError, match="centre needs 40"):
        kernels.gram_f64(x, np.zeros(39, dtype=np.float32))
    for beta, begin, end in ((0, 0, 40), (4, 0, 40), (1, 10, 5), (1, 0, 41)):
        with pytest.raises(ValueError, match="beta"):
            kernels.bulyan_coordinates(x, np.array([0, 1, 2]), beta, begin, end)
    with pytest.raises(ValueError, match="MiB"):
        kernels.gram_f32(np.zeros((3000, 4), dtype=np.float32), None)


def test_a_stack_too_large_for_the_lanes_takes_torchs_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 n^2 bytes of float64 lanes per column range: past LANES_BUDGET the Grams come from torch, alike."""
    x = torch.randn(23, 3000, generator=torch.Generator().manual_seed(4))
    expected = {rule.__name__: rule(x, torch.ones(23), 5) for rule in (krum, bulyan)}
    monkeypatch.setattr(kernels, "LANES_BUDGET", 64 * 20**2)
    assert not kernels.gram_fits(23) and kernels.gram_fits(20)
    for rule in (krum, bulyan):
        assert torch.equal(rule(x, torch.ones(23), 5), expected[rule.__name__])


def test_selections_work_on_stacks_that_require_grad() -> None:
    x = torch.randn(11, 300, generator=torch.Generator().manual_seed(2)).requires_grad_()
    for rule in (krum, multikrum, bulyan):
        assert torch.equal(rule(x, torch.ones(11), 2), rule(x.detach(), torch.ones(11), 2))
