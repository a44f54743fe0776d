"""Laplace and Gaussian mechanisms with explicit sensitivity, and the analytic Gaussian calibration.

A mechanism is its sensitivity and its noise; ``release`` passes the value itself through OpenDP (see ``_noise``),
so the output is exact on OpenDP's grid rather than a floating-point sum. After each release the measurement's own
privacy map (which includes the input's rounding to the grid) is checked against the nominal figure.

The analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8): the Gaussian mechanism with L2 sensitivity
``D`` and noise ``sigma`` is (eps, delta)-DP iff

    delta >= Phi(D / (2 sigma) - eps sigma / D) - e^eps Phi(-D / (2 sigma) - eps sigma / D),

which is exact, so calibrating ``sigma`` by bisection on it gives the smallest sigma for (eps, delta), below the
classical ``sqrt(2 ln(1.25 / delta)) D / eps`` (which is only valid for eps < 1 anyway). It holds for one release;
for many, subsampled rounds use the accountant (``_accounting``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import numpy as np

from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy._errors import PrivacyError
from edgeshield.privacy._noise import check_positive, float_release

_MAP_SLACK = 1e-6  # the grid rounding may add this much (relative) to the privacy loss; it adds far less (2**-40)


def _log_phi(x: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail (where ``erfc`` underflows)."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series: Phi(x) = phi(x)/(-x) * (1 - 1/x^2 + 3/x^4 - 15/x^6 + ...); at x < -30 four terms are exact
    # to double precision.
    x2 = x * x
    series = 1.0 - 1.0 / x2 + 3.0 / x2**2 - 15.0 / x2**3 + 105.0 / x2**4
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def analytic_gaussian_delta(epsilon: float, sigma: float, sensitivity_l2: float = 1.0) -> float:
    """The exact delta at which Gaussian noise ``sigma`` on a query of L2 sensitivity ``sensitivity_l2`` is
    ``epsilon``-DP (Balle & Wang 2018, Theorem 8)."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InvalidArgumentError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    s = check_positive("sigma", sigma)
    d = check_positive("sensitivity_l2", sensitivity_l2)
    a = d / (2.0 * s) - epsilon * s / d
    b = -d / (2.0 * s) - epsilon * s / d
    first = math.exp(_log_phi(a))
    second = math.exp(epsilon + _log_phi(b)) if epsilon + _log_phi(b) > -745.0 else 0.0
    return max(0.0, first - second)


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise InvalidArgumentError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity_l2: float = 1.0) -> float:
    """The smallest noise ``sigma`` for which the Gaussian mechanism is (epsilon, delta)-DP at L2 sensitivity
    ``sensitivity_l2`` (analytic Gaussian mechanism). The bisection returns the upper end of its last bracket, so
    the delta at the returned sigma is at most ``delta``."""
    eps = check_positive("epsilon", epsilon)
    dl = _check_delta(delta)
    d = check_positive("sensitivity_l2", sensitivity_l2)
    lo, hi = d * 1e-3, d  # delta falls as sigma grows: widen until delta(lo) > target >= delta(hi)
    while analytic_gaussian_delta(eps, hi, d) > dl:
        lo, hi = hi, hi * 2.0
    while analytic_gaussian_delta(eps, lo, d) <= dl:
        lo, hi = lo / 2.0, lo
    for _ in range(200):
        if hi / lo - 1.0 < 1e-13:
            break
        mid = math.sqrt(lo * hi)
        if analytic_gaussian_delta(eps, mid, d) > dl:
            lo = mid
        else:
            hi = mid
    return hi


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity_l2: float = 1.0) -> float:
    """The smallest epsilon at which noise ``sigma`` is (epsilon, delta)-DP at L2 sensitivity ``sensitivity_l2``
    (the upper end of the bisection bracket: a valid, not an optimistic, figure)."""
    s = check_positive("sigma", sigma)
    dl = _check_delta(delta)
    d = check_positive("sensitivity_l2", sensitivity_l2)
    if analytic_gaussian_delta(0.0, s, d) <= dl:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(hi, s, d) > dl:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        if hi - lo < 1e-12 * max(1.0, hi):
            break
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, s, d) > dl:
            lo = mid
        else:
            hi = mid
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity_l2: float = 1.0) -> float:
    """The textbook calibration sqrt(2 ln(1.25/delta)) D / eps (Dwork & Roth, Theorem A.1; valid for eps < 1)."""
    return math.sqrt(2.0 * math.log(1.25 / _check_delta(delta))) * check_positive("sensitivity_l2", sensitivity_l2) \
        / check_positive("epsilon", epsilon)


def _as_values(value: object) -> tuple[np.ndarray, bool]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"a release takes a number or a numeric array, got {type(value).__name__}") \
            from None
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError("a release takes finite values: NaN or infinity in the input")
    return arr, arr.ndim == 0


def _checked_loss(actual: float, nominal: float) -> None:
    if not actual <= nominal * (1.0 + _MAP_SLACK):
        raise PrivacyError(f"OpenDP's privacy map gives {actual!r}, above the nominal {nominal!r}: release refused")


@dataclass(frozen=True, slots=True)
class LaplaceMechanism:
    """epsilon-DP release of a value whose L1 sensitivity (largest change from one individual) is
    ``sensitivity_l1``: Laplace noise of scale ``sensitivity_l1 / epsilon`` on every coordinate."""

    sensitivity_l1: float
    epsilon: float

    def __post_init__(self) -> None:
        check_positive("sensitivity_l1", self.sensitivity_l1)
        check_positive("epsilon", self.epsilon)

    @property
    def scale(self) -> float:
        return float(self.sensitivity_l1) / float(self.epsilon)

    def release(self, value: float | np.ndarray) -> float | np.ndarray:
        """``value`` (a number or an array of any shape) plus Laplace noise; a number in, a float out."""
        arr, scalar = _as_values(value)
        out, meas = float_release("laplace", arr.reshape(-1), self.scale)
        _checked_loss(float(meas.map(float(self.sensitivity_l1))), float(self.epsilon))
        return float(out[0]) if scalar else out.reshape(arr.shape)


@dataclass(frozen=True, slots=True)
class GaussianMechanism:
    """Release of a value whose L2 sensitivity is ``sensitivity_l2`` with N(0, sigma^2) noise on every coordinate;
    :meth:`calibrated` picks the smallest sigma for (epsilon, delta) by the analytic Gaussian mechanism."""

    sensitivity_l2: float
    sigma: float

    def __post_init__(self) -> None:
        check_positive("sensitivity_l2", self.sensitivity_l2)
        check_positive("sigma", self.sigma)

    @classmethod
    def calibrated(cls, sensitivity_l2: float, epsilon: float, delta: float) -> Self:
        return cls(sensitivity_l2, analytic_gaussian_sigma(epsilon, delta, sensitivity_l2))

    @property
    def noise_multiplier(self) -> float:
        """sigma / sensitivity: what the accountant takes."""
        return float(self.sigma) / float(self.sensitivity_l2)

    def epsilon(self, delta: float) -> float:
        """The exact epsilon of one release at ``delta`` (analytic Gaussian)."""
        return analytic_gaussian_epsilon(self.sigma, delta, self.sensitivity_l2)

    def delta(self, epsilon: float) -> float:
        return analytic_gaussian_delta(epsilon, self.sigma, self.sensitivity_l2)

    def release(self, value: float | np.ndarray) -> float | np.ndarray:
        """``value`` (a number or an array of any shape) plus Gaussian noise; a number in, a float out."""
        arr, scalar = _as_values(value)
        out, meas = float_release("gaussian", arr.reshape(-1), float(self.sigma))
        rho = float(self.sensitivity_l2) ** 2 / (2.0 * float(self.sigma) ** 2)  # zCDP: OpenDP's measure here
        _checked_loss(float(meas.map(float(self.sensitivity_l2))), rho)
        return float(out[0]) if scalar else out.reshape(arr.shape)
