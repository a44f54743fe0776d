"""A C2SP tlog-witness: keeps the newest checkpoint of each log it knows and cosigns only consistent growth.

The request and answer formats follow c2sp.org/tlog-witness: ``add-checkpoint`` takes ``old <size>``, up to 63
base64 consistency proof lines, a blank line and the signed checkpoint; the answer is the witness's cosignature
line(s) (c2sp.org/tlog-cosignature, ``cosignature/v1``). The checks, in the order the specification gives them:
malformed request 400, unknown origin 404, no valid signature from a key trusted for the origin 403, old size
above the checkpoint's 400, old size not the one the witness holds 409 (body: that size, ``text/x.tlog.size``),
then a bad root or consistency proof 422. Checking the old size and storing the new checkpoint happen in one SQLite
transaction, so two racing requests can never roll the witness back.

This module is the witness itself, transport-free; ``_witness_http`` serves it over HTTPS.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield.audit import _merkle
from edgeshield.audit._format import utc_now
from edgeshield.audit._note import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Vkey,
    b64,
    b64decode_strict,
    cosign,
    decode_bounded,
    format_note,
    make_vkey,
    parse_checkpoint,
    parse_note,
    verify_note,
)
from edgeshield.errors import (
    EdgeShieldError,
    InvalidArgumentError,
    MalformedNoteError,
    NotAFileError,
    NoteSignatureError,
)

MAX_PROOF_LINES = 63
MAX_REQUEST_BYTES = 16 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
NOTE_CONTENT_TYPE = "text/plain; charset=utf-8"
APPLICATION_ID = 0x45535731  # "ESW1": an EdgeShield witness store
_REFUSED_KEPT = 100  # refused-but-signed checkpoints kept per origin, as evidence of log misbehaviour

_SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS checkpoints (origin TEXT PRIMARY KEY, tree_size INTEGER NOT NULL, "
     "root BLOB NOT NULL, note TEXT NOT NULL, ts TEXT NOT NULL)"),
    ("CREATE TABLE IF NOT EXISTS refused (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, old_size INTEGER NOT NULL, "
     "note TEXT NOT NULL, reason TEXT NOT NULL, ts TEXT NOT NULL)"),
    f"PRAGMA application_id={APPLICATION_ID}",
)


# --- the request format -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddCheckpointRequest:
    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: str  # the signed note, as sent


def parse_add_checkpoint(body: bytes) -> AddCheckpointRequest:
    """Parse an add-checkpoint body: ``old N``, proof lines, a blank line, the checkpoint note."""
    text = decode_bounded(body, MAX_REQUEST_BYTES, "the request")
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise MalformedNoteError("the request needs an empty line between the proof and the checkpoint")
    lines = head.split("\n")
    old_line, proof_lines = lines[0], lines[1:]
    digits = old_line.removeprefix("old ")
    if (not old_line.startswith("old ") or not digits.isascii() or not digits.isdigit()
            or (digits != "0" and digits.startswith("0")) or int(digits) > 2**63 - 1):
        raise MalformedNoteError("the first line must be 'old <size>' in decimal without leading zeros")
    if len(proof_lines) > MAX_PROOF_LINES:
        raise MalformedNoteError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof = tuple(b64decode_strict(x, "a consistency proof line") for x in proof_lines)
    if any(len(p) != _merkle.HASH_SIZE for p in proof):
        raise MalformedNoteError("a consistency proof line is not a 32-byte hash")
    return AddCheckpointRequest(int(digits), proof, note)


def format_add_checkpoint(old_size: int, proof: Iterable[bytes], note: str) -> bytes:
    return (f"old {old_size}\n" + "".join(b64(p) + "\n" for p in proof) + "\n" + note).encode()


def origin_hash(origin: str) -> str:
    """The monitoring path component for a log: lowercase hex SHA-256 of its origin."""
    return hashlib.sha256(origin.encode()).hexdigest()


# --- the witness --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WitnessResponse:
    status: int
    body: bytes
    content_type: str = NOTE_CONTENT_TYPE
    reason: str = ""  # for the witness's own log; never secret

    @classmethod
    def refuse(cls, status: int, reason: str) -> WitnessResponse:
        return cls(status, (reason + "\n").encode(), NOTE_CONTENT_TYPE, reason)


class WitnessStoreError(EdgeShieldError):
    """The witness's own database cannot be used."""


def _open_store(path: Path) -> sqlite3.Connection:
    if path.exists() and not path.is_file():
        raise NotAFileError(f"witness store is not a regular file: {path}")
    if not path.exists():  # created 0600 before SQLite touches it; its -wal/-shm files inherit the mode
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            conn.close()
            raise WitnessStoreError(f"{path} is not an EdgeShield witness store")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a cosignature is only sent once its checkpoint is on disk
    except sqlite3.Error as exc:
        raise WitnessStoreError(f"cannot use witness store {path}: {exc}") from exc
    return conn


class Witness:
    """A witness named ``name`` with Ed25519 key ``signing_key``, for the logs in ``logs`` (origin -> the vkeys
    trusted to sign its checkpoints), keeping its state in the SQLite file ``db_path`` (created 0600)."""

    def __init__(self, db_path: str | os.PathLike[str], signing_key: Ed25519PrivateKey, name: str,
                 logs: Mapping[str, Sequence[Vkey]], *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise InvalidArgumentError("the witness key must be an Ed25519 private key")
        self.vkey = make_vkey(name, signing_key.public_key(), SIG_COSIGNATURE_V1)
        self.name = name
        self._key = signing_key
        self._clock = clock
        self.logs: dict[str, tuple[Vkey, ...]] = {}
        for origin, keys in logs.items():
            if not origin or "\n" in origin or not keys:
                raise InvalidArgumentError(f"witnessed log {origin!r} needs an origin line and at least one vkey")
            if any(k.sig_type != SIG_ED25519 for k in keys):
                raise InvalidArgumentError(f"log {origin!r}: checkpoints are checked with Ed25519 (0x01) vkeys")
            self.logs[origin] = tuple(keys)
        self._by_hash = {origin_hash(o): o for o in self.logs}
        self._lock = threading.Lock()
        self.path = Path(db_path)
        self._conn = _open_store(self.path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add_checkpoint(self, body: bytes) -> WitnessResponse:
        """Handle one add-checkpoint request body; never raises for anything the request contains."""
        try:
            req = parse_add_checkpoint(body)
            note = parse_note(req.checkpoint)
            cp = parse_checkpoint(note.text)
        except MalformedNoteError as exc:
            return WitnessResponse.refuse(400, f"malformed request: {exc}")
        keys = self.logs.get(cp.origin)
        if keys is None:
            return WitnessResponse.refuse(404, "unknown log origin")
        try:
            verified = verify_note(note, keys)
        except NoteSignatureError as exc:
            return WitnessResponse.refuse(403, str(exc))
        if req.old_size > cp.tree_size:
            return WitnessResponse.refuse(400, f"old size {req.old_size} is above the checkpoint size {cp.tree_size}")
        with self._lock:
            try:
                return self._update(req, cp.origin, cp.tree_size, cp.root, note.text,
                                    format_note(note.text, [v.signature for v in verified]))
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                return WitnessResponse(503, b"witness store busy, retry\n", NOTE_CONTENT_TYPE, f"store: {exc}")

    def _update(self, req: AddCheckpointRequest, origin: str, size: int, root: bytes, text: str,
                log_note: str) -> WitnessResponse:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT tree_size, root FROM checkpoints WHERE origin = ?", (origin,)).fetchone()
            held, held_root = (int(row[0]), bytes(row[1])) if row else (0, _merkle.EMPTY_ROOT)
            if req.old_size != held:
                conn.execute("COMMIT")
                return WitnessResponse(409, f"{held}\n".encode(), SIZE_CONTENT_TYPE, f"old size is not {held}")
            problem = _inconsistency(req, size, root, held_root)
            if problem:
                _keep_refused(conn, origin, req.old_size, log_note, problem)
                conn.execute("COMMIT")
                return WitnessResponse.refuse(422, problem)
            cosignature = cosign(text, self.name, self._key, int(self._clock()))
            conn.execute("INSERT INTO checkpoints (origin, tree_size, root, note, ts) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(origin) DO UPDATE SET tree_size = excluded.tree_size, root = excluded.root, "
                         "note = excluded.note, ts = excluded.ts",
                         (origin, size, root, log_note + cosignature.line(), utc_now()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return WitnessResponse(200, cosignature.line().encode(), NOTE_CONTENT_TYPE, f"cosigned {origin} at {size}")

    def checkpoint(self, origin: str) -> str | None:
        """The newest checkpoint cosigned for ``origin``: the log's verified signatures and this cosignature."""
        with self._lock:
            row = self._conn.execute("SELECT note FROM checkpoints WHERE origin = ?", (origin,)).fetchone()
        return None if row is None else str(row[0])

    def checkpoint_by_hash(self, hex_hash: str) -> str | None:
        origin = self._by_hash.get(hex_hash)
        return None if origin is None else self.checkpoint(origin)

    def refused(self, origin: str) -> list[tuple[int, str, str]]:
        """Checkpoints with a valid log signature that failed the consistency checks: (old size, note, reason)."""
        with self._lock:
            rows = self._conn.execute("SELECT old_size, note, reason FROM refused WHERE origin = ? ORDER BY id",
                                      (origin,)).fetchall()
        return [(int(a), str(b), str(c)) for a, b, c in rows]


def _inconsistency(req: AddCheckpointRequest, size: int, root: bytes, held_root: bytes) -> str | None:
    if size == 0 and root != _merkle.EMPTY_ROOT:
        return "a checkpoint of size 0 must carry the empty tree's root"
    if req.old_size == 0:
        return "a consistency proof from size 0 must be empty" if req.proof else None
    if req.old_size == size:
        if req.proof or root != held_root:
            return "same size as the checkpoint held, but another root (or a proof where none belongs)"
        return None
    if not _merkle.verify_consistency(req.old_size, size, held_root, root, req.proof):
        return f"the consistency proof from size {req.old_size} to {size} does not verify"
    return None


def _keep_refused(conn: sqlite3.Connection, origin: str, old_size: int, note: str, reason: str) -> None:
    conn.execute("INSERT INTO refused (origin, old_size, note, reason, ts) VALUES (?, ?, ?, ?, ?)",
                 (origin, old_size, note, reason, utc_now()))
    conn.execute("DELETE FROM refused WHERE origin = ? AND id NOT IN (SELECT id FROM refused WHERE origin = ? "
                 "ORDER BY id DESC LIMIT ?)", (origin, origin, _REFUSED_KEPT))
