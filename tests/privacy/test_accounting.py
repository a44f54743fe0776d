"""The accountant (dp-accounting, RDP and PLD) against an independent one (Opacus' RDP and PRV accountants).

Tolerances, from the measured gaps over this grid (dp-accounting 0.6.0, Opacus 1.6.0):
- RDP vs Opacus RDP: within 1 % relative (measured <= 0.33 %: the two use slightly different sets of orders);
- PLD vs Opacus PRV: within 0.02 absolute (measured 0.0098-0.0108: Opacus reports the PRV estimate plus its
  ``eps_error`` of 0.01, so its figure sits that much above the PLD one);
- the inverse: our noise multiplier within 0.5 % (RDP; measured <= 0.11 %) and 2.5 % (PLD vs PRV; measured
  0.14-1.9 %) of Opacus' ``get_noise_multiplier``, and Opacus' own accountant confirms it meets the target.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy import EpsilonReport, epsilon_for, noise_multiplier_for
from edgeshield.privacy._accounting import history_epsilon

DELTA = 1e-5
GRID = [(0.8, 1.0, 5), (1.0, 0.01, 1000), (1.1, 0.1, 100), (1.0, 0.001, 10000)]
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # Opacus' PRV takes log(0) at q = 1
              pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")]  # Opacus' RDP


def _opacus(z: float, q: float, steps: int) -> tuple[float, float]:
    warnings.filterwarnings("ignore", module="opacus")
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    rdp.history = [(z, q, steps)]
    prv = PRVAccountant()
    prv.history = [(z, q, steps)]
    return float(rdp.get_epsilon(DELTA)), float(prv.get_epsilon(DELTA))


@pytest.mark.parametrize(("z", "q", "steps"), GRID)
def test_epsilon_matches_opacus(z: float, q: float, steps: int) -> None:
    report = epsilon_for(z, q, steps, DELTA)
    assert isinstance(report, EpsilonReport) and report.delta == DELTA
    opacus_rdp, opacus_prv = _opacus(z, q, steps)
    assert report.rdp == pytest.approx(opacus_rdp, rel=0.01)
    assert abs(report.pld - opacus_prv) <= 0.02
    assert report.pld <= report.rdp  # PLD is the tighter bound


@pytest.mark.parametrize(("epsilon", "q", "steps"), [(1.0, 0.01, 1000), (0.5, 1.0, 1)])
def test_noise_multiplier_rdp_matches_opacus(epsilon: float, q: float, steps: int) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    z = noise_multiplier_for(epsilon, DELTA, q, steps, "rdp")
    theirs = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=steps,
                                  accountant="rdp", epsilon_tolerance=0.001)
    assert z == pytest.approx(theirs, rel=0.005)
    assert epsilon_for(z, q, steps, DELTA).rdp <= epsilon
    assert _opacus(z, q, steps)[0] <= epsilon * 1.01


@pytest.mark.parametrize(("epsilon", "q", "steps"), [(0.5, 1.0, 1)])
def test_noise_multiplier_pld_matches_opacus_prv(epsilon: float, q: float, steps: int) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    z = noise_multiplier_for(epsilon, DELTA, q, steps, "pld")
    theirs = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=steps,
                                  accountant="prv", epsilon_tolerance=0.001)
    assert z == pytest.approx(theirs, rel=0.025)
    assert epsilon_for(z, q, steps, DELTA).pld <= epsilon
    assert z < noise_multiplier_for(epsilon, DELTA, q, steps, "rdp")  # PLD needs less noise for the same claim


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise() -> None:
    base = history_epsilon([(1.0, 0.1, 50)], DELTA, "rdp")
    assert history_epsilon([(1.0, 0.1, 100)], DELTA, "rdp") > base
    assert history_epsilon([(1.0, 0.2, 50)], DELTA, "rdp") > base
    assert history_epsilon([(2.0, 0.1, 50)], DELTA, "rdp") < base
    assert history_epsilon([], DELTA, "rdp") == 0.0
    assert epsilon_for(1.0, 0.1, 0, DELTA) == EpsilonReport(0.0, 0.0, DELTA)
    # a heterogeneous history composes: two kinds of rounds sit between their homogeneous extremes
    mixed = history_epsilon([(1.0, 0.1, 25), (2.0, 0.1, 25)], DELTA, "rdp")
    assert history_epsilon([(2.0, 0.1, 50)], DELTA, "rdp") < mixed < base


def test_rdp_non_convergence_warnings_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        epsilon_for(2.0, 0.5, 50, DELTA)  # fractional orders that dp-accounting's series cannot converge on
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


@pytest.mark.parametrize("args", [
    (0.0, 0.1, 10, DELTA), (-1.0, 0.1, 10, DELTA), (math.nan, 0.1, 10, DELTA), (1.0, 0.0, 10, DELTA),
    (1.0, 1.5, 10, DELTA), (1.0, 0.1, -1, DELTA), (1.0, 0.1, 2.5, DELTA), (1.0, 0.1, 10, 0.0), (1.0, 0.1, 10, 1.0),
    (True, 0.1, 10, DELTA), ("1", 0.1, 10, DELTA),
])
def test_epsilon_for_refuses_bad_arguments(args: tuple[object, ...]) -> None:
    with pytest.raises(InvalidArgumentError):
        epsilon_for(*args)  # type: ignore[call-overload]


@pytest.mark.parametrize(("args", "accountant"), [
    ((0.0, DELTA, 0.1, 10), "rdp"), ((1.0, DELTA, 0.1, 0), "rdp"), ((1.0, 2.0, 0.1, 10), "rdp"),
    ((1.0, DELTA, 0.1, 10), "gdp"),
])
def test_noise_multiplier_for_refuses_bad_arguments(args: tuple[float, float, float, int], accountant: str) -> None:
    with pytest.raises(InvalidArgumentError):
        noise_multiplier_for(*args, accountant=accountant)


# --- sampling="fixed": exactly m of N without replacement, replace-one (WBK19 Thm 27, RDP only) ---

def _fixed_direct(z: float, n: int, m: int, steps: int) -> float:
    """dp-accounting's own composition of the fixed-size event, built here independently of ours."""
    import dp_accounting as dpa

    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z)), steps))
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize(("z", "steps"), [(0.8, 1), (2.0, 5)])
def test_fixed_at_q_one_is_the_closed_form_gaussian(z: float, steps: int) -> None:
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

    orders = np.array(DEFAULT_RDP_ORDERS)
    closed = float(compute_epsilon(orders, steps * orders / (2 * z * z), DELTA)[0])  # Gaussian RDP: order/(2 z^2)
    report = epsilon_for(z, 1.0, steps, DELTA, sampling="fixed")
    assert report.rdp == pytest.approx(closed, rel=1e-12)
    assert (report.pld, report.delta, report.sampling) == (None, DELTA, "fixed")
    assert report.to_dict() == {"epsilon_rdp": report.rdp, "epsilon_pld": None, "delta": DELTA, "sampling": "fixed"}
    # sampling everyone is the same mechanism under either scheme
    assert report.rdp == pytest.approx(epsilon_for(z, 1.0, steps, DELTA).rdp, rel=1e-12)


def test_fixed_composes_like_dp_accounting() -> None:
    # our cached one-round curves, added up, against dp-accounting composing m = 10 of N = 50 itself
    assert epsilon_for(1.2, 10 / 50, 30, DELTA, sampling="fixed").rdp == pytest.approx(_fixed_direct(1.2, 50, 10, 30),
                                                                                         rel=1e-12)
    mixed = history_epsilon([(1.2, 0.2, 10), (2.0, 0.2, 20)], DELTA, "rdp", sampling="fixed")
    assert history_epsilon([(2.0, 0.2, 30)], DELTA, "rdp", sampling="fixed") < mixed \
        < history_epsilon([(1.2, 0.2, 30)], DELTA, "rdp", sampling="fixed")


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 0.1, 50), (0.8, 0.01, 1000), (5.0, 0.5, 10), (20.0, 0.05, 10)])
def test_fixed_is_never_below_poisson(z: float, q: float, steps: int) -> None:
    """At the same z and q, dp-accounting's fixed-size bound is at least the Poisson one, at every integer order.

    Why: with L the Gaussian likelihood ratio and D_j = E[(L-1)^j], the Poisson moment is exactly
    A = sum_j C(a,j) q^j D_j. WBK19 Thm 27 bounds the fixed-size one term by term by C(a,j) q^j times
    min(4 D_j (even j) or 4 sqrt(D_(j-1) D_(j+1)) (odd j), 2 E[L^j]); each is >= D_j, since D_j <= E|L-1|^j,
    E|L-1|^j <= E[L^j] + 1 <= 2 E[L^j], and E|L-1|^j <= sqrt(D_(j-1) D_(j+1)) by Cauchy-Schwarz for odd j.
    Fractional orders are not compared: dp-accounting's Poisson series there is loose (it can exceed its own
    integer-order values), so only the integer orders and the final epsilon are asserted."""
    import numpy as np

    from edgeshield.privacy._accounting import _rdp_curve

    orders, fixed = _rdp_curve(z, q, "fixed")
    _, poisson = _rdp_curve(z, q, "poisson")
    whole = (orders == np.round(orders)) & np.isfinite(poisson)
    assert np.all(fixed[whole] >= poisson[whole])
    assert epsilon_for(z, q, steps, DELTA, sampling="fixed").rdp >= epsilon_for(z, q, steps, DELTA).rdp


def test_fixed_grows_with_rounds_and_sampling_and_falls_with_noise() -> None:
    def eps(z: float, q: float, n: int) -> float:
        return history_epsilon([(z, q, n)], DELTA, "rdp", sampling="fixed")

    base = eps(1.0, 0.1, 20)
    assert eps(1.0, 0.1, 40) > base
    assert eps(1.0, 0.2, 20) > base
    assert eps(2.0, 0.1, 20) < base
    assert eps(1.0, 0.1, 0) == 0.0 and history_epsilon([], DELTA, "rdp", sampling="fixed") == 0.0


def test_fixed_calibration_round_trip() -> None:
    z = noise_multiplier_for(1.0, DELTA, 0.1, 20, sampling="fixed")
    assert epsilon_for(z, 0.1, 20, DELTA, sampling="fixed").rdp <= 1.0
    assert epsilon_for(z * 0.995, 0.1, 20, DELTA, sampling="fixed").rdp > 1.0  # it is (nearly) the least noise
    assert z > noise_multiplier_for(1.0, DELTA, 0.1, 20)  # replace-one costs more noise than Poisson's add/remove
    assert noise_multiplier_for(0.5, DELTA, 1.0, 1, sampling="fixed") == noise_multiplier_for(0.5, DELTA, 1.0, 1)


def test_fixed_has_no_pld_and_refuses_bad_schemes() -> None:
    with pytest.raises(InvalidArgumentError, match="no PLD"):
        noise_multiplier_for(1.0, DELTA, 0.1, 10, "pld", sampling="fixed")
    with pytest.raises(InvalidArgumentError, match="no PLD"):
        history_epsilon([(1.0, 0.1, 10)], DELTA, "pld", sampling="fixed")
    for call in (lambda: epsilon_for(1.0, 0.1, 10, DELTA, sampling="uniform"),
                 lambda: noise_multiplier_for(1.0, DELTA, 0.1, 10, sampling="Poisson"),
                 lambda: epsilon_for(1.0, 0.123456789, 10, DELTA, sampling="fixed"),  # no m/N with N <= 10**6
                 lambda: epsilon_for(1.0, 1e-7, 10, DELTA, sampling="fixed")):
        with pytest.raises(InvalidArgumentError):
            call()


@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_fixed_rate_is_recovered_as_m_over_n(mn: tuple[int, int]) -> None:
    from fractions import Fraction

    from edgeshield.privacy._accounting import _population, check_round

    m, n = mn
    assert check_round(1.0, m / n, "fixed") == (1.0, m / n)
    exact = Fraction(m, n)
    assert _population(m / n) == (exact.denominator, exact.numerator)


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_fixed_rate_either_is_a_fraction_or_is_refused(q: float) -> None:
    from edgeshield.privacy._accounting import _population

    try:
        n, m = _population(q)
    except InvalidArgumentError:
        return
    assert m / n == q and 1 <= m <= n <= 10**6
