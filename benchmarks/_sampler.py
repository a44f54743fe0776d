"""The sampler check: Mironov's floating-point leak, and an empirical privacy-loss audit of our Laplace mechanism.

(a) ``mironov_counts``. The textbook Laplace sampler ``x + b * (-sign(u) * ln(1 - 2|u|))`` with a float64 uniform
``u`` (``u = j * 2**-53 - 0.5``, as ``random() - 0.5`` gives it) can only output the floats that its arithmetic
reaches from the 2**53 possible ``u``, and that set depends on ``x`` (Mironov, CCS 2012). We draw outputs ``y`` of
M(0) and ask, exactly, whether M(1) could have produced each: the map ``j -> fl(1 + noise(j))`` is non-decreasing
in ``j``, so a binary search over all 2**53 values of ``j`` (vectorised over the draws) finds the ``j`` where it
first reaches ``y``, and ``y`` is possible under M(1) iff that ``j`` (or a neighbour, against a non-monotone ``ln``)
gives ``y`` exactly. The same search run against M(0) itself must find every draw (``textbook_self_misses`` = 0):
it shows the inverter is right, so the impossible outputs are the sampler's, not the test's. Ours (OpenDP via
:class:`LaplaceMechanism`) outputs the exact sum of the input rounded to the grid ``2**k`` and ``2**k`` times a
discrete Laplace integer (support: all of Z), rounded to the nearest float. Both 0 and 1 lie on the grid, so M(0)
and M(1) draw from the same lattice Z * 2**k through the same rounding: ``y`` is possible under M(1) iff it is the
float of a lattice point, i.e. iff ``y / 2**k`` is an integer (a lattice point below 2**(k+52) in magnitude is a
float itself; every float above is a multiple of 2**k), which we test exactly (scaling by a power of two is exact).
Each output impossible under the neighbour would let an observer tell 0 from 1 with certainty.

(b) ``empirical_privacy_loss``. ``draws`` outputs each of M(0) and M(1) (sensitivity 1, our mechanism at
``epsilon``); the events are the half-lines {y <= t} and {y > t} at ``events`` thresholds spread over
[-3b, 1 + 3b]; for each event and both orders of the pair, the log ratio of the two empirical frequencies, with
Clopper-Pearson intervals at a Bonferroni-corrected 95 % over all comparisons. ``max_log_ratio`` is the largest
point estimate, ``lower_bound`` the largest loss the samples prove (lower confidence bound), ``upper_bound`` the
largest upper confidence bound. Laplace is tight on these events (every half-line below 0 has ratio exactly e^eps),
so the true largest loss over the family *is* epsilon: the point estimate sits near epsilon and the upper bound just
above it whatever the sampler; what a broken sampler changes is the lower bound. ``ratio_to_epsilon`` is therefore
``lower_bound / epsilon``: above 1 means the data show, at 95 % confidence, more loss than claimed (a mechanism at
half its stated noise scores about 2). ``upper_ratio_to_epsilon`` says how finely the run resolved it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeshield.privacy import LaplaceMechanism
from edgeshield.privacy._noise import _grid_exponent

DEFAULT_DRAWS = 200_000
QUICK_DRAWS = 20_000
DEFAULT_EVENTS = 50
QUICK_EVENTS = 20
_J_MAX = 2**53 - 1  # j = 0 gives u = -0.5 and ln(0): the textbook sampler redraws it


def _textbook_noise(j: np.ndarray, b: float) -> np.ndarray:
    u = j.astype(np.float64) * 2.0**-53 - 0.5  # exact for j < 2**53
    return -np.sign(u) * b * np.log(1.0 - 2.0 * np.abs(u))


def textbook_laplace(x: float, b: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """The attack target, not a sampler to use: the textbook float Laplace of scale ``b`` around ``x``."""
    return x + _textbook_noise(rng.integers(1, _J_MAX + 1, n), b)


def _possible_textbook(y: np.ndarray, x: float, b: float) -> np.ndarray:
    """Whether each ``y`` is an output of the textbook sampler around ``x`` for some float ``u``, exactly."""
    lo = np.ones(y.shape, dtype=np.int64)
    hi = np.full(y.shape, _J_MAX, dtype=np.int64)
    for _ in range(54):  # smallest j with x + noise(j) >= y
        mid = lo + (hi - lo) // 2
        ge = (x + _textbook_noise(mid, b)) >= y
        hi = np.where(ge, mid, hi)
        lo = np.where(ge, lo, mid + 1)
    hit = np.zeros(y.shape, dtype=bool)
    for d in (-2, -1, 0, 1, 2):
        hit |= (x + _textbook_noise(np.clip(lo + d, 1, _J_MAX), b)) == y
    return hit


def mironov_counts(draws: int, scale: float) -> dict[str, int]:
    """Outputs of M(0) that M(1) cannot produce, out of ``draws``: the textbook sampler's and ours."""
    rng = np.random.default_rng(2012)  # the attack target's own randomness: not privacy noise
    y_textbook = textbook_laplace(0.0, scale, draws, rng)
    textbook = int(np.count_nonzero(~_possible_textbook(y_textbook, 1.0, scale)))
    self_misses = int(np.count_nonzero(~_possible_textbook(y_textbook, 0.0, scale)))
    mech = LaplaceMechanism(1.0, 1.0 / scale)
    y_ours = np.asarray(mech.release(np.zeros(draws)))
    on_grid = np.ldexp(y_ours, -_grid_exponent(scale, draws))
    ours = int(np.count_nonzero(on_grid != np.floor(on_grid)))
    return {"textbook": textbook, "ours": ours, "draws": draws, "textbook_self_misses": self_misses}


def _log_ratio_bounds(c0: np.ndarray, c1: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds at ``alpha`` each: lower and upper bounds on log(p0 / p1)."""
    from scipy.stats import beta

    p0_lo = np.where(c0 > 0, beta.ppf(alpha, c0, n - c0 + 1), 0.0)
    p0_hi = np.where(c0 < n, beta.ppf(1 - alpha, c0 + 1, n - c0), 1.0)
    p1_lo = np.where(c1 > 0, beta.ppf(alpha, c1, n - c1 + 1), 0.0)
    p1_hi = np.where(c1 < n, beta.ppf(1 - alpha, c1 + 1, n - c1), 1.0)
    with np.errstate(divide="ignore"):
        lower = np.log(p0_lo) - np.log(p1_hi)
        upper = np.log(p0_hi) - np.log(p1_lo)
    return lower, upper


def audit_samples(s0: np.ndarray, s1: np.ndarray, thresholds: Sequence[float], epsilon: float,
                  confidence: float = 0.95) -> dict[str, Any]:
    """The audit of (b) on given samples of M(x) and M(x'), so it can also be run on a deliberately broken one."""
    n = int(min(s0.shape[0], s1.shape[0]))
    a, b = np.sort(s0[:n]), np.sort(s1[:n])
    t = np.asarray(thresholds, dtype=np.float64)
    le0, le1 = np.searchsorted(a, t, side="right"), np.searchsorted(b, t, side="right")
    c0 = np.concatenate([le0, n - le0])  # {y <= t} then {y > t}
    c1 = np.concatenate([le1, n - le1])
    comparisons = 2 * c0.shape[0]  # each event, both orders of the pair
    alpha = (1.0 - confidence) / (2 * comparisons)  # two one-sided bounds per comparison, Bonferroni
    lo01, hi01 = _log_ratio_bounds(c0, c1, n, alpha)
    lo10, hi10 = _log_ratio_bounds(c1, c0, n, alpha)
    both = (c0 > 0) & (c1 > 0)
    with np.errstate(divide="ignore"):
        point = np.abs(np.log(np.where(both, c0, 1)) - np.log(np.where(both, c1, 1)))
    max_log_ratio = float(point.max()) if point.size else 0.0
    lower = float(max(lo01.max(), lo10.max(), 0.0))
    upper = float(max(hi01.max(), hi10.max()))
    return {"max_log_ratio": max_log_ratio, "lower_bound": lower, "upper_bound": upper,
            "ratio_to_epsilon": lower / epsilon, "upper_ratio_to_epsilon": upper / epsilon,
            "point_ratio_to_epsilon": max_log_ratio / epsilon, "draws": n, "events": int(c0.shape[0]),
            "confidence": confidence}


def thresholds_for(epsilon: float, events: int) -> np.ndarray:
    b = 1.0 / epsilon
    return np.linspace(-3.0 * b, 1.0 + 3.0 * b, events)


def empirical_privacy_loss(epsilon: float, draws: int, events: int) -> dict[str, Any]:
    """Audit our Laplace mechanism (sensitivity 1) on neighbouring inputs 0 and 1: see the module docstring."""
    mech = LaplaceMechanism(1.0, epsilon)
    s0 = np.asarray(mech.release(np.zeros(draws)))
    s1 = np.asarray(mech.release(np.ones(draws)))
    return audit_samples(s0, s1, thresholds_for(epsilon, events), epsilon)


def sampler_speed(sizes: Sequence[int] = (10_000, 100_000), repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds per call of each noise source at each size (OpenDP loaded beforehand)."""
    import time

    from edgeshield.privacy import discrete_gaussian_noise, gaussian_noise, laplace_noise

    gaussian_noise(1, 1.0)
    out: dict[str, float] = {}
    for name, draw in (("gaussian", gaussian_noise), ("laplace", laplace_noise),
                       ("discrete_gaussian", discrete_gaussian_noise)):
        for n in sizes:
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                draw((n,), 1.0)
                best = min(best, time.perf_counter() - start)
            out[f"{name}_{n}_s"] = best
    return out


if __name__ == "__main__":  # python benchmarks/_sampler.py [--quick]
    import sys
    import time

    quick = "--quick" in sys.argv[1:]
    draws, events = (QUICK_DRAWS, QUICK_EVENTS) if quick else (DEFAULT_DRAWS, DEFAULT_EVENTS)
    start = time.perf_counter()
    print("mironov", mironov_counts(draws, 1.0), f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    print("loss", empirical_privacy_loss(1.0, draws, events), f"{time.perf_counter() - start:.1f} s")
    print("speed", {k: round(v, 3) for k, v in sampler_speed().items()})
