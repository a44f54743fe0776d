"""Epsilon of subsampled Gaussian rounds from Google's ``dp-accounting``, under one of two sampling schemes.

- ``"poisson"``: each round is a ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (each client in with probability
  ``q``), under add-or-remove-one neighbouring: one user's data in or out. RDP and PLD side by side: both give valid
  upper bounds; PLD (privacy loss distributions, pessimistic discretisation) is the tighter, RDP (Renyi DP) the
  faster and more conservative.
- ``"fixed"``: exactly m of N clients drawn uniformly without replacement (``q = m/N``), under replace-one
  neighbouring (N public, one user's data replaced by anything): a
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z))``, RDP only (Wang, Balle & Kasiviswanathan 2019,
  Thm 27). dp-accounting has no PLD for sampling without replacement, so its PLD figure is ``None``: never the RDP
  one copied into the PLD slot.

``z`` is the noise std divided by the L2 sensitivity under the scheme's own relation (add/remove for poisson,
replace-one for fixed). A history of different rounds composes by adding each kind of round with its count.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Generic, Literal, TypeVar, overload

from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy._errors import PrivacyError

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
_PLD_DISCRETISATION = 1e-4  # dp-accounting's default value_discretization_interval
_MAX_POPULATION = 10**6  # the largest N a fixed-size rate m/N is recovered from
_NO_PLD = "dp-accounting has no PLD accountant for sampling without replacement: use the rdp accountant"

_PldT = TypeVar("_PldT", float, float | None, covariant=True)


@dataclass(frozen=True, slots=True)
class EpsilonReport(Generic[_PldT]):
    """Epsilon at ``delta`` by the RDP and the PLD accountant for the same history; ``pld`` is ``None`` under
    ``sampling="fixed"`` (dp-accounting has no PLD for sampling without replacement)."""

    rdp: float
    pld: _PldT
    delta: float
    sampling: str = "poisson"

    def to_dict(self) -> dict[str, float | str | None]:
        return {"epsilon_rdp": self.rdp, "epsilon_pld": self.pld, "delta": self.delta, "sampling": self.sampling}


class _DropNonConvergence(logging.Filter):
    # dp-accounting's RDP logs a warning for each fractional order whose series does not converge and leaves that
    # order out of the minimum: a larger, still valid epsilon. One line per order per call would flood a ledger.
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_DROP = _DropNonConvergence()


def _dpa() -> Any:
    import dp_accounting

    logging.getLogger("absl").addFilter(_DROP)  # adding the same filter again is a no-op
    return dp_accounting


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return v


def check_sampling(sampling: object) -> str:
    if sampling not in SAMPLINGS:
        raise InvalidArgumentError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return str(sampling)


def _population(q: float) -> tuple[int, int]:
    """``(N, m)`` in lowest terms for a fixed-size rate ``q = m/N``; refuses a rate that is no such fraction (a
    nearby one could be smaller than ``q`` and under-count the privacy loss)."""
    frac = Fraction(q).limit_denominator(_MAX_POPULATION)
    if float(frac) != q:
        raise InvalidArgumentError(f"with sampling 'fixed', sampling_rate must be exactly m/N (N <= "
                                   f"{_MAX_POPULATION}), got {q!r}")
    return frac.denominator, frac.numerator


def check_round(noise_multiplier: object, sampling_rate: object, sampling: str = "poisson") -> tuple[float, float]:
    z = _number("noise_multiplier", noise_multiplier)
    q = _number("sampling_rate", sampling_rate)
    if z <= 0:
        raise InvalidArgumentError(f"noise_multiplier must be > 0 (0 means no privacy), got {noise_multiplier!r}")
    if not 0.0 < q <= 1.0:
        raise InvalidArgumentError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if check_sampling(sampling) == "fixed":
        _population(q)
    return z, q


def check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidArgumentError(f"steps must be a whole number >= 0, got {steps!r}")
    return steps


def check_delta(delta: object) -> float:
    d = _number("delta", delta)
    if not 0.0 < d < 1.0:
        raise InvalidArgumentError(f"delta must be in (0, 1), got {delta!r}")
    return d


def check_accountant(accountant: object) -> str:
    if accountant not in ACCOUNTANTS:
        raise InvalidArgumentError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return str(accountant)


def check_scheme(accountant: object, sampling: object) -> tuple[str, str]:
    """``(accountant, sampling)`` checked together: the PLD accountant exists for poisson sampling only."""
    acc, smp = check_accountant(accountant), check_sampling(sampling)
    if smp == "fixed" and acc == "pld":
        raise InvalidArgumentError(_NO_PLD)
    return acc, smp


def _round_event(z: float, q: float, sampling: str) -> Any:
    dpa = _dpa()
    if sampling == "fixed":
        n, m = _population(q)
        return dpa.SampledWithoutReplacementDpEvent(source_dataset_size=n, sample_size=m,
                                                    event=dpa.GaussianDpEvent(z))
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))


def _rdp_accountant(sampling: str) -> Any:
    dpa = _dpa()
    if sampling == "fixed":
        return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    return dpa.rdp.RdpAccountant()


def _event(history: Iterable[tuple[float, float, int]]) -> Any:
    dpa = _dpa()
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n)
              for z, q, n in history if n > 0]
    return dpa.ComposedDpEvent(events)


@functools.lru_cache(maxsize=1024)
def _rdp_curve(z: float, q: float, sampling: str = "poisson") -> tuple[Any, Any]:
    """One round's RDP at every order (dp-accounting's default orders). Composition adds curves, which is all
    ``RdpAccountant.compose`` does with a count, so a ledger's histories reuse these instead of recomputing them
    (a fixed-size round's curve takes about 0.2 s to compute)."""
    acc = _rdp_accountant(sampling)
    acc.compose(_round_event(z, q, sampling))
    return acc.orders, acc.rdp


def history_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str, *,
                    sampling: str = "poisson") -> float:
    """Epsilon at ``delta`` of a history of ``(noise_multiplier, sampling_rate, count)`` rounds, all of the one
    ``sampling`` scheme (0 when empty). ``sampling="fixed"`` with ``accountant="pld"`` is refused."""
    _, smp = check_scheme(accountant, sampling)
    rounds = [(z, q, n) for z, q, n in history if n > 0]
    if not rounds:
        return 0.0
    dpa = _dpa()
    try:
        if accountant == "rdp":
            orders, total = None, None
            for z, q, n in rounds:
                orders, curve = _rdp_curve(z, q, smp)
                total = n * curve if total is None else total + n * curve
            eps = float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
        else:
            acc = dpa.pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETISATION)
            acc.compose(_event(rounds))
            eps = float(acc.get_epsilon(delta))
    except (ValueError, OverflowError, ArithmeticError) as exc:
        raise PrivacyError(f"the {accountant} accountant failed on this history: {exc}") from None
    if math.isnan(eps):
        raise PrivacyError(f"the {accountant} accountant gave no epsilon for this history")
    return eps


@overload
def epsilon_for(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
                sampling: Literal["poisson"] = "poisson") -> EpsilonReport[float]: ...
@overload
def epsilon_for(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
                sampling: str) -> EpsilonReport[float | None]: ...
def epsilon_for(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
                sampling: str = "poisson") -> EpsilonReport[float] | EpsilonReport[float | None]:
    """Epsilon at ``delta`` after ``steps`` subsampled Gaussian rounds at rate ``sampling_rate`` (``m/N`` for
    ``sampling="fixed"``), by RDP and by PLD (``None`` for fixed)."""
    smp = check_sampling(sampling)
    z, q = check_round(noise_multiplier, sampling_rate, smp)
    n = check_steps(steps)
    d = check_delta(delta)
    rdp = history_epsilon([(z, q, n)], d, "rdp", sampling=smp)
    if smp == "fixed":
        return EpsilonReport(rdp=rdp, pld=None, delta=d, sampling=smp)
    return EpsilonReport(rdp=rdp, pld=history_epsilon([(z, q, n)], d, "pld"), delta=d)


def noise_multiplier_for(epsilon: float, delta: float, sampling_rate: float, steps: int,
                         accountant: str = "rdp", *, sampling: str = "poisson") -> float:
    """The smallest noise multiplier whose ``steps`` rounds at ``sampling_rate`` stay within (epsilon, delta) by
    ``accountant`` ("rdp" or "pld"; only "rdp" for ``sampling="fixed"``). ``dp_accounting.calibrate_dp_mechanism``
    finds it to within a tolerance; the answer is then re-checked and nudged up until the accountant confirms
    epsilon <= target."""
    eps = _number("epsilon", epsilon)
    if eps <= 0:
        raise InvalidArgumentError(f"epsilon must be > 0, got {epsilon!r}")
    d = check_delta(delta)
    acc, smp = check_scheme(accountant, sampling)
    _, q = check_round(1.0, sampling_rate, smp)
    n = check_steps(steps)
    if n == 0:
        raise InvalidArgumentError("steps must be >= 1: no rounds spend nothing")
    return _calibrated(eps, d, q, n, acc, smp)


@functools.lru_cache(maxsize=256)
def _calibrated(eps: float, d: float, q: float, n: int, acc: str, smp: str) -> float:
    """:func:`noise_multiplier_for` on checked arguments, cached: a calibration costs seconds (a fixed-sampling RDP
    curve per step of the search) and a benchmark or a ledger asks the same question many times."""
    dpa = _dpa()

    def fresh() -> Any:
        return _rdp_accountant(smp) if acc == "rdp" else \
            dpa.pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETISATION)

    def event(z: float) -> Any:
        return dpa.SelfComposedDpEvent(_round_event(z, q, smp), n)

    if acc == "rdp":
        bracket = dpa.LowerEndpointAndGuess(lower_endpoint=0.01, initial_guess=1.0)
        tol = 1e-4
    else:  # PLD is tighter than RDP: its answer lies below RDP's, which bounds the (slow) search from above
        hi = noise_multiplier_for(eps, d, q, n, "rdp")
        lo = hi * 0.9
        while lo > 0.01 and history_epsilon([(lo, q, n)], d, "pld") <= eps:
            hi, lo = lo, lo * 0.9
        bracket = dpa.ExplicitBracketInterval(lo, hi)
        tol = 1e-3 * hi
    try:
        z = float(dpa.calibrate_dp_mechanism(fresh, event, eps, d, bracket, tol=tol))
    except dpa.mechanism_calibration.NoBracketIntervalFoundError:
        raise PrivacyError(f"no noise multiplier reaches epsilon {eps:g} at delta {d:g} in {n} rounds") from None
    for _ in range(100):  # calibrate_dp_mechanism is within tol of the optimum, on either side of it
        if history_epsilon([(z, q, n)], d, acc, sampling=smp) <= eps:
            return z
        z += tol
    raise PrivacyError(f"could not confirm a noise multiplier for epsilon {eps:g} at delta {d:g}")
