"""The append-only audit log: SQLite rows chained by hash, with signed Merkle checkpoints over them.

Each entry's hash covers the previous entry's hash, so editing, dropping, reordering or inserting a row breaks the
chain at that row. The chain alone is unkeyed, though: whoever holds the file could rewrite everything after an
edit. Checkpoints close that gap: every ``checkpoint_every`` entries the device signs (Ed25519) the RFC 9162 Merkle
root of all entries so far, so a rewrite is caught at the first checkpoint it crosses, truncation below a
checkpoint is caught by its tree size, and anyone can be given inclusion and consistency proofs. Entries after the
latest checkpoint are protected by the chain only, and a log deleted back to an earlier checkpoint (checkpoints
included) looks whole: keep or publish checkpoints elsewhere to rule that out.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeshield._io import atomic_writer, check_readable_file
from edgeshield.audit import _merkle
from edgeshield.audit._format import (
    GENESIS_HASH,
    Checkpoint,
    Entry,
    canonical_data,
    canonical_json,
    chain_hash,
    check_actor,
    check_kind,
    checkpoint_text,
    entry_leaf,
    key_id,
    origin_for,
    utc_now,
)
from edgeshield.errors import (
    AuditChainError,
    AuditCheckpointError,
    AuditIntegrityError,
    AuditKeyMismatchError,
    AuditSignatureError,
    AuditTruncatedError,
    AuditWrongKeyError,
    EdgeShieldError,
    InvalidArgumentError,
    KeyMaterialError,
    NotAFileError,
    NotAnAuditLogError,
    PathNotFoundError,
    UnsupportedFormatVersionError,
)

APPLICATION_ID = 0x45534131  # "ESA1": marks a SQLite file as an EdgeShield audit log
SCHEMA_VERSION = 1
_BATCH = 1000

_APPEND_ONLY = "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END"
_SCHEMA = (
    "CREATE TABLE entries (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL, "
    "data TEXT NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL)",
    "CREATE TABLE checkpoints (tree_size INTEGER PRIMARY KEY, root BLOB NOT NULL, ts TEXT NOT NULL, key_id TEXT, "
    "signature BLOB)",
    # Append-only by construction: the triggers stop mistakes, not attackers (who can drop them; verify() catches
    # what they do next).
    f"CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries {_APPEND_ONLY}",
    f"CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries {_APPEND_ONLY}",
    f"CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints {_APPEND_ONLY}",
    f"CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints {_APPEND_ONLY}",
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
)


# --- results ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditLog.verify` checked and found intact."""

    entries: int
    checkpoints: int
    latest_checkpoint: int | None  # tree size of the newest checkpoint
    head_hash: bytes  # chain hash of the last entry (32 zero bytes for an empty log)
    root: bytes  # Merkle root over all entries
    signatures_checked: bool
    key_id: str | None  # key every checkpoint was checked against, when signatures_checked

    @property
    def unanchored(self) -> int:
        """Entries after the newest checkpoint: protected by the chain only until the next checkpoint."""
        return self.entries - (self.latest_checkpoint or 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "latest_checkpoint": self.latest_checkpoint,
            "unanchored_entries": self.unanchored,
            "head_hash": self.head_hash.hex(),
            "root": self.root.hex(),
            "signatures_checked": self.signatures_checked,
            "key_id": self.key_id,
        }


@dataclass(frozen=True)
class InclusionProof:
    """Entry ``seq`` is leaf ``seq`` of the tree of ``tree_size`` entries whose root is ``root``."""

    seq: int
    tree_size: int
    leaf_hash: bytes
    path: tuple[bytes, ...]
    root: bytes

    def verify(self, root: bytes | None = None) -> bool:
        return _merkle.verify_inclusion(self.leaf_hash, self.seq, self.tree_size, self.path, root or self.root)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "tree_size": self.tree_size, "leaf_hash": self.leaf_hash.hex(),
                "path": [p.hex() for p in self.path], "root": self.root.hex()}


@dataclass(frozen=True)
class ConsistencyProof:
    """The tree of ``new_size`` entries extends the tree of ``old_size`` entries."""

    old_size: int
    new_size: int
    old_root: bytes
    new_root: bytes
    path: tuple[bytes, ...]

    def verify(self) -> bool:
        return _merkle.verify_consistency(self.old_size, self.new_size, self.old_root, self.new_root, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"old_size": self.old_size, "new_size": self.new_size, "old_root": self.old_root.hex(),
                "new_root": self.new_root.hex(), "path": [p.hex() for p in self.path]}


# --- the log ------------------------------------------------------------------------------------------------------
class AuditLog:
    """An append-only, tamper-evident audit log in one SQLite file (WAL, ``synchronous=FULL``).

    ``append`` commits one entry (and, every ``checkpoint_every`` entries, a checkpoint signed with
    ``signing_key``) in a single transaction before returning, so a crash never loses an acknowledged entry.
    Appends are serialised by a lock and safe from any thread; reads use their own short-lived connections.
    Log metadata and digests, never raw model inputs: entries are kept forever and exported to auditors.
    ``readonly=True`` opens an existing log for verification and export without ever writing to it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 100,
        readonly: bool = False,
        durability: str = "full",
    ) -> None:
        if durability not in ("full", "normal"):
            raise InvalidArgumentError("audit durability must be 'full' (fsync per entry: survives power loss) or "
                                       "'normal' (WAL without fsync per commit: survives a process crash only)")
        self.durability = durability
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise InvalidArgumentError(f"checkpoint_every must be a whole number >= 0 (0: only on demand), "
                                       f"got {checkpoint_every!r}")
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise KeyMaterialError(f"the audit signing key must be Ed25519, got {type(signing_key).__name__}")
        self.path = Path(path)
        self.readonly = readonly
        self.checkpoint_every = checkpoint_every
        self._signing_key = signing_key
        self._public_key = signing_key.public_key() if signing_key is not None else None
        self._key_id = key_id(self._public_key) if self._public_key is not None else None
        self._lock = threading.RLock()
        self._frontier: _merkle.Frontier | None = None  # Merkle frontier of the first _frontier_size entries
        self._frontier_size = -1
        self._conn: sqlite3.Connection | None = None
        if readonly:
            check_readable_file(self.path, what="audit log")
            with self._reader() as conn:
                _check_schema(conn, self.path)
        else:
            self._conn = self._open_writer()

    # -- opening --
    def _open_writer(self) -> sqlite3.Connection:
        if self.path.exists() and not self.path.is_file():
            raise NotAFileError(f"audit log is not a regular file: {self.path}")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise PathNotFoundError(f"audit log directory not found: {parent}")
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if _check_schema(conn, self.path, allow_empty=True):
                    self._check_signing_mode(conn)
                else:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            # Only once the file is known to be ours: WAL lets readers run beside the writer, FULL fsyncs every
            # commit so an acknowledged entry survives a crash or power loss (the default). NORMAL, in WAL mode,
            # still survives a killed process (the commit is in the WAL file) but not a power cut.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise NotAnAuditLogError(f"{self.path} is not an audit log database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_signing_mode(self, conn: sqlite3.Connection) -> None:
        # A log keeps one signing identity: another key (or none) would make every later verify fail, so refuse it
        # when the log is opened. Only the newest checkpoint sets the identity; a stray key id on an older one is
        # a forgery, which verify() reports as such.
        row = conn.execute("SELECT key_id FROM checkpoints ORDER BY tree_size DESC LIMIT 1").fetchone()
        if row is not None and row[0] != self._key_id:
            raise AuditKeyMismatchError(f"{self.path}: checkpoints are signed by {row[0] or 'no key'}, but the log "
                                        f"was opened with {self._key_id or 'no signing key'}")

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A fresh read-only connection; one read transaction gives a consistent snapshot next to the writer."""
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise NotAnAuditLogError(f"cannot open audit log {self.path}: {exc}") from exc
        try:
            conn.execute("BEGIN")
            yield conn
        except sqlite3.OperationalError as exc:
            raise EdgeShieldError(f"cannot read audit log {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise AuditIntegrityError(f"audit log {self.path} is unreadable or corrupt: {exc}",
                                      reason="corrupt") from exc
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def key_id(self) -> str | None:
        """Key id of the signing key, or None for a log whose checkpoints are unsigned."""
        return self._key_id

    # -- writing --
    def _writer(self) -> sqlite3.Connection:
        if self.readonly:
            raise InvalidArgumentError(f"audit log {self.path} was opened read-only")
        if self._conn is None:
            raise InvalidArgumentError(f"audit log {self.path} is closed")
        return self._conn

    def append(self, kind: str, actor: str, data: dict[str, Any] | None = None) -> Entry:
        """Commit one entry and return it; it is on disk (fsynced) when this returns.

        ``kind`` is a dotted lowercase event name, ``actor`` who caused it, ``data`` a small JSON object (at most
        16 KiB): decisions, ids and SHA-256 digests, never raw model inputs or outputs.
        """
        check_kind(kind)
        check_actor(actor)
        text, parsed = canonical_data({} if data is None else data)
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (row[0] + 1, row[1]) if row else (0, GENESIS_HASH)
                ts = utc_now()
                leaf = entry_leaf(seq, ts, kind, actor, parsed)
                entry = Entry(seq, ts, kind, actor, parsed, prev, chain_hash(prev, leaf))
                conn.execute("INSERT INTO entries (seq, ts, kind, actor, data, prev_hash, entry_hash) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, ts, kind, actor, text, prev, entry.entry_hash))
                frontier = None
                if self._frontier is not None and self._frontier_size == seq:
                    frontier = _merkle.frontier_append(self._frontier, _merkle.leaf_hash(leaf))
                if self.checkpoint_every and (seq + 1) % self.checkpoint_every == 0:
                    if frontier is None:
                        frontier = self._load_frontier(conn)
                    self._insert_checkpoint(conn, seq + 1, _merkle.frontier_root(frontier))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._frontier, self._frontier_size = (frontier, seq + 1) if frontier is not None else (None, -1)
        return entry

    def checkpoint(self) -> Checkpoint:
        """Commit (or return the existing) checkpoint over every entry so far, signed when the log has a key.

        Before its first checkpoint in a process the log verifies itself, so the device never signs a root over
        a chain that was tampered with.
        """
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                size = _size(conn)
                row = conn.execute("SELECT tree_size, root, ts, key_id, signature FROM checkpoints "
                                   "WHERE tree_size = ?", (size,)).fetchone()
                if row is not None:
                    conn.execute("COMMIT")
                    return _checkpoint(row)
                if self._frontier is not None and self._frontier_size == size:
                    frontier = self._frontier
                else:
                    frontier = self._load_frontier(conn)
                cp = self._insert_checkpoint(conn, size, _merkle.frontier_root(frontier))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._frontier, self._frontier_size = frontier, size
            return cp

    def _load_frontier(self, conn: sqlite3.Connection) -> _merkle.Frontier:
        # The full check runs inside the writer's transaction, so nothing can change between checking and signing.
        _report, frontier = _scan(conn, self._public_key)
        return frontier

    def _insert_checkpoint(self, conn: sqlite3.Connection, size: int, root: bytes) -> Checkpoint:
        signature = None
        if self._signing_key is not None:
            signature = self._signing_key.sign(checkpoint_text(origin_for(self._key_id), size, root).encode())
        cp = Checkpoint(size, root, utc_now(), self._key_id, signature)
        conn.execute("INSERT INTO checkpoints (tree_size, root, ts, key_id, signature) VALUES (?, ?, ?, ?, ?)",
                     (cp.tree_size, cp.root, cp.ts, cp.key_id, cp.signature))
        return cp

    # -- reading --
    def __len__(self) -> int:
        with self._reader() as conn:
            return _size(conn)

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        """Entries with ``start <= seq < stop`` in order, read in batches (appends may continue meanwhile)."""
        seq = start
        while stop is None or seq < stop:
            limit = _BATCH if stop is None else min(_BATCH, stop - seq)
            with self._reader() as conn:
                rows = conn.execute("SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries "
                                    "WHERE seq >= ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _entry(row)
            seq = rows[-1][0] + 1

    def tail(self, n: int) -> list[Entry]:
        """The last ``n`` entries, oldest first."""
        if n < 0:
            raise InvalidArgumentError(f"cannot show {n} entries")
        with self._reader() as conn:
            rows = conn.execute("SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries "
                                "ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def checkpoints(self) -> list[Checkpoint]:
        with self._reader() as conn:
            rows = conn.execute("SELECT tree_size, root, ts, key_id, signature FROM checkpoints "
                                "ORDER BY tree_size").fetchall()
        return [_checkpoint(r) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._reader() as conn:
            row = conn.execute("SELECT tree_size, root, ts, key_id, signature FROM checkpoints "
                               "ORDER BY tree_size DESC LIMIT 1").fetchone()
        return _checkpoint(row) if row else None

    # -- verifying and proving --
    def verify(self, *, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Recompute the whole chain and every checkpoint root; check signatures against ``public_key``.

        Without ``public_key`` a log opened with a signing key checks against that key; a read-only log then checks
        roots only (``report.signatures_checked`` is False). Raises an :class:`AuditIntegrityError` subclass naming
        the first bad entry (``seq``) or checkpoint (``tree_size``).
        """
        if public_key is not None and not isinstance(public_key, Ed25519PublicKey):
            raise KeyMaterialError(f"the checkpoint key must be an Ed25519 public key, got {type(public_key).__name__}")
        with self._reader() as conn:
            report, _ = _scan(conn, public_key or self._public_key)
        return report

    def inclusion_proof(self, seq: int, tree_size: int | None = None) -> InclusionProof:
        """Proof that entry ``seq`` is in the tree of the first ``tree_size`` entries (default: all of them)."""
        with self._reader() as conn:
            size = _size(conn) if tree_size is None else tree_size
            hashes = _leaf_hashes(conn, size)
        path = _merkle.inclusion_proof_from_hashes(seq, hashes)
        return InclusionProof(seq, size, hashes[seq], tuple(path), _merkle.root_from_hashes(hashes))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Proof that the tree of ``new_size`` entries (default: all) extends the tree of ``old_size`` entries."""
        with self._reader() as conn:
            size = _size(conn) if new_size is None else new_size
            hashes = _leaf_hashes(conn, size)
        path = _merkle.consistency_proof_from_hashes(old_size, hashes)
        return ConsistencyProof(old_size, size, _merkle.root_from_hashes(hashes[:old_size]),
                                _merkle.root_from_hashes(hashes), tuple(path))

    def export_jsonl(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> tuple[int, int]:
        """Write every entry (``"type": "entry"``) and checkpoint (``"type": "checkpoint"``, after the entry that
        completes it) as JSON lines, atomically. Exports as stored, without verifying. Returns the counts."""
        n_entries = n_cps = 0
        with self._reader() as conn, atomic_writer(path, overwrite=overwrite) as fh:
            cps = [_checkpoint(r) for r in conn.execute(
                "SELECT tree_size, root, ts, key_id, signature FROM checkpoints ORDER BY tree_size")]
            pending = iter(cps)
            nxt = next(pending, None)

            def flush_checkpoints(size: int) -> None:
                nonlocal nxt, n_cps
                while nxt is not None and nxt.tree_size <= size:
                    fh.write(canonical_json({"type": "checkpoint", **nxt.to_dict()}).encode() + b"\n")
                    n_cps += 1
                    nxt = next(pending, None)

            flush_checkpoints(0)
            for row in conn.execute("SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries "
                                    "ORDER BY seq"):
                fh.write(canonical_json({"type": "entry", **_entry(row).to_dict()}).encode() + b"\n")
                n_entries += 1
                flush_checkpoints(row[0] + 1)
            flush_checkpoints(1 << 62)
        return n_entries, n_cps


# --- private helpers ----------------------------------------------------------------------------------------------
def _check_schema(conn: sqlite3.Connection, path: Path, *, allow_empty: bool = False) -> bool:
    """True when ``conn`` holds an audit log; False for an empty database when ``allow_empty``."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise NotAnAuditLogError(f"{path} is not an audit log database: {exc}") from exc
    if app_id == 0 and not tables and allow_empty:
        return False
    if app_id != APPLICATION_ID or not {"entries", "checkpoints"} <= tables:
        raise NotAnAuditLogError(f"{path} is not an EdgeShield audit log")
    if version > SCHEMA_VERSION:
        raise UnsupportedFormatVersionError(f"{path} is audit log schema {version}; this build reads up to "
                                            f"{SCHEMA_VERSION}")
    return True


def _size(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(seq) FROM entries").fetchone()
    return 0 if row[0] is None else int(row[0]) + 1


def _entry(row: tuple[Any, ...]) -> Entry:
    seq, ts, kind, actor, data, prev, h = row
    try:
        parsed = json.loads(data)
    except (TypeError, ValueError):
        parsed = {"_unparseable": str(data)}
    return Entry(seq, ts, kind, actor, parsed, bytes(prev), bytes(h))


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint:
    size, root, ts, kid, sig = row
    return Checkpoint(size, bytes(root), ts, kid, bytes(sig) if sig is not None else None)


def _leaf_hashes(conn: sqlite3.Connection, size: int) -> list[bytes]:
    available = _size(conn)
    if not 0 <= size <= available:
        raise InvalidArgumentError(f"tree size {size} is outside 0..{available}")
    hashes = []
    for seq, ts, kind, actor, data in conn.execute(
        "SELECT seq, ts, kind, actor, data FROM entries WHERE seq < ? ORDER BY seq", (size,)
    ):
        try:
            parsed = json.loads(data)
        except (TypeError, ValueError) as exc:
            raise AuditChainError(f"entry {seq} is malformed: its data is not JSON", reason="malformed",
                                  seq=seq) from exc
        hashes.append(_merkle.leaf_hash(entry_leaf(seq, ts, kind, actor, parsed)))
    return hashes


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _row_problem(row: tuple[Any, ...]) -> str | None:
    _seq, ts, kind, actor, data, prev, h = row
    if not all(isinstance(v, str) for v in (ts, kind, actor, data)):
        return "a text column holds a non-text value"
    if not (_is_hash(prev) and _is_hash(h)):
        return "a hash column is not a 32-byte blob"
    try:
        parsed = json.loads(data)
    except ValueError:
        return "its data is not JSON"
    if canonical_json(parsed) != data:
        return "its data is not in canonical form"
    return None


def _scan(conn: sqlite3.Connection, public_key: Ed25519PublicKey | None) -> tuple[VerifyReport, _merkle.Frontier]:
    """Walk every entry and checkpoint once, in order; raise at the first fault, else report."""
    want_kid = key_id(public_key) if public_key is not None else None
    cps = [tuple(r) for r in conn.execute("SELECT tree_size, root, ts, key_id, signature FROM checkpoints "
                                          "ORDER BY tree_size")]
    ci = 0
    frontier: _merkle.Frontier = ()
    anchored = 0  # tree size of the last checkpoint found good

    def check_checkpoints(size: int) -> None:
        nonlocal ci, anchored
        while ci < len(cps) and cps[ci][0] == size:
            _check_checkpoint(cps[ci], _merkle.frontier_root(frontier), public_key, want_kid, anchored)
            anchored = size
            ci += 1

    if cps and (not isinstance(cps[0][0], int) or cps[0][0] < 0):
        raise AuditCheckpointError(f"checkpoint with invalid tree size {cps[0][0]!r}", reason="malformed-checkpoint",
                                   tree_size=None)
    check_checkpoints(0)
    expected, prev_hash, prev_row = 0, GENESIS_HASH, None
    for row in conn.execute("SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries ORDER BY seq"):
        seq = row[0]
        if seq != expected:
            if seq > expected:
                raise AuditChainError(f"entry {expected} is missing (the next stored entry is {seq})",
                                      reason="missing", seq=expected)
            raise AuditChainError(f"unexpected entry {seq} before entry {expected}", reason="inserted", seq=seq)
        problem = _row_problem(row)
        if problem:
            raise AuditChainError(f"entry {seq} is malformed: {problem}", reason="malformed", seq=seq)
        _, ts, kind, actor, data, stored_prev, stored_hash = row
        leaf = entry_leaf(seq, ts, kind, actor, json.loads(data))
        if stored_prev != prev_hash:
            raise _link_error(seq, row, leaf, prev_row)
        if chain_hash(prev_hash, leaf) != stored_hash:
            raise AuditChainError(f"entry {seq} does not match its hash (edited entry)", reason="edited", seq=seq)
        frontier = _merkle.frontier_append(frontier, _merkle.leaf_hash(leaf))
        prev_hash, prev_row, expected = stored_hash, row, expected + 1
        check_checkpoints(expected)
    if ci < len(cps):
        raise AuditTruncatedError(
            f"the log ends at {expected} entries but a checkpoint covers {cps[-1][0]}: entries from {expected} on "
            "were removed", reason="truncated", seq=expected, tree_size=cps[-1][0])
    report = VerifyReport(
        entries=expected,
        checkpoints=len(cps),
        latest_checkpoint=cps[-1][0] if cps else None,
        head_hash=prev_hash,
        root=_merkle.frontier_root(frontier),
        signatures_checked=public_key is not None,
        key_id=want_kid,
    )
    return report, frontier


def _link_error(seq: int, row: tuple[Any, ...], leaf: bytes, prev_row: tuple[Any, ...] | None) -> AuditChainError:
    # Entry ``seq`` does not point at the entry before it. Decide which of the two is the bad one: if ``seq`` is
    # intact by itself (its hash matches its own stored back-link), or it shares its back-link with the previous
    # entry, then the previous entry is the impostor (an inserted or rewritten-and-rehashed row).
    stored_prev, stored_hash = row[5], row[6]
    self_consistent = chain_hash(stored_prev, leaf) == stored_hash
    if prev_row is not None and (self_consistent or prev_row[5] == stored_prev):
        bad = seq - 1
        return AuditChainError(f"entry {bad} is not the entry that entry {seq} was chained to (inserted or "
                               "rewritten entry)", reason="replaced", seq=bad)
    return AuditChainError(f"entry {seq} does not link to entry {seq - 1} (deleted, reordered or inserted entries)",
                           reason="broken-link", seq=seq)


def _check_checkpoint(cp: tuple[Any, ...], actual_root: bytes, public_key: Ed25519PublicKey | None,
                      want_kid: str | None, anchored: int) -> None:
    size, root, _ts, kid, sig = cp
    if public_key is not None:
        if sig is None:
            raise AuditSignatureError(f"checkpoint at tree size {size} is unsigned", reason="unsigned",
                                      tree_size=size)
        if kid != want_kid:
            raise AuditWrongKeyError(f"checkpoint at tree size {size} is signed by key {kid}, not the device key "
                                     f"{want_kid}", reason="wrong-key", tree_size=size)
        if not _is_hash(root):
            raise AuditCheckpointError(f"checkpoint at tree size {size} has a malformed root",
                                       reason="malformed-checkpoint", tree_size=size)
        try:
            public_key.verify(bytes(sig), checkpoint_text(origin_for(kid), size, root).encode())
        except (InvalidSignature, TypeError, ValueError) as exc:
            raise AuditSignatureError(f"checkpoint at tree size {size} has a bad signature (forged checkpoint)",
                                      reason="bad-signature", tree_size=size) from exc
    if root != actual_root:
        span = f"entries {anchored}..{size - 1}" if size > anchored else "the empty log"
        raise AuditCheckpointError(f"checkpoint at tree size {size} does not match {span}: an entry there was "
                                   "rewritten, or the checkpoint is forged", reason="root-mismatch", tree_size=size)
