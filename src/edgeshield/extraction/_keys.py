"""Canonical keys of model inputs: one 32-byte identity per input row, the same for jittered copies of it.

Every per-input decision (the query budget, PRADA's repeat skipping, the served watermark's unit) keys on these, so
changing one pixel by 1e-6 no longer makes a "new" input.

* :class:`GridKeys` — the input spec has a quantum: a row's key is the SHA-256 of its values snapped to the grid
  (``InputSpec.snap``'s formula), so every float32 way of writing ``k·quantum`` gets one key. Off-grid jitter is
  refused earlier, by ``InputSpec.validate``.
* :class:`LeaderKeys` — no quantum: a registry of representative rows ("leaders"). A row within L∞ ``radius`` of a
  registered leader takes the key of the earliest registered such leader; otherwise it becomes a leader itself.
  Claim: every perturbation of a registered leader up to L∞ ``radius`` maps to its key, so jittered copies of any
  input ``x``, each within ``radius/2`` of ``x``, share one key whichever copy came first. No fixed partition of
  input space can promise that (a cell boundary always splits some close pair), hence the registry.
* :func:`digest_keys` — SHA-256 of the exact float32 bytes: the old behaviour, the default where no keys are given.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import zipfile
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeshield._arrays import canonical
from edgeshield.errors import ExtractionStateError, InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec

__all__ = ["GridKeys", "InputKeys", "LeaderKeys", "collision_rate", "digest_keys", "keys_for"]

_GRID_TAG = b"edgeshield/key/grid/v1"
_LEADER_TAG = b"edgeshield/key/leader/v1"
_STATE_VERSION = 1


class InputKeys(Protocol):
    name: str

    def keys(self, x: np.ndarray) -> list[bytes]: ...

    def describe(self) -> dict[str, Any]: ...

    def export_state(self) -> bytes | None: ...

    def import_state(self, data: bytes) -> None: ...


def digest_keys(x: np.ndarray) -> list[bytes]:
    """SHA-256 of each row's canonical float32 bytes (exact identity: any change of any bit is a new key)."""
    rows = canonical(x)
    return [hashlib.sha256(rows[i].tobytes()).digest() for i in range(rows.shape[0])]


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 rows ``[N, features]``; non-finite values are refused (a key of NaN means nothing)."""
    rows = canonical(x)
    rows = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    if not np.isfinite(rows).all():
        raise InvalidArgumentError("canonical keys need finite input values (NaN or infinity found)")
    return rows


class GridKeys:
    """Keys of inputs on a grid of step ``quantum``: SHA-256 of the row snapped to ``k·quantum`` in float32.

    The snap is ``InputSpec.snap``'s: ``rint(x / quantum) · quantum`` computed in float64 and rounded once to float32,
    so the key depends only on the integers ``k`` (for float32 inputs the bytes hashed are exactly
    ``InputSpec.snap(x)``'s). Stateless.
    """

    name = "grid"

    def __init__(self, quantum: float) -> None:
        if isinstance(quantum, bool) or not isinstance(quantum, (int, float)) or not np.isfinite(quantum) \
                or not quantum > 0:
            raise InvalidArgumentError("grid keys need a positive, finite quantum")
        self.quantum = float(quantum)

    def keys(self, x: np.ndarray) -> list[bytes]:
        v = np.asarray(x)
        if v.ndim < 1 or v.dtype.kind not in "fiub":
            raise InvalidArgumentError("grid keys need a numeric batch (an array with a leading row axis)")
        v64 = v.astype(np.float64).reshape(v.shape[0], -1)
        if not np.isfinite(v64).all():
            raise InvalidArgumentError("canonical keys need finite input values (NaN or infinity found)")
        with np.errstate(over="ignore"):
            snapped = np.ascontiguousarray((np.rint(v64 / self.quantum) * self.quantum).astype("<f4"))
        return [hashlib.sha256(_GRID_TAG + snapped[i].tobytes()).digest() for i in range(snapped.shape[0])]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "quantum": self.quantum}

    def export_state(self) -> bytes | None:
        return None

    def import_state(self, data: bytes) -> None:
        """Nothing to restore: grid keys are a pure function of the input (a stale leader registry is ignored)."""


# Odd 64-bit multipliers that mix a cell's coordinates into one code (a collision only adds candidates).
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)
_INDEX_DIMS = len(_MIX)
_FILTER_DIMS = 16  # coordinates compared first (a contiguous copy): most candidates fail there, cheaply
_ALL_TRUE = np.uint64(0x0101010101010101)  # eight numpy bools, all True, read as one word
_CHUNK = 256  # rows looked up against the index at once; rows inside a chunk are then settled in order
_GATHER = 1 << 22  # at most this many candidate values compared at once (memory bound of one lookup step)


class LeaderKeys:
    """A registry of leaders: a row within L∞ ``radius`` of a leader takes the earliest such leader's key.

    Lookup is exact (the brute-force scan is the oracle in the tests) through a grid index on ``k`` (up to 8)
    coordinates that spread the leaders most (re-chosen whenever the registry doubles). A coordinate is 1-Lipschitz
    in L∞, so a leader within ``radius`` of a row lies in a cell (width ``4·radius``) that ``row ± radius`` touches:
    one or two per coordinate, about ``1.5^k`` cells per row. Leaders in those cells are compared on 16 spread
    coordinates first (a contiguous copy), and in full only if those pass.
    Rows crowded into few cells (many near-copies, or inputs that differ only outside the indexed coordinates)
    make the scan slower, never wrong.

    Rows of one call are settled in order: a later row may take the key of a leader an earlier row of the same call
    registered. A leader's key is the SHA-256 of a domain tag and its float32 bytes.

    Memory is bounded: at most ``max_leaders`` leaders (``max_leaders · features`` float32 values). Beyond that the
    least recently used ``max_leaders // 16`` are forgotten at the end of a call (one index rebuild per such step);
    a jittered copy of a forgotten leader then gets a new key, i.e. counts as a new input again.

    Thread-safe: one lock around every call (the server calls it from worker threads).
    """

    name = "leader"

    def __init__(self, radius: float = 0.04, *, max_leaders: int = 200_000) -> None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not np.isfinite(radius) \
                or not radius > 0:
            raise InvalidArgumentError("leader keys need a positive, finite radius")
        if isinstance(max_leaders, bool) or not isinstance(max_leaders, int) or max_leaders < 1:
            raise InvalidArgumentError("leader keys need max_leaders >= 1")
        self.radius = float(radius)
        self.max_leaders = max_leaders
        # The float32 threshold rows are compared with: radius plus 1e-5 of it, so that float32 rounding of copies
        # built within radius/2 of an input (a few ulps) never splits them.
        self._r32 = np.float32(self.radius * (1 + 1e-5))
        # Probe margin and cell width: [v - margin, v + margin] covers every value within radius of v despite float
        # rounding and is narrower than one cell, so it touches one cell per coordinate or (about half the time,
        # with cells of 4·radius) two: about 1.5^k probes per row, not 2^k.
        self._margin = self.radius * (1 + 5e-4)
        self._width = 4.0 * self.radius * (1 + 1e-3)
        self._clip = self.radius * 1e7  # index coordinates are clipped (monotone, 1-Lipschitz) so floats stay exact
        self._lock = threading.Lock()
        self._clear(None)

    # --- public ------------------------------------------------------------------------------------------------
    def keys(self, x: np.ndarray) -> list[bytes]:
        rows = _finite_rows(x)
        with self._lock:
            if self._features is None:
                self._clear(rows.shape[1])
            if rows.shape[1] != self._features:
                raise InvalidArgumentError(
                    f"leader keys hold rows of {self._features} features; got rows of {rows.shape[1]}")
            out: list[bytes] = []
            for start in range(0, rows.shape[0], _CHUNK):
                out += self._settle(rows[start:start + _CHUNK])
            if self._n > self.max_leaders:
                self._evict()
            return out

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"kind": self.name, "radius": self.radius, "leaders": self._n, "max_leaders": self.max_leaders,
                    "features": self._features, "index_dims": len(self._dims)}

    @property
    def match_radius(self) -> float:
        """The L∞ threshold actually applied (float32 arithmetic): ``radius`` plus 1e-5 of it for rounding."""
        return float(self._r32)

    def __len__(self) -> int:
        return self._n

    def export_state(self) -> bytes | None:
        """The registry as ``np.savez`` bytes (no pickle): leaders in registration order and their last use."""
        with self._lock:
            buf = io.BytesIO()
            np.savez(buf, version=np.asarray(_STATE_VERSION, dtype=np.int64),
                     radius=np.asarray(self.radius, dtype=np.float64),
                     features=np.asarray(-1 if self._features is None else self._features, dtype=np.int64),
                     leaders=self._reps[:self._n], used=self._used[:self._n],
                     tick=np.asarray(self._tick, dtype=np.int64))
            return buf.getvalue()

    def import_state(self, data: bytes) -> None:
        """Replace the registry by an exported one; anything malformed raises :class:`ExtractionStateError`."""
        arrays = _load_npz(data, {"version", "radius", "features", "leaders", "used", "tick"}, "leader registry")
        version, radius, features, tick = (arrays[k] for k in ("version", "radius", "features", "tick"))
        reps, used = arrays["leaders"], arrays["used"]
        if version.shape != () or version.dtype != np.int64 or int(version) != _STATE_VERSION:
            raise ExtractionStateError("leader registry: unknown state version")
        if radius.shape != () or radius.dtype != np.float64 or float(radius) != self.radius:
            raise ExtractionStateError(f"leader registry was built with another radius ({radius!r}, not {self.radius})")
        if features.shape != () or features.dtype != np.int64 or tick.shape != () or tick.dtype != np.int64:
            raise ExtractionStateError("leader registry: malformed header")
        if reps.dtype != np.float32 or reps.ndim != 2 or used.dtype != np.int64 or used.shape != (reps.shape[0],):
            raise ExtractionStateError("leader registry: leaders must be float32 [N, F] with int64 [N] last uses")
        width = int(features)
        if (width == -1 and reps.shape[0]) or (width != -1 and (width < 1 or reps.shape[1] != width)):
            raise ExtractionStateError("leader registry: leader width does not match its feature count")
        if not np.isfinite(reps).all() or (used < 0).any() or (used.size and int(used.max()) > int(tick)):
            raise ExtractionStateError("leader registry: non-finite leaders or inconsistent last-use counters")
        if len({r.tobytes() for r in reps}) != reps.shape[0]:
            raise ExtractionStateError("leader registry: duplicate leaders")
        with self._lock:
            self._clear(None if width == -1 else width)
            self._tick = int(tick)
            if reps.shape[0]:
                self._append(np.ascontiguousarray(reps), used)
                if self._n > self.max_leaders:
                    self._evict(target=self.max_leaders)
                self._reindex()

    # --- internals (called with the lock held) -----------------------------------------------------------------
    def _clear(self, features: int | None) -> None:
        self._features = features
        self._n = 0
        self._tick = 0
        self._reps = np.empty((0, features or 0), dtype=np.float32)
        self._used = np.empty(0, dtype=np.int64)
        self._keys: list[bytes] = []
        self._dims = np.arange(min(_INDEX_DIMS, features or 0))
        self._filter_dims = np.resize(np.arange(features or 1), _FILTER_DIMS)  # 16 exactly: repeats allowed
        self._filter = np.empty((0, len(self._filter_dims)), dtype=np.float32)  # leaders on those, contiguous
        self._indexed_at = 0
        self._codes = np.empty(0, dtype=np.uint64)  # sorted cell codes of the leaders ...
        self._perm = np.empty(0, dtype=np.int64)  # ... and the leader index behind each

    def _cells(self, v: np.ndarray) -> np.ndarray:
        return np.floor(np.clip(v.astype(np.float64), -self._clip, self._clip) / self._width).astype(np.int64)

    def _code(self, cells: np.ndarray) -> np.ndarray:
        return np.asarray((cells.astype(np.uint64) * _MIX[: cells.shape[-1]]).sum(axis=-1, dtype=np.uint64))

    def _probes(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, code) of every cell a row's neighbours within ``radius`` can lie in: one or two per coordinate."""
        v = rows[:, self._dims].astype(np.float64)
        lo, hi = self._cells(v - self._margin), self._cells(v + self._margin)
        # A code is linear in the cells (mod 2^64): start from the low cells and, coordinate by coordinate, add the
        # step to the high cell to a copy of the codes of the rows whose interval touches two cells.
        step = (hi - lo).astype(np.uint64) * _MIX[: lo.shape[1]]
        row, code = np.arange(rows.shape[0]), self._code(lo)
        for j in range(lo.shape[1]):
            two = np.flatnonzero(step[row, j])
            row, code = np.concatenate([row, row[two]]), np.concatenate([code, code[two] + step[row[two], j]])
        return row, code

    def _indexed_matches(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the earliest indexed leader within ``radius`` (``-1``: none)."""
        if not self._codes.size:
            return np.full(rows.shape[0], -1, dtype=np.int64)
        best = np.full(rows.shape[0], self._n, dtype=np.int64)
        probe_row, codes = self._probes(rows)
        order = np.argsort(codes)  # sorted needles: searchsorted walks the index in order (cache-friendly)
        probe_row, codes = probe_row[order], codes[order]
        starts = np.searchsorted(self._codes, codes, side="left")
        lengths = np.searchsorted(self._codes, codes, side="right") - starts
        budget = max(1, _GATHER // len(self._filter_dims))
        sub = rows[:, self._filter_dims]
        cum = np.cumsum(lengths)
        done, i = 0, 0
        while i < lengths.size:  # groups of probes whose candidates fit the gather bound (at least one probe)
            j = max(i + 1, int(np.searchsorted(cum, done + budget, side="right")))
            s, ln = starts[i:j], lengths[i:j]
            total = int(cum[j - 1] - done)
            if total:
                offsets = np.repeat(s - np.cumsum(ln) + ln, ln) + np.arange(total)
                cand = self._perm[offsets]
                row_of = np.repeat(probe_row[i:j], ln)
                with np.errstate(over="ignore", invalid="ignore"):
                    within = np.abs(self._filter[cand] - sub[row_of]) <= self._r32  # [M, 16] bools, contiguous
                    packed = within.view(np.uint64)  # 16 bools = two words: all true = both words all-ones
                    maybe = (packed[:, 0] & packed[:, 1]) == _ALL_TRUE
                    cand, row_of = cand[maybe], row_of[maybe]
                    near = np.abs(self._reps[cand] - rows[row_of]).max(axis=1) <= self._r32
                np.minimum.at(best, row_of[near], cand[near])
            done, i = int(cum[j - 1]), j
        best[best == self._n] = -1
        return best

    def _settle(self, rows: np.ndarray) -> list[bytes]:
        ticks = self._tick + np.arange(rows.shape[0], dtype=np.int64)
        self._tick += rows.shape[0]
        best = self._indexed_matches(rows)
        hit = best >= 0
        np.maximum.at(self._used, best[hit], ticks[hit])
        out: list[bytes | None] = [self._keys[b] if b >= 0 else None for b in best]
        fresh = np.flatnonzero(~hit)
        if fresh.size:
            new = rows[fresh]
            near = self._near_pairs(new)
            # Rows near no earlier fresh row lead themselves; the others, in order, take the earliest leader near them.
            leader_of = np.arange(fresh.size)
            is_leader = np.ones(fresh.size, dtype=bool)
            for a in np.flatnonzero(near.any(axis=1)):
                earlier = np.flatnonzero(near[a] & is_leader)
                if earlier.size:
                    leader_of[a], is_leader[a] = earlier[0], False
            own = np.flatnonzero(is_leader)
            last_use = np.zeros(fresh.size, dtype=np.int64)
            np.maximum.at(last_use, leader_of, ticks[fresh])
            first = self._n
            self._append(new[own], last_use[own])
            slot = np.full(fresh.size, -1, dtype=np.int64)
            slot[own] = first + np.arange(own.size)
            for pos, row in enumerate(fresh):
                out[row] = self._keys[slot[leader_of[pos]]]
            self._insert_index(first)
        return [k for k in out if k is not None]

    def _near_pairs(self, new: np.ndarray) -> np.ndarray:
        """``near[a, b]`` (b < a): rows a and b of ``new`` lie within ``radius`` (indexed coordinates checked first)."""
        with np.errstate(over="ignore", invalid="ignore"):
            sub = new[:, self._dims]
            maybe = np.tril(np.abs(sub[:, None, :] - sub[None, :, :]).max(axis=2) <= self._r32, -1)
            a, b = np.nonzero(maybe)
            maybe[a, b] = np.abs(new[a] - new[b]).max(axis=1) <= self._r32
        return np.asarray(maybe)

    def _append(self, reps: np.ndarray, used: np.ndarray) -> None:
        end = self._n + reps.shape[0]
        if end > self._reps.shape[0]:  # grow by doubling: appending a chunk costs O(chunk), not O(registry)
            cap = max(end, 2 * self._reps.shape[0], 64)
            grown = np.empty((cap, reps.shape[1]), dtype=np.float32)
            grown[:self._n] = self._reps[:self._n]
            grown_used = np.zeros(cap, dtype=np.int64)
            grown_used[:self._n] = self._used[:self._n]
            grown_filter = np.empty((cap, len(self._filter_dims)), dtype=np.float32)
            grown_filter[:self._n] = self._filter[:self._n]
            self._reps, self._used, self._filter = grown, grown_used, grown_filter
        self._reps[self._n:end] = reps
        self._used[self._n:end] = used
        self._filter[self._n:end] = reps[:, self._filter_dims]
        self._keys += [hashlib.sha256(_LEADER_TAG + r.tobytes()).digest() for r in reps]
        self._n = end

    def _insert_index(self, first: int) -> None:
        if self._n >= max(64, 2 * self._indexed_at):
            self._reindex()
            return
        new = self._code(self._cells(self._reps[first:self._n, self._dims]))
        order = np.argsort(new, kind="stable")  # np.insert keeps the given order among equal positions
        pos = np.searchsorted(self._codes, new[order])
        self._codes = np.insert(self._codes, pos, new[order])
        self._perm = np.insert(self._perm, pos, first + order)

    def _reindex(self) -> None:
        """Re-choose the indexed coordinates (largest variance among the leaders) and rebuild the sorted codes."""
        reps = self._reps[:self._n]
        k = min(_INDEX_DIMS, reps.shape[1])
        if self._n >= 2:
            spread = _spread_coordinates(reps[:: max(1, self._n // 8192)], min(_FILTER_DIMS, reps.shape[1]))
            self._dims, self._filter_dims = np.sort(spread[:k]), np.resize(np.sort(spread), _FILTER_DIMS)
            self._filter = np.ascontiguousarray(self._reps[:, self._filter_dims])
        codes = self._code(self._cells(reps[:, self._dims]))
        self._perm = np.argsort(codes, kind="stable").astype(np.int64)
        self._codes = codes[self._perm]
        self._indexed_at = self._n

    def _evict(self, target: int | None = None) -> None:
        """Forget the least recently used leaders, down to ``target`` (default ``max_leaders - max_leaders//16``)."""
        target = self.max_leaders - self.max_leaders // 16 if target is None else target
        keep = np.sort(np.argsort(-self._used[:self._n], kind="stable")[:target])  # registration order kept
        self._reps[:keep.size] = self._reps[keep]
        self._used[:keep.size] = self._used[keep]
        self._filter[:keep.size] = self._filter[keep]
        self._keys = [self._keys[i] for i in keep]
        self._n = int(keep.size)
        self._reindex()


def _spread_coordinates(sample: np.ndarray, k: int) -> np.ndarray:
    """``k`` coordinates that spread the sample most, in the order picked: greedy largest variance left unexplained
    by those chosen (pivoted Cholesky of the covariance), so that correlated neighbours are not all picked."""
    cov = np.atleast_2d(np.cov(sample.astype(np.float64), rowvar=False))
    residual = np.diag(cov).copy()
    basis = np.zeros((k, cov.shape[0]))
    chosen: list[int] = []
    for step in range(k):
        j = int(np.argmax(np.where(np.isin(np.arange(residual.size), chosen), -np.inf, residual)))
        chosen.append(j)
        if residual[j] <= 1e-12:
            continue
        col = (cov[:, j] - basis[:step].T @ basis[:step, j]) / np.sqrt(residual[j])
        basis[step] = col
        residual = np.maximum(residual - col**2, 0.0)
    return np.array(chosen, dtype=np.int64)


def _load_npz(data: bytes, names: set[str], what: str) -> dict[str, np.ndarray]:
    """The arrays of an ``np.savez`` blob with exactly ``names`` (no pickle); anything else: ExtractionStateError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ExtractionStateError(f"{what}: state must be bytes")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as blob:
            if not isinstance(blob, np.lib.npyio.NpzFile) or set(blob.files) != names:
                raise ExtractionStateError(f"{what}: state does not hold the expected arrays")
            return {name: blob[name] for name in names}
    except ExtractionStateError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ExtractionStateError(f"{what}: state is not a readable array archive ({exc})") from None


def keys_for(spec: InputSpec | None, *, radius: float = 0.04) -> InputKeys:
    """Grid keys where the spec has a quantum, else a fresh leader registry of the given L∞ ``radius``."""
    if spec is not None and spec.quantum is not None:
        return GridKeys(spec.quantum)
    return LeaderKeys(radius)


def collision_rate(keys: InputKeys, x: np.ndarray) -> float:
    """Share of the distinct rows of ``x`` whose key another distinct row of ``x`` also got (honest collisions).

    Rows are keyed in their order of first appearance; with :class:`LeaderKeys`, pass a fresh registry (the rows
    become its leaders).
    """
    rows = canonical(x)
    rows = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    if not rows.shape[0]:
        raise InvalidArgumentError("collision_rate needs at least one row")
    first: dict[bytes, int] = {}
    for i in range(rows.shape[0]):
        first.setdefault(rows[i].tobytes(), i)
    got = keys.keys(rows[sorted(first.values())])
    counts = Counter(got)
    return sum(counts[k] > 1 for k in got) / len(got)
