"""The only sources of privacy noise: OpenDP's vetted samplers, never ``np.random``.

OpenDP 0.16's ``make_laplace`` and ``make_gaussian`` over floats do not compute ``x + noise`` in floating point (the
arithmetic Mironov's attack reads back, CCS 2012): they round the input to the grid ``2**k``, add *discrete* Laplace
or discrete Gaussian noise on that grid with exact integer arithmetic (Canonne, Kamath & Steinke 2020), and return
the exact sum, so every output lies on the grid and every grid point is possible under every input. Their proofs
account for the rounding, so neither needs OpenDP's ``idealized-numerics`` (formerly ``floating-point``) opt-in,
and this module does not enable it. The random bits come from OpenDP's ``fill_bytes`` (the installed wheel links
OpenSSL and draws from ``RAND_bytes``).

A vector is one measurement over a sized vector domain; a long one is cut into chunks sampled on a few threads
(OpenDP releases the GIL), which changes nothing in the distribution: the coordinates are i.i.d.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgeshield.errors import InvalidArgumentError

_GRID_BITS = 40  # the float grid is 2**-40 of the noise scale, finer again for long vectors (see _grid_exponent)
_CHUNK = 16_384
_MAX_THREADS = 4


def _opendp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")  # OpenDP's not-yet-vetted-by-committee constructors; never idealized-numerics
    return dp


def check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise InvalidArgumentError(f"shape must be a tuple of whole numbers >= 0, got {shape!r}")
    return shape


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InvalidArgumentError(f"{name} must be finite and > 0, got {value!r}")
    return v


def _grid_exponent(scale: float, n: int) -> int:
    """``k`` of OpenDP's grid ``2**k``: 40 bits below the scale, and another bit per doubling of the length, so the
    input's rounding (at most half a grid step per coordinate, which OpenDP adds to the sensitivity) stays below
    ``2**-40`` of the scale even summed over the whole vector."""
    return max(-1074, math.floor(math.log2(scale)) - _GRID_BITS - math.ceil(math.log2(max(n, 1))))


def _parallel(sample: Callable[[np.ndarray], list[Any]], flat: np.ndarray) -> list[Any]:
    n = flat.shape[0]
    if n <= _CHUNK:
        return sample(flat)
    parts = [flat[i:i + _CHUNK] for i in range(0, n, _CHUNK)]
    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(parts)))
    out: list[Any] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="dp-noise") as pool:
        for part in pool.map(sample, parts):
            out.extend(part)
    return out


def float_measurement(kind: str, n: int, scale: float, k: int) -> Any:
    """OpenDP's ``make_laplace`` (L1) or ``make_gaussian`` (L2) over float vectors of length ``n`` on grid ``2**k``."""
    dp = _opendp()
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=n)
    if kind == "laplace":
        return dp.m.make_laplace(domain, dp.l1_distance(T=float), scale=scale, k=k)
    return dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale, k=k)


def float_release(kind: str, values: np.ndarray, scale: float) -> tuple[np.ndarray, Any]:
    """``values`` (flat, finite float64) with OpenDP noise; also the measurement over the whole vector, whose
    ``map`` gives the privacy loss with the grid rounding included."""
    n = int(values.shape[0])
    k = _grid_exponent(scale, n)
    whole = float_measurement(kind, max(n, 1), scale, k)
    if n == 0:
        return np.zeros(0, dtype=np.float64), whole

    def sample(part: np.ndarray) -> list[Any]:
        meas = whole if part.shape[0] == n else float_measurement(kind, int(part.shape[0]), scale, k)
        return list(meas(np.ascontiguousarray(part, dtype=np.float64)))

    return np.asarray(_parallel(sample, values), dtype=np.float64), whole


def gaussian_noise(shape: int | tuple[int, ...], sigma: float) -> np.ndarray:
    """I.i.d. N(0, sigma^2) noise (float64) from OpenDP's Gaussian sampler, on the grid ``2**k`` of
    :func:`_grid_exponent`. For a release prefer :meth:`GaussianMechanism.release`, which feeds the value through
    OpenDP: ``value + gaussian_noise(...)`` rounds the sum in floating point, which is what Mironov's attack reads."""
    dims = check_shape(shape)
    s = check_positive("sigma", sigma)
    n = math.prod(dims)
    return float_release("gaussian", np.zeros(n), s)[0].reshape(dims)


def laplace_noise(shape: int | tuple[int, ...], scale: float) -> np.ndarray:
    """I.i.d. Laplace(0, scale) noise (float64) from OpenDP's Laplace measurement (discrete Laplace on a fine grid);
    the same caution about adding it to a float as :func:`gaussian_noise`: prefer :meth:`LaplaceMechanism.release`."""
    dims = check_shape(shape)
    b = check_positive("scale", scale)
    n = math.prod(dims)
    return float_release("laplace", np.zeros(n), b)[0].reshape(dims)


def discrete_gaussian_noise(shape: int | tuple[int, ...], scale: float) -> np.ndarray:
    """I.i.d. discrete Gaussian N_Z(0, scale^2) integers (int64), OpenDP's exact sampler (Canonne, Kamath & Steinke
    2020): the noise shares of distributed DP, added to integer-quantised updates before secure aggregation."""
    dims = check_shape(shape)
    s = check_positive("scale", scale)
    n = math.prod(dims)
    if n == 0:
        return np.zeros(dims, dtype=np.int64)
    dp = _opendp()

    def sample(part: np.ndarray) -> list[Any]:
        domain = dp.vector_domain(dp.atom_domain(T="i64"), size=int(part.shape[0]))
        meas = dp.m.make_gaussian(domain, dp.l2_distance(T="i64"), scale=s)
        return list(meas(np.ascontiguousarray(part, dtype=np.int64)))

    return np.asarray(_parallel(sample, np.zeros(n, dtype=np.int64)), dtype=np.int64).reshape(dims)
