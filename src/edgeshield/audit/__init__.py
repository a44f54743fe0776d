"""Tamper-evident audit log: hash-chained SQLite entries with signed RFC 9162 Merkle checkpoints.

    log = AuditLog("audit.db", signing_key=load_signing_key("audit.key"))
    log.append("inference.request", "client-17", {"input_sha256": digest, "decision": "accepted"})
    report = log.verify(public_key=load_verify_key("audit.pub"))

Entries hold metadata and digests, never raw model inputs. ``verify`` recomputes the whole chain and every
checkpoint, and raises an :class:`AuditIntegrityError` subclass naming the first bad entry. The RFC 9162 Merkle
tree functions (roots, inclusion and consistency proofs) are ``audit.merkle``.
"""

from __future__ import annotations

from edgeshield.audit import _merkle as merkle
from edgeshield.audit._format import Checkpoint, Entry, key_id
from edgeshield.audit._keys import generate_signing_key, load_signing_key, load_verify_key
from edgeshield.audit._log import (
    AuditChainError,
    AuditCheckpointError,
    AuditIntegrityError,
    AuditKeyMismatchError,
    AuditLog,
    AuditSignatureError,
    AuditTruncatedError,
    AuditWrongKeyError,
    ConsistencyProof,
    InclusionProof,
    NotAnAuditLogError,
    VerifyReport,
)

__all__ = [
    "AuditChainError",
    "AuditCheckpointError",
    "AuditIntegrityError",
    "AuditKeyMismatchError",
    "AuditLog",
    "AuditSignatureError",
    "AuditTruncatedError",
    "AuditWrongKeyError",
    "Checkpoint",
    "ConsistencyProof",
    "Entry",
    "InclusionProof",
    "NotAnAuditLogError",
    "VerifyReport",
    "generate_signing_key",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "merkle",
]
