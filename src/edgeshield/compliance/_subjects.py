"""Data subjects: pseudonyms under per-subject keys, erasure by destroying the key (crypto-shredding), retention.

A *subject* is whoever a request is about, named by a header the operator configures; client certificates name
devices, not people. The audit log never holds a subject id: it holds ``pseudonym(id)``, an HMAC-SHA256 under a
random key kept for that subject alone. Erasing the subject deletes its rows from the named personal-data stores
and deletes its key, after which no one can recompute the pseudonym from the id, so the audit entries that carry
it no longer link to anybody — while the entries themselves, their hash chain, Merkle tree and witness proofs stay
exactly as they were (nothing in the log was changed).

The key table does not list subject ids either: each row is found by HMAC-SHA256(id) under a store-wide lookup
key. Whoever holds the file (and so the lookup key) can still test a guessed id for membership; whoever copied
the file before an erasure still holds that subject's key. Backups of this file defeat crypto-shredding: keep none.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from edgeshield._sqlite import PrivateStore
from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.audit import AuditLog
    from edgeshield.compliance._deployment import Deployment

_APPLICATION_ID = 0x45535342  # "ESSB": marks the SQLite file as a subject key store
_SCHEMA_VERSION = 1
_SCHEMA = (
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE subject_keys (lookup TEXT PRIMARY KEY, key BLOB NOT NULL, created TEXT NOT NULL)",
)
_PSEUDONYM_HEX = 32
MAX_SUBJECT_ID = 256
AUDIT_ACTOR = "compliance"


class NotASubjectKeyStoreError(InvalidArgumentError):
    """The file is not an EdgeShield subject key store."""


def check_subject_id(subject_id: object) -> str:
    """A subject id is 1-256 printable characters without surrounding spaces."""
    if (not isinstance(subject_id, str) or not subject_id or len(subject_id) > MAX_SUBJECT_ID
            or not subject_id.isprintable() or subject_id.strip() != subject_id):
        raise InvalidArgumentError(f"a subject id must be 1-{MAX_SUBJECT_ID} printable characters without surrounding "
                                   "spaces")
    return subject_id


class SubjectKeys(PrivateStore):
    """Per-subject random keys in one SQLite file (mode 0600, WAL, secure_delete); thread-safe.

    ``pseudonym(id)`` is HMAC-SHA256(key of id, id) as hex, its first 32 characters (128 bits), creating the key on
    first use; ``erase(id)`` deletes the key. Nothing is cached in memory, so an erasure made by another process
    (``edgeshield comply erase`` beside a running server) takes effect on the server's next request.
    """

    _what = "subject key store"
    _application_id = _APPLICATION_ID
    _schema = _SCHEMA
    _tables = frozenset({"meta", "subject_keys"})
    _not_a_store = NotASubjectKeyStoreError
    _lookup_key: bytes

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA secure_delete = ON")  # a deleted key's bytes are overwritten, not left in a page

    def _created(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (name, value) VALUES ('lookup_key', ?)", (secrets.token_bytes(32),))

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        row = conn.execute("SELECT value FROM meta WHERE name = 'lookup_key'").fetchone()
        if row is None or not isinstance(row[0], bytes) or len(row[0]) != 32:
            raise NotASubjectKeyStoreError(f"{self.path}: the store's lookup key is missing or malformed")
        self._lookup_key = row[0]

    def _lookup(self, subject_id: str) -> str:
        return hmac.new(self._lookup_key, check_subject_id(subject_id).encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _mac(key: bytes, subject_id: str) -> str:
        return hmac.new(key, subject_id.encode(), hashlib.sha256).hexdigest()[:_PSEUDONYM_HEX]

    def pseudonym(self, subject_id: str) -> str:
        """The subject's pseudonym (32 hex characters); the subject's key is created on first use."""
        lookup = self._lookup(subject_id)
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO subject_keys (lookup, key, created) VALUES (?, ?, ?)",
                         (lookup, secrets.token_bytes(32), datetime.now(UTC).isoformat(timespec="seconds")))
            key = conn.execute("SELECT key FROM subject_keys WHERE lookup = ?", (lookup,)).fetchone()[0]
        return self._mac(bytes(key), subject_id)

    def existing_pseudonym(self, subject_id: str) -> str | None:
        """The subject's pseudonym when it has a key, else None (no key is created)."""
        rows = self._read("SELECT key FROM subject_keys WHERE lookup = ?", (self._lookup(subject_id),))
        return self._mac(bytes(rows[0][0]), subject_id) if rows else None

    def erase(self, subject_id: str) -> bool:
        """Delete the subject's key (True when there was one): its pseudonym can never be recomputed."""
        lookup = self._lookup(subject_id)
        with self._tx() as conn:
            deleted = conn.execute("DELETE FROM subject_keys WHERE lookup = ?", (lookup,)).rowcount > 0
        if deleted:  # the WAL still holds the page with the key as it was
            self._checkpoint()
        return deleted

    def __len__(self) -> int:
        return int(self._read("SELECT count(*) FROM subject_keys")[0][0])


# --- operations over a deployment's stores ----------------------------------------------------------------------
@dataclass(frozen=True)
class ErasureReport:
    """What ``erase_subject`` did: rows deleted per store, whether a key was destroyed, and the audit entry."""

    erasure_id: str
    stores: dict[str, int]
    key_destroyed: bool
    audit_seq: int | None
    checkpoint: int | None = None

    @property
    def records(self) -> int:
        return sum(v for k, v in self.stores.items() if k != "subject_keys")

    def to_dict(self) -> dict[str, Any]:
        return {"erasure_id": self.erasure_id, "stores": self.stores, "records": self.records,
                "key_destroyed": self.key_destroyed, "audit_seq": self.audit_seq, "checkpoint": self.checkpoint}


@dataclass(frozen=True)
class PurgeReport:
    """What ``purge`` did: the cut-off, rows deleted per store, and the audit entry."""

    before: str
    stores: dict[str, int] = field(default_factory=dict)
    audit_seq: int | None = None
    checkpoint: int | None = None

    @property
    def records(self) -> int:
        return sum(self.stores.values())

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "stores": self.stores, "records": self.records, "audit_seq": self.audit_seq,
                "checkpoint": self.checkpoint}


def open_audit_writer(deployment: Deployment) -> AuditLog:
    """The deployment's audit log opened for appending with its checkpoint key, as the server opens it. A running
    server may hold the same log: appends from both processes serialise on SQLite's write lock (WAL)."""
    from edgeshield.audit import AuditLog, load_signing_key

    key = load_signing_key(deployment.require("audit-key"), deployment.passphrase)
    return AuditLog(deployment.require("audit-db"), signing_key=key)


def _evidence_store(deployment: Deployment) -> Any:
    from edgeshield.watermark import EvidenceStore

    path = deployment.served_watermark_evidence
    return EvidenceStore(path) if path is not None and path.is_file() else None


def _append(deployment: Deployment, kind: str, data: dict[str, Any]) -> tuple[int, int | None]:
    with open_audit_writer(deployment) as log:
        entry = log.append(kind, AUDIT_ACTOR, data)
        cp = log.checkpoint()  # sign it now: the entry is covered by a checkpoint at once
    return entry.seq, cp.tree_size


def erase_subject(deployment: Deployment, subject_id: str) -> ErasureReport:
    """Right to erasure: delete the subject's rows from every named store, destroy its key, and audit
    ``subject.erased`` with a random erasure id and the counts — never the subject id or its pseudonym."""
    check_subject_id(subject_id)
    path = deployment.subject_keys
    if path is None and deployment.served_watermark_evidence is None:
        raise InvalidArgumentError("the deployment names no subject key store (subject-keys) and no personal-data "
                                   "store: there is nothing to erase from")
    keys = SubjectKeys(path, create=False) if path is not None and path.is_file() else None
    stores: dict[str, int] = {}
    try:
        pseudonym = keys.existing_pseudonym(subject_id) if keys is not None else None
        store = _evidence_store(deployment)
        if store is not None:  # rows are tagged with the subject id or its pseudonym: delete both
            with store:
                stores["served_evidence"] = store.erase_subject(subject_id) + (
                    store.erase_subject(pseudonym) if pseudonym is not None else 0)
        destroyed = keys.erase(subject_id) if keys is not None else False
    finally:
        if keys is not None:
            keys.close()
    stores["subject_keys"] = int(destroyed)
    erasure_id = uuid.uuid4().hex  # links the entry to the requester's receipt, and to nobody
    records = sum(v for k, v in stores.items() if k != "subject_keys")
    seq, cp = _append(deployment, "subject.erased", {"subject_ref": erasure_id, "records": records,
                                                     "stores": stores})
    return ErasureReport(erasure_id, stores, destroyed, seq, cp)


def purge(deployment: Deployment, now: float | None = None) -> PurgeReport:
    """Apply the retention policy: delete records older than ``retention-days`` from the named stores; audit
    ``retention.purged``. The audit log itself is append-only and never purged (it holds no personal data)."""
    if deployment.retention_days is None:
        raise InvalidArgumentError(f"the deployment sets no retention period (retention-days) in "
                                   f"{deployment.config or 'its config'}")
    cutoff = (time.time() if now is None else now) - deployment.retention_days * 86400.0
    before = datetime.fromtimestamp(cutoff, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    stores: dict[str, int] = {}
    store = _evidence_store(deployment)
    if store is not None:
        with store:
            stores["served_evidence"] = store.purge_before(cutoff)
    seq, cp = _append(deployment, "retention.purged", {"before": before, "records": sum(stores.values()),
                                                       "stores": stores})
    return PurgeReport(before, stores, seq, cp)
