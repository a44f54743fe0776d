"""edgeshield._stats.shapiro (numpy AS R94) against scipy.stats.shapiro, and its edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield._stats import SHAPIRO_MAX_N, ShapiroWarning, shapiro
from edgeshield.errors import InvalidArgumentError

W_ATOL = 1e-12  # measured worst case over the grid below: 1e-13 (n = 7000)
P_RTOL, P_ATOL = 1e-8, 1e-14  # measured: 1e-10 relative wherever the p-values differ by more than 1e-14

SIZES = [*range(3, 31), 35, 50, 99, 100, 257, 1000, 2000, 4999, SHAPIRO_MAX_N]
DISTRIBUTIONS = {
    "normal": lambda rng, n: rng.normal(size=n),
    "uniform": lambda rng, n: rng.uniform(size=n),
    "student_t2": lambda rng, n: rng.standard_t(2, size=n),
    "cauchy": lambda rng, n: rng.standard_cauchy(n),
    "exponential": lambda rng, n: rng.exponential(size=n),
    "ties": lambda rng, n: rng.integers(0, 4, n).astype(np.float64),
    "large_offset": lambda rng, n: 1e6 + rng.normal(size=n),
    "tiny_scale": lambda rng, n: 1e-12 * rng.normal(size=n),
    "bimodal": lambda rng, n: np.r_[rng.normal(0, 1, n // 2), rng.normal(8, 1, n - n // 2)],
}


def _scipy_shapiro(x):  # type: ignore[no-untyped-def]
    stats = pytest.importorskip("scipy.stats")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats.shapiro(x)


def _assert_agrees(x: np.ndarray) -> None:
    ref = _scipy_shapiro(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShapiroWarning)
        got = shapiro(x)
    assert got.statistic == pytest.approx(float(ref.statistic), rel=0, abs=W_ATOL)
    assert got.pvalue == pytest.approx(float(ref.pvalue), rel=P_RTOL, abs=P_ATOL)


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_agrees_with_scipy_over_sizes_and_distributions(dist):
    rng = np.random.default_rng(sorted(DISTRIBUTIONS).index(dist))
    for n in SIZES:
        for _ in range(3 if n <= 100 else 1):
            _assert_agrees(DISTRIBUTIONS[dist](rng, n))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, -2.5, 3.0])),
                min_size=3, max_size=120))
def test_agrees_with_scipy_on_arbitrary_samples(values):
    x = np.array(values)
    if np.ptp(x) < 1e-12:  # zero range: see test_zero_range (scipy's own verdict is then arbitrary)
        return
    _assert_agrees(x)


def test_order_and_shift_do_not_matter():
    x = np.random.default_rng(1).normal(size=200)
    ref = shapiro(x)
    assert shapiro(x[::-1]) == pytest.approx(ref, abs=1e-13)
    assert shapiro(x * 3 + 1e4) == pytest.approx(ref, abs=1e-9)


def test_shapiro_wilk_1965_example():
    """The weights of 11 men in Shapiro & Wilk (1965), section 5: W = 0.79, significant below the 1 % level."""
    w, p = shapiro([148, 154, 158, 160, 161, 162, 166, 170, 182, 195, 236])
    assert w == pytest.approx(0.79, abs=0.005)
    assert p < 0.01


def test_normal_and_non_normal_are_told_apart():
    rng = np.random.default_rng(2)
    assert shapiro(rng.normal(size=500)).pvalue > 0.01
    assert shapiro(rng.exponential(size=500)).pvalue < 1e-10


def test_three_values_are_exact():
    assert shapiro([1.0, 2.0, 3.0]) == pytest.approx((1.0, 1.0))  # equally spaced: W = 1
    w, p = shapiro([0.0, 0.0, 1.0])  # the least normal three values: W = 0.75, p = 0
    assert w == pytest.approx(0.75) and p == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("values", [[], [1.0], [1.0, 2.0]])
def test_fewer_than_three_values_is_an_error(values):
    # scipy returns NaN with a SmallSampleWarning; a typed error is what EdgeShield callers catch
    with pytest.raises(InvalidArgumentError, match="at least 3"):
        shapiro(values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_error(bad):
    with pytest.raises(InvalidArgumentError, match="finite"):
        shapiro([1.0, 2.0, bad, 4.0])


def test_zero_range_warns_and_answers_like_scipy():
    with pytest.warns(ShapiroWarning, match="zero range"):
        got = shapiro(np.full(10, 7.5))
    assert got == (1.0, 1.0)
    assert tuple(map(float, _scipy_shapiro(np.full(10, 7.5)))) == got


def test_more_than_5000_values_warns_and_still_agrees():
    x = np.random.default_rng(3).normal(size=SHAPIRO_MAX_N + 1000)
    with pytest.warns(ShapiroWarning, match="may not be accurate"):
        shapiro(x)
    _assert_agrees(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shapiro(x[:SHAPIRO_MAX_N])  # no warning at the limit itself

