"""PRADA: per-client detection of model-extraction query streams (Juuti et al., EuroS&P 2019).

Variant implemented (Algorithm 1 of the paper, with bounded memory):

* Per client and per predicted class ``c`` keep a *growing set* ``G_c`` of queries, the distances ``D_{G_c}`` that
  admitted them, and a threshold ``T_c`` (initially 0).
* For a query ``x`` predicted as ``c``: if ``G_c`` is empty, ``x`` joins ``G_c`` and nothing else happens.
  Otherwise ``d_min = min_{y in G_c} ||x - y||_2`` is appended to the client's distance set ``D`` (all classes);
  if ``d_min > T_c`` then ``x`` joins ``G_c``, ``d_min`` joins ``D_{G_c}`` and
  ``T_c = max(T_c, mean(D_{G_c}) - std(D_{G_c}))``.
* Once ``|D| >= min_samples`` the Shapiro–Wilk statistic ``W`` is computed on ``D`` after removing outliers outside
  ``mean ± 3·std`` (as in the paper); ``W < delta`` raises the alarm. Benign queries give roughly normal minimum
  distances; synthetic queries (small perturbations of seeds, random probes) do not.

Memory bound (our deviation from the paper, which keeps everything): ``G_c`` keeps at most ``max_history`` queries
per class (the most recent ones, a ring buffer), ``D_{G_c}`` the same number of distances, and ``D`` the most recent
``max_distances`` distances. So a client costs at most ``classes·max_history·(d + 1) + max_distances`` floats.
The test is therefore over a sliding window, which also lets an attack that starts late still be caught.

Shapiro–Wilk is :func:`edgeshield._stats.shapiro`, a numpy port of the algorithm ``scipy.stats.shapiro`` runs
(AS R94, agreeing to ~1e-13 in W), so a plain device install needs no scipy. ``delta`` should be calibrated on
benign traffic (:func:`calibrate_delta`); the paper used 0.9 (MNIST) and 0.95 (GTSRB).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeshield._stats import shapiro
from edgeshield.errors import InvalidArgumentError

__all__ = ["PradaDetector", "PradaState", "calibrate_delta", "shapiro_w"]


def shapiro_w(values: np.ndarray) -> float:
    """Shapiro–Wilk W of ``values`` (3 ≤ n ≤ 5000); a constant sample gives 0.0 (maximally non-normal)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 3:
        raise InvalidArgumentError("Shapiro–Wilk needs at least 3 values")
    if np.ptp(values) <= 1e-12 * max(1.0, float(np.abs(values).max())):
        return 0.0
    return float(shapiro(values[-5000:]).statistic)


@dataclass(frozen=True)
class PradaState:
    """What PRADA knows about one client after a batch: W (None before the test can run), |D|, alarm."""

    name: str
    alarm: bool
    w: float | None
    distances: int
    growing: int

    @property
    def stats(self) -> dict[str, Any]:
        return {"w": self.w, "distances": self.distances, "growing": self.growing}


@dataclass
class _ClassSet:
    queries: deque[np.ndarray]
    admitted: deque[float]
    threshold: float = 0.0


@dataclass
class _Client:
    classes: dict[int, _ClassSet] = field(default_factory=dict)
    distances: deque[float] = field(default_factory=deque)


class PradaDetector:
    """Per-client PRADA detector; ``observe`` takes a batch and returns the client's state after it."""

    name = "prada"

    def __init__(
        self,
        delta: float = 0.9,
        min_samples: int = 30,
        max_history: int = 1000,
        max_distances: int = 2000,
        outlier_sigmas: float = 3.0,
    ) -> None:
        if not 0.0 < delta <= 1.0:
            raise InvalidArgumentError("PRADA delta must lie in (0, 1]")
        if min_samples < 3:
            raise InvalidArgumentError("PRADA min_samples must be at least 3")
        if max_history < 1 or max_distances < min_samples:
            raise InvalidArgumentError("PRADA needs max_history >= 1 and max_distances >= min_samples")
        if outlier_sigmas <= 0:
            raise InvalidArgumentError("PRADA outlier_sigmas must be positive")
        self.delta = float(delta)
        self.min_samples = int(min_samples)
        self.max_history = int(max_history)
        self.max_distances = int(max_distances)
        self.outlier_sigmas = float(outlier_sigmas)
        self._clients: dict[str, _Client] = {}

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray) -> PradaState:
        """Feed one batch of queries ``x`` (any shape ``[N, ...]``) with the model's predicted labels ``[N]``."""
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        labels = np.asarray(predicted).reshape(-1)
        if len(flat) != len(labels):
            raise InvalidArgumentError("PRADA needs one predicted label per query")
        client = self._clients.setdefault(client_id, _Client(distances=deque(maxlen=self.max_distances)))
        for query, label in zip(flat, labels, strict=True):  # equal lengths: checked above
            self._add(client, query, int(label))
        return self.state(client_id)

    def state(self, client_id: str) -> PradaState:
        client = self._clients.get(client_id)
        distances = np.fromiter(client.distances, dtype=np.float64) if client else np.empty(0)
        growing = sum(len(c.queries) for c in client.classes.values()) if client else 0
        w = self._w(distances) if distances.size >= self.min_samples else None
        return PradaState(self.name, w is not None and w < self.delta, w, int(distances.size), growing)

    def reset(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def stored_queries(self, client_id: str) -> int:
        """Number of query vectors held for a client (bounded by classes × ``max_history``)."""
        client = self._clients.get(client_id)
        return sum(len(c.queries) for c in client.classes.values()) if client else 0

    def _add(self, client: _Client, query: np.ndarray, label: int) -> None:
        cls = client.classes.get(label)
        if cls is None:
            client.classes[label] = _ClassSet(deque([query], maxlen=self.max_history), deque(maxlen=self.max_history))
            return
        d_min = float(np.sqrt(((np.stack(cls.queries) - query) ** 2).sum(axis=1).min()))
        if d_min == 0.0:
            # An exact repeat teaches an attacker nothing new, while honest clients retry and resend all the time:
            # counting its zero distance would wreck the normality test (measured: every repetitive client flagged).
            return
        client.distances.append(d_min)
        if d_min > cls.threshold:
            cls.queries.append(query)
            cls.admitted.append(d_min)
            admitted = np.fromiter(cls.admitted, dtype=np.float64)
            cls.threshold = max(cls.threshold, float(admitted.mean() - admitted.std()))

    def _w(self, distances: np.ndarray) -> float:
        mean, std = distances.mean(), distances.std()
        kept = distances[np.abs(distances - mean) <= self.outlier_sigmas * std] if std > 0 else distances
        return shapiro_w(kept if kept.size >= 3 else distances)


def calibrate_delta(w_values: np.ndarray, *, quantile: float = 0.01) -> float:
    """A ``delta`` below the given low quantile of W measured on benign client streams (benign FPR ≈ quantile)."""
    w = np.asarray(w_values, dtype=np.float64)
    if w.size == 0 or not 0.0 <= quantile < 1.0:
        raise InvalidArgumentError("calibrate_delta needs benign W values and a quantile in [0, 1)")
    return float(np.quantile(w, quantile))
