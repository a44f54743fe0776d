"""Signals complementary to PRADA: out-of-distribution rate and a per-client budget of distinct queries.

``OodRateSignal``: PRADA looks at the *spacing* of a client's queries; random or synthetic probes that are evenly
spread (uniform noise, Jacobian-augmented seeds) can pass it. Such probes are far from the data manifold, so the
number of a client's recent queries whose PCA reconstruction residual
(:class:`edgeshield.adversarial.ReconstructionDetector`, fitted on clean data) exceeds the clean ``quantile`` is a
cheap second signal. The alarm is a one-sided binomial test: with ``k`` out-of-distribution queries among the last
``n``, it fires when ``P(Binomial(n, null_rate) >= k) < alpha``. ``null_rate`` is the rate an honest client is
assumed not to exceed (by default twice the calibrated ``1 - quantile``, for the quantile's estimation error), and
``alpha`` is small (1e-6) because the test is repeated after every batch. A burst of a handful of synthetic queries
already crosses it (5 of 10 at the defaults), where a fixed rate threshold needs a full window.

``QueryBudget``: a client's number of *distinct* inputs (exact repeats are free) in a sliding time window. Extraction
needs many distinct answers; an honest device sees a bounded stream. Natural-data extraction (an attacker with real
inputs of the task) is statistically indistinguishable from an honest client query by query, so the budget is the
one brake that works on it: it caps what one identity can learn per window. It is an operator setting (the most
distinct inputs an honest device of this deployment sends per window, with a margin), not something to learn from
the attacker. Memory per client: at most ``budget + 1`` 32-byte digests.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeshield._arrays import canonical
from edgeshield._stats import binomial_sf
from edgeshield.adversarial import ReconstructionDetector
from edgeshield.errors import InvalidArgumentError

__all__ = ["OodRateSignal", "QueryBudget", "SignalState"]


@dataclass(frozen=True)
class SignalState:
    """One signal's view of one client: alarm plus the numbers behind it."""

    name: str
    alarm: bool
    stats: dict[str, Any]


class OodRateSignal:
    """Alarm when a client's recent out-of-distribution count is implausible for an honest client."""

    name = "ood_rate"

    def __init__(
        self,
        detector: ReconstructionDetector,
        threshold: float,
        *,
        null_rate: float = 0.02,
        alpha: float = 1e-6,
        window: int = 200,
        min_samples: int = 10,
    ) -> None:
        if not 1 <= min_samples <= window:
            raise InvalidArgumentError("ood_rate needs 1 <= min_samples <= window")
        if not 0.0 < null_rate < 1.0:
            raise InvalidArgumentError("ood_rate null_rate must lie in (0, 1)")
        if not 0.0 < alpha < 1.0:
            raise InvalidArgumentError("ood_rate alpha must lie in (0, 1)")
        self.detector = detector
        self.threshold = float(threshold)
        self.null_rate = float(null_rate)
        self.alpha = float(alpha)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self._flags: dict[str, deque[bool]] = {}

    @classmethod
    def fit(
        cls,
        reference: np.ndarray,
        held_out: np.ndarray,
        *,
        components: int = 20,
        quantile: float = 0.99,
        **kwargs: Any,
    ) -> OodRateSignal:
        """PCA on clean ``reference``; the OOD threshold is the ``quantile`` of residuals on clean ``held_out``."""
        if not 0.0 < quantile < 1.0:
            raise InvalidArgumentError("ood_rate quantile must lie in (0, 1)")
        detector = ReconstructionDetector.fit(reference, components=components)
        kwargs.setdefault("null_rate", min(0.5, 2.0 * (1.0 - quantile)))
        return cls(detector, float(np.quantile(detector.scores(held_out), quantile)), **kwargs)

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None) -> SignalState:
        flags = self._flags.setdefault(client_id, deque(maxlen=self.window))
        flags.extend((self.detector.scores(np.asarray(x)) > self.threshold).tolist())
        return self.state(client_id)

    def state(self, client_id: str) -> SignalState:
        flags = self._flags.get(client_id, ())
        n, k = len(flags), int(sum(flags))
        p = binomial_sf(k, n, self.null_rate) if n else 1.0
        alarm = n >= self.min_samples and p < self.alpha
        return SignalState(self.name, alarm, {"ood_rate": k / n if n else 0.0, "window": n, "p_value": p})

    def reset(self, client_id: str) -> None:
        self._flags.pop(client_id, None)


class QueryBudget:
    """Alarm when a client sent more than ``budget`` distinct inputs within the last ``window_s`` seconds."""

    name = "query_budget"

    def __init__(self, budget: int, *, window_s: float = 86400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if budget < 1:
            raise InvalidArgumentError("query budget must be at least 1 distinct input")
        if not window_s > 0:
            raise InvalidArgumentError("query budget window must be positive")
        self.budget = int(budget)
        self.window_s = float(window_s)
        self._clock = clock
        self._seen: dict[str, OrderedDict[bytes, float]] = {}

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None) -> SignalState:
        seen = self._seen.setdefault(client_id, OrderedDict())
        now = self._clock()
        rows = canonical(x)
        for i in range(len(rows)):
            digest = hashlib.sha256(rows[i].tobytes()).digest()
            seen[digest] = now
            seen.move_to_end(digest)
            if len(seen) > self.budget + 1:  # over budget already: the oldest digests no longer matter
                seen.popitem(last=False)
        return self.state(client_id)

    def state(self, client_id: str) -> SignalState:
        seen = self._seen.get(client_id)
        if seen is None:
            return SignalState(self.name, False, {"distinct": 0, "budget": self.budget})
        horizon = self._clock() - self.window_s
        while seen and next(iter(seen.values())) < horizon:
            seen.popitem(last=False)
        return SignalState(self.name, len(seen) > self.budget, {"distinct": len(seen), "budget": self.budget})

    def reset(self, client_id: str) -> None:
        self._seen.pop(client_id, None)
