"""A served watermark (DAWN: Szyller et al., "Dynamic Adversarial Watermarking of Neural Networks", 2021).

The weight watermark cannot survive a copy trained from scratch on the API's answers (CopycatCNN, KnockoffNets).
DAWN marks the *answers* instead: the server answers a small keyed fraction ``rate`` of inputs with a deliberately
wrong label. A copy trained on those answers learns (memorises) the wrong labels; an independent model does not.
The owner keeps the watermarked inputs and the labels that were answered (``EvidenceStore``), and later asks a
suspect model for its labels on them (``verify_copy``).

Whether an input is marked, and which wrong label it gets, is a keyed PRF of the input's canonical bytes
(HMAC-SHA256 under a subkey of the owner's watermark key). It depends on the input alone, not on the client, the
time or a counter: the same input always gets the same answer, so resending a query, or asking from many (Sybil)
clients, teaches an attacker nothing about which answers are marked. Honest clients pay about ``rate`` in
accuracy (a marked answer is wrong by construction; with the default 1 % that is about one answer in a hundred).

Null distribution. Under H0 the suspect is independent of the key. For a marked input the answered label is
``(victim's top-1 + offset) mod K`` with the offset uniform on 1..K-1 (from HMAC bytes independent of those that
decided the marking), so given the input it is uniform over the K-1 labels other than the victim's, and the
suspect, which never saw the key, agrees with it with probability at most 1/(K-1) (exactly 1/(K-1) times its
probability of disagreeing with the victim). Over distinct inputs these agreements are independent, so
P(Binomial(n, 1/(K-1)) >= matches) is a valid, conservative p-value whatever the suspect is (the modulo bias of
offsets drawn from 64 bits is below K/2**64 and ignored). With K = 2 the wrong label is fixed and the test has no
power: every p-value is 1.

Known limits. A client who perturbs every query slightly gets a fresh coin flip per perturbed input, but each is
still marked with probability ``rate``, so a copy trained on perturbed queries still carries marks on the
perturbed inputs the server stored. A client who asks several perturbed copies of each input and keeps the
majority label does filter the mark out (most of m copies are marked with probability about rate**(m/2), and
marked copies disagree on the wrong label), at the price of m times the queries; rate limits and the query-pattern
detectors must catch that. The evidence rows are checked against their digests
(which the audit log records), but a stored label is not authenticated on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
from collections.abc import Callable
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

SERVED_SCHEME = "served-dawn-v1"
DEFAULT_RATE = 0.01
_INFO = b"edgeshield/watermark/served-dawn/v1"
_APPLICATION_ID = 0x45535756  # "ESWV": marks the SQLite file as an evidence store
_SCHEMA_VERSION = 2  # 2: a nullable subject column (a data-subject pseudonym), for erasure
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


class ServedWatermark:
    """Answers a keyed fraction ``rate`` of inputs with a wrong label, deterministically in the input."""

    def __init__(self, key: bytes, rate: float = DEFAULT_RATE, *, classes: int) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 0.5:
            raise InvalidArgumentError(f"rate must be in (0, 0.5], not {rate!r}")
        self.rate = float(rate)
        self.classes = _check_classes(classes)
        # A separate subkey: the served mark and the weight mark reveal nothing about each other.
        self._subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(_check_key(key))
        self._cut = np.uint64(int(self.rate * 2.0**64))  # exact (a power-of-two scaling): marked iff u64 < cut

    def marks(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(marked bool[N], offset int64[N] in 1..classes-1) from HMAC-SHA256(subkey, row bytes): bytes 0-7 and
        8-15, read as big-endian uint64, give u = word/2**64 (marked iff u < rate) and the offset."""
        c = canonical(x)
        n = c.shape[0]
        macs = b"".join(hmac.new(self._subkey, c[i].tobytes(), hashlib.sha256).digest() for i in range(n))
        words = np.frombuffer(macs, dtype=">u8").reshape(n, 4)
        marked = words[:, 0] < self._cut  # u = first 8 bytes / 2**64 < rate
        offset = (1 + words[:, 1] % np.uint64(self.classes - 1)).astype(np.int64)
        return marked, offset

    def relabel(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The labels to answer: ``(label + offset) % classes`` on marked rows; and the marked mask."""
        marked, offset = self.marks(x)
        out = _check_labels(labels, len(marked), self.classes)  # a fresh int64 copy
        out[marked] = (out[marked] + offset[marked]) % self.classes
        return out, marked

    def apply(self, x: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Swap each marked row's top-1 column with its watermark label's; unmarked rows are returned bitwise."""
        marked, offset = self.marks(x)
        p = np.asarray(probs)
        if p.shape != (len(marked), self.classes):
            raise InvalidArgumentError(f"probs must have shape ({len(marked)}, {self.classes}), got {p.shape}")
        out = np.array(p, dtype=p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64)
        if not np.isfinite(out).all():
            raise InvalidArgumentError("probs must be finite")
        rows = np.nonzero(marked)[0]
        top = out[rows].argmax(axis=1)
        target = (top + offset[rows]) % self.classes
        top_vals, target_vals = out[rows, top].copy(), out[rows, target].copy()
        out[rows, top], out[rows, target] = target_vals, top_vals
        # A tie for the top: move a sliver of mass so that the watermark label wins.
        for r, t in zip(rows, target, strict=True):
            m = out[r, t]
            tied = np.nonzero(out[r] == m)[0]
            if len(tied) > 1:
                delta = out.dtype.type(max(abs(float(m)), 1e-3) * 2.0**-8)
                out[r, tied] -= delta
                out[r, t] = m + delta * (len(tied) - 1)
        return out, marked


@dataclass(frozen=True)
class CopyVerifyResult:
    """How often the suspect reproduced the watermarked answers, the binomial p-value under H0 and the decision."""

    evidence: int  # distinct watermarked inputs used
    matches: int  # of them, how many the suspect labels as the (wrong) answered label
    match_rate: float
    p_value: float  # P(Binomial(evidence, null_rate) >= matches)
    threshold: float
    present: bool
    null_rate: float  # 1/(classes-1): the most an independent model agrees per input

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


def verify_copy(suspect: Suspect, x: np.ndarray, labels: np.ndarray, *, classes: int,
                threshold: float = DEFAULT_P_THRESHOLD) -> CopyVerifyResult:
    """Test whether ``suspect`` learnt the served watermark: its labels on the watermarked inputs ``x`` against the
    wrong ``labels`` that were answered. ``suspect`` is ONNX bytes (first output, argmax over the last axis; logits
    or probabilities) or a callable ``x -> scores [N, classes]``. Repeated inputs count once.

    Under H0 (the suspect is independent of the key) each answered label is uniform over the classes other than the
    victim's top-1, picked by a PRF the suspect never saw, so the suspect matches it with probability at most
    1/(classes-1), independently across distinct inputs: the binomial tail is a valid, conservative p-value
    whatever the suspect is (see the module docstring)."""
    classes = _check_classes(classes)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InvalidArgumentError(f"threshold must be in (0, 1), not {threshold!r}")
    c = canonical(x)
    lab = _check_labels(labels, c.shape[0], classes)
    keep = np.sort(np.unique(np.array(row_digests(c), dtype=object), return_index=True)[1])  # first of each input:
    c, lab = c[keep], lab[keep]  # a repeated input is one trial, not several
    n, null = len(keep), 1.0 / (classes - 1)
    if n == 0:
        return CopyVerifyResult(0, 0, 0.0, 1.0, float(threshold), False, null)
    scores = _scores(suspect, c)
    if scores.ndim != 2 or scores.shape != (n, classes):
        raise UnsupportedModelError(f"the suspect answered shape {scores.shape}, expected ({n}, {classes})")
    matches = int((scores.argmax(axis=-1) == lab).sum())
    p = binomial_sf(matches, n, null)
    return CopyVerifyResult(n, matches, matches / n, p, float(threshold), p < threshold, null)


_SCHEMA = (
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
    ("CREATE TABLE evidence (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, client TEXT NOT NULL,"
     " digest TEXT NOT NULL, label INTEGER NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL,"
     " subject TEXT, UNIQUE (client, digest))"),
    "CREATE INDEX evidence_subject ON evidence (subject)",
    "CREATE INDEX evidence_time ON evidence (time)",
)
# Schema 1 had no subject column: opening such a store for writing adds it (rows stored before have no subject).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE evidence ADD COLUMN subject TEXT",
    "CREATE INDEX evidence_subject ON evidence (subject)",
    "CREATE INDEX evidence_time ON evidence (time)",
    "PRAGMA user_version = 2",
)


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

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        if not create:
            check_readable_file(path, what=self._what)  # an empty file is refused as such, not as a foreign one
        super().__init__(path, create=create)

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(evidence)")}
        if create and "subject" not in columns:
            conn.execute("BEGIN IMMEDIATE")
            if "subject" not in {r[1] for r in conn.execute("PRAGMA table_info(evidence)")}:  # not by another
                for statement in _MIGRATE_1_TO_2:
                    conn.execute(statement)
            conn.execute("COMMIT")
            columns.add("subject")
        self._has_subject = "subject" in columns
        # Erased and purged rows hold raw inputs: overwrite their bytes in the file instead of leaving them in free
        # pages (the WAL is truncated after each erasure, see _delete).
        conn.execute("PRAGMA secure_delete = ON")

    def add(self, client: str, x: np.ndarray, labels: np.ndarray, *, subject: str | None = None) -> int:
        """Store the watermarked rows ``x`` answered to ``client`` with ``labels``; returns how many were new.

        ``subject`` names the data subject the request was about (the id from the operator's subject header, or
        its pseudonym): ``erase_subject`` deletes exactly those rows. This store is a personal-data store: what it
        holds is erased with the subject and purged by the retention policy."""
        if not isinstance(client, str) or not client:
            raise InvalidArgumentError("client must be a non-empty string")
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise InvalidArgumentError("subject must be a non-empty string (a pseudonym) or None")
        c = canonical(x)
        lab = _check_labels(labels, c.shape[0], None)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        shape = json.dumps(list(c.shape[1:]))
        rows = [(now, client, d, int(label), shape, _DTYPE, c[i].tobytes(), subject)
                for i, (d, label) in enumerate(zip(row_digests(c), lab, strict=True))]
        if not self._has_subject:
            raise InvalidArgumentError(f"evidence store {self.path} is schema 1 and was opened read-only "
                                       "(create=False): open it with create=True to migrate it")
        with self._tx() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO evidence (time, client, digest, label, shape, dtype, data,"
                             " subject) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
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
        naming its seq."""
        query = "SELECT seq, client, digest, label, shape, dtype, data FROM evidence"
        try:
            rows = (self._read(query + " WHERE client = ? ORDER BY seq", (client,)) if client is not None
                    else self._read(query + " ORDER BY seq"))
        except sqlite3.DatabaseError as exc:
            raise EvidenceIntegrityError(f"evidence store {self.path} is unreadable: {exc}") from None
        xs, labels, shapes = [], [], set()
        for seq, _, digest, label, shape_json, dtype, data in rows:
            try:
                shape = tuple(json.loads(shape_json))
                if dtype != _DTYPE or not isinstance(data, bytes) or len(data) != 4 * math.prod(shape):
                    raise ValueError("data does not match its shape and dtype")
                xs.append(np.frombuffer(data, dtype=_DTYPE).reshape(shape))
                labels.append(int(label))
            except (TypeError, ValueError) as exc:
                raise EvidenceIntegrityError(f"evidence row seq {seq} is malformed: {exc}", seq=seq) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise EvidenceIntegrityError(f"evidence row seq {seq} was altered: its data does not match its "
                                             "digest", seq=seq)
            shapes.add(shape)
        if len(shapes) > 1:
            raise InvalidArgumentError(f"evidence rows have differing shapes {sorted(shapes)}; load one client")
        x = np.stack(xs).astype(np.float32, copy=False) if xs else np.zeros((0,), dtype=np.float32)
        return x, np.asarray(labels, dtype=np.int64), [r[1] for r in rows], [r[2] for r in rows]

    def clients(self) -> dict[str, int]:
        """client -> number of evidence rows stored for it."""
        rows = self._read("SELECT client, count(*) FROM evidence GROUP BY client ORDER BY client")
        return {str(c): int(k) for c, k in rows}
