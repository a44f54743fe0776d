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
``max_distances`` distances. The test is therefore over a sliding window, which also lets an attack that starts late
still be caught. Everything is held in numpy rings, not Python objects: a stored query costs ``4·d`` bytes (float32,
the canonical input dtype: lossless for the float32 rows the server hands over, and distances are computed in
float64 exactly as from float64 rows) plus its 32-byte key and an 8-byte admitted distance; a recent key 32 bytes, a
distance 8. So a client costs at most ``classes·max_history·(4·d + 40) + 32·max_recent_keys + 8·max_distances``
bytes (``max_client_bytes``): 3.0 MB for digits (d = 64, 10 classes) at the defaults. Measured for one client filled
to the bounds (``benchmarks/_monitor_scale.py``, ``prada_full``): 3.04 MB of state as written and 6.4 MB of resident
set, against 5.6 MB and 8.4 MB when rows were float64 and keys and distances Python objects.

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
_KEY_WORDS = _KEY_BYTES // 8  # a key held as 4 uint64 words


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
    """At most ``cap`` rows of ``width`` values of ``dtype``, the oldest overwritten first; storage starts at two
    rows and grows by doubling up to ``cap`` (a client with a few queries per class holds a few rows per class)."""

    def __init__(self, cap: int, width: int, dtype: type[np.generic] = np.float32) -> None:
        self.cap, self.n, self.head = cap, 0, 0
        self.data = np.empty((min(cap, 2), width), dtype=dtype)

    @classmethod
    def of(cls, cap: int, rows: np.ndarray, dtype: type[np.generic] = np.float32) -> _Ring:
        """A ring holding the newest ``cap`` of ``rows`` (oldest first), as if they had been appended in order."""
        ring = cls(cap, rows.shape[1], dtype)
        kept = rows[-cap:] if cap else rows[:0]
        if len(kept):
            ring.data = np.array(kept, dtype=dtype)
            ring.n = len(kept)
            ring.head = 0
        return ring

    def append(self, row: np.ndarray | np.generic) -> None:
        if self.n < self.cap:
            if self.n == len(self.data):
                grown = np.empty((min(self.cap, 2 * len(self.data)), self.data.shape[1]), dtype=self.data.dtype)
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
    """The most recent ``cap`` 32-byte keys (a FIFO; a key added twice is held twice) in one ring of 4 uint64 words
    per key: 32 bytes a key instead of a bytes object, a deque slot and a counter entry (about 140 bytes).
    Membership compares the first word of every held key (one vectorised pass), then the whole of the few that
    share it: exact, as a set would be."""

    def __init__(self, cap: int, keys: np.ndarray | None = None) -> None:
        self.cap = cap
        self._ring = None
        if cap:
            words = None if keys is None else np.ascontiguousarray(keys, dtype=np.uint8).view(np.uint64)
            self._ring = _Ring(cap, _KEY_WORDS, np.uint64) if words is None else _Ring.of(cap, words, np.uint64)

    def add(self, key: bytes) -> None:
        if self._ring is not None:
            self._ring.append(np.frombuffer(key, dtype=np.uint64))

    def __contains__(self, key: object) -> bool:
        if self._ring is None or not self._ring.n or not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            return False
        rows = self._ring.rows()
        want = np.frombuffer(key, dtype=np.uint64)
        first = rows[:, 0] == want[0]
        if not first.any():
            return False
        return bool((rows[first] == want).all(axis=1).any())

    def __len__(self) -> int:
        return 0 if self._ring is None else self._ring.n

    def first_words(self) -> np.ndarray:
        """The first uint64 word of every held key (a view, in no particular order)."""
        return np.empty(0, np.uint64) if self._ring is None else self._ring.rows()[:, 0]

    def ordered(self) -> np.ndarray:
        """The keys, oldest first, as a uint8 array [n, 32]."""
        if self._ring is None:
            return np.empty((0, _KEY_BYTES), np.uint8)
        return np.ascontiguousarray(self._ring.ordered()).view(np.uint8)


class _FloatWindow:
    """The most recent ``cap`` float64 values (a bounded deque's semantics, 8 bytes a value)."""

    def __init__(self, cap: int, values: Sequence[float] | np.ndarray = ()) -> None:
        self._ring = _Ring.of(cap, np.asarray(values, dtype=np.float64).reshape(-1, 1), np.float64)

    def append(self, value: float) -> None:
        self._ring.append(np.float64(value))

    def __len__(self) -> int:
        return self._ring.n

    def values(self) -> np.ndarray:
        """The values, oldest first (float64 [n])."""
        return self._ring.ordered().ravel()


@dataclass
class _ClassSet:
    queries: _Ring
    keys: _KeyWindow  # the keys of ``queries``, in the same order
    admitted: _FloatWindow
    threshold: float = 0.0


@dataclass
class _Client:
    recent: _KeyWindow
    distances: _FloatWindow
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
        # Which keys may have been seen: their first word among the held keys' at the start of the batch (one
        # vectorised pass instead of a scan per query). A key held now was either held then or added during this
        # batch, so the exact check is needed only for those; a key evicted since is settled by the exact check.
        held = [client.recent.first_words(), *(c.keys.first_words() for c in client.classes.values())]
        firsts = np.frombuffer(b"".join(keys), dtype=np.uint64)[::_KEY_WORDS] if keys else np.empty(0, np.uint64)
        maybe = np.isin(firsts, np.concatenate(held)).tolist()
        added: set[bytes] = set()
        nearest = _BatchNearest(client, flat, labels, every_class=self.dup_distance is not None)
        for j, (query, label, key, seen) in enumerate(zip(flat, labels, keys, maybe, strict=True)):  # equal lengths
            self._add(client, query, int(label), key, seen or key in added, nearest, j)
            added.add(key)
        return self.state(client_id)

    def state(self, client_id: str) -> PradaState:
        client = self._clients.get(client_id)
        distances = client.distances.values() if client else np.empty(0)
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

    def max_client_bytes(self, features: int, classes: int) -> int:
        """The most one client's state can hold, in bytes of array data, for inputs of ``features`` values and a
        model of ``classes`` classes: every class set full, every recent key and distance kept (see the module
        docstring; Python object headers, a few hundred bytes a class, come on top)."""
        per_query = 4 * int(features) + _KEY_BYTES + 8
        return int(classes) * self.max_history * per_query + _KEY_BYTES * self.max_recent_keys \
            + 8 * self.max_distances

    def _new_client(self) -> _Client:
        return _Client(recent=_KeyWindow(self.max_recent_keys), distances=_FloatWindow(self.max_distances))

    def _add(self, client: _Client, query: np.ndarray, label: int, key: bytes, maybe_seen: bool = True,
             batch: _BatchNearest | None = None, j: int = 0) -> None:
        if maybe_seen and (key in client.recent or any(key in c.keys for c in client.classes.values())):
            client.ignored += 1
            return
        client.recent.add(key)
        # Without dup_distance only the predicted class's set is needed (the paper's cost); with it, every class's.
        compared = client.classes if self.dup_distance is not None else {
            c: s for c, s in client.classes.items() if c == label}
        nearest = batch.nearest(compared, query, j) if batch is not None else {
            c: _nearest_live(s, query) for c, s in compared.items()}
        if self.dup_distance is not None and nearest and min(nearest.values()) <= self.dup_distance:
            client.ignored += 1  # an honest retake (or a probe too close to teach anything): no evidence either way
            return
        cls = client.classes.get(label)
        if cls is None:
            ring = _Ring(self.max_history, query.size)
            ring.append(query)
            window = _KeyWindow(self.max_history)
            window.add(key)
            client.classes[label] = _ClassSet(ring, window, _FloatWindow(self.max_history))
            if batch is not None:
                batch.created(label, ring)
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
            if batch is not None:
                batch.appended(label, cls.queries.rows()[-1])  # (a set that was full is not tracked)
            cls.keys.add(key)
            cls.admitted.append(d_min)
            admitted = cls.admitted.values()
            cls.threshold = max(cls.threshold, float(admitted.mean() - admitted.std()))

    def _w(self, distances: np.ndarray) -> float:
        mean, std = distances.mean(), distances.std()
        kept = distances[np.abs(distances - mean) <= self.outlier_sigmas * std] if std > 0 else distances
        return shapiro_w(kept if kept.size >= 3 else distances)

    # --- persistence -------------------------------------------------------------------------------------------
    def export_state(self, client_id: str) -> bytes | None:
        """One client's sets, distances and recent keys as ``np.savez`` bytes (no pickle); None: nothing held.
        Queries are written as float32 (as held); ``import_state`` also reads the float64 rows written before."""
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
            "queries": np.concatenate(rows) if rows else np.empty((0, max(width, 0)), dtype=np.float32),
            "query_keys": np.concatenate([s.keys.ordered() for _, s in sets]) if sets else _key_array([]),
            "admitted": np.concatenate([s.admitted.values() for _, s in sets]) if sets else np.empty(0),
            "distances": client.distances.values(),
            "recent": client.recent.ordered(),
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
              and queries.dtype in (np.float32, np.float64) and queries.ndim == 2
              and qkeys.shape == (queries.shape[0], _KEY_BYTES)
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
            ring = _Ring.of(self.max_history, queries[starts[i]: starts[i] + counts[i]])
            window = _KeyWindow(self.max_history, qkeys[starts[i]: starts[i] + counts[i]])
            adm = admitted[adm_starts[i]: adm_starts[i] + adm_counts[i]]
            client.classes[label] = _ClassSet(ring, window, _FloatWindow(self.max_history, adm),
                                              float(thresholds[i]))
        client.distances = _FloatWindow(self.max_distances, distances)
        client.recent = _KeyWindow(self.max_recent_keys, recent)
        self._clients[client_id] = client


def _nearest_live(s: _ClassSet, query: np.ndarray) -> float:
    """L2 distance from ``query`` to its nearest neighbour in the class set ``s``."""
    return float(np.sqrt(((s.queries.rows() - query) ** 2).sum(axis=1).min()))


class _BatchNearest:
    """Nearest-neighbour distances for one batch of one client, with a few vectorised passes instead of one per
    query and class set: the least squared distance of every query of the batch to each set as it was when the batch
    began (one pass per set), and, per query, to the rows appended during the batch (one pass over all of them;
    a set created during the batch holds only such rows).
    The minimum of the two is, bit for bit, what comparing each query with the whole set when it comes gives (the
    same per-row sums). A set the batch could overwrite (no room for every row of the batch) is compared live."""

    def __init__(self, client: _Client, flat: np.ndarray, labels: np.ndarray, *, every_class: bool) -> None:
        wanted = client.classes if every_class else {
            c: client.classes[c] for c in set(labels.tolist()) if c in client.classes}
        self.before: dict[int, np.ndarray] = {}
        for c, s in wanted.items():
            if not len(flat) or s.queries.n + len(flat) > s.queries.cap:
                continue
            rows = s.queries.rows()
            best = np.empty(len(flat))
            step = max(1, (1 << 19) // max(1, rows.size))  # at most ~4 MB of differences at a time
            for start in range(0, len(flat), step):
                q = flat[start : start + step]
                best[start : start + len(q)] = ((rows[None, :, :] - q[:, None, :]) ** 2).sum(axis=2).min(axis=1)
            self.before[c] = best
        self._rows: list[np.ndarray] = []
        self._classes: list[int] = []
        self._n = len(flat)

    def created(self, c: int, ring: _Ring) -> None:
        """Class set ``c`` was created during the batch, holding one row: tracked if the batch cannot overwrite it."""
        if self._n <= ring.cap:
            self.before[c] = np.full(self._n, np.inf)
            self.appended(c, ring.rows()[0])

    def appended(self, c: int, row: np.ndarray) -> None:
        """A row was appended to class set ``c`` during the batch."""
        if c in self.before:
            self._rows.append(row)
            self._classes.append(c)

    def nearest(self, compared: dict[int, _ClassSet], query: np.ndarray, j: int) -> dict[int, float]:
        out: dict[int, float] = {}
        extra: dict[int, float] = {}
        if self._rows and any(c in self.before for c in compared):
            d2 = ((np.stack(self._rows) - query) ** 2).sum(axis=1)
            for c, v in zip(self._classes, d2.tolist(), strict=True):
                if c not in extra or v < extra[c]:
                    extra[c] = v
        for c, s in compared.items():
            if c in self.before:
                d = float(self.before[c][j])
                out[c] = float(np.sqrt(min(d, extra[c]) if c in extra else d))
            else:
                out[c] = _nearest_live(s, query)
        return out


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
