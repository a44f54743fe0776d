"""Tamper-evident audit log: hash-chained SQLite entries with signed RFC 9162 Merkle checkpoints chained among them,
and a C2SP witness off the device.

    log = AuditLog("audit.db", signing_key=load_signing_key("audit.key"))
    log.recover()                                   # at start-up: verify, checkpoint what a crash left uncovered
    log.append("inference.request", "client-17", {"input_sha256": digest, "decision": "accepted"})
    report = log.verify(public_key=load_verify_key("audit.pub"), require_checkpoint=True)
    verify_from_witnessed(log, note, public_key=pub, witness_keys=[wkey])  # only what came after the cosigned note
    publish(log, WitnessClient(url, witness_client_context("ca.crt")), public_key=pub)

Entries hold metadata and digests, never raw model inputs. ``verify`` recomputes the whole chain, every checkpoint
and its chained entry, raises an :class:`AuditIntegrityError` subclass naming the first bad entry, and reports how
many entries no checkpoint covers. ``audit.merkle`` holds the RFC 9162 tree functions, ``audit.note`` the C2SP
signed-note, checkpoint and cosignature formats; ``Witness``/``WitnessServer`` are the witness service.
"""

from __future__ import annotations

from edgeshield.audit import _merkle as merkle
from edgeshield.audit import _note as note
from edgeshield.audit._format import Checkpoint, Entry, key_id
from edgeshield.audit._keys import generate_signing_key, load_signing_key, load_verify_key
from edgeshield.audit._log import (
    AuditChainError,
    AuditCheckpointError,
    AuditCheckpointLinkError,
    AuditCommitError,
    AuditIntegrityError,
    AuditKeyMismatchError,
    AuditLog,
    AuditSignatureError,
    AuditTruncatedError,
    AuditUncoveredError,
    AuditWrongKeyError,
    ConsistencyProof,
    InclusionProof,
    NotAnAuditLogError,
    RecoveryReport,
    VerifyReport,
)
from edgeshield.audit._note import Vkey, parse_vkey
from edgeshield.audit._publish import (
    AgainstReport,
    PublishResult,
    WitnessClient,
    WitnessEndpoint,
    log_vkey,
    publish,
    verify_against,
    verify_from_witnessed,
)
from edgeshield.audit._publish import client_context as witness_client_context
from edgeshield.audit._witness import Witness, WitnessResponse
from edgeshield.audit._witness_http import WitnessServer, serve_in_thread
from edgeshield.audit._witness_http import server_context as witness_server_context
from edgeshield.errors import (
    AuditCompactRangeError,
    AuditNotExtendedError,
    WitnessInconsistentError,
    WitnessRefusedError,
)

__all__ = [
    "AgainstReport",
    "AuditChainError",
    "AuditCheckpointError",
    "AuditCheckpointLinkError",
    "AuditCommitError",
    "AuditCompactRangeError",
    "AuditIntegrityError",
    "AuditKeyMismatchError",
    "AuditLog",
    "AuditNotExtendedError",
    "AuditSignatureError",
    "AuditTruncatedError",
    "AuditUncoveredError",
    "AuditWrongKeyError",
    "Checkpoint",
    "ConsistencyProof",
    "Entry",
    "InclusionProof",
    "NotAnAuditLogError",
    "PublishResult",
    "RecoveryReport",
    "VerifyReport",
    "Vkey",
    "Witness",
    "WitnessClient",
    "WitnessEndpoint",
    "WitnessInconsistentError",
    "WitnessRefusedError",
    "WitnessResponse",
    "WitnessServer",
    "generate_signing_key",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "log_vkey",
    "merkle",
    "note",
    "parse_vkey",
    "publish",
    "serve_in_thread",
    "verify_against",
    "verify_from_witnessed",
    "witness_client_context",
    "witness_server_context",
]
