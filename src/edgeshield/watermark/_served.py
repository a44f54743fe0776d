"""A served watermark (DAWN: Szyller et al., "Dynamic Adversarial Watermarking of Neural Networks", 2021).

The weight watermark cannot survive a copy trained from scratch on the API's answers (CopycatCNN, KnockoffNets).
DAWN marks the *answers* instead: the server answers a small keyed fraction ``rate`` of inputs with a deliberately
wrong label. A copy trained on those answers learns the wrong labels; an independent model does not. The owner
keeps the watermarked inputs, the labels that were answered and each row's *unit* (``EvidenceStore``), and later
asks a suspect model for its labels on them (``verify_copy``).

Units. Every mark decision is made for a *unit* (16 bytes), never for raw input bytes: whether the unit is marked,
and by which offset 1..K-1 its answers are shifted, is HMAC-SHA256(subkey, unit). Two kinds:

* point units (``regions=None``): the unit is the row's canonical key (``keys``, 32 bytes, from the server's
  ``InputKeys``: jittered copies of one input share a key, so they share the answer and a thief who asks several
  jittered copies and keeps the majority label keeps the mark); ``keys=None`` is sha256 of the row's canonical
  float32 bytes, so that only exact repeats share a unit.
* region units (``regions=bits``): the unit is (keyed region of input space, the victim's label), the region being
  the sign pattern of the row against ``bits`` keyed random hyperplanes (directions from SHAKE-256 under a subkey:
  version-stable, no numpy generator stream; each plane at a keyed 20..80 % quantile of a ``reference`` sample of
  typical inputs along its direction, or through a keyed point of the input range ``bounds`` without one). A marked
  unit answers *every* input of that class in that region with the same wrong label: a pattern over a cluster of
  inputs, which a briefly trained copy learns more often than an isolated wrong point. The honest cost is still
  about ``rate`` of traffic in expectation (each unit is marked with probability ``rate``), with much more variance
  (one marked unit can hold a large share of a class), and a session touches fewer units, so fewer are marked.

Null distribution (one trial per unit). Under H0 the suspect is independent of the key. The hyperplanes, the
marking bytes and the offset bytes come from separate keyed derivations, so given the partition and which units
are marked, a marked unit's answered label is ``(its victim label + offset) mod K`` with the offset uniform on
1..K-1: uniform over the K-1 labels other than the unit's victim label. The suspect's majority label over the unit's
rows does not depend on the offset, so it equals the answered label with probability at most 1/(K-1). Distinct units
are distinct PRF inputs, so their offsets, hence these agreements, are independent; rows of one unit share one
offset and are therefore one trial, however many there are. ``P(Binomial(units, 1/(K-1)) >= matches)`` is a valid,
conservative p-value whatever the suspect is (the modulo bias of offsets from 64 bits, below K/2**64, is ignored).
With K = 2 the wrong label is forced and the test has no power. The least number of matched units that can reach p
is ``marks_needed`` (7 for K = 10 at 1e-6); a session that cannot collect that many marked units at the served rate
cannot be proven, whatever the scheme (``provable_session``).

``verify_copy(..., victim=)`` may exclude each unit's victim label from the suspect's vote (a copy that learnt a
unit's mark on some of its rows still matches): the excluded label does not depend on the key, so the bound holds.

Known limits. A region's code is computed from the row itself, so a jittered copy of an input that lies within the
jitter of a hyperplane can fall in a neighbouring region (a different unit); the majority of a few copies still
carries the mark unless most copies cross. A stored label or unit is not authenticated on its own (rows are checked
against their digests, which the audit log records). Hyperplane codes use float64 dot products: a row exactly on a
hyperplane may code differently on another BLAS.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from edgeshield._arrays import CANONICAL_DTYPE, canonical, row_digests
from edgeshield._io import check_readable_file
from edgeshield._sqlite import PrivateStore
from edgeshield._stats import binomial_sf
from edgeshield.errors import (
    EvidenceIntegrityError,
    InvalidArgumentError,
    NotAnEvidenceStoreError,
    UnsupportedModelError,
)
from edgeshield.watermark._spread import DEFAULT_P_THRESHOLD, _check_key

SERVED_SCHEME = "served-dawn-v2"  # v2: decisions per unit (canonical key, or keyed region + victim label)
DEFAULT_RATE = 0.01
DEFAULT_REGIONS: int | None = None  # point units; see the module docstring and docs/extraction.md for region units
UNIT_SIZE = 16
KEY_BYTES = 32
_INFO = b"edgeshield/watermark/served-dawn/v2"
_POINT = b"edgeshield/watermark/served-unit/point/v2"
_REGION = b"edgeshield/watermark/served-unit/region/v2"
_PLANES = b"edgeshield/watermark/served-planes/v2"
_APPLICATION_ID = 0x45535756  # "ESWV": marks the SQLite file as an evidence store
_SCHEMA_VERSION = 3  # 2: a nullable subject column (a data-subject pseudonym), for erasure; 3: a nullable unit column
_DTYPE = CANONICAL_DTYPE

Suspect = bytes | bytearray | memoryview | Callable[[np.ndarray], np.ndarray]


def _check_classes(classes: int) -> int:
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise InvalidArgumentError(f"classes must be an integer of at least 2, not {classes!r}")
    return int(classes)


def _check_labels(labels: np.ndarray, n: int, classes: int | None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,) or (n and not np.issubdtype(lab.dtype, np.integer)):
        raise InvalidArgumentError(f"labels must be {n} integers, got shape {lab.shape} of {lab.dtype}")
    if n and (lab.min() < 0 or (classes is not None and lab.max() >= classes)):
        raise InvalidArgumentError("labels must be non-negative" + (f" and below {classes}" if classes else ""))
    return lab.astype(np.int64)


def _check_blobs(values: object, n: int, size: int, what: str) -> list[bytes] | None:
    """``values`` as a list of ``n`` byte strings of ``size`` bytes each (None stays None); InvalidArgumentError."""
    if values is None:
        return None
    if isinstance(values, (bytes, bytearray, str)) or not isinstance(values, Sequence) or len(values) != n:
        raise InvalidArgumentError(f"{what} must be a sequence of {n} byte strings")
    out = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else None for v in values]
    if any(v is None or len(v) != size for v in out):
        raise InvalidArgumentError(f"each of the {what} must be {size} bytes")
    return [v for v in out if v is not None]


def digest_units(x: np.ndarray) -> list[bytes]:
    """The point unit of each row when no canonical keys are given: the first 16 bytes of sha256 of its canonical
    float32 bytes (``row_digests``), so only exact repeats share a unit. Evidence rows stored without a unit get it."""
    return [bytes.fromhex(d)[:UNIT_SIZE] for d in row_digests(x)]


@dataclass(frozen=True)
class Marks:
    """One batch's mark decisions: which rows are marked, the labels to answer and each row's unit."""

    marked: np.ndarray  # bool [N]
    labels: np.ndarray  # int64 [N]: the labels to answer (the marked rows' changed)
    units: list[bytes]  # 16 bytes per row: the unit the row's decision belongs to (stored with the evidence)

    def marked_units(self) -> list[bytes]:
        """The units of the marked rows, in order: ``evidence.add(client, x[m.marked], m.labels[m.marked],
        units=m.marked_units())``."""
        return [u for u, k in zip(self.units, self.marked.tolist(), strict=True) if k]


class ServedWatermark:
    """Answers the inputs of a keyed fraction ``rate`` of units with a wrong label, deterministically in the unit.

    ``regions``: None for point units (the canonical key), or the number of keyed hyperplanes whose sign pattern,
    with the victim's label, is the unit. ``bounds``: the input range the hyperplanes' offsets are drawn through."""

    def __init__(self, key: bytes, rate: float = DEFAULT_RATE, *, classes: int, regions: int | None = DEFAULT_REGIONS,
                 bounds: tuple[float, float] = (0.0, 1.0), reference: np.ndarray | None = None) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 0.5:
            raise InvalidArgumentError(f"rate must be in (0, 0.5], not {rate!r}")
        if regions is not None and (isinstance(regions, bool) or not isinstance(regions, (int, np.integer))
                                    or not 1 <= regions <= 64):
            raise InvalidArgumentError(f"regions must be None or a number of hyperplanes in 1..64, not {regions!r}")
        lo, hi = (float(b) for b in bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InvalidArgumentError(f"bounds must be two finite numbers low < high, not {bounds!r}")
        self.rate = float(rate)
        self.classes = _check_classes(classes)
        self.regions = None if regions is None else int(regions)
        self.bounds = (lo, hi)
        self._reference = None
        if reference is not None:
            ref = canonical(reference)
            if ref.shape[0] < 2 or not np.isfinite(ref).all():
                raise InvalidArgumentError("reference must be at least 2 finite input rows")
            self._reference = ref.reshape(ref.shape[0], -1).astype(np.float64)
        # Separate subkeys: the served mark and the weight mark reveal nothing about each other, and the hyperplanes
        # are independent of the marking and offset bytes (the null argument needs it).
        root = _check_key(key)
        self._subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(root)
        self._plane_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PLANES).derive(root)
        self._cut = np.uint64(int(self.rate * 2.0**64))  # exact (a power-of-two scaling): marked iff u64 < cut
        self._planes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def describe(self) -> dict[str, object]:
        """JSON-able settings (no key material), for /v1/status and the docs."""
        return {"scheme": SERVED_SCHEME, "rate": self.rate, "classes": self.classes, "regions": self.regions,
                "bounds": list(self.bounds)}

    # --- units ---
    def _hyperplanes(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """``regions`` keyed hyperplanes in R^d: directions uniform in [-1, 1)^d and thresholds w·p for a point p
        uniform in bounds^d, all from SHAKE-256(plane subkey, d): the same planes for the same key on any machine."""
        if d not in self._planes:
            b = self.regions or 0
            stream = hashlib.shake_256(self._plane_key + d.to_bytes(8, "big")).digest(8 * 2 * b * d)
            u = np.frombuffer(stream, dtype=">u8").astype(np.float64) / 2.0**64  # [0, 1)
            w = (2.0 * u[: b * d] - 1.0).reshape(b, d)
            lo, hi = self.bounds
            if self._reference is not None and self._reference.shape[1] == d:
                # through the data: each plane at a keyed quantile (20..80 %) of the reference along its direction
                q = 0.2 + 0.6 * u[b * d : b * d + b]
                proj = self._reference @ w.T
                self._planes[d] = (w, np.array([np.quantile(proj[:, j], q[j]) for j in range(b)]))
            else:
                point = (lo + (hi - lo) * u[b * d :]).reshape(b, d)
                self._planes[d] = (w, (w * point).sum(axis=1))
        return self._planes[d]

    def region_codes(self, x: np.ndarray) -> np.ndarray:
        """Each row's region: the bit pattern (uint64) of which side of each keyed hyperplane it lies on."""
        if self.regions is None:
            raise InvalidArgumentError("this watermark has point units (regions=None): no regions")
        c = canonical(x)
        flat = c.reshape(c.shape[0], -1).astype(np.float64)
        w, t = self._hyperplanes(flat.shape[1])
        side = (flat @ w.T) > t
        codes: np.ndarray = (side.astype(np.uint64) << np.arange(self.regions, dtype=np.uint64)).sum(
            axis=1, dtype=np.uint64)
        return codes

    def units(self, x: np.ndarray, labels: np.ndarray | None = None, *,
              keys: Sequence[bytes] | None = None) -> list[bytes]:
        """Each row's unit (16 bytes). Point units: the canonical key's first 16 bytes (``keys``; None: sha256 of
        the row bytes). Region units: sha256(domain, region code, victim label) -- ``labels`` required."""
        c = canonical(x)
        n = c.shape[0]
        keys = _check_blobs(keys, n, KEY_BYTES, "keys")
        if self.regions is None:
            return digest_units(c) if keys is None else [k[:UNIT_SIZE] for k in keys]
        if labels is None:
            raise InvalidArgumentError("region units need the victim's labels")
        lab = _check_labels(labels, n, self.classes)
        codes = self.region_codes(c)
        return [hashlib.sha256(_REGION + int(code).to_bytes(8, "big") + int(v).to_bytes(2, "big")).digest()[:UNIT_SIZE]
                for code, v in zip(codes, lab, strict=True)]

    def decide(self, units: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(marked bool[N], offset int64[N] in 1..classes-1) from HMAC-SHA256(subkey, unit): bytes 0-7 and 8-15,
        read as big-endian uint64, give u = word/2**64 (marked iff u < rate) and the offset."""
        checked = _check_blobs(units, len(units), UNIT_SIZE, "units") or []
        n = len(checked)
        macs = b"".join(hmac.new(self._subkey, u, hashlib.sha256).digest() for u in checked)
        words = np.frombuffer(macs, dtype=">u8").reshape(n, 4)
        marked = words[:, 0] < self._cut
        offset = (1 + words[:, 1] % np.uint64(self.classes - 1)).astype(np.int64)
        return marked, offset

    def marks(self, x: np.ndarray, labels: np.ndarray | None = None, *,
              keys: Sequence[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(marked bool[N], offset int64[N]) of each row's unit (region units need ``labels``)."""
        return self.decide(self.units(x, labels, keys=keys))

    # --- answers ---
    def mark(self, x: np.ndarray, labels: np.ndarray, *, keys: Sequence[bytes] | None = None) -> Marks:
        """The mark decisions for a batch whose victim labels are ``labels``: marked rows answer
        ``(label + offset) % classes``; every row's unit (store it with the evidence)."""
        c = canonical(x)
        lab = _check_labels(labels, c.shape[0], self.classes)  # a fresh int64 copy
        units = self.units(c, lab, keys=keys)
        marked, offset = self.decide(units)
        lab[marked] = (lab[marked] + offset[marked]) % self.classes
        return Marks(marked=marked, labels=lab, units=units)

    def swap_top(self, probs: np.ndarray, marks: Marks) -> np.ndarray:
        """``probs`` with each marked row's top-1 column swapped with its watermark label's column (``marks`` made
        from these probabilities' argmax); unmarked rows are returned bitwise. A tie for the top is broken by moving
        a sliver of mass so that the watermark label wins."""
        marked = np.asarray(marks.marked, dtype=bool)
        p = np.asarray(probs)
        if p.shape != (len(marked), self.classes):
            raise InvalidArgumentError(f"probs must have shape ({len(marked)}, {self.classes}), got {p.shape}")
        out = np.array(p, dtype=p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64)
        if not np.isfinite(out).all():
            raise InvalidArgumentError("probs must be finite")
        rows = np.nonzero(marked)[0]
        top = out[rows].argmax(axis=1)
        target = np.asarray(marks.labels, dtype=np.int64)[rows]
        top_vals, target_vals = out[rows, top].copy(), out[rows, target].copy()
        out[rows, top], out[rows, target] = target_vals, top_vals
        for r, t in zip(rows, target, strict=True):
            m = out[r, t]
            tied = np.nonzero(out[r] == m)[0]
            if len(tied) > 1:
                delta = out.dtype.type(max(abs(float(m)), 1e-3) * 2.0**-8)
                out[r, tied] -= delta
                out[r, t] = m + delta * (len(tied) - 1)
        return out

    def relabel(self, x: np.ndarray, labels: np.ndarray, *,
                keys: Sequence[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The labels to answer: ``(label + offset) % classes`` on marked rows; and the marked mask."""
        m = self.mark(x, labels, keys=keys)
        return m.labels, m.marked

    def apply(self, x: np.ndarray, probs: np.ndarray, *,
              keys: Sequence[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Swap each marked row's top-1 column with its watermark label's; unmarked rows are returned bitwise."""
        c = canonical(x)
        p = np.asarray(probs)
        if p.shape != (c.shape[0], self.classes):
            raise InvalidArgumentError(f"probs must have shape ({c.shape[0]}, {self.classes}), got {p.shape}")
        if not np.isfinite(p).all():
            raise InvalidArgumentError("probs must be finite")
        m = self.mark(c, p.argmax(axis=1), keys=keys)
        return self.swap_top(p, m), m.marked


def marks_needed(classes: int, p: float = 1e-6) -> int:
    """The fewest matched units that can reach a p-value below ``p``: the smallest m with (1/(K-1))**m < p (all m
    marked units matched). 7 for K = 10 at 1e-6. Two classes: no number suffices (InvalidArgumentError)."""
    k = _check_classes(classes)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise InvalidArgumentError(f"p must be in (0, 1), not {p!r}")
    if k == 2:
        raise InvalidArgumentError("with two classes the wrong label is forced: no number of marks proves a copy")
    m = max(1, math.ceil(math.log(p) / -math.log(k - 1)))
    while (1 / (k - 1)) ** m >= p:
        m += 1
    while m > 1 and (1 / (k - 1)) ** (m - 1) < p:
        m -= 1
    return m


def provable_session(queries: int, rate: float, classes: int, *, p: float = 1e-6, inherit: float = 1.0,
                     rows_per_unit: float = 1.0) -> bool:
    """Whether a session of ``queries`` distinct inputs can be proven at the served ``rate``: with the expected
    number of marked units M = queries / rows_per_unit * rate, of which the copy repeats floor(inherit * M), is
    P(Binomial(M, 1/(K-1)) >= matches) below ``p``? (An expectation, not a guarantee: the count of marked units is
    itself binomial.) ``inherit`` is the share of marks the copy carries (1: a copy that fits every answer)."""
    k = _check_classes(classes)
    if k == 2 or queries <= 0:
        return False
    if not 0 < rate <= 1 or not 0 <= inherit <= 1 or rows_per_unit < 1:
        raise InvalidArgumentError("rate in (0, 1], inherit in [0, 1] and rows_per_unit >= 1 are required")
    units = math.floor(queries / rows_per_unit * rate)
    return binomial_sf(math.floor(inherit * units), units, 1 / (k - 1)) < p


@dataclass(frozen=True)
class CopyVerifyResult:
    """How often the suspect reproduced the watermarked answers (per unit), the p-value under H0 and the decision."""

    evidence: int  # distinct watermarked inputs used
    matches: int  # units whose suspect majority label is the (wrong) answered label
    match_rate: float  # matches / units
    p_value: float  # P(Binomial(units, null_rate) >= matches)
    threshold: float
    present: bool
    null_rate: float  # 1/(classes-1): the most an independent model agrees per unit
    units: int = 0  # trials: distinct units among the evidence (= evidence without units)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _scores(suspect: Suspect, x: np.ndarray) -> np.ndarray:
    if not isinstance(suspect, (bytes, bytearray, memoryview)):
        if not callable(suspect):
            raise InvalidArgumentError(f"suspect must be ONNX model bytes or a callable, not {type(suspect).__name__}")
        return np.asarray(suspect(x))
    from edgeshield.bundles._ort import onnxruntime as ort

    try:
        sess = ort.InferenceSession(bytes(suspect), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own assorted types for malformed models
        raise UnsupportedModelError(f"not a loadable ONNX model: {type(exc).__name__}") from None
    inp = sess.get_inputs()[0]
    if inp.type != "tensor(float)":
        raise UnsupportedModelError(f"the suspect's input {inp.name!r} is {inp.type}, not a float32 tensor")
    try:
        return np.asarray(sess.run(None, {inp.name: x})[0])
    except Exception as exc:  # noqa: BLE001 - likewise for inputs the model cannot take
        raise UnsupportedModelError(f"the suspect model failed on the evidence inputs: {exc}") from None


def _predict(model: Suspect, x: np.ndarray, classes: int, what: str) -> np.ndarray:
    scores = _scores(model, x)
    if scores.ndim != 2 or scores.shape != (x.shape[0], classes):
        raise UnsupportedModelError(f"the {what} answered shape {scores.shape}, expected ({x.shape[0]}, {classes})")
    return np.asarray(scores.argmax(axis=-1), dtype=np.int64)


def verify_copy(suspect: Suspect, x: np.ndarray, labels: np.ndarray, *, classes: int,
                units: Sequence[bytes] | None = None, victim: np.ndarray | Suspect | None = None,
                threshold: float = DEFAULT_P_THRESHOLD) -> CopyVerifyResult:
    """Test whether ``suspect`` learnt the served watermark: its labels on the watermarked inputs ``x`` against the
    wrong ``labels`` that were answered. ``suspect`` is ONNX bytes (first output, argmax over the last axis; logits
    or probabilities) or a callable ``x -> scores [N, classes]``. Repeated inputs count once.

    ``units`` (16 bytes per row, as ``ServedWatermark.mark`` gave them): one trial per unit -- the suspect's majority
    label over the unit's rows against the unit's answered label (its first row's; a tie for the majority is no
    match). None: one unit per distinct input.

    ``victim`` (the owner's model -- ONNX bytes or a callable, as ``suspect`` -- or its labels on ``x``; optional):
    the suspect's label for a unit is then its most frequent label *other than the unit's victim label* (its first
    row's), so a copy that learnt a unit's mark on only some of its rows still matches. Any label that does not
    depend on the key may be excluded this way, so a victim label that differs from the one served (a model
    reloaded since) costs power, never validity.

    Under H0 the answered label of a unit is uniform over the labels other than its victim label, picked by a PRF
    the suspect never saw, independently across units, and the suspect's label for the unit does not depend on it:
    the binomial tail over units is a valid, conservative p-value whatever the suspect is (module docstring)."""
    classes = _check_classes(classes)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InvalidArgumentError(f"threshold must be in (0, 1), not {threshold!r}")
    c = canonical(x)
    lab = _check_labels(labels, c.shape[0], classes)
    given = _check_blobs(units, c.shape[0], UNIT_SIZE, "units")
    digests = row_digests(c)
    keep = np.sort(np.unique(np.array(digests, dtype=object), return_index=True)[1]).astype(np.int64)
    c, lab = c[keep], lab[keep]  # a repeated input is one row (its first), not several
    row_units = [bytes.fromhex(digests[i])[:UNIT_SIZE] for i in keep] if given is None else [given[i] for i in keep]
    n, null = len(keep), 1.0 / (classes - 1)
    if n == 0:
        return CopyVerifyResult(0, 0, 0.0, 1.0, float(threshold), False, null, 0)
    honest = None
    if victim is not None:
        if isinstance(victim, (bytes, bytearray, memoryview)) or callable(victim):
            honest = _predict(victim, c, classes, "victim")
        else:
            honest = _check_labels(victim, len(digests), classes)[keep]
    predicted = _predict(suspect, c, classes, "suspect")
    index: dict[bytes, int] = {}
    first: list[int] = []
    for i, u in enumerate(row_units):
        if u not in index:
            index[u] = len(first)
            first.append(i)
    group = np.array([index[u] for u in row_units], dtype=np.int64)
    votes = np.zeros((len(first), classes), dtype=np.int64)
    np.add.at(votes, (group, predicted), 1)
    if honest is not None:  # the unit's victim label is not a candidate: the most frequent of the others is
        votes[np.arange(len(first)), honest[np.array(first, dtype=np.int64)]] = 0
    top = votes.max(axis=1)
    unique_top = ((votes == top[:, None]).sum(axis=1) == 1) & (top > 0)
    answered = lab[np.array(first, dtype=np.int64)]
    matches = int((unique_top & (votes.argmax(axis=1) == answered)).sum())
    m = len(first)
    p = binomial_sf(matches, m, null)
    return CopyVerifyResult(n, matches, matches / m, p, float(threshold), p < threshold, null, m)


_SCHEMA = (
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
    ("CREATE TABLE evidence (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, client TEXT NOT NULL,"
     " digest TEXT NOT NULL, label INTEGER NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL,"
     " subject TEXT, unit BLOB, UNIQUE (client, digest))"),
    "CREATE INDEX evidence_subject ON evidence (subject)",
    "CREATE INDEX evidence_time ON evidence (time)",
)
# Schema 1 had no subject column, schema 2 no unit column: opening such a store for writing adds what it lacks (rows
# stored before have no subject, and their unit is their digest's: one unit per distinct input, as they were marked).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE evidence ADD COLUMN subject TEXT",
    "CREATE INDEX evidence_subject ON evidence (subject)",
    "CREATE INDEX evidence_time ON evidence (time)",
    "PRAGMA user_version = 2",
)
_MIGRATE_2_TO_3 = (
    "ALTER TABLE evidence ADD COLUMN unit BLOB",
    "PRAGMA user_version = 3",
)


@dataclass(frozen=True)
class Evidence:
    """What an ``EvidenceStore`` holds, in storage order: the inputs, the answered labels, each row's unit (its
    digest's for rows stored without one), the client each was answered to and the row digests."""

    x: np.ndarray  # float32 [N, *shape] (shape (0,) when empty)
    labels: np.ndarray  # int64 [N]
    units: list[bytes]  # 16 bytes per row
    clients: list[str]
    digests: list[str]


def _iso(ts: float) -> str:
    """The ``time`` column's format (UTC ISO 8601, milliseconds): text that sorts in time order."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class EvidenceStore(PrivateStore):
    """The raw watermarked inputs the server answered, and the labels it gave (SQLite, WAL, mode 0600).

    The audit log records only digests of inputs, never the inputs; verification needs the inputs themselves, so
    they live here, each row bound to its digest (``row_digests``) and stored once per client."""

    _what = "evidence store"
    _application_id = _APPLICATION_ID
    _schema = _SCHEMA
    _tables = frozenset({"evidence"})
    _not_a_store = NotAnEvidenceStoreError
    _has_subject: bool  # False only for a schema 1 store opened with create=False
    _has_unit: bool  # False only for a schema 1 or 2 store opened with create=False

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        if not create:
            check_readable_file(path, what=self._what)  # an empty file is refused as such, not as a foreign one
        super().__init__(path, create=create)

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(evidence)")}
        if create and not {"subject", "unit"} <= columns:
            conn.execute("BEGIN IMMEDIATE")
            columns = {r[1] for r in conn.execute("PRAGMA table_info(evidence)")}  # not migrated by another
            if "subject" not in columns:
                for statement in _MIGRATE_1_TO_2:
                    conn.execute(statement)
            if "unit" not in columns:
                for statement in _MIGRATE_2_TO_3:
                    conn.execute(statement)
            conn.execute("COMMIT")
            columns |= {"subject", "unit"}
        self._has_subject = "subject" in columns
        self._has_unit = "unit" in columns
        # Erased and purged rows hold raw inputs: overwrite their bytes in the file instead of leaving them in free
        # pages (the WAL is truncated after each erasure, see _delete).
        conn.execute("PRAGMA secure_delete = ON")

    def add(self, client: str, x: np.ndarray, labels: np.ndarray, *, subject: str | None = None,
            units: Sequence[bytes] | None = None) -> int:
        """Store the watermarked rows ``x`` answered to ``client`` with ``labels``; returns how many were new.

        ``units``: each row's unit (16 bytes, ``Marks.units``); None stores none, and such a row counts as its own
        unit (its digest's). ``subject`` names the data subject the request was about (the id from the operator's
        subject header, or its pseudonym): ``erase_subject`` deletes exactly those rows. This store is a
        personal-data store: what it holds is erased with the subject and purged by the retention policy."""
        if not isinstance(client, str) or not client:
            raise InvalidArgumentError("client must be a non-empty string")
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise InvalidArgumentError("subject must be a non-empty string (a pseudonym) or None")
        c = canonical(x)
        lab = _check_labels(labels, c.shape[0], None)
        unit_list = _check_blobs(units, c.shape[0], UNIT_SIZE, "units")
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        shape = json.dumps(list(c.shape[1:]))
        rows = [(now, client, d, int(label), shape, _DTYPE, c[i].tobytes(), subject,
                 None if unit_list is None else unit_list[i])
                for i, (d, label) in enumerate(zip(row_digests(c), lab, strict=True))]
        if not (self._has_subject and self._has_unit):
            version = 1 if not self._has_subject else 2
            raise InvalidArgumentError(f"evidence store {self.path} is schema {version} and was opened read-only "
                                       "(create=False): open it with create=True to migrate it")
        with self._tx() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO evidence (time, client, digest, label, shape, dtype, data,"
                             " subject, unit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            added = conn.total_changes - before
        return added

    def _delete(self, where: str, args: tuple[object, ...]) -> int:
        with self._tx() as conn:
            n = int(conn.execute(f"DELETE FROM evidence WHERE {where}", args).rowcount)  # noqa: S608 - fixed text
        if n:  # secure_delete zeroed the rows in the database pages; the WAL may still hold the pages as they were
            self._checkpoint()
        return n

    def erase_subject(self, subject_id: str) -> int:
        """Delete every row stored for the data subject ``subject_id`` (the value ``add`` was given); returns how
        many. A schema 1 store opened with create=False has no subject column, so no row is a subject's: 0."""
        if not isinstance(subject_id, str) or not subject_id:
            raise InvalidArgumentError("subject_id must be a non-empty string")
        if not self._has_subject:
            return 0
        return self._delete("subject = ?", (subject_id,))

    def purge_before(self, ts: float) -> int:
        """Delete every row stored before ``ts`` (seconds since the epoch): the retention policy; returns how many."""
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise InvalidArgumentError(f"ts must be a finite number of seconds, not {ts!r}")
        return self._delete("time < ?", (_iso(float(ts)),))

    def oldest(self) -> float | None:
        """When the oldest row still stored was added (seconds since the epoch), or None when the store is empty."""
        oldest = self._read("SELECT min(time) FROM evidence")[0][0]
        return None if oldest is None else datetime.fromisoformat(str(oldest)).timestamp()

    def count(self) -> int:
        """How many rows are stored."""
        return int(self._read("SELECT count(*) FROM evidence")[0][0])

    def load(self, client: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(x float32 [N, *shape], labels int64 [N], clients, digests) in storage order (x is shape (0,) when there
        are no rows), each row's bytes checked against its digest: a tampered row raises ``EvidenceIntegrityError``
        naming its seq. ``evidence`` also gives each row's unit."""
        ev = self.evidence(client)
        return ev.x, ev.labels, ev.clients, ev.digests

    def evidence(self, client: str | None = None) -> Evidence:
        """Every row (or ``client``'s) in storage order with its unit, checked as ``load`` checks: a row whose data
        does not match its digest, or whose unit is not 16 bytes, raises ``EvidenceIntegrityError``."""
        unit = "unit" if self._has_unit else "NULL"
        query = f"SELECT seq, client, digest, label, shape, dtype, data, {unit} FROM evidence"  # noqa: S608 - fixed
        try:
            rows = (self._read(query + " WHERE client = ? ORDER BY seq", (client,)) if client is not None
                    else self._read(query + " ORDER BY seq"))
        except sqlite3.DatabaseError as exc:
            raise EvidenceIntegrityError(f"evidence store {self.path} is unreadable: {exc}") from None
        xs, labels, units, shapes = [], [], [], set()
        for seq, _, digest, label, shape_json, dtype, data, row_unit in rows:
            try:
                shape = tuple(json.loads(shape_json))
                if dtype != _DTYPE or not isinstance(data, bytes) or len(data) != 4 * math.prod(shape):
                    raise ValueError("data does not match its shape and dtype")
                if row_unit is not None and (not isinstance(row_unit, bytes) or len(row_unit) != UNIT_SIZE):
                    raise ValueError(f"its unit is not {UNIT_SIZE} bytes")
                xs.append(np.frombuffer(data, dtype=_DTYPE).reshape(shape))
                labels.append(int(label))
            except (TypeError, ValueError) as exc:
                raise EvidenceIntegrityError(f"evidence row seq {seq} is malformed: {exc}", seq=seq) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise EvidenceIntegrityError(f"evidence row seq {seq} was altered: its data does not match its "
                                             "digest", seq=seq)
            units.append(bytes.fromhex(digest)[:UNIT_SIZE] if row_unit is None else row_unit)
            shapes.add(shape)
        if len(shapes) > 1:
            raise InvalidArgumentError(f"evidence rows have differing shapes {sorted(shapes)}; load one client")
        x = np.stack(xs).astype(np.float32, copy=False) if xs else np.zeros((0,), dtype=np.float32)
        return Evidence(x, np.asarray(labels, dtype=np.int64), units, [r[1] for r in rows], [r[2] for r in rows])

    def clients(self) -> dict[str, int]:
        """client -> number of evidence rows stored for it."""
        rows = self._read("SELECT client, count(*) FROM evidence GROUP BY client ORDER BY client")
        return {str(c): int(k) for c, k in rows}
