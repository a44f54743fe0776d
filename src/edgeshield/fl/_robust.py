"""Robust aggregation of client updates, in numpy over flat float64 vectors (one per client).

Each aggregator is a small object behind one protocol: ``aggregate(updates, weights, *, root_update=None)`` returns
the aggregate, a per-client anomaly score (higher is more suspicious) and the clients it left out, with reasons.

Scores, per aggregator (all but FLTrust are ratios to the typical client, so 1 is ordinary):

- FedAvg, Median, TrimmedMean, Bulyan: the client's L2 distance to the aggregate ÷ the median of those distances.
- Krum / multi-Krum: the Krum score (sum of squared distances to the n − f − 2 nearest other updates) ÷ its median.
- FLTrust: 1 − trust score, trust = ReLU(cos(update, root update)): 0 for an update aligned with the server's, 1 for
  one orthogonal to it or against it.
- NormBound: the distance of the update as sent (before clipping) to the aggregate ÷ the median of those distances,
  whatever the inner aggregator (a boosted update is harmless once clipped, but still reported).

"Rejected" means the client's update carried no weight in the aggregate: Krum's non-selected, Bulyan's clients left
out by its Krum phase, FLTrust's zero-trust clients. Coordinates cut by the trimmed mean or the median are not
rejections (every client still contributes elsewhere); NormBound's clipped clients are listed in ``clipped``.

Weights (example counts) are used by FedAvg and by multi-Krum's average of the selected; the median, trimmed mean,
Krum's selection and Bulyan ignore them (as Flower's do: a client could claim any count), and FLTrust weighs by trust.

Central DP (``_strategy.CentralDP``) needs, per aggregator, how far one client can move its output. Each aggregator
states it as ``replace_one_sensitivity(m, clip)``: the L2 distance, at most, between its outputs on two cohorts of m
updates of norm <= clip that differ in one update (uniform weights, output projected onto the clip-ball with
:func:`project_l2_ball`), with the proof in its docstring; and ``poisson_sound``: whether each client's contribution
to the (unnormalised) aggregate depends on its own update alone with norm <= clip, so the add/remove-one sensitivity
of the sum is clip and Poisson sampling's accounting applies. :func:`sensitivity_of` and :func:`is_poisson_sound`
read both from any aggregator (typed refusal for one that does not state them).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from edgeshield.errors import EdgeShieldError, InvalidArgumentError

__all__ = [
    "AGGREGATORS",
    "AggregateResult",
    "Aggregator",
    "AggregatorConfigError",
    "Bulyan",
    "FLTrust",
    "FedAvg",
    "Krum",
    "Median",
    "MissingRootUpdateError",
    "NormBound",
    "TooFewClientsError",
    "TrimmedMean",
    "is_poisson_sound",
    "make_aggregator",
    "outliers",
    "project_l2_ball",
    "sensitivity_of",
]


class AggregatorConfigError(InvalidArgumentError):
    """An unknown aggregator name, an unknown parameter or a parameter out of range."""


class MissingRootUpdateError(InvalidArgumentError):
    """FLTrust was called without the server's root update (or with a zero or mis-sized one)."""


class TooFewClientsError(EdgeShieldError):
    """Fewer updates than the aggregator's guarantee needs (Krum: n ≥ 2f + 3, Bulyan: n ≥ 4f + 3)."""

    def __init__(self, aggregator: str, needed: int, got: int, why: str) -> None:
        super().__init__(f"{aggregator} needs at least {needed} updates ({why}), got {got}")
        self.aggregator = aggregator
        self.needed = needed
        self.got = got


@dataclass
class AggregateResult:
    """The aggregate and what the aggregator thought of each client (indices are positions in ``updates``)."""

    vector: np.ndarray
    scores: np.ndarray
    rejected: list[int]
    reasons: dict[int, str]
    clipped: list[int] = field(default_factory=list)


class Aggregator(Protocol):
    """Anything that turns one round's client updates into one update."""

    name: str

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult: ...


# --- shared pieces ----------------------------------------------------------------------------------------------
def _stack(updates: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Updates as an (n, d) float64 matrix and weights as a vector, both checked (they come validated: be sure)."""
    n = len(updates)
    if n == 0:
        raise InvalidArgumentError("no updates to aggregate")
    if len(weights) != n:
        raise InvalidArgumentError(f"{n} updates but {len(weights)} weights")
    try:
        x = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"updates must be flat numeric vectors of one length: {exc}") from None
    if x.ndim != 2:
        raise InvalidArgumentError(f"updates must be flat vectors, got shape {x.shape[1:]}")
    if not np.all(np.isfinite(x)):
        raise InvalidArgumentError("updates contain NaN or Inf: validate them first (validate_update)")
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise InvalidArgumentError("weights must be finite, non-negative and not all zero")
    return x, w


def _ratio_to_median(values: np.ndarray, scale: float) -> np.ndarray:
    """``values`` ÷ their median; if the median is 0 (most clients identical), ÷ a tiny positive floor instead."""
    med = float(np.median(values))
    floor = np.finfo(np.float64).eps * max(1.0, scale)
    return np.asarray(values / max(med, floor), dtype=np.float64)


def _distance_scores(x: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
    dist = np.linalg.norm(x - aggregate, axis=1)
    return _ratio_to_median(dist, float(np.max(np.abs(x))) if x.size else 1.0)


def _sq_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances via one matrix product, O(n² d) in BLAS.

    The coordinate-wise median is subtracted first: distances do not change, and the ‖a‖² + ‖b‖² − 2a·b identity
    then works on small centred vectors, so a huge attacker (or a large common offset) does not wash out the
    honest clients' small distances by cancellation.
    """
    c = x - np.median(x, axis=0)
    sq = np.einsum("ij,ij->i", c, c)
    d = sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return np.asarray(d, dtype=np.float64)


def _krum_scores(d: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row of the squared-distance matrix ``d``: sum of its n − f − 2 smallest off-diagonal."""
    n = d.shape[0]
    k = max(1, n - f - 2)
    if n == 1:
        return np.zeros(1)
    off = d + np.diag(np.full(n, np.inf))  # a client is not its own neighbour
    k = min(k, n - 1)
    nearest = np.partition(off, k - 1, axis=1)[:, :k]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def _int_param(agg: str, name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or int(value) < minimum:
        raise AggregatorConfigError(f"{agg}: {name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _float_param(agg: str, name: str, value: object) -> float:
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool):
        raise AggregatorConfigError(f"{agg}: {name} must be a number, not {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise AggregatorConfigError(f"{agg}: {name} must be finite, not {value!r}")
    return v


def _check_m_clip(agg: str, m: object, clip: object) -> tuple[int, float]:
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or int(m) < 1:
        raise InvalidArgumentError(f"{agg}: the cohort size m must be a positive integer, not {m!r}")
    c = float(clip) if isinstance(clip, int | float | np.integer | np.floating) and not isinstance(clip, bool) \
        else math.nan
    if not (math.isfinite(c) and c > 0):
        raise InvalidArgumentError(f"{agg}: clip must be a positive finite number, not {clip!r}")
    return int(m), c


def project_l2_ball(vector: np.ndarray, radius: float) -> np.ndarray:
    """``vector`` scaled down onto the L2 ball of ``radius`` (unchanged inside it). 1-Lipschitz, so it never raises
    an aggregate's sensitivity, and any two points of the ball are at most 2·radius apart."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return v * (radius / norm) if norm > radius else v.copy()


# --- the aggregators --------------------------------------------------------------------------------------------
class FedAvg:
    """Weighted mean (McMahan et al. 2017): the baseline, with no defence at all."""

    name = "fedavg"
    #: False: the aggregate is a weighted sum, so it also runs under secure aggregation (only the sum is seen).
    needs_individual_updates: ClassVar[bool] = False
    #: each client adds its own clipped update to the sum: add/remove-one sensitivity of the sum is the clip
    poisson_sound: ClassVar[bool] = True

    def min_clients(self) -> int:
        return 1

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """2C/m. With uniform weights the output is (1/m)·Σ u_i; replacing u_i by u_i' changes it by
        (u_i' − u_i)/m, and ‖u_i' − u_i‖ <= ‖u_i'‖ + ‖u_i‖ <= 2C."""
        m, c = _check_m_clip(self.name, m, clip)
        return 2.0 * c / m

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, w = _stack(updates, weights)
        vector = (w / w.sum()) @ x
        return AggregateResult(vector, _distance_scores(x, vector), [], {})


class Median:
    """Coordinate-wise median (Yin et al. 2018); unweighted, like Flower's FedMedian."""

    name = "median"
    needs_individual_updates: ClassVar[bool] = True
    poisson_sound: ClassVar[bool] = False  # an order statistic: one client moves what everyone else contributes

    def min_clients(self) -> int:
        return 1

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """2C. Per coordinate j, replacing one value a_j by b_j moves every order statistic monotonically (all in the
        direction of b_j − a_j) by at most abs(b_j − a_j); the median (odd m) or the mean of the two middle ones (even
        m) so moves by at most abs(b_j − a_j), and over all coordinates by at most ‖a − b‖ <= 2C. (The output itself
        may leave the C-ball, e.g. the median of three unit vectors (1,1,0)/√2, (1,0,1)/√2, (0,1,1)/√2 is (1,1,1)/√2;
        central DP projects it back, which is 1-Lipschitz.) Unlike the mean, it does not shrink with m."""
        _check_m_clip(self.name, m, clip)
        return 2.0 * float(clip)

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, _ = _stack(updates, weights)
        vector = np.median(x, axis=0)
        return AggregateResult(vector, _distance_scores(x, vector), [], {})


class TrimmedMean:
    """Coordinate-wise trimmed mean: drop the ⌊beta·n⌋ largest and smallest values of each coordinate, average."""

    name = "trimmed_mean"
    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, beta: float = 0.1) -> None:
        b = _float_param(self.name, "beta", beta)
        if not 0.0 <= b < 0.5:
            raise AggregatorConfigError(f"trimmed_mean: beta must be in [0, 0.5), not {beta!r}")
        self.beta = b

    poisson_sound: ClassVar[bool] = False  # which values are trimmed depends on every client

    def min_clients(self) -> int:
        return 1

    def trimmed(self, n: int) -> int:
        """k, the values cut at EACH end of every coordinate for n updates (Flower's and scipy's rounding)."""
        return int(self.beta * n)

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """2C/(m − 2k), k = ⌊beta·m⌋. Per coordinate, replacing a by b (say b > a) moves every order statistic up,
        and the shifts add up to exactly b − a (the multiset's sum changes by b − a); so the sum of the kept middle
        m − 2k order statistics moves by between 0 and b − a, i.e. by at most abs(a_j − b_j), and the trimmed mean by
        at most abs(a_j − b_j)/(m − 2k). Over all coordinates: ‖a − b‖/(m − 2k) <= 2C/(m − 2k). (m − 2k >= 1 as
        beta < 1/2.)"""
        m, c = _check_m_clip(self.name, m, clip)
        return 2.0 * c / (m - 2 * self.trimmed(m))

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, _ = _stack(updates, weights)
        n = x.shape[0]
        cut = self.trimmed(n)
        part = np.partition(x, (cut, n - cut - 1), axis=0) if cut else x
        vector = part[cut : n - cut].mean(axis=0)
        return AggregateResult(vector, _distance_scores(x, vector), [], {})


class Krum:
    """Krum (Blanchard et al. 2017) and, with ``m > 1``, multi-Krum: the m updates with the lowest Krum scores.

    ``f`` is the number of Byzantine clients tolerated; the guarantee needs n ≥ 2f + 3, so fewer are refused.
    ``m=None`` selects n − f (El Mhamdi et al. 2018). Krum (m = 1) returns the selected update itself; multi-Krum
    the weighted mean of the selected.
    """

    name = "krum"
    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, f: int, m: int | None = 1) -> None:
        self.f = _int_param(self.name, "f", f, 0)
        self.m = None if m is None else _int_param(self.name, "m", m, 1)
        if self.m is None or self.m > 1:
            self.name = "multi_krum"

    poisson_sound: ClassVar[bool] = False  # one client can switch the selected set

    def min_clients(self) -> int:
        return max(2 * self.f + 3, (self.m or 1) + self.f)

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """2C. One client can switch the selection (e.g. two antipodal clusters ±C·e, the replaced client tipping
        which one is the majority), so no bound below the ball's diameter holds in general; but the output (one
        selected update, or the mean of several: a convex combination) lies in the C-ball, as does its projection,
        and any two points of that ball are at most 2C apart."""
        _check_m_clip(self.name, m, clip)
        return 2.0 * float(clip)

    def _check(self, n: int) -> int:
        if n < 2 * self.f + 3:
            raise TooFewClientsError(self.name, 2 * self.f + 3, n, f"n >= 2f + 3 for f = {self.f}")
        m = n - self.f if self.m is None else self.m
        if m > n - self.f:
            raise TooFewClientsError(self.name, m + self.f, n, f"selecting m = {m} needs n >= m + f")
        return m

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, w = _stack(updates, weights)
        m = self._check(x.shape[0])
        scores = _krum_scores(_sq_distances(x), self.f)
        order = np.argsort(scores, kind="stable")
        chosen = np.sort(order[:m])
        if m == 1:
            vector = x[chosen[0]].copy()
        else:
            wc = w[chosen]
            # all selected clients claiming zero examples: an unweighted mean rather than a division by zero
            vector = (wc / wc.sum()) @ x[chosen] if wc.sum() > 0 else x[chosen].mean(axis=0)
        rank = {int(i): r for r, i in enumerate(order)}
        rejected = [i for i in range(x.shape[0]) if i not in set(chosen.tolist())]
        reasons = {
            i: f"{self.name}: score rank {rank[i] + 1} of {x.shape[0]}, only the {m} lowest are kept" for i in rejected
        }
        return AggregateResult(vector, _ratio_to_median(scores, float(np.max(scores))), rejected, reasons)


class Bulyan:
    """Bulyan (El Mhamdi et al. 2018): iterated Krum picks θ = n − 2f updates, then each coordinate averages the
    β = θ − 2f values closest to the selected updates' median. Needs n ≥ 4f + 3; fewer are refused.

    The selection is the paper's (and Flower's legacy ``aggregate_bulyan``'s): Krum re-run on the remaining updates
    θ times. Flower 1.42's ``Bulyan`` strategy instead takes the θ lowest scores of a single multi-Krum pass.
    """

    name = "bulyan"
    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, f: int) -> None:
        self.f = _int_param(self.name, "f", f, 0)

    poisson_sound: ClassVar[bool] = False  # Krum's selection, then coordinate-wise order statistics

    def min_clients(self) -> int:
        return 4 * self.f + 3

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """2C. Its Krum phase can switch the selected set (see :meth:`Krum.replace_one_sensitivity`), so the only
        bound is the diameter of the C-ball its output is projected onto (the coordinate-wise phase can leave the
        ball, as the median can; the projection is 1-Lipschitz and brings it back)."""
        _check_m_clip(self.name, m, clip)
        return 2.0 * float(clip)

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, _ = _stack(updates, weights)
        n = x.shape[0]
        if n < 4 * self.f + 3:
            raise TooFewClientsError(self.name, 4 * self.f + 3, n, f"n >= 4f + 3 for f = {self.f}")
        theta, beta = n - 2 * self.f, n - 4 * self.f
        d = _sq_distances(x)
        remaining = list(range(n))
        selected: list[int] = []
        for _ in range(theta):
            sub = np.asarray(remaining)
            best = int(sub[int(np.argmin(_krum_scores(d[np.ix_(sub, sub)], self.f)))])
            selected.append(best)
            remaining.remove(best)
        s = x[sorted(selected)]
        med = np.median(s, axis=0)
        closest = np.argpartition(np.abs(s - med), beta - 1, axis=0)[:beta]
        vector = np.take_along_axis(s, closest, axis=0).mean(axis=0)
        rejected = sorted(remaining)
        reasons = dict.fromkeys(rejected, f"bulyan: not among the {theta} updates iterated Krum selected")
        return AggregateResult(vector, _distance_scores(x, vector), rejected, reasons)


class FLTrust:
    """FLTrust (Cao et al., NDSS 2021): trust each update by ReLU(cos(update, root update)), rescale it to the root
    update's norm, and average by trust. The root update is the server's own on its small clean root data set.

    ``normalise="trust"`` (the paper's): divide by the sum of the trust scores. ``normalise="count"`` (its DP form):
    divide by the number of updates n instead, Σ trust_i·‖g0‖·u_i/‖u_i‖ / n, so each client's term depends on its own
    update (and the server's root update) alone; central DP runs this form with the root update clipped to C.
    ``trust="cosine"`` (the paper's): trust = ReLU(cos). ``trust="sign"`` (ours, for DP): trust = 1 when the cosine
    is positive, else 0 — a gate instead of a weight. Under central DP the noise is fixed by the clip, so weighting
    honest updates by their cosine (often 0.2–0.5 between non-IID clients and the root set) shrinks the signal and not
    the noise; the gate keeps every aligned update at full size and still drops those pointing away from the root
    update. Its sensitivity is the same (trust stays in [0, 1]).
    When every client has zero trust the aggregate is the zero vector (the model does not move this round).
    """

    name = "fltrust"
    needs_individual_updates: ClassVar[bool] = True
    NORMALISE: ClassVar[tuple[str, ...]] = ("trust", "count")
    TRUST: ClassVar[tuple[str, ...]] = ("cosine", "sign")

    def __init__(self, normalise: str = "trust", trust: str = "cosine") -> None:
        if not isinstance(normalise, str) or normalise not in self.NORMALISE:
            raise AggregatorConfigError(f"fltrust: normalise must be one of {', '.join(self.NORMALISE)}, "
                                        f"not {normalise!r}")
        if not isinstance(trust, str) or trust not in self.TRUST:
            raise AggregatorConfigError(f"fltrust: trust must be one of {', '.join(self.TRUST)}, not {trust!r}")
        self.normalise = normalise
        self.trust = trust

    @property
    def poisson_sound(self) -> bool:
        """The count form only: its sum is Σ_i w_i·s·u_i/‖u_i‖, each term of norm <= s <= C and a function of u_i
        and the root update alone. The trust form divides by Σ w, which depends on everyone."""
        return self.normalise == "count"

    def min_clients(self) -> int:
        return 1

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """Count form: 2C/m, for a root update g0 with ‖g0‖ <= C (central DP clips it to C, like every update). Each
        term t_i = w_i·‖g0‖·u_i/‖u_i‖ has w_i = ReLU(cos(u_i, g0)) in [0, 1], so ‖t_i‖ <= ‖g0‖ <= C and t_i depends on
        u_i and g0 only; replacing u_i changes one term by <= 2C, and the output, (1/m)·Σ t_i, by <= 2C/m.
        Trust form: 2C, only the diameter of the C-ball the output is projected onto (Σ w renormalises by everyone's
        trust: one client can swing it from one direction to another)."""
        m, c = _check_m_clip(self.name, m, clip)
        return 2.0 * c / m if self.normalise == "count" else 2.0 * c

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, _ = _stack(updates, weights)
        if root_update is None:
            raise MissingRootUpdateError("fltrust needs root_update: the server's update on its root data set")
        g0 = np.asarray(root_update, dtype=np.float64)
        if g0.shape != x.shape[1:] or not np.all(np.isfinite(g0)):
            raise MissingRootUpdateError(f"root_update must be a finite vector of length {x.shape[1]}")
        norm0 = float(np.linalg.norm(g0))
        if norm0 == 0.0:
            raise MissingRootUpdateError("root_update is zero: it gives no direction to trust")
        norms = np.linalg.norm(x, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        cos = np.where(norms > 0, (x @ g0) / (safe * norm0), 0.0)
        cos = np.clip(cos, -1.0, 1.0)
        trust = np.maximum(cos, 0.0) if self.trust == "cosine" else (cos > 0.0).astype(np.float64)
        rejected = [int(i) for i in np.flatnonzero(trust == 0.0)]
        reasons = {
            i: "fltrust: zero update" if norms[i] == 0 else f"fltrust: cosine with the root update {cos[i]:.3f} <= 0"
            for i in rejected
        }
        scaled = x * (norm0 / safe)[:, None]
        if self.normalise == "count":
            vector = (trust / x.shape[0]) @ scaled
        elif trust.sum() > 0:
            vector = (trust / trust.sum()) @ scaled
        else:
            vector = np.zeros(x.shape[1])
        return AggregateResult(vector, 1.0 - trust, rejected, reasons)


class NormBound:
    """Clip each update to L2 norm ``max_norm`` (scaled down, direction kept), then run ``inner`` on the result.

    The root update handed to ``inner`` (FLTrust's reference) is clipped to ``max_norm`` too: every vector the inner
    aggregator sees is bounded, so FLTrust's rescaled terms are as well.
    """

    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, max_norm: float, inner: Aggregator | None = None) -> None:
        self.max_norm = _float_param("norm_bound", "max_norm", max_norm)
        if self.max_norm <= 0:
            raise AggregatorConfigError(f"norm_bound: max_norm must be positive, not {max_norm!r}")
        self.inner: Aggregator = FedAvg() if inner is None else inner
        self.name = f"norm_bound({self.inner.name})"

    def min_clients(self) -> int:
        inner_min: Callable[[], int] | None = getattr(self.inner, "min_clients", None)
        return inner_min() if inner_min is not None else 1

    @property
    def poisson_sound(self) -> bool:
        """As the inner aggregator: the second clip changes no one's dependence on the others."""
        return is_poisson_sound(self.inner)

    def replace_one_sensitivity(self, m: int, clip: float) -> float:
        """The inner aggregator's with C' = min(C, max_norm): the second clip only shrinks inputs (and the root
        update), so the inner aggregator sees m vectors of norm <= C', and its bound for C' holds."""
        m, c = _check_m_clip(self.name, m, clip)
        return sensitivity_of(self.inner, m, min(c, self.max_norm))

    def aggregate(
        self, updates: Sequence[np.ndarray], weights: Sequence[float], *, root_update: np.ndarray | None = None
    ) -> AggregateResult:
        x, w = _stack(updates, weights)
        norms = np.linalg.norm(x, axis=1)
        over = norms > self.max_norm
        factor = np.where(over, self.max_norm / np.where(over, norms, 1.0), 1.0)
        clipped_x = x * factor[:, None]
        root = None if root_update is None else project_l2_ball(np.asarray(root_update, dtype=np.float64),
                                                                 self.max_norm)
        res = self.inner.aggregate(list(clipped_x), list(w), root_update=root)
        # scored on the updates as sent: clipping makes a boosted update harmless, not unremarkable
        scores = _distance_scores(x, np.asarray(res.vector, dtype=np.float64))
        clipped = sorted(set(res.clipped) | {int(i) for i in np.flatnonzero(over)})
        return AggregateResult(res.vector, scores, list(res.rejected), dict(res.reasons), clipped)


# --- sensitivity under central DP ---------------------------------------------------------------------------------
def sensitivity_of(aggregator: Aggregator, m: int, clip: float) -> float:
    """``aggregator``'s replace-one L2 sensitivity on m updates of norm <= ``clip`` (its output projected onto the
    clip-ball), as it states it; an aggregator that states none is refused (central DP cannot noise it)."""
    method: Callable[[int, float], float] | None = getattr(aggregator, "replace_one_sensitivity", None)
    if method is None:
        raise AggregatorConfigError(
            f"{aggregator.name}: states no replace_one_sensitivity(m, clip), so central DP cannot bound it")
    value = float(method(m, clip))
    # the projection onto the clip-ball caps any aggregator at the ball's diameter
    return min(value, 2.0 * float(clip))


def is_poisson_sound(aggregator: Aggregator) -> bool:
    """Whether ``aggregator`` under central DP may use Poisson sampling's add/remove-one accounting (sum
    sensitivity = clip); False for one that does not say."""
    return bool(getattr(aggregator, "poisson_sound", False))


# --- configuration and reporting --------------------------------------------------------------------------------
def _make_norm_bound(
    max_norm: float, inner: str | Aggregator = "fedavg", inner_params: dict[str, Any] | None = None
) -> NormBound:
    if isinstance(inner, str):
        inner_agg = make_aggregator(inner, **(inner_params or {}))
    elif inner_params:
        raise AggregatorConfigError("norm_bound: inner_params only go with an inner aggregator given by name")
    else:
        inner_agg = inner
    return NormBound(max_norm, inner_agg)


def _make_multi_krum(f: int, m: int | None = None) -> Krum:
    return Krum(f, m)


#: name -> factory; the factory's signature is the parameter list make_aggregator accepts for that name.
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "fedavg": FedAvg,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": _make_multi_krum,
    "bulyan": Bulyan,
    "fltrust": FLTrust,
    "norm_bound": _make_norm_bound,
}


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """The aggregator called ``name`` (a key of :data:`AGGREGATORS`) with ``params``; typed errors for bad ones.

    ``multi_krum`` takes ``f`` and ``m`` (default n − f); ``norm_bound`` takes ``max_norm``, ``inner`` (a name or an
    aggregator, default ``"fedavg"``) and ``inner_params`` (a dict, for an inner aggregator given by name).
    """
    factory = AGGREGATORS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise AggregatorConfigError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    sig = inspect.signature(factory)
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise AggregatorConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'}"
        )
    try:
        sig.bind(**params)
    except TypeError as exc:
        raise AggregatorConfigError(f"{name}: {exc}") from None
    return factory(**params)


def outliers(scores: Sequence[float] | np.ndarray, threshold: float = 3.5) -> list[int]:
    """Clients whose score is unusually HIGH: modified z-score 0.6745·(s − median) / MAD above ``threshold``.

    Iglewicz & Hoaglin's rule (3.5 is their cut-off). When more than half the scores are equal (MAD = 0) the mean
    absolute deviation stands in (× 1.2533, its ratio to the standard deviation under normality); if that is 0
    too, nothing is flagged.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise InvalidArgumentError("scores must be a finite 1-D sequence")
    if s.size < 3:
        return []
    med = float(np.median(s))
    dev = np.abs(s - med)
    mad = float(np.median(dev))
    if mad > 0:
        z = 0.6745 * (s - med) / mad
    else:
        mean_ad = float(dev.mean())
        if mean_ad == 0:
            return []
        z = (s - med) / (1.2533 * mean_ad)
    return [int(i) for i in np.flatnonzero(z > threshold)]
