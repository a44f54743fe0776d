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
        epsilon_for(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "accountant"), [
    ((0.0, DELTA, 0.1, 10), "rdp"), ((1.0, DELTA, 0.1, 0), "rdp"), ((1.0, 2.0, 0.1, 10), "rdp"),
    ((1.0, DELTA, 0.1, 10), "gdp"),
])
def test_noise_multiplier_for_refuses_bad_arguments(args: tuple[float, float, float, int], accountant: str) -> None:
    with pytest.raises(InvalidArgumentError):
        noise_multiplier_for(*args, accountant=accountant)
