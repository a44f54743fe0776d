"""The device's side of a witness: publish checkpoints to it, and prove the log extends what it cosigned.

Whoever holds the device's checkpoint key can re-sign any rewrite, and whoever holds the file can cut the log back
to right after an older checkpoint; neither can be seen from the device alone. A witness (``_witness``) off the
device keeps the newest checkpoint it cosigned for the log, and cosigns a new one only with a consistency proof
from that size. ``publish`` submits the log's newest checkpoint; ``verify_against`` checks the log against a
witnessed checkpoint (from a file, or fetched from the witness with ``WitnessClient.checkpoint``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeshield.audit import _merkle
from edgeshield.audit._format import Checkpoint, key_id, origin_for
from edgeshield.audit._log import AuditLog
from edgeshield.audit._note import (
    SIG_COSIGNATURE_V1,
    CheckpointBody,
    Note,
    NoteSignature,
    Vkey,
    format_note,
    make_vkey,
    parse_checkpoint,
    parse_note,
    parse_signature_lines,
    verify_note,
)
from edgeshield.audit._verify import VerifyReport
from edgeshield.audit._witness import SIZE_CONTENT_TYPE, WitnessResponse, format_add_checkpoint, origin_hash
from edgeshield.errors import (
    AuditNotExtendedError,
    AuditWrongKeyError,
    ConnectionFailedError,
    InvalidArgumentError,
    MalformedNoteError,
    WitnessInconsistentError,
    WitnessRefusedError,
)

_MAX_ANSWER = 64 * 1024


def log_vkey(public_key: Ed25519PublicKey) -> Vkey:
    """The vkey a witness is configured with for this device's log: its origin as the key name, type 0x01."""
    return make_vkey(origin_for(key_id(public_key)), public_key)


class WitnessEndpoint(Protocol):
    """What ``publish`` needs from a witness: an in-process :class:`Witness` or a :class:`WitnessClient`."""

    def add_checkpoint(self, body: bytes) -> WitnessResponse: ...

    def checkpoint(self, origin: str) -> str | None: ...


def client_context(ca: str | os.PathLike[str], cert: str | os.PathLike[str] | None = None,
                   key: str | os.PathLike[str] | None = None, *, passphrase: bytes | None = None) -> ssl.SSLContext:
    """TLS 1.3 client context for a witness: its server certificate must chain to ``ca`` and name the host; with
    ``cert``/``key`` the device also presents a client certificate (e.g. from ``edgeshield pki``)."""
    from edgeshield import transport
    from edgeshield._io import check_readable_file

    if (cert is None) != (key is None):
        raise InvalidArgumentError("give both a client certificate and its key, or neither")
    if cert is not None and key is not None:
        return transport.client_context(ca, cert, key, passphrase=passphrase)
    ca_path = ca if not os.path.isdir(ca) else os.path.join(ca, "ca.crt")
    check_readable_file(ca_path, what="witness CA certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca_path))
    return ctx


class WitnessClient:
    """A witness over HTTPS (``url`` is its submission and monitoring prefix), with a timeout on every wait."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidArgumentError(f"a witness URL is https://host[:port][/prefix], got {url!r}")
        self.url = url.rstrip("/")
        self._ssl, self._timeout = ssl_context, timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> WitnessResponse:
        import httpx

        try:
            with httpx.Client(verify=self._ssl, timeout=self._timeout, follow_redirects=False) as client, \
                    client.stream(method, self.url + path, content=body) as resp:
                data = b""
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > _MAX_ANSWER:
                        raise WitnessRefusedError(502, f"the witness's answer is over {_MAX_ANSWER} bytes")
                return WitnessResponse(resp.status_code, data, resp.headers.get("content-type", ""))
        except httpx.TimeoutException as exc:
            raise ConnectionFailedError(f"the witness at {self.url} did not answer within {self._timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise ConnectionFailedError(f"cannot reach the witness at {self.url}: {exc}") from exc

    def add_checkpoint(self, body: bytes) -> WitnessResponse:
        return self._request("POST", "/add-checkpoint", body)

    def checkpoint(self, origin: str) -> str | None:
        resp = self._request("GET", f"/{origin_hash(origin)}/checkpoint")
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise WitnessRefusedError(resp.status, _reason(resp))
        try:
            return resp.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedNoteError("the witness answered with a checkpoint that is not UTF-8") from exc


def _reason(resp: WitnessResponse) -> str:
    text = resp.body[:200].decode("utf-8", "replace").strip().splitlines()
    return text[0] if text else "no reason given"


# --- publishing ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishResult:
    """The checkpoint published, the size the witness held before, and the note with the witness's cosignatures."""

    checkpoint: Checkpoint
    witness_size: int
    cosignatures: tuple[NoteSignature, ...]
    note: str
    verified_witnesses: tuple[str, ...]  # names whose cosignature was checked against a given vkey

    def to_dict(self) -> dict[str, Any]:
        return {"tree_size": self.checkpoint.tree_size, "root": self.checkpoint.root.hex(),
                "witness_size_before": self.witness_size, "cosigned_by": [s.name for s in self.cosignatures],
                "cosignatures_verified": list(self.verified_witnesses), "note": self.note}


def publish(log: AuditLog, witness: WitnessEndpoint, *, public_key: Ed25519PublicKey,
            witness_keys: Sequence[Vkey] = (), old_size: int = 0) -> PublishResult:
    """Submit the log's newest checkpoint with a consistency proof from the size the witness holds.

    ``old_size`` is the size last published (0 when unknown: the witness's 409 then says its size, and the request
    is sent once more). ``witness_keys`` (cosignature vkeys) check the answer. Raises
    :class:`WitnessInconsistentError` when the witness holds a tree this log does not extend.
    """
    cp = log.latest_checkpoint()
    if cp is None or cp.signature is None:
        raise InvalidArgumentError(f"{log.path} has no signed checkpoint to publish")
    if cp.key_id != key_id(public_key):
        raise AuditWrongKeyError(f"the newest checkpoint is signed by {cp.key_id}, not {key_id(public_key)}",
                                 reason="wrong-key", tree_size=cp.tree_size)
    note = cp.signed_note(public_key)
    verify_note(parse_note(note), [log_vkey(public_key)])  # never publish what the device did not sign
    old = old_size if 0 <= old_size <= cp.tree_size else 0
    for _attempt in range(2):
        proof = log.consistency_proof(old, cp.tree_size).path if old else ()
        resp = witness.add_checkpoint(format_add_checkpoint(old, proof, note))
        if resp.status == 200:
            return _cosigned(cp, old, note, resp, witness_keys)
        if resp.status == 409:
            held = _held_size(resp)
            if held > cp.tree_size:
                raise WitnessInconsistentError(
                    f"the witness holds tree size {held}, beyond this log's newest checkpoint ({cp.tree_size}): the "
                    "log was cut back after the witness saw it", reason="cut-back", tree_size=held)
            if held == old:
                break
            old = held
            continue
        if resp.status == 422:
            raise WitnessInconsistentError(
                f"the witness refused the consistency proof from tree size {old} to {cp.tree_size}: this log does "
                f"not extend the checkpoint it cosigned ({_reason(resp)})", reason="rewritten", tree_size=old)
        raise WitnessRefusedError(resp.status, _reason(resp))
    raise WitnessRefusedError(409, "the witness kept answering with a conflicting size")


def _held_size(resp: WitnessResponse) -> int:
    text = resp.body.decode("ascii", "replace")
    if not resp.content_type.startswith(SIZE_CONTENT_TYPE) or not text.endswith("\n") or not text[:-1].isdigit():
        raise WitnessRefusedError(409, "the witness's 409 carries no tree size")
    return int(text[:-1])


def _cosigned(cp: Checkpoint, old: int, note: str, resp: WitnessResponse,
              witness_keys: Sequence[Vkey]) -> PublishResult:
    try:
        cosigs = parse_signature_lines(resp.body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedNoteError("the witness's cosignature is not UTF-8") from exc
    parsed = parse_note(note)
    names: tuple[str, ...] = ()
    if witness_keys:
        checked = verify_note(Note(parsed.text, cosigs), [k for k in witness_keys if k.sig_type == SIG_COSIGNATURE_V1])
        names = tuple(v.vkey.name for v in checked)
    return PublishResult(cp, old, cosigs, format_note(parsed.text, [*parsed.signatures, *cosigs]), names)


# --- checking the log against a witnessed checkpoint ----------------------------------------------------------------
@dataclass(frozen=True)
class AgainstReport:
    """The log verified, and extends the witnessed checkpoint of ``tree_size`` entries."""

    verified: VerifyReport
    tree_size: int
    root: bytes
    cosigned_by: tuple[str, ...]  # witnesses whose cosignature was verified
    cosigned_at: tuple[int, ...]  # their timestamps (POSIX seconds)
    incremental: bool = False  # only the entries after the witnessed checkpoint were read (verify_from_witnessed)

    @property
    def witness_checked(self) -> bool:
        return bool(self.cosigned_by)

    def to_dict(self) -> dict[str, Any]:
        return {**self.verified.to_dict(), "witnessed_size": self.tree_size, "witnessed_root": self.root.hex(),
                "extends_witnessed": True, "cosigned_by": list(self.cosigned_by),
                "cosigned_at": list(self.cosigned_at), "witness_checked": self.witness_checked,
                "incremental": self.incremental}


def _own_checkpoint(note: str | bytes, public_key: Ed25519PublicKey) -> tuple[Note, CheckpointBody]:
    """Parse ``note`` as this log's checkpoint and check the device's own signature on it."""
    parsed = parse_note(note)
    body = parse_checkpoint(parsed.text)
    origin = origin_for(key_id(public_key))
    if body.origin != origin:
        raise InvalidArgumentError(f"the checkpoint is for log {body.origin!r}, not this log ({origin})")
    verify_note(parsed, [log_vkey(public_key)])
    return parsed, body


def verify_against(log: AuditLog, note: str | bytes, *, public_key: Ed25519PublicKey,
                   witness_keys: Sequence[Vkey] = (), require_checkpoint: bool = False) -> AgainstReport:
    """Verify the log (with ``public_key``), check ``note`` is this log's checkpoint signed by the device and, when
    ``witness_keys`` are given, cosigned by one of them, then prove with a consistency proof that the log extends it.

    A log cut back below the note, or rewritten under it, raises :class:`AuditNotExtendedError`.
    """
    parsed, body = _own_checkpoint(note, public_key)
    cosigned: list[tuple[str, int]] = []
    if witness_keys:
        checked = verify_note(parsed, [k for k in witness_keys if k.sig_type == SIG_COSIGNATURE_V1])
        cosigned = [(v.vkey.name, v.timestamp or 0) for v in checked]
    report = log.verify(public_key=public_key, require_checkpoint=require_checkpoint)
    size = body.tree_size
    if report.entries < size:
        raise AuditNotExtendedError(
            f"the log has {report.entries} entries but the witnessed checkpoint covers {size}: entries from "
            f"{report.entries} on were removed (the log was cut back)", reason="cut-back", seq=report.entries,
            tree_size=size)
    proof = log.consistency_proof(size, report.entries)
    if proof.old_root != body.root or not _merkle.verify_consistency(size, report.entries, body.root, report.root,
                                                                     proof.path):
        raise AuditNotExtendedError(
            f"the log's first {size} entries are not the ones the witnessed checkpoint covers: the log was rewritten "
            "after the witness saw it", reason="rewritten", tree_size=size)
    if report.latest_checkpoint is None or report.latest_checkpoint < size:
        raise AuditNotExtendedError(
            f"the witnessed checkpoint at tree size {size} is newer than the log's newest checkpoint "
            f"({report.latest_checkpoint}): checkpoints were removed", reason="checkpoint-removed", tree_size=size)
    return AgainstReport(report, size, body.root, tuple(n for n, _ in cosigned), tuple(t for _, t in cosigned))


def verify_from_witnessed(log: AuditLog, note: str | bytes, *, public_key: Ed25519PublicKey,
                          witness_keys: Sequence[Vkey], require_checkpoint: bool = False) -> AgainstReport:
    """Verify only what the log gained since a witness cosigned ``note``: cost proportional to the new entries.

    The starting point is trusted only because someone off the device vouches for it: ``note`` must be this log's
    checkpoint, signed by the device key and cosigned by at least one of ``witness_keys`` (a marker the device keeps
    by itself could be rewritten with the log). The compact range stored at its size must fold to its root; then
    the new entries, the chain and every later checkpoint are checked (:meth:`AuditLog.verify_from`). Entries
    below the witnessed size are not re-read: the witnessed root commits to them, and a full ``verify`` still
    checks them. Raises :class:`NoteSignatureError` for an unwitnessed or forged note,
    :class:`AuditCompactRangeError` when the stored range does not match the signed root.
    """
    cosigners = [k for k in witness_keys if k.sig_type == SIG_COSIGNATURE_V1]
    if not cosigners:
        raise InvalidArgumentError("incremental verification starts only from a witness-cosigned checkpoint: give "
                                   "the witness's cosignature key (--witness-key)")
    parsed, body = _own_checkpoint(note, public_key)
    checked = verify_note(parsed, cosigners)
    report = log.verify_from(body.tree_size, body.root, public_key=public_key, require_checkpoint=require_checkpoint)
    if report.entries < body.tree_size:  # not reached: scan_from needs entry tree_size - 1; kept as the rule
        raise AuditNotExtendedError(f"the log has {report.entries} entries but the witnessed checkpoint covers "
                                    f"{body.tree_size}", reason="cut-back", seq=report.entries,
                                    tree_size=body.tree_size)
    return AgainstReport(report, body.tree_size, body.root, tuple(v.vkey.name for v in checked),
                         tuple(v.timestamp or 0 for v in checked), incremental=True)
