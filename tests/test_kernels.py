"""The compiled kernels against their numpy paths and definitions, and the fallback where they cannot be built."""

from __future__ import annotations

import itertools
import logging
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import aggregators, kernels
from strategies.aggregators import _bulyan_coordinates, _by_column_blocks, _row_means_closest_to_median, bulyan

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
    return _by_column_blocks(x, partial(_row_means_closest_to_median, beta=beta), rows=chosen)


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
    """Across several column ranges (the pool's); float32 bit for bit (the float64 window sums are exact),
    float64 to the rounding of a sum of beta terms (numpy sums in another order)."""
    g = torch.Generator().manual_seed(theta * beta)
    x = (
        torch.randn(theta + 5, 70_001, generator=g, dtype=dtype)
        * torch.logspace(-3, 3, theta + 5, dtype=dtype)[:, None]
    )
    chosen = torch.randperm(theta + 5, generator=g)[:theta]
    got, expected = _bulyan_coordinates(x, chosen, beta), _numpy_path(x, chosen, beta)
    if dtype == torch.float32:
        assert torch.equal(got, expected)
    else:
        scale = x[chosen].abs().amax(dim=0)  # each sum of beta terms rounds by at most beta u of its largest term
        assert bool(((got - expected).abs() <= 2 * beta * 2.0**-53 * scale).all())
        assert not torch.equal(got, torch.zeros_like(got))


def test_without_a_compiler_the_numpy_path_gives_the_same_bulyan(
    rebuilt, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.randn(23, 5000, generator=torch.Generator().manual_seed(3))
    with_kernel = bulyan(x, torch.ones(23), 5)
    kernels.library.cache_clear()
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(rebuilt / "empty"))
    monkeypatch.setenv("CC", str(rebuilt / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="strategies.kernels"):
        assert kernels.library() is None
    assert "no-such-compiler" in caplog.text and "numpy path" in caplog.text
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
    assert torch.equal(aggregators._bulyan_coordinates(x, chosen, 2), _numpy_path(x.contiguous(), chosen, 2))
