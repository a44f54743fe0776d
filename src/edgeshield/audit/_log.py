"""The append-only audit log: SQLite rows chained by hash, with signed Merkle checkpoints chained among them.

Each entry's hash covers the previous entry's hash, so editing, dropping, reordering or inserting a row breaks the
chain at that row. The chain alone is unkeyed, though: whoever holds the file could rewrite everything after an
edit. Checkpoints close that gap: every ``checkpoint_every`` entries the device signs (Ed25519) the RFC 9162 Merkle
root of all entries so far and appends the checkpoint itself as the next entry (``audit.checkpoint``), in the same
transaction. A rewrite is caught at the first checkpoint it crosses, truncation below a checkpoint by its tree
size, and removing or reordering a checkpoint by the chain. What the device alone cannot show is a log cut back to
right after an older checkpoint, or rewritten by someone holding the signing key: publish checkpoints to a witness
(``edgeshield.audit.publish``) for that. Verification rules: ``_verify``; the file itself: ``_store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeshield._io import atomic_writer
from edgeshield.audit import _merkle, _store
from edgeshield.audit._format import (
    CHECKPOINT_KIND,
    GENESIS_HASH,
    LOG_ACTOR,
    MIGRATED_KIND,
    Checkpoint,
    Entry,
    canonical_data,
    canonical_json,
    chain_hash,
    check_actor,
    check_caller_kind,
    checkpoint_entry_data,
    checkpoint_text,
    entry_leaf,
    entry_leaf_text,
    key_id,
    origin_for,
    utc_now,
)
from edgeshield.audit._verify import (
    CHECKPOINT_COLUMNS,
    ENTRY_COLUMNS,
    SCHEMA_VERSION,
    VerifyReport,
    scan,
    scan_from,
)
from edgeshield.errors import (
    AuditChainError,
    AuditCheckpointError,
    AuditCheckpointLinkError,
    AuditCommitError,
    AuditIntegrityError,
    AuditKeyMismatchError,
    AuditSignatureError,
    AuditTruncatedError,
    AuditUncoveredError,
    AuditWrongKeyError,
    InvalidArgumentError,
    KeyMaterialError,
    NotAnAuditLogError,
    PathNotFoundError,
)

__all__ = [
    "AuditChainError", "AuditCheckpointError", "AuditCheckpointLinkError", "AuditCommitError", "AuditIntegrityError",
    "AuditKeyMismatchError", "AuditLog", "AuditSignatureError", "AuditTruncatedError", "AuditUncoveredError",
    "AuditWrongKeyError", "ConsistencyProof", "InclusionProof", "NotAnAuditLogError", "RecoveryReport",
    "VerifyReport",
]

APPLICATION_ID = _store.APPLICATION_ID
_BATCH = 1000
_GROUP_MAX = 4096  # entries' callers one group commit takes at most (the rest lead the next one)
_MAX_COMMIT_DELAY_S = 0.01  # a leader waits at most this long for more callers (PostgreSQL's commit_delay)


# --- results ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`AuditLog.recover` found (``verified``) and did: the ``server.recovered`` entry and the checkpoint
    covering it when entries were left uncovered, else both None."""

    verified: VerifyReport
    entry: Entry | None = None
    checkpoint: Checkpoint | None = None

    @property
    def recovered(self) -> bool:
        return self.entry is not None

    @property
    def uncovered(self) -> int:
        return self.verified.uncovered

    @property
    def uncovered_seqs(self) -> range:
        return range(self.verified.covered, self.verified.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"recovered": self.recovered, "uncovered_entries": self.uncovered,
                "first_seq": self.uncovered_seqs.start if self.uncovered else None,
                "last_seq": self.uncovered_seqs.stop - 1 if self.uncovered else None,
                "entry_seq": self.entry.seq if self.entry else None,
                "checkpoint": self.checkpoint.tree_size if self.checkpoint else None,
                "verified": self.verified.to_dict()}


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



@dataclass
class _Tx:
    """One write transaction's view of the log's end: its size, last hash and (when known) Merkle frontier."""

    size: int
    prev_hash: bytes
    frontier: _merkle.Frontier | None
    schema: int = SCHEMA_VERSION
    rows: list[tuple[Any, ...]] = field(default_factory=list)  # entry rows not yet INSERTed (one executemany)
    ts: str = field(default_factory=utc_now)  # one timestamp for the entries of one transaction: their commit time


class _Waiter:
    """One caller's records in the group-commit queue. A thread caller sleeps on ``lock`` (held from the start)
    until a leader has committed its records or made it the next leader; an event-loop caller (``loop`` set) is
    resolved through its future. Then ``entries`` or ``error`` says how it went."""

    __slots__ = ("entries", "error", "future", "lead", "lock", "loop", "records")

    def __init__(self, records: list[tuple[str, str, tuple[str, dict[str, Any]]]],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.records = records
        self.entries: list[Entry] = []
        self.error: BaseException | None = None
        self.lead = False
        self.loop = loop
        self.future: asyncio.Future[list[Entry]] | None = loop.create_future() if loop is not None else None
        self.lock = threading.Lock()
        self.lock.acquire()


def _resolve(waiters: list[_Waiter]) -> None:
    """On the event loop: settle the futures of the async callers a group commit has finished with."""
    for w in waiters:
        fut = w.future
        if fut is None or fut.done():  # cancelled meanwhile: the entry is committed all the same
            continue
        if w.error is not None:
            fut.set_exception(_group_error(w.error, led=False))
        else:
            fut.set_result(w.entries)


# --- the log ------------------------------------------------------------------------------------------------------
class AuditLog:
    """An append-only, tamper-evident audit log in one SQLite file (WAL, ``synchronous=FULL``).

    ``append`` commits its entry (and, every ``checkpoint_every`` entries, a checkpoint signed with
    ``signing_key`` together with its chained entry) before returning, so a crash never loses an acknowledged entry.
    Concurrent appends from any thread (or, through ``append_async``, an event loop) are group-committed: they
    share one transaction and one fsync; ``commit_delay_s`` (default 0) makes a leader whose last group had more
    than one caller wait that long for more before committing. Reads use their own short-lived connections. Log
    metadata and digests, never raw model inputs: entries are kept forever and exported to auditors.
    ``readonly=True`` opens an existing log for verification and export without ever writing to it. A schema 1 log
    (checkpoints not chained) is read as it is, and migrated when opened for writing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 100,
        readonly: bool = False,
        durability: str = "full",
        commit_delay_s: float = 0.0,
    ) -> None:
        if durability not in ("full", "normal"):
            raise InvalidArgumentError("audit durability must be 'full' (fsync per entry: survives power loss) or "
                                       "'normal' (WAL without fsync per commit: survives a process crash only)")
        self.durability = durability
        if (isinstance(commit_delay_s, bool) or not isinstance(commit_delay_s, int | float)
                or not 0 <= commit_delay_s <= _MAX_COMMIT_DELAY_S):
            raise InvalidArgumentError(f"the audit commit delay must be 0 to {_MAX_COMMIT_DELAY_S * 1000:g} ms, "
                                       f"got {commit_delay_s!r} s")
        self.commit_delay_s = float(commit_delay_s)
        self._last_group = 0  # callers in the last group commit: the concurrency that makes waiting worth it
        self._groups = self._group_callers = self._group_entries = 0
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
        self._queue_lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leading = False
        self._committer: threading.Thread | None = None  # leads group commits for event-loop callers
        self._committer_wake = threading.Semaphore(0)
        self._committer_turn = False  # the committer thread holds the leadership it was woken for
        self._closing = False
        self._frontier: _merkle.Frontier | None = None  # Merkle frontier of the first _frontier_size entries
        self._frontier_size = -1
        self._conn: sqlite3.Connection | None = None
        if readonly:
            _store.check_file(self.path, must_exist=True)
            with self._reader() as conn:
                _store.check_schema(conn, self.path)
        else:
            self._conn = self._open_writer()

    # -- opening --
    def _open_writer(self) -> sqlite3.Connection:
        exists = _store.check_file(self.path, must_exist=False)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not exists and not parent.is_dir():
            raise PathNotFoundError(f"audit log directory not found: {parent}")
        try:
            conn = _store.connect(self.path)
        except _store.SQLITE_ERRORS as exc:
            raise _store.db_error(exc, self.path) from exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                schema = _store.check_schema(conn, self.path, allow_empty=not exists)
                if schema:
                    self._check_signing_mode(conn)
                else:
                    for statement in _store.SCHEMA:
                        conn.execute(statement)
                for statement in _store.COMPACT_SCHEMA:  # logs written before compact ranges gain the table
                    conn.execute(statement)
                if schema == 1:
                    self._migrate(conn)
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
        except _store.SQLITE_ERRORS as exc:
            conn.close()
            raise _store.db_error(exc, self.path) from exc
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2, inside the opening transaction: verify the log as schema 1 (with this log's key), then
        seal it with an ``audit.migrated`` entry and a chained checkpoint over everything before it. Old checkpoint
        rows stay as legacy rows: the new checkpoint covers every entry they covered."""
        report, frontier = scan(conn, self._public_key, schema=1)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        tx = _Tx(report.entries, report.head_hash, frontier)
        self._insert_entry(conn, tx, MIGRATED_KIND, LOG_ACTOR, {
            "from_schema": 1, "to_schema": SCHEMA_VERSION, "legacy_checkpoints": report.checkpoints,
            "latest_legacy_checkpoint": report.latest_checkpoint})
        self._insert_checkpoint(conn, tx)
        _flush(conn, tx)

    def _reader(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return _store.reader(self.path)

    def close(self) -> None:
        self._closing = True
        if self._committer is not None:
            self._committer_wake.release()
            self._committer.join(timeout=10)
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

    @property
    def origin(self) -> str:
        """The origin line of this log's checkpoints (``edgeshield/audit/<key id>``)."""
        return origin_for(self._key_id)

    # -- writing --
    def _writer(self) -> sqlite3.Connection:
        if self.readonly:
            raise InvalidArgumentError(f"audit log {self.path} was opened read-only")
        if self._conn is None:
            raise InvalidArgumentError(f"audit log {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[tuple[sqlite3.Connection, _Tx]]:
        """BEGIN IMMEDIATE .. COMMIT under the lock; the cached frontier follows only committed state."""
        with self._lock:
            conn = self._writer()
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                size, prev = (row[0] + 1, bytes(row[1])) if row else (0, GENESIS_HASH)
                tx = _Tx(size, prev, self._frontier if self._frontier_size == size else None)
                yield conn, tx
                _flush(conn, tx)
                conn.execute("COMMIT")
            except _store.SQLITE_ERRORS as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise _store.db_error(exc, self.path) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._frontier, self._frontier_size = (tx.frontier, tx.size) if tx.frontier is not None else (None, -1)

    def _insert_entry(self, conn: sqlite3.Connection, tx: _Tx, kind: str, actor: str,
                      data: dict[str, Any] | tuple[str, dict[str, Any]], ts: str | None = None) -> Entry:
        text, parsed = data if isinstance(data, tuple) else canonical_data(data)
        seq, ts = tx.size, ts or tx.ts
        leaf = entry_leaf_text(seq, ts, kind, actor, text)
        entry_hash = chain_hash(tx.prev_hash, leaf)
        entry = Entry(seq, ts, kind, actor, parsed, tx.prev_hash, entry_hash)
        tx.rows.append((seq, ts, kind, actor, text, tx.prev_hash, entry_hash))
        if tx.frontier is not None:
            tx.frontier = _merkle.frontier_append(tx.frontier, _merkle.leaf_hash(leaf))
        tx.size, tx.prev_hash = seq + 1, entry_hash
        return entry

    def _insert_checkpoint(self, conn: sqlite3.Connection, tx: _Tx) -> Checkpoint:
        """Sign the root over every entry so far and chain the checkpoint in as the next entry."""
        if tx.frontier is None:
            # The full check runs inside the writer's transaction, so nothing can change between checking and
            # signing: the device never signs a root over a chain that was tampered with.
            _flush(conn, tx)
            _report, tx.frontier = scan(conn, self._public_key, tx.schema)
        size, root = tx.size, _merkle.frontier_root(tx.frontier)
        signature = None
        if self._signing_key is not None:
            signature = self._signing_key.sign(checkpoint_text(origin_for(self._key_id), size, root).encode())
        cp = Checkpoint(size, root, utc_now(), self._key_id, signature)
        conn.execute(f"INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                     (cp.tree_size, cp.root, cp.ts, cp.key_id, cp.signature))
        # The compact range (the frontier's subtree roots) at this size: incremental verification from a witnessed
        # checkpoint starts from it, after checking it folds to the signed root (``_verify.scan_from``).
        conn.execute("INSERT INTO compact_ranges (tree_size, hashes) VALUES (?, ?)",
                     (size, _merkle.encode_frontier(tx.frontier)))
        self._insert_entry(conn, tx, CHECKPOINT_KIND, LOG_ACTOR,
                           checkpoint_entry_data(size, root, self._key_id, signature), ts=cp.ts)
        return cp

    def append(self, kind: str, actor: str, data: dict[str, Any] | None = None) -> Entry:
        """Commit one entry and return it; it is on disk (fsynced) when this returns.

        ``kind`` is a dotted lowercase event name (``audit.*`` is the log's own), ``actor`` who caused it, ``data`` a
        small JSON object (at most 16 KiB): decisions, ids and SHA-256 digests, never raw model inputs or outputs.
        Appends from concurrent threads are group-committed: they share one transaction and one fsync, and each
        returns only once the transaction holding its own entry has committed. A failed group commit raises
        :class:`AuditCommitError` in every caller of that group and leaves the log as it was before the group.
        """
        check_caller_kind(kind)
        check_actor(actor)
        canonical = canonical_data({} if data is None else data)  # refuse bad data before queueing it
        return self._commit([(kind, actor, canonical)])[0]

    def append_many(self, records: Iterable[tuple[str, str, dict[str, Any] | None]]) -> list[Entry]:
        """Commit many ``(kind, actor, data)`` entries in one transaction (one fsync), checkpoints included where
        they fall due; the bulk path (imports, back-fills). Each record is checked as :meth:`append` checks it
        before anything is written; all of them are on disk when this returns, or none is."""
        checked = [(check_caller_kind(kind), check_actor(actor), canonical_data({} if data is None else data))
                   for kind, actor, data in records]
        return self._commit(checked) if checked else []

    # -- group commit --
    def _commit(self, records: list[tuple[str, str, tuple[str, dict[str, Any]]]]) -> list[Entry]:
        """Queue ``records``; the first caller to find no leader leads: it takes everything queued, writes it in
        one transaction, commits (one fsync), wakes the callers it committed and hands leadership to the next
        waiter. Callers that find a leader sleep on their own lock until woken, as done or as the next leader."""
        self._writer()  # a read-only or closed log refuses before queueing
        waiter = _Waiter(records)
        with self._queue_lock:
            self._queue.append(waiter)
            lead = not self._leading
            self._leading = True
        if not lead:
            waiter.lock.acquire()  # released by the leader that committed us, or to make us the next leader
        if lead or waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise _group_error(waiter.error, led=lead or waiter.lead)
        return waiter.entries

    async def append_async(self, kind: str, actor: str, data: dict[str, Any] | None = None) -> Entry:
        """:meth:`append` for an event loop: the entry joins the same group commit, led by a committer thread, and
        the coroutine resumes once it is durable; the loop never blocks on the fsync and no worker thread waits
        per call. (The server's audit subscriber uses this.)"""
        check_caller_kind(kind)
        check_actor(actor)
        canonical = canonical_data({} if data is None else data)
        self._writer()
        waiter = _Waiter([(kind, actor, canonical)], asyncio.get_running_loop())
        with self._queue_lock:
            self._queue.append(waiter)
            lead = not self._leading
            self._leading = True
        if lead:
            self._wake_committer()
        future = waiter.future
        if future is None:  # not reached: a waiter made with a loop has a future
            raise InvalidArgumentError("no event loop to wait on")
        return (await future)[0]

    def _wake_committer(self) -> None:
        """Hand leadership of the next group commit to the committer thread (started on first use)."""
        with self._queue_lock:
            self._committer_turn = True
            if self._committer is None:
                self._committer = threading.Thread(target=self._run_committer, name="edgeshield-audit-commit",
                                                   daemon=True)
                self._committer.start()
        self._committer_wake.release()

    def _run_committer(self) -> None:
        while True:
            self._committer_wake.acquire()
            with self._queue_lock:
                turn, self._committer_turn = self._committer_turn, False
            if turn:
                self._lead()
            elif self._closing:  # close()'s own wake-up: no leadership came with it
                return

    @property
    def group_stats(self) -> dict[str, float]:
        """Committed group commits so far: how many, the callers and entries they carried, and the mean callers per
        group (a group that failed and was rolled back is not counted)."""
        with self._queue_lock:
            groups, callers, entries = self._groups, self._group_callers, self._group_entries
        return {"groups": groups, "callers": callers, "entries": entries,
                "mean_callers_per_group": callers / groups if groups else 0.0}

    def _lead(self) -> None:
        # PostgreSQL's commit_delay/commit_siblings: when the last group had company, wait a moment for more
        # callers before committing, so one fsync and one wake-up serve more of them. A lone caller never waits.
        if self.commit_delay_s and self._last_group > 1:
            time.sleep(self.commit_delay_s)
        with self._queue_lock:
            batch, self._queue = self._queue[:_GROUP_MAX], self._queue[_GROUP_MAX:]
            self._last_group = len(batch)
        try:
            with self._transaction() as (conn, tx):
                for w in batch:
                    w.entries = [self._append_one(conn, tx, kind, actor, canonical)
                                 for kind, actor, canonical in w.records]
            with self._queue_lock:  # committed groups only
                self._groups += 1
                self._group_callers += len(batch)
                self._group_entries += sum(len(w.entries) for w in batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter of the group gets it (typed), then we go on
            for w in batch:
                w.entries, w.error = [], exc
        finally:
            with self._queue_lock:
                nxt = self._queue[0] if self._queue else None
                self._leading = nxt is not None
            if nxt is not None:  # hand over: to the next thread caller itself, or to the committer thread
                if nxt.loop is None:
                    nxt.lead = True
                    nxt.lock.release()
                else:
                    self._wake_committer()
            by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
            for w in batch:
                if w.loop is not None:
                    by_loop.setdefault(w.loop, []).append(w)
                elif w.lock.locked():
                    w.lock.release()
            for loop, waiters in by_loop.items():  # one wake-up of each loop per group, not one per caller
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                    loop.call_soon_threadsafe(_resolve, waiters)

    def _append_one(self, conn: sqlite3.Connection, tx: _Tx, kind: str, actor: str,
                    canonical: tuple[str, dict[str, Any]]) -> Entry:
        due = self.checkpoint_every and (tx.size + 1) % self.checkpoint_every == 0
        if due and tx.frontier is None:  # check what is there before adding to it and signing over it
            _flush(conn, tx)
            _report, tx.frontier = scan(conn, self._public_key, tx.schema)
        entry = self._insert_entry(conn, tx, kind, actor, canonical)
        if due:
            self._insert_checkpoint(conn, tx)
        return entry

    def checkpoint(self) -> Checkpoint:
        """Commit a checkpoint over every entry so far (signed when the log has a key), chained in as the next
        entry; when nothing is uncovered, return the newest checkpoint instead (so it is idempotent).

        Before its first checkpoint in a process the log verifies itself, so the device never signs a root over
        a chain that was tampered with.
        """
        with self._transaction() as (conn, tx):
            row = conn.execute(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size DESC "
                               "LIMIT 1").fetchone()
            if row is not None and _covers_all(conn, row[0], tx.size):
                return _checkpoint(row)
            return self._insert_checkpoint(conn, tx)

    def recover(self, *, actor: str = "server", kind: str = "server.recovered") -> RecoveryReport:
        """Start-up recovery: verify the whole log and every checkpoint (with this log's key), then, if entries a
        crash left uncovered exist, append a ``kind`` entry saying how many and which, and a checkpoint covering it.

        Raises the :class:`AuditIntegrityError` subclass of the first fault when the log does not verify (a server
        should then refuse to start). All of it runs in one write transaction.
        """
        check_caller_kind(kind)
        check_actor(actor)
        with self._transaction() as (conn, tx):
            report, tx.frontier = scan(conn, self._public_key, tx.schema)
            if not report.uncovered:
                return RecoveryReport(report)
            entry = self._insert_entry(conn, tx, kind, actor, {
                "uncovered": report.uncovered, "first_seq": report.covered, "last_seq": report.entries - 1,
                "latest_checkpoint": report.latest_checkpoint})
            cp = self._insert_checkpoint(conn, tx)
            return RecoveryReport(report, entry, cp)

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
                rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE seq >= ? ORDER BY seq LIMIT ?",
                                    (seq, limit)).fetchall()
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
            rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def checkpoints(self) -> list[Checkpoint]:
        with self._reader() as conn:
            rows = conn.execute(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size").fetchall()
        return [_checkpoint(r) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._reader() as conn:
            row = conn.execute(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size DESC "
                               "LIMIT 1").fetchone()
        return _checkpoint(row) if row else None

    # -- verifying and proving --
    def verify(self, *, public_key: Ed25519PublicKey | None = None, require_checkpoint: bool = False) -> VerifyReport:
        """Recompute the whole chain, every checkpoint root and its chained entry; check signatures against
        ``public_key``; report how many entries no checkpoint covers.

        Without ``public_key`` a log opened with a signing key checks against that key; a read-only log then checks
        roots only (``report.signatures_checked`` is False). Raises an :class:`AuditIntegrityError` subclass naming
        the first bad entry (``seq``) or checkpoint (``tree_size``); with ``require_checkpoint``, uncovered entries
        raise :class:`AuditUncoveredError`.
        """
        if public_key is not None and not isinstance(public_key, Ed25519PublicKey):
            raise KeyMaterialError(f"the checkpoint key must be an Ed25519 public key, got {type(public_key).__name__}")
        with self._reader() as conn:
            schema = _store.check_schema(conn, self.path)
            _store.quick_check(conn, self.path)
            report, _ = scan(conn, public_key or self._public_key, schema)
        if require_checkpoint and report.uncovered:
            last = report.entries - 1
            span = f"entry {report.covered}" if report.covered == last else f"entries {report.covered}..{last}"
            raise AuditUncoveredError(
                f"{report.uncovered} of {report.entries} entries are not covered by any checkpoint ({span}): they are "
                "protected by the hash chain only", reason="uncovered", seq=report.covered,
                tree_size=report.latest_checkpoint)
        return report

    def verify_from(self, tree_size: int, root: bytes, *, public_key: Ed25519PublicKey,
                    require_checkpoint: bool = False) -> VerifyReport:
        """Verify only what was appended after the checkpoint of ``tree_size`` entries whose root is ``root``, in
        time proportional to the new entries: the stored compact range at that size must fold to ``root``, then
        the chain, every later checkpoint (signatures against ``public_key``) and its chained entry are checked as
        :meth:`verify` checks them. ``root`` must come from somewhere the device cannot rewrite — a checkpoint a
        witness cosigned: use :func:`edgeshield.audit.verify_from_witnessed`, which checks that first."""
        if not isinstance(public_key, Ed25519PublicKey):
            raise KeyMaterialError(f"the checkpoint key must be an Ed25519 public key, got {type(public_key).__name__}")
        with self._reader() as conn:
            schema = _store.check_schema(conn, self.path)
            if schema < SCHEMA_VERSION:
                raise InvalidArgumentError(f"{self.path} is a schema {schema} log: verify the whole log instead")
            report, _ = scan_from(conn, public_key, tree_size, root)
        if require_checkpoint and report.uncovered:
            raise AuditUncoveredError(
                f"{report.uncovered} of {report.entries} entries are not covered by any checkpoint (from entry "
                f"{report.covered}): they are protected by the hash chain only", reason="uncovered",
                seq=report.covered, tree_size=report.latest_checkpoint)
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
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size")]
            pending = iter(cps)
            nxt = next(pending, None)

            def flush_checkpoints(size: int) -> None:
                nonlocal nxt, n_cps
                while nxt is not None and nxt.tree_size <= size:
                    fh.write(canonical_json({"type": "checkpoint", **nxt.to_dict()}).encode() + b"\n")
                    n_cps += 1
                    nxt = next(pending, None)

            flush_checkpoints(0)
            for row in conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq"):
                fh.write(canonical_json({"type": "entry", **_entry(row).to_dict()}).encode() + b"\n")
                n_entries += 1
                flush_checkpoints(row[0] + 1)
            flush_checkpoints(1 << 62)
        return n_entries, n_cps


# --- private helpers ----------------------------------------------------------------------------------------------
def _group_error(exc: BaseException, *, led: bool) -> BaseException:
    """What one caller of a failed group commit raises. An integrity fault found while checkpointing: its own copy
    of that error (same type and fields; the cause is the original). An interrupt: the original, for the caller
    that led, and AuditCommitError for the others. Anything else (SQLite, I/O, the log closed): AuditCommitError."""
    if isinstance(exc, AuditIntegrityError):
        copy = type(exc).__new__(type(exc))
        copy.args = exc.args
        copy.__dict__.update(exc.__dict__)
        copy.__cause__ = exc
        return copy
    if led and not isinstance(exc, Exception):
        return exc
    err = AuditCommitError(f"audit entries not committed: {exc}")
    err.__cause__ = exc
    return err


def _flush(conn: sqlite3.Connection, tx: _Tx) -> None:
    """INSERT the entry rows the transaction has built so far, in one executemany."""
    if tx.rows:
        conn.executemany(f"INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tx.rows)
        tx.rows.clear()


def _covers_all(conn: sqlite3.Connection, tree_size: int, size: int) -> bool:
    """Does the checkpoint at ``tree_size`` cover a log of ``size`` entries (itself, or its own entry last)?"""
    if tree_size == size:
        return True
    if tree_size != size - 1:
        return False
    row = conn.execute("SELECT kind FROM entries WHERE seq = ?", (tree_size,)).fetchone()
    return row is not None and row[0] == CHECKPOINT_KIND


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
