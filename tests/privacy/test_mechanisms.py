"""Laplace and Gaussian mechanisms; the analytic Gaussian calibration checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy import (
    GaussianMechanism,
    LaplaceMechanism,
    analytic_gaussian_delta,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
)


def _hockey_stick(epsilon: float, sigma: float, sensitivity: float) -> float:
    """delta(eps) = integral of max(0, p(x) - e^eps q(x)) for p = N(0, s^2), q = N(D, s^2), by quadrature: the
    definition, computed without the closed form."""
    x = np.linspace(-40 * sigma - 10 * sensitivity, 40 * sigma + 10 * sensitivity, 2_000_001)
    p = np.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    q = np.exp(-((x - sensitivity) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    return float(np.trapezoid(np.maximum(0.0, p - math.exp(epsilon) * q), x))


@pytest.mark.parametrize(("epsilon", "sigma", "sensitivity"), [(0.5, 2.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.8, 1.0),
                                                               (0.1, 10.0, 2.0), (4.0, 0.5, 1.0)])
def test_delta_closed_form_matches_the_definition(epsilon: float, sigma: float, sensitivity: float) -> None:
    closed = analytic_gaussian_delta(epsilon, sigma, sensitivity)
    assert closed == pytest.approx(_hockey_stick(epsilon, sigma, sensitivity), rel=1e-6, abs=1e-12)


def test_delta_at_fixed_points() -> None:
    # eps = 0: delta is the total variation distance, 2 Phi(D / (2 sigma)) - 1 = erf(D / (2 sqrt(2) sigma))
    assert analytic_gaussian_delta(0.0, 1.0, 1.0) == pytest.approx(math.erf(1 / (2 * math.sqrt(2))), rel=1e-12)
    # sigma = D = 1, eps = 1: Phi(-1/2) - e Phi(-3/2), by hand from the standard normal table
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    assert analytic_gaussian_delta(1.0, 1.0, 1.0) == pytest.approx(phi(-0.5) - math.e * phi(-1.5), rel=1e-12)
    assert analytic_gaussian_delta(1.0, 1.0, 1.0) == pytest.approx(0.126936, abs=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-9])
def test_sigma_matches_dp_accounting_and_meets_delta(epsilon: float, delta: float) -> None:
    from dp_accounting import get_sigma_gaussian

    sigma = analytic_gaussian_sigma(epsilon, delta, 1.0)
    assert sigma == pytest.approx(get_sigma_gaussian(epsilon, delta), rel=1e-8)
    assert analytic_gaussian_delta(epsilon, sigma, 1.0) <= delta  # the returned sigma is on the safe side
    assert analytic_gaussian_delta(epsilon, sigma * (1 - 1e-6), 1.0) > delta  # and not more than it needs
    assert analytic_gaussian_sigma(epsilon, delta, 3.0) == pytest.approx(3.0 * sigma, rel=1e-9)  # linear in D
    assert analytic_gaussian_epsilon(sigma, delta, 1.0) == pytest.approx(epsilon, rel=1e-6)


@pytest.mark.parametrize("epsilon", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_analytic_below_classical_for_eps_below_one(epsilon: float, delta: float) -> None:
    analytic = analytic_gaussian_sigma(epsilon, delta, 1.0)
    classical = classical_gaussian_sigma(epsilon, delta, 1.0)
    assert classical == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
    assert analytic < classical
    assert analytic_gaussian_delta(epsilon, classical, 1.0) < delta  # the classical sigma is valid, just loose


def test_gaussian_mechanism_release() -> None:
    mech = GaussianMechanism.calibrated(2.0, 1.0, 1e-5)
    assert mech.sigma == pytest.approx(analytic_gaussian_sigma(1.0, 1e-5, 2.0))
    assert mech.noise_multiplier == pytest.approx(mech.sigma / 2.0)
    assert mech.epsilon(1e-5) == pytest.approx(1.0, rel=1e-6)
    out = mech.release(np.full((100, 100), 5.0))
    assert isinstance(out, np.ndarray) and out.shape == (100, 100)
    assert abs(float(out.mean()) - 5.0) < 6 * mech.sigma / 100
    assert float(out.std()) == pytest.approx(mech.sigma, rel=0.05)
    scalar = mech.release(3)
    assert isinstance(scalar, float)


def test_laplace_mechanism_release() -> None:
    mech = LaplaceMechanism(sensitivity_l1=2.0, epsilon=0.5)
    assert mech.scale == 4.0
    out = mech.release(np.arange(20_000, dtype=np.float64).reshape(100, 200))
    assert isinstance(out, np.ndarray) and out.shape == (100, 200)
    noise = out - np.arange(20_000).reshape(100, 200)
    assert float(np.abs(noise).mean()) == pytest.approx(4.0, rel=0.05)
    assert isinstance(mech.release(1.5), float)


@pytest.mark.parametrize("value", [math.nan, [1.0, math.inf], "text", [[1.0], [2.0, 3.0]]])
def test_release_refuses_bad_values(value: object) -> None:
    with pytest.raises(InvalidArgumentError):
        LaplaceMechanism(1.0, 1.0).release(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        GaussianMechanism(1.0, 1.0).release(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "cls"), [((0.0, 1.0), LaplaceMechanism), ((1.0, -1.0), LaplaceMechanism),
                                           ((1.0, math.inf), GaussianMechanism), ((math.nan, 1.0), GaussianMechanism)])
def test_mechanisms_refuse_bad_parameters(args: tuple[float, float], cls: type) -> None:
    with pytest.raises(InvalidArgumentError):
        cls(*args)


@pytest.mark.parametrize(("epsilon", "delta"), [(0.0, 1e-5), (1.0, 0.0), (1.0, 1.0), (-1.0, 1e-5), (1.0, math.nan)])
def test_calibration_refuses_bad_parameters(epsilon: float, delta: float) -> None:
    with pytest.raises(InvalidArgumentError):
        analytic_gaussian_sigma(epsilon, delta)
