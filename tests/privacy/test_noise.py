"""The noise sources: OpenDP's samplers, vectorised, with the right law, shape and dtype; bad arguments refused."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy import discrete_gaussian_noise, gaussian_noise, laplace_noise
from edgeshield.privacy._noise import _grid_exponent

N = 40_000  # more than two chunks: the threaded path


def _within(value: float, expected: float, se: float) -> None:
    assert abs(value - expected) < 6 * se, (value, expected, se)  # six standard errors: fails ~1e-9 of the time


def test_gaussian_moments_shape_and_grid() -> None:
    x = gaussian_noise((200, 200), 2.5)
    assert x.shape == (200, 200) and x.dtype == np.float64
    flat = x.reshape(-1)
    _within(float(flat.mean()), 0.0, 2.5 / math.sqrt(flat.size))
    _within(float(flat.std()), 2.5, 2.5 / math.sqrt(2 * flat.size))
    k = _grid_exponent(2.5, flat.size)
    scaled = np.ldexp(flat, -k)
    assert np.all(scaled == np.floor(scaled))  # every output on OpenDP's grid 2**k: exact, not a float sum
    assert len(np.unique(flat)) > 0.99 * flat.size  # chunks are independent draws, not copies


def test_laplace_moments() -> None:
    x = laplace_noise(N, 0.5)
    assert x.shape == (N,) and x.dtype == np.float64
    _within(float(x.mean()), 0.0, 0.5 * math.sqrt(2) / math.sqrt(N))
    _within(float(np.abs(x).mean()), 0.5, 0.5 / math.sqrt(N))  # E|X| = b, sd of |X| = b
    # the tail: P(X > 2b) = exp(-2) / 2
    p = math.exp(-2) / 2
    _within(float((x > 1.0).mean()), p, math.sqrt(p * (1 - p) / N))


def test_discrete_gaussian_is_integer_with_the_right_variance() -> None:
    x = discrete_gaussian_noise((N,), 4.0)
    assert x.dtype == np.int64 and x.shape == (N,)
    _within(float(x.mean()), 0.0, 4.0 / math.sqrt(N))
    _within(float(x.var()), 16.0, 16.0 * math.sqrt(2 / N))  # N_Z(0, 16) has variance within 1e-10 of 16


def test_empty_and_scalar_shapes() -> None:
    assert gaussian_noise((0,), 1.0).shape == (0,)
    assert laplace_noise((3, 0), 1.0).shape == (3, 0)
    assert discrete_gaussian_noise((), 1.0).shape == ()
    assert gaussian_noise(5, 1.0).shape == (5,)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, "1", None, True])
def test_bad_scale_refused(bad: object) -> None:
    for f in (gaussian_noise, laplace_noise, discrete_gaussian_noise):
        with pytest.raises(InvalidArgumentError):
            f((3,), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [(-1,), (2.0,), [3], "3", (True,)])
def test_bad_shape_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        gaussian_noise(bad, 1.0)  # type: ignore[arg-type]


def test_ten_thousand_draws_are_quick() -> None:
    gaussian_noise(1, 1.0)  # load OpenDP
    start = time.perf_counter()
    gaussian_noise((10_000,), 1.0)
    laplace_noise((10_000,), 1.0)
    assert time.perf_counter() - start < 5.0  # ~0.2 s on an idle core; generous for a loaded CI machine
