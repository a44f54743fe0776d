"""Checking a whole audit log in one pass: the hash chain, every checkpoint, and the link between the two.

Rules (schema 2):

- entries are numbered 0, 1, 2, … with no gap, each chained onto the one before (see ``_format``);
- a checkpoint at tree size N signs the Merkle root of entries 0..N-1, and entry N is its ``audit.checkpoint``
  entry, written in the same transaction, whose data repeats the checkpoint (tree size, root, key id, signature) and
  whose timestamp is the checkpoint's. A checkpoint row without that entry, an ``audit.checkpoint`` entry without
  its row, or the two disagreeing is a fault: checkpoints cannot be removed or reordered without breaking the chain;
- *covered* entries are those a signed root commits to (seq < the newest checkpoint's tree size) plus that
  checkpoint's own entry, which carries nothing but the signed checkpoint it is checked against. Every other entry
  is *uncovered*: protected by the hash chain alone, which anyone holding the file can recompute.

Schema 1 logs had no checkpoint entries: their checkpoint rows are *legacy* rows, checked (root, signature) but not
required to be chained. A schema 1 log opened for writing is migrated: an ``audit.migrated`` entry and a chained
checkpoint right after it cover everything before, and rows up to the migration stay legacy.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeshield.audit import _merkle
from edgeshield.audit._format import (
    CHECKPOINT_KIND,
    GENESIS_HASH,
    LOG_ACTOR,
    MIGRATED_KIND,
    canonical_json,
    chain_hash,
    checkpoint_entry_data,
    checkpoint_text,
    entry_leaf_text,
    key_id,
    origin_for,
)
from edgeshield.errors import (
    AuditChainError,
    AuditCheckpointError,
    AuditCheckpointLinkError,
    AuditCompactRangeError,
    AuditSignatureError,
    AuditTruncatedError,
    AuditWrongKeyError,
)

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditLog.verify` checked and found consistent, and how much of it a signed checkpoint covers."""

    entries: int
    checkpoints: int
    latest_checkpoint: int | None  # tree size of the newest checkpoint
    head_hash: bytes  # chain hash of the last entry (32 zero bytes for an empty log)
    root: bytes  # Merkle root over all entries
    signatures_checked: bool  # a public key was given: every checkpoint's signature was checked against it
    key_id: str | None  # key every checkpoint was checked against, when signatures_checked
    covered: int = 0  # entries 0..covered-1 are covered by the newest checkpoint (its own entry included)
    schema: int = SCHEMA_VERSION
    legacy_checkpoints: int = 0  # schema 1 checkpoint rows, which have no chained entry

    @property
    def uncovered(self) -> int:
        """Entries no checkpoint covers: protected by the hash chain only, so they can be rewritten or cut off."""
        return self.entries - self.covered

    @property
    def unanchored(self) -> int:
        """The same as :attr:`uncovered` (the name before checkpoints were chained)."""
        return self.uncovered

    @property
    def first_uncovered(self) -> int | None:
        return self.covered if self.uncovered else None

    @property
    def signatures_verified(self) -> int:
        """How many checkpoint signatures were verified (0 when no key was given or there are no checkpoints)."""
        return self.checkpoints if self.signatures_checked else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "schema": self.schema,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "latest_checkpoint": self.latest_checkpoint,
            "covered_entries": self.covered,
            "uncovered_entries": self.uncovered,
            "first_uncovered": self.first_uncovered,
            "unanchored_entries": self.uncovered,
            "legacy_checkpoints": self.legacy_checkpoints,
            "head_hash": self.head_hash.hex(),
            "root": self.root.hex(),
            "signatures_checked": self.signatures_checked,
            "signatures_verified": self.signatures_verified,
            "key_id": self.key_id,
        }


ENTRY_COLUMNS = "seq, ts, kind, actor, data, prev_hash, entry_hash"
CHECKPOINT_COLUMNS = "tree_size, root, ts, key_id, signature"


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _row_problem(row: tuple[Any, ...]) -> tuple[str | None, Any]:
    """What is wrong with a stored row's form (None when nothing), and its data decoded."""
    _seq, ts, kind, actor, data, prev, h = row
    if not (isinstance(ts, str) and isinstance(kind, str) and isinstance(actor, str) and isinstance(data, str)):
        return "a text column holds a non-text value", None
    if not (_is_hash(prev) and _is_hash(h)):
        return "a hash column is not a 32-byte blob", None
    try:
        parsed = json.loads(data)
    except ValueError:
        return "its data is not JSON", None
    if canonical_json(parsed) != data:
        return "its data is not in canonical form", None
    return None, parsed


class _Scan:
    """State of one pass over the log; ``run`` raises at the first fault."""

    def __init__(self, conn: sqlite3.Connection, public_key: Ed25519PublicKey | None, schema: int,
                 start: int = 0, frontier: _merkle.Frontier = (), prev_hash: bytes = GENESIS_HASH) -> None:
        self.conn, self.public_key, self.schema = conn, public_key, schema
        # An incremental scan starts at entry ``start`` with the Merkle frontier and chain hash of the entries
        # before it (taken from a witnessed checkpoint: ``scan_from``); a full scan starts at 0 from nothing.
        self.start, self.prev_hash = start, prev_hash
        self.want_kid = key_id(public_key) if public_key is not None else None
        # A full scan reads every row, even ones with a negative number (inserted to confuse the order).
        low = start if start else -(1 << 62)
        self.cps = [tuple(r) for r in conn.execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE tree_size >= ? ORDER BY tree_size", (low,))]
        for cp in self.cps:
            if isinstance(cp[0], bool) or not isinstance(cp[0], int) or cp[0] < 0:
                raise AuditCheckpointError(f"checkpoint with invalid tree size {cp[0]!r}",
                                           reason="malformed-checkpoint", tree_size=None)
        # Rows at or below this tree size may lack a chained entry (schema 1, or before a migration).
        self.legacy_limit = 1 << 62 if schema < 2 else -1
        if schema >= 2:
            row = conn.execute("SELECT min(seq) FROM entries WHERE seq >= ? AND kind = ?",
                               (low, MIGRATED_KIND)).fetchone()
            if row[0] is not None:
                self.legacy_limit = int(row[0])
        self.ci = 0
        self.frontier: _merkle.Frontier = frontier
        self.anchored = start  # tree size of the last checkpoint found good
        self.pending: tuple[Any, ...] | None = None  # checkpoint row at tree size == next seq, awaiting its entry
        self.last_cp_entry = -1
        self.legacy = 0
        self.migration_cp_at: int | None = None

    def check_rows(self, size: int) -> None:
        while self.ci < len(self.cps) and self.cps[self.ci][0] == size:
            _check_checkpoint(self.cps[self.ci], _merkle.frontier_root(self.frontier), self.public_key,
                              self.want_kid, self.anchored)
            self.anchored, self.pending = size, self.cps[self.ci]
            self.ci += 1

    def link(self, seq: int, ts: str, kind: str, actor: str, data: Any) -> None:
        """Tie entry ``seq`` to the checkpoint rows: the chained half of every checkpoint."""
        if self.schema < 2:  # schema 1: checkpoints were never chained; its entry kinds carry no meaning here
            self.legacy += self.pending is not None
            self.pending = None
            return
        is_cp = kind == CHECKPOINT_KIND
        if self.migration_cp_at == seq and not is_cp:
            raise AuditCheckpointLinkError(f"entry {seq} should be the checkpoint that seals the schema migration",
                                           reason="migration-unsealed", seq=seq, tree_size=seq)
        if self.pending is not None:
            if is_cp:
                _check_link(self.pending, seq, ts, actor, data)
                self.last_cp_entry = seq
            elif seq <= self.legacy_limit:
                self.legacy += 1
            else:
                raise AuditCheckpointLinkError(
                    f"checkpoint at tree size {seq} has no chained entry (entry {seq} is {kind!r}): the checkpoint "
                    "was added or moved beside the chain", reason="unchained-checkpoint", seq=seq, tree_size=seq)
        elif is_cp:
            raise AuditCheckpointLinkError(
                f"entry {seq} records a checkpoint at tree size {seq} that is not in the checkpoint table: the "
                "checkpoint was removed", reason="checkpoint-removed", seq=seq, tree_size=seq)
        if kind == MIGRATED_KIND:
            if (seq != self.legacy_limit or self.last_cp_entry >= 0 or not isinstance(data, dict)
                    or data.get("from_schema") != 1):
                raise AuditChainError(f"entry {seq} claims a schema migration it cannot be", reason="bad-migration",
                                      seq=seq)
            self.migration_cp_at = seq + 1
        self.pending = None

    def run(self) -> tuple[VerifyReport, _merkle.Frontier]:
        self.check_rows(self.start)
        expected, prev_hash, prev_row = self.start, self.prev_hash, None
        stack = list(self.frontier)  # the frontier, grown in place (a tuple per entry would cost O(log n) each)
        push, leaf_hash, special = _merkle.frontier_push, _merkle.leaf_hash, (CHECKPOINT_KIND, MIGRATED_KIND)
        next_cp = self.cps[self.ci][0] if self.ci < len(self.cps) else -1
        for row in self.conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE seq >= ? ORDER BY seq",
                                     (self.start if self.start else -(1 << 62),)):
            seq = row[0]
            if seq != expected:
                if isinstance(seq, int) and seq > expected:
                    raise AuditChainError(f"entry {expected} is missing (the next stored entry is {seq})",
                                          reason="missing", seq=expected)
                raise AuditChainError(f"unexpected entry {seq} before entry {expected}", reason="inserted", seq=seq)
            problem, parsed = _row_problem(row)
            if problem:
                raise AuditChainError(f"entry {seq} is malformed: {problem}", reason="malformed", seq=seq)
            _, ts, kind, actor, data, stored_prev, stored_hash = row
            leaf = entry_leaf_text(seq, ts, kind, actor, data)  # data is canonical: the same bytes as entry_leaf
            if stored_prev != prev_hash:
                raise _link_error(seq, row, leaf, prev_row)
            if chain_hash(prev_hash, leaf) != stored_hash:
                raise AuditChainError(f"entry {seq} does not match its hash (edited entry)", reason="edited", seq=seq)
            if self.pending is not None or kind in special or self.migration_cp_at == seq or self.schema < 2:
                self.link(seq, ts, kind, actor, parsed)
            push(stack, leaf_hash(leaf))
            prev_hash, prev_row, expected = stored_hash, row, expected + 1
            if expected == next_cp:
                self.frontier = tuple(stack)
                self.check_rows(expected)
                next_cp = self.cps[self.ci][0] if self.ci < len(self.cps) else -1
        self.frontier = tuple(stack)
        if self.migration_cp_at == expected:
            raise AuditCheckpointLinkError("the log ends before the checkpoint that seals its schema migration",
                                           reason="migration-unsealed", seq=expected, tree_size=expected)
        if self.ci < len(self.cps):
            raise AuditTruncatedError(
                f"the log ends at {expected} entries but a checkpoint covers {self.cps[-1][0]}: entries from "
                f"{expected} on were removed", reason="truncated", seq=expected, tree_size=self.cps[-1][0])
        if self.pending is not None:
            if self.schema < 2 or expected <= self.legacy_limit:
                self.legacy += 1
            else:
                raise AuditCheckpointLinkError(
                    f"checkpoint at tree size {expected} has no chained entry: the log ends before it (its "
                    "audit.checkpoint entry was removed, or the row was added)", reason="unchained-checkpoint",
                    seq=expected, tree_size=expected)
        latest = self.cps[-1][0] if self.cps else None
        covered = 0 if latest is None else latest + 1 if self.last_cp_entry == latest else latest
        report = VerifyReport(
            entries=expected, checkpoints=len(self.cps), latest_checkpoint=latest, head_hash=prev_hash,
            root=_merkle.frontier_root(self.frontier), signatures_checked=self.public_key is not None,
            key_id=self.want_kid, covered=covered, schema=self.schema, legacy_checkpoints=self.legacy,
        )
        return report, self.frontier


def scan(conn: sqlite3.Connection, public_key: Ed25519PublicKey | None,
         schema: int = SCHEMA_VERSION) -> tuple[VerifyReport, _merkle.Frontier]:
    """Walk every entry and checkpoint once, in order; raise at the first fault, else report."""
    return _Scan(conn, public_key, schema).run()


def scan_from(conn: sqlite3.Connection, public_key: Ed25519PublicKey, tree_size: int,
              root: bytes) -> tuple[VerifyReport, _merkle.Frontier]:
    """Verify only the entries from ``tree_size`` on, starting from the compact range stored at that size, which
    must fold to ``root`` (the caller's witnessed, signed root): then it *is* that tree's frontier, unless SHA-256
    has a collision, and every later checkpoint root is recomputed over it and the new entries.

    The entries below ``tree_size`` are not read again: the witnessed root commits to them. Raises
    :class:`AuditCompactRangeError` when the stored range is missing or does not fold to ``root``, else the
    first fault as :func:`scan` does. The report's ``checkpoints`` counts the checkpoints checked (from
    ``tree_size`` on).
    """
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'compact_ranges'").fetchone()
    row = conn.execute("SELECT hashes FROM compact_ranges WHERE tree_size = ?", (tree_size,)).fetchone() \
        if has_table else None
    if row is None:
        raise AuditCompactRangeError(
            f"no compact range is stored for tree size {tree_size} (a checkpoint written before compact ranges, or "
            "the row was removed): verify the whole log instead", reason="no-compact-range", tree_size=tree_size)
    frontier = _merkle.decode_frontier(tree_size, row[0])
    if frontier is None or _merkle.frontier_root(frontier) != root:
        raise AuditCompactRangeError(
            f"the compact range stored for tree size {tree_size} does not fold to the witnessed root: it was "
            "altered, or the log was rewritten under the witnessed checkpoint", reason="compact-range-mismatch",
            tree_size=tree_size)
    prev_hash = GENESIS_HASH
    if tree_size:
        prev = conn.execute("SELECT entry_hash FROM entries WHERE seq = ?", (tree_size - 1,)).fetchone()
        if prev is None or not _is_hash(prev[0]):
            raise AuditTruncatedError(f"entry {tree_size - 1}, the last one the witnessed checkpoint covers, is "
                                      "missing or malformed", reason="truncated", seq=tree_size - 1,
                                      tree_size=tree_size)
        prev_hash = bytes(prev[0])
    return _Scan(conn, public_key, SCHEMA_VERSION, tree_size, frontier, prev_hash).run()


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


def _check_link(cp: tuple[Any, ...], seq: int, ts: str, actor: str, data: Any) -> None:
    size, root, cp_ts, kid, sig = cp
    want = None
    if _is_hash(root) and (sig is None or isinstance(sig, bytes)) and (kid is None or isinstance(kid, str)):
        want = checkpoint_entry_data(size, root, kid, sig)
    if want is None or data != want or ts != cp_ts or actor != LOG_ACTOR:
        raise AuditCheckpointLinkError(f"checkpoint at tree size {size} does not match its chained entry {seq} "
                                       "(the checkpoint or its entry was altered)", reason="checkpoint-mismatch",
                                       seq=seq, tree_size=size)


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
