"""Small statistics shared by the detectors and the watermarks, in numpy alone: no scipy on the device path.

scipy would add a 35 MB wheel (143 MB installed) to a 62 MB / 236 MB device install for one test, so the
Shapiro–Wilk test PRADA needs is written here (Royston's algorithm AS R94, the one ``scipy.stats.shapiro`` runs).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np

from edgeshield.errors import InvalidArgumentError

__all__ = ["ShapiroResult", "ShapiroWarning", "binomial_sf", "shapiro"]


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed in log space (lgamma + log-sum-exp): no overflow for any n."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise InvalidArgumentError("binomial_sf needs n >= 0 and 0 <= p <= 1")
    if k <= 0 or p == 1.0:
        return 1.0
    if k > n or p == 0.0:
        return 0.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms: list[float] = []
    top = -math.inf
    for i in range(k, n + 1):
        t = ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        terms.append(t)
        top = max(top, t)
        if i > n * p and t < top - 50:  # past the mode the terms fall geometrically: the rest is < e^-50 * sqrt(n)
            break
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


# --- Shapiro–Wilk W test: Royston, "Remark AS R94", Applied Statistics 44 (1995) 547-551 ------------------------
# Coefficients from the paper; each polynomial is c[0] + c[1]·x + c[2]·x² + ….
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)  # a_n in 1/sqrt(n)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)  # a_(n-1) in 1/sqrt(n)
_C3 = (0.5440, -0.39978, 0.025054, -6.714e-4)  # n <= 11: mean of -log(gamma - log(1 - W)), in n
_C4 = (1.3822, -0.77857, 0.062767, -0.0020322)  # n <= 11: log sd, in n
_C5 = (-1.5861, -0.31082, -0.083751, 0.0038915)  # n >= 12: mean of log(1 - W), in log n
_C6 = (-0.4803, -0.082676, 0.0030302)  # n >= 12: log sd, in log n
_G = (-2.273, 0.459)  # n <= 11: gamma, in n
_SMALL = 1e-19  # AS R94's floor for the range and for the smallest p-value it reports
SHAPIRO_MAX_N = 5000  # the p-value approximation is fitted up to here


class ShapiroResult(NamedTuple):
    statistic: float
    pvalue: float


class ShapiroWarning(UserWarning):
    """A Shapiro–Wilk result that may be inaccurate (n > 5000, or a sample of zero range)."""


def _poly(c: tuple[float, ...], x: float) -> float:
    out = 0.0
    for coef in reversed(c[1:]):
        out = (out + coef) * x
    return c[0] + out


def _ppnd(p: np.ndarray) -> np.ndarray:
    """Normal quantiles by AS 111 (Beasley & Springer 1977), as AS R94 computes its expected order statistics."""
    q = p - 0.5
    r = q * q
    central = q * (((-25.44106049637 * r + 41.39119773534) * r - 18.61500062529) * r + 2.50662823884) / (
        (((3.13082909833 * r - 21.06224101826) * r + 23.08336743743) * r - 8.47351093090) * r + 1.0)
    t = np.sqrt(-np.log(np.minimum(p, 1.0 - p)))
    tail = (((2.32121276858 * t + 4.85014127135) * t - 2.29796479134) * t - 2.78718931138) / (
        (1.63706781897 * t + 3.54388924762) * t + 1.0)
    return np.where(np.abs(q) <= 0.42, central, np.where(q < 0, -tail, tail))


def _alnorm_upper(z: float) -> float:
    """Upper normal tail ``P(Z > z)`` by AS 66 (Hill 1973, with its 2001 range extension), as in AS R94."""
    upper = z > 0
    z = abs(z) if not math.isnan(z) else z
    if not (z <= 7.0 or (upper and z <= 38.0)):
        return 0.0 if upper else 1.0
    y = 0.5 * z * z
    if z <= 1.28:
        tail = 0.5 - z * (0.398942280444 - 0.399903438504 * y / (
            y + 5.75885480458 - 29.8213557808 / (y + 2.62433121679 + 48.6959930692 / (y + 5.92885724438))))
    else:
        tail = 0.398942280385 * math.exp(-y) / (z - 3.8052e-8 + 1.00000615302 / (
            z + 3.98064794e-4 + 1.98615381364 / (z - 0.151679116635 + 5.29330324926 / (
                z + 4.8385912808 - 15.1508972451 / (z + 0.742380924027 + 30.789933034 / (z + 3.99019417011))))))
    return tail if upper else 1.0 - tail


@functools.lru_cache(maxsize=32)
def _shapiro_weights(n: int) -> np.ndarray:
    """The antisymmetric W weights for a sorted sample of n (ascending; a zero in the middle when n is odd)."""
    half = n // 2
    if n == 3:
        a = np.array([math.sqrt(0.5)])
    else:
        m = _ppnd((np.arange(1, half + 1) - 0.375) / (n + 0.25))  # expected normal order statistics, lower half
        summ2 = 2.0 * float(np.sum(m * m))
        ssumm2 = math.sqrt(summ2)
        rsn = 1.0 / math.sqrt(n)
        a = -m
        a1 = _poly(_C1, rsn) - m[0] / ssumm2
        if n > 5:
            a2 = _poly(_C2, rsn) - m[1] / ssumm2
            fac = math.sqrt((summ2 - 2 * m[0] ** 2 - 2 * m[1] ** 2) / (1 - 2 * a1**2 - 2 * a2**2))
            a = a / fac
            a[1] = a2
        else:
            fac = math.sqrt((summ2 - 2 * m[0] ** 2) / (1 - 2 * a1**2))
            a = a / fac
        a[0] = a1
    weights = np.zeros(n)
    weights[:half] = -a
    weights[n - half:] = a[::-1]
    weights.flags.writeable = False
    return weights


def shapiro(values: np.ndarray) -> ShapiroResult:
    """Shapiro–Wilk test of normality: ``(W, p-value)``, agreeing with ``scipy.stats.shapiro``.

    Needs n >= 3 finite values (else ``InvalidArgumentError``; scipy returns NaN). As scipy does, warns
    (``ShapiroWarning``) when n > 5000, where W is exact but the p-value approximation was not fitted, and when the
    sample has zero range, for which it returns ``(1.0, 1.0)``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n < 3:
        raise InvalidArgumentError(f"the Shapiro–Wilk test needs at least 3 values, got {n}")
    if not np.isfinite(x).all():
        raise InvalidArgumentError("the Shapiro–Wilk test needs finite values (no NaN or infinity)")
    if n > SHAPIRO_MAX_N:
        warnings.warn(f"Shapiro–Wilk: for n > {SHAPIRO_MAX_N} the p-value may not be accurate (n = {n})",
                      ShapiroWarning, stacklevel=2)
    y = np.sort(x)
    y -= y[n // 2]  # centred on a sample value: the sums below then lose no precision to a large offset
    spread = float(y[-1] - y[0])
    if spread < _SMALL:
        warnings.warn("Shapiro–Wilk: the sample has zero range; W and p are meaningless", ShapiroWarning,
                      stacklevel=2)
        return ShapiroResult(1.0, 1.0)
    a = _shapiro_weights(n)
    xs = y / spread
    da, dx = a - a.mean(), xs - xs.mean()
    ssa, ssx, sax = float(np.dot(da, da)), float(np.dot(dx, dx)), float(np.dot(da, dx))
    root = math.sqrt(ssa * ssx)
    w1 = (root - sax) * (root + sax) / (ssa * ssx)  # 1 - W, computed without cancellation
    w = 1.0 - w1
    if n == 3:  # exact: W >= 0.75 in theory; rounding may dip below it
        if w < 0.75:
            return ShapiroResult(0.75, 0.0)
        return ShapiroResult(w, max(0.0, 1.0 - 6.0 / math.pi * math.acos(math.sqrt(min(w, 1.0)))))
    if w1 <= 0.0:  # a sample on the weights' own line, to rounding: as normal as it gets
        return ShapiroResult(w, 1.0)
    ly = math.log(w1)
    if n <= 11:
        gamma = _poly(_G, n)
        if ly >= gamma:
            return ShapiroResult(w, _SMALL)
        ly = -math.log(gamma - ly)
        mean, sd = _poly(_C3, n), math.exp(_poly(_C4, n))
    else:
        ln = math.log(n)
        mean, sd = _poly(_C5, ln), math.exp(_poly(_C6, ln))
    return ShapiroResult(w, _alnorm_upper((ly - mean) / sd))
