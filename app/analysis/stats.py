"""Confidence intervals over seeds: a t-interval of the mean, and of the mean paired difference.

Seeds are the replicates: a run's seed fixes its federation, attackers, sampling and batches, so two runs with the
same seed and setting differ only in the model compared, and their difference per seed is a paired sample. The
95 % interval is mean ± t(0.975, n - 1) · s / √n with s the sample std (ddof 1), Student's t quantile from SciPy
(installed with scikit-learn). With one seed there is no interval (NaN) and nothing is called significant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of `n` values and its two-sided t-interval [lo, hi] at LEVEL (NaN bounds when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (False without an interval)."""
        return bool(self.lo > 0 or self.hi < 0)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and t-interval of `values` (NaN values dropped)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(student_t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval:
    """t-interval of the mean of a[s] - b[s] over the seeds s present in both (a seed missing on one side, or NaN
    on either, is left out)."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds], level)
