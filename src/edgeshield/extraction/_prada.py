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

Near-duplicates (our addition): honest clients retry and re-photograph; a query whose canonical key the client sent
before, or whose L2 distance to one of the client's stored queries (any class) is at most ``dup_distance``, is
ignored — neither a distance nor a set member — since it teaches an attacker almost nothing new. ``dup_distance``
comes from honest retakes (:func:`calibrate_dup_distance`); ``None`` skips exact key repeats only. Ignored queries
never join a set, so a chain of small steps cannot walk away from the stored queries unseen.

Shapiro–Wilk is :func:`edgeshield._stats.shapiro`, a numpy port of the algorithm ``scipy.stats.shapiro`` runs
(AS R94, agreeing to ~1e-13 in W), so a plain device install needs no scipy. ``delta`` should be calibrated on
benign traffic (:func:`calibrate_delta`); the paper used 0.9 (MNIST) and 0.95 (GTSRB).
"""

from __future__ import annotations

import io
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeshield._stats import shapiro
from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction._keys import _load_npz, digest_keys

__all__ = ["PradaDetector", "PradaState", "calibrate_delta", "calibrate_dup_distance", "shapiro_w"]

_STATE_VERSION = 1
_KEY_BYTES = 32


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
    ignored: int = 0  # near-duplicates and repeats skipped so far

    @property
    def stats(self) -> dict[str, Any]:
        return {"w": self.w, "distances": self.distances, "growing": self.growing, "ignored": self.ignored}


class _Ring:
    """At most ``cap`` rows, the oldest overwritten first; storage grows by doubling up to ``cap``."""

    def __init__(self, cap: int, width: int) -> None:
        self.cap, self.n, self.head = cap, 0, 0
        self.data = np.empty((min(cap, 16), width), dtype=np.float64)

    def append(self, row: np.ndarray) -> None:
        if self.n < self.cap:
            if self.n == len(self.data):
                grown = np.empty((min(self.cap, 2 * len(self.data)), self.data.shape[1]), dtype=np.float64)
                grown[: self.n] = self.data[: self.n]
                self.data = grown
            self.data[self.n] = row
            self.n += 1
        else:
            self.data[self.head] = row
            self.head = (self.head + 1) % self.cap

    def rows(self) -> np.ndarray:
        """The stored rows, in no particular order."""
        return self.data[: self.n]

    def ordered(self) -> np.ndarray:
        """The stored rows, oldest first."""
        return np.roll(self.data[: self.n], -self.head, axis=0) if self.n == self.cap else self.data[: self.n]


class _KeyWindow:
    """The most recent ``cap`` keys (a FIFO) with O(1) membership."""

    def __init__(self, cap: int) -> None:
        self.order: deque[bytes] = deque()
        self.counts: Counter[bytes] = Counter()
        self.cap = cap

    def add(self, key: bytes) -> None:
        self.order.append(key)
        self.counts[key] += 1
        if len(self.order) > self.cap:
            old = self.order.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]

    def __contains__(self, key: object) -> bool:
        return key in self.counts


@dataclass
class _ClassSet:
    queries: _Ring
    keys: _KeyWindow  # the keys of ``queries``, in the same order
    admitted: deque[float]
    threshold: float = 0.0


@dataclass
class _Client:
    recent: _KeyWindow
    distances: deque[float]
    classes: dict[int, _ClassSet] = field(default_factory=dict)
    width: int | None = None
    ignored: int = 0


class PradaDetector:
    """Per-client PRADA detector; ``observe`` takes a batch and returns the client's state after it.

    ``dup_distance`` (L2, ``None``: exact repeats only) ignores honest retakes, see the module docstring; a client's
    seen-key memory is bounded by the keys of its stored queries plus the ``max_recent_keys`` most recent ones.
    """

    name = "prada"

    def __init__(
        self,
        delta: float = 0.9,
        min_samples: int = 30,
        max_history: int = 1000,
        max_distances: int = 2000,
        outlier_sigmas: float = 3.0,
        *,
        dup_distance: float | None = None,
        max_recent_keys: int = 2000,
    ) -> None:
        if not 0.0 < delta <= 1.0:
            raise InvalidArgumentError("PRADA delta must lie in (0, 1]")
        if min_samples < 3:
            raise InvalidArgumentError("PRADA min_samples must be at least 3")
        if max_history < 1 or max_distances < min_samples:
            raise InvalidArgumentError("PRADA needs max_history >= 1 and max_distances >= min_samples")
        if outlier_sigmas <= 0:
            raise InvalidArgumentError("PRADA outlier_sigmas must be positive")
        if dup_distance is not None and (isinstance(dup_distance, bool) or not isinstance(dup_distance, (int, float))
                                         or not math.isfinite(dup_distance) or dup_distance < 0):
            raise InvalidArgumentError("PRADA dup_distance must be a finite distance >= 0 (or None)")
        if max_recent_keys < 0:
            raise InvalidArgumentError("PRADA max_recent_keys must be >= 0")
        self.delta = float(delta)
        self.min_samples = int(min_samples)
        self.max_history = int(max_history)
        self.max_distances = int(max_distances)
        self.outlier_sigmas = float(outlier_sigmas)
        self.dup_distance = None if dup_distance is None else float(dup_distance)
        self.max_recent_keys = int(max_recent_keys)
        self._clients: dict[str, _Client] = {}

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray,
                keys: Sequence[bytes] | None = None) -> PradaState:
        """Feed one batch of queries ``x`` (any shape ``[N, ...]``) with the model's predicted labels ``[N]`` and,
        optionally, their canonical keys (default: :func:`~edgeshield.extraction.digest_keys` of ``x``)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim < 1:
            raise InvalidArgumentError("PRADA needs a batch of queries (an array with a leading row axis)")
        flat = arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))
        labels = np.asarray(predicted).reshape(-1)
        if len(flat) != len(labels):
            raise InvalidArgumentError("PRADA needs one predicted label per query")
        keys = digest_keys(flat) if keys is None else list(keys)
        if len(keys) != len(flat) or any(not isinstance(k, bytes) or len(k) != _KEY_BYTES for k in keys):
            raise InvalidArgumentError(f"PRADA needs one {_KEY_BYTES}-byte key per query")
        if not np.isfinite(flat).all():
            raise InvalidArgumentError("PRADA needs finite queries")
        client = self._clients.get(client_id) or self._new_client()
        if len(flat) and client.width is not None and flat.shape[1] != client.width:
            raise InvalidArgumentError(f"PRADA holds queries of {client.width} features for this client; "
                                       f"got {flat.shape[1]}")
        self._clients[client_id] = client
        if len(flat):
            client.width = flat.shape[1]
        for query, label, key in zip(flat, labels, keys, strict=True):  # equal lengths: checked above
            self._add(client, query, int(label), key)
        return self.state(client_id)

    def state(self, client_id: str) -> PradaState:
        client = self._clients.get(client_id)
        distances = np.fromiter(client.distances, dtype=np.float64) if client else np.empty(0)
        growing = sum(c.queries.n for c in client.classes.values()) if client else 0
        w = self._w(distances) if distances.size >= self.min_samples else None
        return PradaState(self.name, w is not None and w < self.delta, w, int(distances.size), growing,
                          client.ignored if client else 0)

    def reset(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def stored_queries(self, client_id: str) -> int:
        """Number of query vectors held for a client (bounded by classes × ``max_history``)."""
        client = self._clients.get(client_id)
        return sum(c.queries.n for c in client.classes.values()) if client else 0

    def _new_client(self) -> _Client:
        return _Client(recent=_KeyWindow(self.max_recent_keys), distances=deque(maxlen=self.max_distances))

    def _add(self, client: _Client, query: np.ndarray, label: int, key: bytes) -> None:
        if key in client.recent or any(key in c.keys for c in client.classes.values()):
            client.ignored += 1
            return
        client.recent.add(key)
        # Without dup_distance only the predicted class's set is needed (the paper's cost); with it, every class's.
        compared = client.classes if self.dup_distance is not None else {
            c: s for c, s in client.classes.items() if c == label}
        nearest = {c: float(np.sqrt(((s.queries.rows() - query) ** 2).sum(axis=1).min())) for c, s in compared.items()}
        if self.dup_distance is not None and nearest and min(nearest.values()) <= self.dup_distance:
            client.ignored += 1  # an honest retake (or a probe too close to teach anything): no evidence either way
            return
        cls = client.classes.get(label)
        if cls is None:
            ring = _Ring(self.max_history, query.size)
            ring.append(query)
            window = _KeyWindow(self.max_history)
            window.add(key)
            client.classes[label] = _ClassSet(ring, window, deque(maxlen=self.max_history))
            return
        d_min = nearest[label]
        if d_min == 0.0:
            # An exact repeat teaches an attacker nothing new, while honest clients retry and resend all the time:
            # counting its zero distance would wreck the normality test (measured: every repetitive client flagged).
            client.ignored += 1
            return
        client.distances.append(d_min)
        if d_min > cls.threshold:
            cls.queries.append(query)
            cls.keys.add(key)
            cls.admitted.append(d_min)
            admitted = np.fromiter(cls.admitted, dtype=np.float64)
            cls.threshold = max(cls.threshold, float(admitted.mean() - admitted.std()))

    def _w(self, distances: np.ndarray) -> float:
        mean, std = distances.mean(), distances.std()
        kept = distances[np.abs(distances - mean) <= self.outlier_sigmas * std] if std > 0 else distances
        return shapiro_w(kept if kept.size >= 3 else distances)

    # --- persistence -------------------------------------------------------------------------------------------
    def export_state(self, client_id: str) -> bytes | None:
        """One client's sets, distances and recent keys as ``np.savez`` bytes (no pickle); None: nothing held."""
        client = self._clients.get(client_id)
        if client is None:
            return None
        width = -1 if client.width is None else client.width
        sets = sorted(client.classes.items())
        rows = [s.queries.ordered() for _, s in sets]
        arrays = {
            "version": np.asarray(_STATE_VERSION, dtype=np.int64),
            "width": np.asarray(width, dtype=np.int64),
            "ignored": np.asarray(client.ignored, dtype=np.int64),
            "labels": np.array([c for c, _ in sets], dtype=np.int64),
            "thresholds": np.array([s.threshold for _, s in sets], dtype=np.float64),
            "counts": np.array([len(r) for r in rows], dtype=np.int64),
            "admitted_counts": np.array([len(s.admitted) for _, s in sets], dtype=np.int64),
            "queries": np.concatenate(rows) if rows else np.empty((0, max(width, 0))),
            "query_keys": _key_array([k for _, s in sets for k in s.keys.order]),
            "admitted": np.array([d for _, s in sets for d in s.admitted], dtype=np.float64),
            "distances": np.array(client.distances, dtype=np.float64),
            "recent": _key_array(list(client.recent.order)),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def import_state(self, client_id: str, data: bytes) -> None:
        """Restore one client from :meth:`export_state` bytes; anything malformed raises ExtractionStateError.

        State written under larger bounds (``max_history`` etc.) is cut to this detector's, keeping the newest.
        """
        a = _load_npz(data, {"version", "width", "ignored", "labels", "thresholds", "counts", "admitted_counts",
                             "queries", "query_keys", "admitted", "distances", "recent"}, "PRADA state")
        scalars = ("version", "width", "ignored")
        if any(a[k].shape != () or a[k].dtype != np.int64 for k in scalars) or int(a["version"]) != _STATE_VERSION:
            raise ExtractionStateError("PRADA state: unknown version or malformed header")
        width, ignored = int(a["width"]), int(a["ignored"])
        labels, thresholds, counts, adm_counts = a["labels"], a["thresholds"], a["counts"], a["admitted_counts"]
        queries, qkeys, admitted, distances, recent = (a[k] for k in ("queries", "query_keys", "admitted",
                                                                      "distances", "recent"))
        c = labels.shape
        ok = (labels.dtype == np.int64 and labels.ndim == 1 and len(set(labels.tolist())) == labels.size
              and thresholds.dtype == np.float64 and thresholds.shape == c
              and counts.dtype == np.int64 and counts.shape == c and adm_counts.dtype == np.int64
              and adm_counts.shape == c and ignored >= 0
              and queries.dtype == np.float64 and queries.ndim == 2 and qkeys.shape == (queries.shape[0], _KEY_BYTES)
              and admitted.dtype == np.float64 and admitted.ndim == 1
              and distances.dtype == np.float64 and distances.ndim == 1
              and qkeys.dtype == np.uint8 and recent.dtype == np.uint8 and recent.ndim == 2
              and recent.shape[1] == _KEY_BYTES)
        ok = ok and bool((counts >= 1).all() and (adm_counts >= 0).all() and (adm_counts <= counts).all()
                         and int(counts.sum()) == queries.shape[0] and int(adm_counts.sum()) == admitted.size)
        ok = ok and ((width == -1 and not labels.size) or (width >= 1 and queries.shape[1] == width))
        floats = np.concatenate([queries.ravel(), thresholds, admitted, distances])
        ok = ok and bool(np.isfinite(floats).all() and (thresholds >= 0).all() and (admitted >= 0).all()
                         and (distances >= 0).all())
        if not ok:
            raise ExtractionStateError("PRADA state: arrays of the wrong shape, type or value")
        client = self._new_client()
        client.width, client.ignored = (None if width == -1 else width), ignored
        starts, adm_starts = np.cumsum(counts) - counts, np.cumsum(adm_counts) - adm_counts
        for i, label in enumerate(labels.tolist()):
            rows = queries[starts[i]: starts[i] + counts[i]][-self.max_history:]
            ks = qkeys[starts[i]: starts[i] + counts[i]][-self.max_history:]
            ring, window = _Ring(self.max_history, queries.shape[1]), _KeyWindow(self.max_history)
            for row, k in zip(rows, ks, strict=True):
                ring.append(row)
                window.add(k.tobytes())
            adm = admitted[adm_starts[i]: adm_starts[i] + adm_counts[i]].tolist()
            client.classes[label] = _ClassSet(ring, window, deque(adm, maxlen=self.max_history), float(thresholds[i]))
        client.distances.extend(distances.tolist())
        for k in recent:
            client.recent.add(k.tobytes())
        self._clients[client_id] = client


def _key_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), _KEY_BYTES).copy()


def calibrate_delta(w_values: np.ndarray, *, quantile: float = 0.01) -> float:
    """A ``delta`` below the given low quantile of W measured on benign client streams (benign FPR ≈ quantile)."""
    w = np.asarray(w_values, dtype=np.float64)
    if w.size == 0 or not 0.0 <= quantile < 1.0:
        raise InvalidArgumentError("calibrate_delta needs benign W values and a quantile in [0, 1)")
    return float(np.quantile(w, quantile))


def calibrate_dup_distance(retakes: np.ndarray, originals: np.ndarray, distinct: np.ndarray, *,
                           quantile: float = 0.99, margin: float = 1.5) -> float:
    """A ``dup_distance`` from honest traffic: the ``quantile`` of L2 distances between honest retakes and their
    originals (row i of each), times ``margin``.

    Refused if it would exceed the 1st percentile of nearest-neighbour distances between ``distinct`` honest inputs:
    then a retake and a new input cannot be told apart by distance, and skipping would hide real queries.
    """
    if not 0.0 < quantile <= 1.0 or not margin >= 1.0:
        raise InvalidArgumentError("calibrate_dup_distance needs a quantile in (0, 1] and a margin >= 1")
    r = np.asarray(retakes, dtype=np.float64)
    o = np.asarray(originals, dtype=np.float64)
    if r.shape != o.shape or r.ndim < 1 or not len(r):
        raise InvalidArgumentError("calibrate_dup_distance needs retakes and originals of the same shape, row i of "
                                   "each the same input")
    d = np.unique(np.asarray(distinct, dtype=np.float64).reshape(len(distinct), -1), axis=0)
    if len(d) < 2 or d.shape[1] != r.reshape(len(r), -1).shape[1]:
        raise InvalidArgumentError("calibrate_dup_distance needs at least two distinct inputs of the retakes' width")
    arrays = (r, o, d)
    if not all(np.isfinite(v).all() for v in arrays):
        raise InvalidArgumentError("calibrate_dup_distance needs finite inputs")
    retake = np.sqrt(((r - o).reshape(len(r), -1) ** 2).sum(axis=1))
    value = float(np.quantile(retake, quantile)) * float(margin)
    squares = (d**2).sum(axis=1)
    nearest = np.empty(len(d))
    for start in range(0, len(d), 512):  # blocks of rows: memory stays len(d) × 512
        block = d[start:start + 512]
        d2 = squares[start:start + 512, None] + squares[None, :] - 2.0 * block @ d.T
        d2[np.arange(len(block)), start + np.arange(len(block))] = np.inf
        nearest[start:start + 512] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    floor = float(np.quantile(nearest, 0.01))
    if value > floor:
        raise InvalidArgumentError(
            f"honest retakes lie up to {value:.4g} apart (quantile {quantile} × margin {margin}), beyond the 1st "
            f"percentile ({floor:.4g}) of nearest-neighbour distances between distinct honest inputs: retakes and new "
            "inputs cannot be told apart by distance, so near-duplicate skipping would hide real queries")
    return value
