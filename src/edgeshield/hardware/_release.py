"""Attestation-gated key release: the owner-side service that hands a bundle's data key to an attested device.

Bundles for an attested fleet name the *release service* as their recipient. The service holds that recipient's
X25519 key, so it can unwrap a bundle's secret (data key || the service's payload MAC key, see docs/bundle-format.md
section 6), and re-wraps that secret with RSA-OAEP-SHA256 to a device's TPM-resident release key — only after a fresh
quote from an enrolled TPM shows the expected PCR values, and the same attestation key certified the release key
(TPM2_Certify), so the secret can be decrypted only inside that TPM. The device then opens the bundle as the
service's recipient stanza: the signed data-key commitment and payload MAC still pin the model.

Refused, audited and emitted as ``attestation.failed``: an unknown, revoked (``revoke_ek``) or CRL-revoked TPM, an
unknown attestation key, a replayed or expired nonce, a changed PCR, a restored TPM state, a revoked device, a bundle
below the device's version floor (a TPM NV counter certified by the AK with the same nonce), and a request outside
the bundle's licence. A licence travels with the released key and is bound into its RSA-OAEP label, so the device's
TPM refuses to decrypt a key whose licence was edited; the device enforces its time limit with the wall clock and
the TPM clock (:class:`LicenceGuard`). Everything runs over mutual TLS 1.3 with EdgeShield's PKI
(``edgeshield.transport``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import os
import secrets
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield._sqlite import PrivateStore
from edgeshield.errors import (
    ConnectionFailedError,
    EdgeShieldError,
    InputError,
    IntegrityError,
    InvalidArgumentError,
    KeyCommitmentError,
    KeyMaterialError,
    NotARecipientError,
    ServerRefusedError,
)
from edgeshield.hardware import _attest as at
from edgeshield.keys import DevicePrivateKey, OwnerPublicKey, key_id

NONCE_TTL_S = 60.0
CHALLENGE_TTL_S = 120.0
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT_S = 10.0


# --- errors ------------------------------------------------------------------------------------------------------
class ReplayedNonceError(at.AttestationError):
    """The nonce was never issued to this device, was used already, or expired."""

    reason = "nonce-replayed"


class DeviceRevokedError(at.AttestationError):
    """The device's enrolment was revoked by the service's operator."""

    reason = "revoked"


class EkRevokedError(at.UnknownTpmError):
    """The TPM's endorsement key was revoked by the operator (``revoke_ek``) or its certificate by its CA's CRL."""

    reason = "ek-revoked"


class BelowFloorError(at.AttestationError):
    """The bundle's model version is below the version floor the device's TPM counter holds."""

    reason = "below-floor"


class FloorRequiredError(at.AttestationError):
    """The request carries no floor evidence, and the service (or this device's history) requires it."""

    reason = "floor-required"


class FloorIndexError(at.AttestationError):
    """The floor evidence names another NV index than the one pinned for this device at its first floor."""

    reason = "floor-index"


class FloorRollbackError(at.TpmRollbackError):
    """The device's certified floor is below the highest one seen from it: the counter cannot go down."""

    reason = "floor-rollback"


class LicenceError(KeyMaterialError):
    """The bundle's licence does not allow this release (expired, device limit reached, wrong device group)."""

    reason = "licence"


class LicenceExpiredError(LicenceError):
    """The licence's time is up: by the service's clock, the device's wall clock or the device's TPM clock."""

    reason = "licence-expired"


class ReleasedKeyRefusedError(at.AttestationError):
    """The TPM refuses to decrypt a released key: its file was edited (licence, bundle id, nonce) or another TPM's."""

    reason = "released-key"


class NotAReleasedKeyFileError(InputError):
    """The file is not an EdgeShield released-key file, or it is damaged."""


class UnknownBundleError(InputError):
    """The service holds no bundle with that id."""

    reason = "unknown-bundle"


class NotAReleaseStoreError(InputError):
    """The file is not an EdgeShield key-release store."""


# --- licences ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Licence:
    """Conditions on releasing one bundle's key: a time limit, a device count, allowed device groups."""

    bundle_id: str
    not_after: datetime | None = None
    max_devices: int | None = None
    groups: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, obj: object) -> Licence:
        if not isinstance(obj, dict) or not isinstance(obj.get("bundle_id"), str):
            raise InvalidArgumentError("a licence is an object with a bundle_id")
        unknown = set(obj) - {"bundle_id", "not_after", "max_devices", "groups"}
        if unknown:
            raise InvalidArgumentError(f"unknown licence field {sorted(unknown)[0]!r}")
        not_after = None
        if obj.get("not_after") is not None:
            try:
                not_after = datetime.fromisoformat(str(obj["not_after"]))
            except ValueError:
                raise InvalidArgumentError("licence not_after must be an ISO 8601 time") from None
            if not_after.tzinfo is None:
                raise InvalidArgumentError("licence not_after needs a time zone (e.g. 2027-01-01T00:00:00+00:00)")
        max_devices = obj.get("max_devices")
        if max_devices is not None and (isinstance(max_devices, bool) or not isinstance(max_devices, int)
                                        or max_devices < 1):
            raise InvalidArgumentError("licence max_devices must be a whole number >= 1")
        groups = obj.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise InvalidArgumentError("licence groups must be a list of group names")
        return cls(obj["bundle_id"], not_after, max_devices, frozenset(groups))

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "not_after": self.not_after.isoformat() if self.not_after else None,
                "max_devices": self.max_devices, "groups": sorted(self.groups)}


def load_licences(path: str | os.PathLike[str]) -> dict[str, Licence]:
    obj = at._load_json(path, "licence file")
    items = obj.get("licences") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise InvalidArgumentError('a licence file is {"licences": [{"bundle_id": ..., ...}, ...]}')
    out = {}
    for item in items:
        lic = Licence.from_dict(item)
        out[lic.bundle_id] = lic
    return out


def licence_digest(doc: Mapping[str, Any] | None) -> bytes:
    """SHA-256 of a released licence's canonical JSON (sorted keys, no spaces): what the OAEP label binds.

    ``b""`` without a licence, so a key released without one keeps the label it always had.
    """
    if doc is None:
        return b""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).digest()


def _release_label(bundle_id: str, nonce: bytes, doc: Mapping[str, Any] | None) -> bytes:
    return at.release_label(bundle_id, nonce, extra=licence_digest(doc))


_ANCHOR = ("tpm_clock_at_release", "tpm_clock_not_after")


class LicenceGuard:
    """Enforces a released key's licence on the device: the wall clock, and the TPM clock where the licence has one.

    The service anchors a time-limited licence to the TPM clock of the quote it released to
    (``tpm_clock_at_release``) and adds the time left (``tpm_clock_not_after``). The TPM clock never goes backwards
    while the TPM keeps its state and cannot be set back by software (TPM2_ClockSet only advances it), so setting
    the device's wall clock back does not extend the licence; a clock below the anchor means the TPM was cleared.
    """

    def __init__(self, licence: Mapping[str, Any] | None, tpm: at.DeviceTpm | None) -> None:
        self.licence = dict(licence) if licence is not None else None
        self.tpm = tpm
        self._not_after: datetime | None = None
        self._anchor: tuple[int, int] | None = None
        self._last: dict[str, Any] | None = None
        if self.licence is None:
            return
        if not isinstance(self.licence.get("bundle_id"), str):
            raise LicenceError("the released licence has no bundle_id")
        raw = self.licence.get("not_after")
        if raw is not None:
            try:
                self._not_after = datetime.fromisoformat(raw) if isinstance(raw, str) else None
            except ValueError:
                self._not_after = None
            if self._not_after is None or self._not_after.tzinfo is None:
                raise LicenceError("the released licence's not_after is not an ISO 8601 time with a zone")
        values = [self.licence.get(k) for k in _ANCHOR]
        if values != [None, None]:
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in values):
                raise LicenceError("the released licence's TPM clock anchor is not two clock values in ms")
            if values[1] < values[0]:  # type: ignore[operator]
                raise LicenceError("the released licence's TPM clock anchor ends before it starts")
            self._anchor = (values[0], values[1])  # type: ignore[assignment]

    @property
    def not_after(self) -> datetime | None:
        """The licence's wall-clock end, if it has one."""
        return self._not_after

    @property
    def bundle_id(self) -> str | None:
        return self.licence["bundle_id"] if self.licence is not None else None

    def check(self) -> None:
        """Raise :class:`LicenceExpiredError` once the licence's time is up by the wall clock or the TPM clock."""
        if self.licence is None:
            return
        now = datetime.now(UTC)
        tpm_clock = None
        try:
            if self._not_after is not None and now > self._not_after:
                raise LicenceExpiredError(f"the licence for bundle {self.bundle_id} expired at "
                                          f"{self._not_after.isoformat()} (device wall clock)")
            if self._anchor is not None and self.tpm is not None:
                tpm_clock = self.tpm.read_clock().clock
                start, end = self._anchor
                if tpm_clock < start:
                    raise LicenceExpiredError(
                        f"the TPM clock ({tpm_clock} ms) is below its value when the key for bundle "
                        f"{self.bundle_id} was released ({start} ms): the TPM was cleared or lost its clock; "
                        "fetch the key again")
                if tpm_clock >= end:
                    raise LicenceExpiredError(f"the licence for bundle {self.bundle_id} expired by the TPM clock "
                                              f"({tpm_clock} ms >= {end} ms)")
        except LicenceExpiredError as exc:
            self._last = {"at": now.isoformat(), "tpm_clock": tpm_clock, "expired": True, "reason": str(exc)}
            raise
        self._last = {"at": now.isoformat(), "tpm_clock": tpm_clock, "expired": False, "reason": None}

    def describe(self) -> dict[str, Any]:
        """What is enforced and how the last check went (no secrets): for status pages and audit entries."""
        if self.licence is None:
            return {"licence": None, "enforced_by": []}
        by = (["wall-clock"] if self._not_after is not None else []) + \
             (["tpm-clock"] if self._anchor is not None and self.tpm is not None else [])
        out: dict[str, Any] = {"licence": self.licence, "bundle_id": self.bundle_id,
                               "not_after": self._not_after.isoformat() if self._not_after else None,
                               "enforced_by": by, "last_check": self._last}
        if self._anchor is not None:
            out["tpm_clock_at_release"], out["tpm_clock_not_after"] = self._anchor
        return out


# --- enrolment list -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolment:
    """An enrolment-list entry: the device (its certificate's name), its group, optionally its EK digest."""

    device: str
    group: str | None = None
    ek_sha256: str | None = None


def load_enrolment_list(path: str | os.PathLike[str]) -> dict[str, Enrolment]:
    obj = at._load_json(path, "enrolment list")
    items = obj.get("devices") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise InvalidArgumentError('an enrolment list is {"devices": [{"device": NAME, "group": G, "ek_sha256": H}]}')
    out = {}
    for e in items:
        if not isinstance(e, dict) or not isinstance(e.get("device"), str):
            raise InvalidArgumentError("each enrolment-list entry needs a device name")
        group, ek = e.get("group"), e.get("ek_sha256")
        if (group is not None and not isinstance(group, str)) or (ek is not None and not isinstance(ek, str)):
            raise InvalidArgumentError("enrolment-list group and ek_sha256 are strings")
        out[e["device"]] = Enrolment(e["device"], group, ek.lower() if ek else None)
    return out


# --- the store -----------------------------------------------------------------------------------------------------
class ReleaseStore(PrivateStore):
    """Enrolled devices (AK, last TPM clock seen), pending credential challenges, issued nonces, releases."""

    _what = "key-release store"
    _application_id = 0x45534B52  # "ESKR"
    _schema = (
        "PRAGMA application_id = 1163086674",
        ("CREATE TABLE devices (device TEXT PRIMARY KEY, ek_sha256 TEXT NOT NULL, ak_public BLOB NOT NULL, "
        "grp TEXT, enrolled_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, clock INTEGER, "
        "reset_count INTEGER, restart_count INTEGER)"),
        ("CREATE TABLE challenges (id TEXT PRIMARY KEY, device TEXT NOT NULL, ek_sha256 TEXT NOT NULL, "
        "ak_public BLOB NOT NULL, grp TEXT, secret BLOB NOT NULL, expires REAL NOT NULL)"),
        "CREATE TABLE nonces (nonce BLOB PRIMARY KEY, device TEXT NOT NULL, expires REAL NOT NULL)",
        ("CREATE TABLE releases (bundle_id TEXT NOT NULL, device TEXT NOT NULL, first_at REAL NOT NULL, "
        "count INTEGER NOT NULL, PRIMARY KEY (bundle_id, device))"),
    )
    _tables = frozenset({"devices", "challenges", "nonces", "releases"})
    _not_a_store = NotAReleaseStoreError
    # added later: created on open, so a store made by an earlier version gains them
    _later = (
        ("CREATE TABLE IF NOT EXISTS floors (device TEXT PRIMARY KEY, nv_name BLOB NOT NULL, "
         "floor INTEGER NOT NULL, seen_at REAL NOT NULL)"),
        "CREATE TABLE IF NOT EXISTS revoked_eks (ek_sha256 TEXT PRIMARY KEY, revoked_at REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS ek_certs (ek_sha256 TEXT PRIMARY KEY, cert BLOB NOT NULL)",
    )

    def _opened(self, conn: Any, create: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in self._later:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def add_challenge(self, device: str, ek_sha256: str, ak_public: bytes, group: str | None,
                      secret: bytes) -> str:
        cid = secrets.token_hex(16)
        now = time.time()
        with self._tx() as c:
            c.execute("DELETE FROM challenges WHERE expires < ? OR device = ?", (now, device))
            c.execute("INSERT INTO challenges VALUES (?,?,?,?,?,?,?)",
                      (cid, device, ek_sha256, ak_public, group, secret, now + CHALLENGE_TTL_S))
        return cid

    def complete_challenge(self, device: str, cid: str, secret: bytes) -> tuple[str, bytes]:
        """Enrol the device if ``secret`` is the challenge's; the challenge is used up either way."""
        with self._tx() as c:
            row = c.execute("SELECT ek_sha256, ak_public, grp, secret, expires FROM challenges WHERE id = ? AND "
                            "device = ?", (cid, device)).fetchone()
            c.execute("DELETE FROM challenges WHERE id = ?", (cid,))
            if row is None or row[4] < time.time():
                raise ReplayedNonceError("no pending enrolment challenge with that id for this device (expired?)")
            if not hmac.compare_digest(row[3], secret):
                raise at.CredentialActivationError("the activated credential is wrong: the AK is not in that TPM")
            if c.execute("SELECT 1 FROM revoked_eks WHERE ek_sha256 = ?", (row[0],)).fetchone():
                raise EkRevokedError("this TPM's endorsement key is revoked")
            c.execute("INSERT OR REPLACE INTO devices (device, ek_sha256, ak_public, grp, enrolled_at) "
                      "VALUES (?,?,?,?,?)", (device, row[0], row[1], row[2], time.time()))
        return row[0], row[1]

    def device(self, device: str) -> tuple[bytes, str | None, at.ClockInfo | None, bool, str] | None:
        rows = self._read("SELECT ak_public, grp, clock, reset_count, restart_count, revoked, ek_sha256 FROM devices "
                          "WHERE device = ?", (device,))
        if not rows:
            return None
        ak, grp, clock, reset, restart, revoked, ek = rows[0]
        last = at.ClockInfo(clock, reset, restart, True) if clock is not None else None
        return ak, grp, last, bool(revoked), ek

    def revoke(self, device: str) -> bool:
        with self._tx() as c:
            return c.execute("UPDATE devices SET revoked = 1 WHERE device = ?", (device,)).rowcount == 1

    def revoke_ek(self, ek_sha256: str) -> bool:
        """Revoke a TPM by its EK digest (SHA-256 of its SubjectPublicKeyInfo, hex): no enrolment, no release again.

        Returns False if it was revoked already.
        """
        ek = ek_sha256.strip().lower()
        if len(ek) != 64 or any(ch not in "0123456789abcdef" for ch in ek):
            raise InvalidArgumentError("an EK digest is 64 hex digits (SHA-256 of its SubjectPublicKeyInfo)")
        with self._tx() as c:
            return c.execute("INSERT OR IGNORE INTO revoked_eks VALUES (?,?)", (ek, time.time())).rowcount == 1

    def ek_revoked(self, ek_sha256: str) -> bool:
        return bool(self._read("SELECT 1 FROM revoked_eks WHERE ek_sha256 = ?", (ek_sha256.lower(),)))

    def revoked_eks(self) -> list[str]:
        return [r[0] for r in self._read("SELECT ek_sha256 FROM revoked_eks ORDER BY revoked_at")]

    def record_ek_cert(self, ek_sha256: str, cert: bytes) -> None:
        """Keep the EK certificate a TPM enrolled with, so CRLs loaded later are checked at release too."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO ek_certs VALUES (?,?)", (ek_sha256, cert))

    def ek_cert(self, ek_sha256: str) -> bytes | None:
        rows = self._read("SELECT cert FROM ek_certs WHERE ek_sha256 = ?", (ek_sha256,))
        return bytes(rows[0][0]) if rows else None

    def device_floor(self, device: str) -> tuple[bytes, int] | None:
        """The NV index name pinned for ``device`` and the highest floor seen from it."""
        rows = self._read("SELECT nv_name, floor FROM floors WHERE device = ?", (device,))
        return (bytes(rows[0][0]), int(rows[0][1])) if rows else None

    def record_floor(self, device: str, nv_name: bytes, floor: int) -> int:
        """Pin the device's NV index at its first floor; refuse another index or a lower floor; keep the highest."""
        with self._tx() as c:
            row = c.execute("SELECT nv_name, floor FROM floors WHERE device = ?", (device,)).fetchone()
            if row is not None:
                if not hmac.compare_digest(bytes(row[0]), nv_name):
                    raise FloorIndexError(f"device {device} certified another NV index than its pinned floor counter")
                if floor < row[1]:
                    raise FloorRollbackError(f"device {device}'s floor went down from {row[1]} to {floor}: "
                                             "a TPM counter cannot; another TPM or a restored state")
            c.execute("INSERT INTO floors VALUES (?,?,?,?) ON CONFLICT (device) DO UPDATE SET floor = excluded.floor, "
                      "seen_at = excluded.seen_at", (device, nv_name, floor, time.time()))
        return floor

    def issue_nonce(self, device: str) -> bytes:
        nonce = secrets.token_bytes(32)
        now = time.time()
        with self._tx() as c:
            c.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            c.execute("INSERT INTO nonces VALUES (?,?,?)", (nonce, device, now + NONCE_TTL_S))
        return nonce

    def use_nonce(self, device: str, nonce: bytes) -> None:
        """Consume a nonce issued to ``device``: each is good for one request, within its lifetime."""
        with self._tx() as c:
            n = c.execute("DELETE FROM nonces WHERE nonce = ? AND device = ? AND expires >= ?",
                          (nonce, device, time.time())).rowcount
        if n != 1:
            raise ReplayedNonceError("the nonce was not issued to this device, was used already, or expired")

    def record_quote(self, device: str, last: at.ClockInfo | None, clock: at.ClockInfo) -> None:
        """Store the TPM clock seen, refusing a concurrent request that stored a later one meanwhile."""
        with self._tx() as c:
            row = c.execute("SELECT clock, reset_count, restart_count FROM devices WHERE device = ?",
                            (device,)).fetchone()
            if row is not None and row[0] is not None:
                at.check_clock(clock, at.ClockInfo(row[0], row[1], row[2], True))
            c.execute("UPDATE devices SET clock = ?, reset_count = ?, restart_count = ? WHERE device = ?",
                      (clock.clock, clock.reset_count, clock.restart_count, device))

    def admit_release(self, bundle_id: str, device: str, licence: Licence | None) -> None:
        """Count the release against the licence's device limit, atomically; a device already counted is free."""
        with self._tx() as c:
            known = c.execute("SELECT 1 FROM releases WHERE bundle_id = ? AND device = ?",
                              (bundle_id, device)).fetchone()
            if licence is not None and licence.max_devices is not None and known is None:
                (n,) = c.execute("SELECT COUNT(*) FROM releases WHERE bundle_id = ?", (bundle_id,)).fetchone()
                if n >= licence.max_devices:
                    raise LicenceError(f"the licence allows {licence.max_devices} device(s) and all are taken")
            c.execute("INSERT INTO releases VALUES (?,?,?,1) ON CONFLICT (bundle_id, device) DO UPDATE SET "
                      "count = count + 1", (bundle_id, device, time.time()))


# --- the service ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleasedKey:
    """What the device gets back, decrypted inside its TPM: the bundle's secret for the service's stanza."""

    bundle_id: str
    recipient_key_id: str
    secret: bytes = field(repr=False)
    licence: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class FloorEvidence:
    """TPM2_NV_Certify of the device's floor counter by its AK over the release nonce (see ``at.verify_nv_counter``)."""

    nv_public: bytes
    attest: bytes
    signature: bytes

    def to_dict(self) -> dict[str, str]:
        return {"nv_public": _b64(self.nv_public), "attest": _b64(self.attest), "signature": _b64(self.signature)}

    @classmethod
    def from_dict(cls, obj: object) -> FloorEvidence:
        if not isinstance(obj, dict):
            raise at.QuoteFormatError('floor evidence is {"nv_public": B64, "attest": B64, "signature": B64}')
        return cls(_unb64(obj, "nv_public"), _unb64(obj, "attest"), _unb64(obj, "signature"))


def load_crls(paths: Sequence[str | os.PathLike[str]]) -> tuple[x509.CertificateRevocationList, ...]:
    """Load EK CA CRLs (PEM or DER)."""
    out = []
    for p in paths:
        data = check_readable_file(p, what="EK CA CRL").read_bytes()
        try:
            out.append(x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
        except ValueError as exc:
            raise InvalidArgumentError(f"{p} is not an X.509 CRL: {exc}") from None
    return tuple(out)


@dataclass
class ReleaseService:
    """The transport-independent core: enrolment, nonces and attested release for the bundles it holds."""

    store: ReleaseStore
    recipient_key: DevicePrivateKey
    owner_key: OwnerPublicKey
    bundles: Mapping[str, Path]
    trust: at.EkTrust
    policy: at.PcrPolicy
    enrolment: Mapping[str, Enrolment] = field(default_factory=dict)
    licences: Mapping[str, Licence] = field(default_factory=dict)
    audit: Any = None  # an edgeshield.audit.AuditLog
    events: Any = None  # an edgeshield.monitor.EventStream
    require_listed: bool = False  # only devices in the enrolment list may enrol
    require_floor: bool = False  # every release needs floor evidence (a device that sent one once always does)
    ek_crls: Sequence[x509.CertificateRevocationList] = ()  # CRLs of the enrolled EK CAs (checked fail-closed)

    def __post_init__(self) -> None:
        for crl in self.ek_crls:
            if not any(ca.subject == crl.issuer and _crl_signed_by(crl, ca) for ca in self.trust.ca_certs):
                raise InvalidArgumentError(f"an EK CRL ({crl.issuer.rfc4514_string()}) is not signed by an enrolled "
                                           "EK CA")

    @classmethod
    def load_bundles(cls, paths: Sequence[str | os.PathLike[str]], owner_key: OwnerPublicKey) -> dict[str, Path]:
        """Verify each bundle with the owner key and index it by bundle id."""
        from edgeshield import bundles

        return {bundles.verify(p, owner_key).bundle_id: Path(p) for p in paths}

    # audit + events
    def _emit(self, kind: str, device: str, data: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(kind, device, data)
        if self.events is not None:
            from edgeshield.monitor import SecurityEvent

            self.events.publish(SecurityEvent(kind, device, data, source="keyrelease"))

    def refuse(self, device: str, exc: EdgeShieldError, **data: Any) -> None:
        reason = getattr(exc, "reason", type(exc).__name__)
        self._emit("attestation.failed", device, {"device": device, "reason": reason, "detail": str(exc), **data})

    def _guard(self, device: str, what: str, fn: Any, **data: Any) -> Any:
        try:
            return fn()
        except EdgeShieldError as exc:
            self.refuse(device, exc, step=what, **data)
            raise

    # EK revocation: the operator's list, and the EK CAs' CRLs
    def _check_ek_not_revoked(self, ek_sha256: str, ek_cert: bytes | None) -> None:
        if self.store.ek_revoked(ek_sha256):
            raise EkRevokedError(f"the TPM's endorsement key {ek_sha256[:16]}… is revoked")
        if ek_cert is None or not self.ek_crls:
            return
        try:
            cert = x509.load_der_x509_certificate(ek_cert)
        except ValueError:
            raise at.UnknownTpmError("the EK certificate cannot be parsed") from None
        now = datetime.now(UTC)
        for crl in self.ek_crls:
            if crl.issuer != cert.issuer:
                continue
            if crl.next_update_utc is not None and now > crl.next_update_utc:
                raise EkRevokedError(f"the CRL of EK CA {crl.issuer.rfc4514_string()} is out of date (next update "
                                     f"{crl.next_update_utc.isoformat()}): refresh it")
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise EkRevokedError(f"the EK certificate (serial {cert.serial_number:x}) is revoked by its CA")

    # enrolment (Keylime's registrar: EK check, then MakeCredential / ActivateCredential)
    def begin_enrolment(self, device: str, ek_public: bytes, ek_cert: bytes | None,
                        ak_public: bytes) -> tuple[str, bytes, bytes]:
        def run() -> tuple[str, bytes, bytes]:
            listed = self.enrolment.get(device)
            if self.require_listed and listed is None:
                raise at.UnknownTpmError(f"device {device} is not in the enrolment list")
            ek, ak = at.parse_public(ek_public), at.parse_public(ak_public)
            at.check_attestation_key(ak)
            trust = self.trust
            if listed is not None and listed.ek_sha256:
                if not hmac.compare_digest(listed.ek_sha256, ek.spki_sha256()):
                    raise at.UnknownTpmError(f"device {device} is listed with another TPM's endorsement key")
                trust = at.EkTrust(trust.ca_certs, trust.ek_digests | {listed.ek_sha256})
            how = at.check_endorsement_key(ek, ek_cert, trust)
            self._check_ek_not_revoked(ek.spki_sha256(), ek_cert if how == "certificate" else None)
            secret = secrets.token_bytes(32)
            blob, enc = at.make_credential(ek, ak, secret)
            if how == "certificate" and ek_cert is not None:
                self.store.record_ek_cert(ek.spki_sha256(), ek_cert)
            cid = self.store.add_challenge(device, ek.spki_sha256(), ak_public,
                                           listed.group if listed else None, secret)
            return cid, blob, enc

        return self._guard(device, "enrol", run)  # type: ignore[no-any-return]

    def finish_enrolment(self, device: str, challenge_id: str, secret: bytes) -> None:
        ek, _ = self._guard(device, "enrol", lambda: self.store.complete_challenge(device, challenge_id, secret))
        self._emit("attestation.enrolled", device, {"device": device, "ek_sha256": ek})

    def nonce(self, device: str) -> bytes:
        return self.store.issue_nonce(device)

    # release
    def release(self, device: str, bundle_id: str, nonce: bytes, quote: at.Quote, release_public: bytes,
                certify_attest: bytes, certify_signature: bytes, *, floor: FloorEvidence | None = None
                ) -> tuple[str, bytes, dict[str, Any] | None]:
        """Verify everything, then return (recipient key id, RSA-OAEP ciphertext of the secret, released licence).

        The released licence is the bundle's licence as sent to the device; with a ``not_after`` it carries the TPM
        clock anchor. Its digest joins the OAEP label, so the device's TPM decrypts only with the licence unchanged.
        """

        def run() -> tuple[str, bytes, dict[str, Any] | None, int | None]:
            self.store.use_nonce(device, nonce)  # first: a replay is refused before any work
            rec = self.store.device(device)
            if rec is None:
                raise at.UnknownAttestationKeyError(f"device {device} has no enrolled attestation key")
            ak_raw, group, last, revoked, ek = rec
            if revoked:
                raise DeviceRevokedError(f"device {device} is revoked")
            self._check_ek_not_revoked(ek, self.store.ek_cert(ek))
            ak = at.parse_public(ak_raw)
            verified = at.verify_quote(quote, ak, nonce, self.policy, last)
            key = at.parse_public(release_public)
            at.check_release_key(key)
            at.verify_certification(certify_attest, certify_signature, ak, key, nonce)
            floor_value: int | None = None
            if floor is not None:
                floor_value = at.verify_nv_counter(floor.nv_public, floor.attest, floor.signature, ak, nonce,
                                                   last=last)
            elif self.require_floor:
                raise FloorRequiredError("this service releases keys only with floor evidence (TPM NV counter)")
            elif self.store.device_floor(device) is not None:
                raise FloorRequiredError(f"device {device} sent floor evidence before: it must send it every time")
            self.store.record_quote(device, last, verified.clock)
            if floor is not None and floor_value is not None:
                self.store.record_floor(device, at.nv_name(floor.nv_public), floor_value)
            path = self.bundles.get(bundle_id)
            if path is None:
                raise UnknownBundleError(f"this service holds no bundle {bundle_id}")
            manifest, rid, secret_ = self._unwrap(path)
            if floor_value is not None and manifest.model_version < floor_value:
                raise BelowFloorError(f"bundle {bundle_id} is model version {manifest.model_version}, below the "
                                      f"device's floor {floor_value}")
            licence = self.licences.get(bundle_id)
            doc = None
            if licence is not None:
                now = datetime.now(UTC)
                if licence.not_after is not None and now > licence.not_after:
                    raise LicenceExpiredError(f"the licence for bundle {bundle_id} expired at {licence.not_after}")
                if licence.groups and group not in licence.groups:
                    raise LicenceError(f"device {device} (group {group}) is not in the licence's device groups")
                doc = licence.to_dict()
                if licence.not_after is not None:
                    left_ms = int((licence.not_after - now).total_seconds() * 1000)
                    doc["tpm_clock_at_release"] = verified.clock.clock
                    doc["tpm_clock_not_after"] = verified.clock.clock + max(0, left_ms)
            self.store.admit_release(bundle_id, device, licence)
            assert isinstance(key.key, rsa.RSAPublicKey)  # noqa: S101 - check_release_key made sure
            wrapped = key.key.encrypt(secret_, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                            _release_label(bundle_id, nonce, doc)))
            return rid, wrapped, doc, floor_value

        rid, wrapped, doc, floor_value = self._guard(device, "release", run, bundle_id=bundle_id)
        self._emit("keyrelease.released", device, {"device": device, "bundle_id": bundle_id, "licence": doc,
                                                    "floor": floor_value})
        return rid, wrapped, doc

    def _unwrap(self, path: Path) -> tuple[Any, str, bytes]:
        from edgeshield import bundles
        from edgeshield.bundles import _format, _wrap

        manifest = bundles.verify(path, self.owner_key)
        rid = key_id(self.recipient_key.public_key())
        stanza = next((r for r in manifest.recipients if r.key_id == rid), None)
        if stanza is None:
            raise NotARecipientError(f"the release service's key {rid} is not a recipient of bundle "
                                     f"{manifest.bundle_id}")
        bid = bytes.fromhex(manifest.bundle_id)
        data_key, mac_key = _wrap.unwrap_key(stanza.wrapped_key, self.recipient_key, bid)
        if not hmac.compare_digest(_format.data_key_commitment(bid, data_key), manifest.data_key_commitment):
            raise KeyCommitmentError("the data key wrapped for the service is not the one the manifest commits to")
        return manifest, rid, data_key + mac_key


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


# --- HTTP over mutual TLS ------------------------------------------------------------------------------------------
_STATUS = {IntegrityError: 403, KeyMaterialError: 403, InputError: 400}


def _status_for(exc: EdgeShieldError) -> int:
    # Anything else a request can raise is the request's fault too (a TPM structure the service cannot use, ...):
    # 400, never 500. The service's own failures never reach here as EdgeShieldError but as bugs (_Handler.do_POST).
    return next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(obj: Mapping[str, Any], key: str) -> bytes:
    return at._unb64(obj.get(key), key)


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST-only JSON endpoints; every answer, refusals and malformed HTTP included, is a JSON object."""

    server: ReleaseServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    error_content_type = "application/json"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name; no secrets, no stderr
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (bad request line, oversized header, unknown method): JSON, and an unsupported
        # method is the client's error (405), not the server's (http.server says 501)
        code = 405 if code == 501 else code
        self.close_connection = True
        self.request_version = self.protocol_version  # an unparsable request line: still a status line (no HTTP/0.9)
        with contextlib.suppress(OSError):
            self._reply(code, {"error": "bad-request" if code != 405 else "method-not-allowed",
                               "message": message or "malformed HTTP request"})

    def do_POST(self) -> None:
        from edgeshield.transport import peer_identity

        assert isinstance(self.connection, ssl.SSLSocket)  # noqa: S101
        service = self.server.service
        try:
            identity = peer_identity(self.connection)
        except EdgeShieldError as exc:
            service.refuse("anonymous", exc)
            self._reply(403, {"error": "revoked", "message": str(exc)})
            return
        device = identity.name
        try:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise InvalidArgumentError("Content-Length is not a number") from None
            if self.headers.get("Transfer-Encoding") is not None:
                raise InvalidArgumentError("send the body with a Content-Length, not a transfer encoding")
            if not 0 < length <= MAX_BODY:
                raise InvalidArgumentError("request body missing or too large")
            data = self.rfile.read(length)
            if len(data) != length:
                raise InvalidArgumentError("the request body is shorter than its Content-Length")
            try:
                body = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise InvalidArgumentError("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise InvalidArgumentError("the request body is a JSON object")
            answer = self._route(device, body)
        except EdgeShieldError as exc:
            self.close_connection = True
            self._reply(_status_for(exc), {"error": getattr(exc, "reason", type(exc).__name__), "message": str(exc)})
        except TimeoutError:
            self.close_connection = True
            self._reply(408, {"error": "timeout", "message": "the request body did not arrive in time"})
        except (ValueError, TypeError, RecursionError) as exc:  # a value no parser anticipated: still the request's
            self.close_connection = True
            self._reply(400, {"error": "bad-request", "message": f"malformed request ({type(exc).__name__})"})
        except Exception as exc:  # noqa: BLE001 - a bug here: answer it, never drop the connection silently
            self.close_connection = True
            with contextlib.suppress(Exception):  # the answer goes out even if auditing fails too
                service._emit("attestation.failed", device, {"device": device, "reason": "internal-error",
                                                             "step": self.path, "detail": type(exc).__name__})
            self._reply(500, {"error": "internal", "message": "the release service failed on this request"})
        else:
            self._reply(200, answer)

    def _route(self, device: str, body: dict[str, Any]) -> dict[str, Any]:
        service = self.server.service
        if self.path == "/v1/nonce":
            return {"nonce": _b64(service.nonce(device))}
        if self.path == "/v1/enrol/begin":
            cert = body.get("ek_certificate")
            cid, blob, enc = service.begin_enrolment(device, _unb64(body, "ek_public"),
                                                     _unb64(body, "ek_certificate") if cert else None,
                                                     _unb64(body, "ak_public"))
            return {"challenge_id": cid, "credential_blob": _b64(blob), "encrypted_secret": _b64(enc)}
        if self.path == "/v1/enrol/finish":
            service.finish_enrolment(device, str(body.get("challenge_id")), _unb64(body, "secret"))
            return {"enrolled": device}
        if self.path == "/v1/release":
            floor = body.get("floor")
            rid, wrapped, licence = service.release(
                device, str(body.get("bundle_id")), _unb64(body, "nonce"), at.Quote.from_dict(body.get("quote")),
                _unb64(body, "release_public"), _unb64(body, "certify_attest"), _unb64(body, "certify_signature"),
                floor=FloorEvidence.from_dict(floor) if floor is not None else None)
            return {"recipient_key_id": rid, "wrapped": _b64(wrapped), "licence": licence}
        raise InvalidArgumentError(f"no such endpoint {self.path}")

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class ReleaseServer(http.server.ThreadingHTTPServer):
    """The service on a TLS 1.3 socket that requires a client certificate from the PKI (CRL checked)."""

    daemon_threads = True
    handshake_timeout_s: ClassVar[float] = 5.0

    def __init__(self, service: ReleaseService, context: ssl.SSLContext, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.service = service
        self.context = context
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread and with a deadline, never in the accept loop.
        request.settimeout(self.handshake_timeout_s)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = "revoked" if "revoked" in str(exc).lower() else "tls-handshake"
            self.service._emit("attestation.failed", "anonymous",
                               {"device": "anonymous", "reason": reason, "detail": type(exc).__name__})
            return
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            super().finish_request(conn, client_address)
        except OSError:
            pass  # the peer went away mid-request (reset, timeout): nothing left to answer
        finally:
            conn.close()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="edgeshield-keyrelease", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# --- the device's client and its released-key file -------------------------------------------------------------------
RELEASED_KEY_FORMAT = "edgeshield.released-key"
_MAX_RELEASED_KEY_FILE = 64 * 1024


@dataclass(frozen=True)
class ReleasedKeyFile:
    """A released key as the device keeps it between runs: still wrapped to its TPM's release key, never in clear.

    Only that TPM can decrypt ``wrapped``, and only with the label made from the bundle id, the nonce and the
    licence below, so editing any of them (a later ``not_after``, another TPM clock anchor) makes it useless.
    """

    bundle_id: str
    recipient_key_id: str
    nonce: bytes
    wrapped: bytes
    licence: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": RELEASED_KEY_FORMAT, "version": 1, "bundle_id": self.bundle_id,
                "recipient_key_id": self.recipient_key_id, "nonce": _b64(self.nonce), "wrapped": _b64(self.wrapped),
                "licence": dict(self.licence) if self.licence is not None else None}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically, mode 0600 (replacing an earlier file)."""
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode(), mode=0o600, overwrite=True)

    @classmethod
    def from_dict(cls, obj: object, what: str = "released-key object") -> ReleasedKeyFile:
        if not isinstance(obj, dict) or obj.get("format") != RELEASED_KEY_FORMAT:
            raise NotAReleasedKeyFileError(f"the {what} is not an EdgeShield released key")
        if obj.get("version") != 1:
            raise NotAReleasedKeyFileError(f"the {what} has an unsupported version {obj.get('version')!r}")
        bid, rid, licence = obj.get("bundle_id"), obj.get("recipient_key_id"), obj.get("licence")
        if not (isinstance(bid, str) and len(bid) == 32 and all(c in "0123456789abcdef" for c in bid)):
            raise NotAReleasedKeyFileError(f"the {what}'s bundle_id is not a bundle id")
        if not (isinstance(rid, str) and 0 < len(rid) <= 256):
            raise NotAReleasedKeyFileError(f"the {what}'s recipient_key_id is not a key id")
        try:
            nonce, wrapped = _unb64(obj, "nonce"), _unb64(obj, "wrapped")
        except at.QuoteFormatError as exc:
            raise NotAReleasedKeyFileError(f"the {what} is damaged: {exc}") from None
        if not 1 <= len(nonce) <= 64 or not 0 < len(wrapped) <= 1024:
            raise NotAReleasedKeyFileError(f"the {what}'s nonce or wrapped key has an impossible length")
        if licence is not None:
            if not isinstance(licence, dict):
                raise NotAReleasedKeyFileError(f"the {what}'s licence is not an object")
            try:
                LicenceGuard(licence, None)
            except LicenceError as exc:
                raise NotAReleasedKeyFileError(f"the {what}'s licence is damaged: {exc}") from None
        return cls(bid, rid, nonce, wrapped, licence)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReleasedKeyFile:
        p = check_readable_file(path, what="released-key file")
        if p.stat().st_size > _MAX_RELEASED_KEY_FILE:
            raise NotAReleasedKeyFileError(f"{p} is too large for a released-key file")
        try:
            obj = json.loads(p.read_bytes())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotAReleasedKeyFileError(f"{p} is not a JSON released-key file") from None
        return cls.from_dict(obj, f"file {p}")


def unwrap_released(file: ReleasedKeyFile, tpm: at.DeviceTpm, keys: at.DeviceKeys) -> ReleasedKey:
    """Check the licence (wall clock and TPM clock), then decrypt the released secret inside the TPM."""
    LicenceGuard(file.licence, tpm).check()
    try:
        secret = tpm.decrypt_released(keys, file.wrapped, _release_label(file.bundle_id, file.nonce, file.licence))
    except at.CredentialActivationError:
        raise ReleasedKeyRefusedError("the TPM refuses to decrypt the released key: the file was edited (its "
                                      "licence, bundle id or nonce) or the key was released to another TPM") from None
    return ReleasedKey(file.bundle_id, file.recipient_key_id, secret, file.licence)


class ReleaseClient:
    """A device talking to the release service over mutual TLS (one short connection per call)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.host, self.port, self.context, self.timeout_s = host, port, context, timeout_s

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout_s)
        try:
            conn.request("POST", path, json.dumps(body or {"_": 0}), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read(MAX_BODY + 1)
        except (ssl.SSLError, OSError, http.client.HTTPException) as exc:
            raise ConnectionFailedError(f"cannot reach the release service at {self.host}:{self.port}: "
                                        f"{exc}") from None
        finally:
            conn.close()
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise ConnectionFailedError("the release service answered something that is not JSON") from None
        if not isinstance(obj, dict):
            raise ConnectionFailedError("the release service answered JSON that is not an object")
        if resp.status != 200:
            raise ServerRefusedError(resp.status, f"{obj.get('error')}: {obj.get('message')}")
        return obj

    def enrol(self, tpm: at.DeviceTpm, keys: at.DeviceKeys) -> None:
        ek, cert = tpm.endorsement()
        body = {"ek_public": _b64(ek), "ak_public": _b64(keys.ak_public)}
        if cert:
            body["ek_certificate"] = _b64(cert)
        ch = self.call("/v1/enrol/begin", body)
        secret = tpm.activate_credential(keys, _unb64(ch, "credential_blob"), _unb64(ch, "encrypted_secret"))
        self.call("/v1/enrol/finish", {"challenge_id": ch["challenge_id"], "secret": _b64(secret)})

    def fetch_wrapped(self, tpm: at.DeviceTpm, keys: at.DeviceKeys, bundle_id: str, pcrs: Sequence[int], *,
                      floor_index: int | None = None) -> ReleasedKeyFile:
        """Attest (and with ``floor_index``, certify the floor counter) and get the key, still wrapped to the TPM."""
        nonce = _unb64(self.call("/v1/nonce", {}), "nonce")
        quote = tpm.quote(keys, nonce, pcrs)
        attest, sig = tpm.certify_release_key(keys, nonce)
        body: dict[str, Any] = {
            "bundle_id": bundle_id, "nonce": _b64(nonce), "quote": quote.to_dict(),
            "release_public": _b64(keys.release_public), "certify_attest": _b64(attest),
            "certify_signature": _b64(sig)}
        if floor_index is not None:
            body["floor"] = FloorEvidence(*tpm.certify_nv_counter(keys, nonce, floor_index)).to_dict()
        answer = self.call("/v1/release", body)
        return ReleasedKeyFile.from_dict({"format": RELEASED_KEY_FORMAT, "version": 1, "bundle_id": bundle_id,
                                          "recipient_key_id": answer.get("recipient_key_id"), "nonce": _b64(nonce),
                                          "wrapped": answer.get("wrapped"), "licence": answer.get("licence")},
                                         "release service's answer")

    def fetch_key(self, tpm: at.DeviceTpm, keys: at.DeviceKeys, bundle_id: str, pcrs: Sequence[int], *,
                  floor_index: int | None = None) -> ReleasedKey:
        """:meth:`fetch_wrapped`, then :func:`unwrap_released`: the secret decrypted in the TPM, in memory only."""
        return unwrap_released(self.fetch_wrapped(tpm, keys, bundle_id, pcrs, floor_index=floor_index), tpm, keys)


# --- opening a bundle with a released key -------------------------------------------------------------------------
def open_released(bundle: str | os.PathLike[str], owner_key: OwnerPublicKey, released: ReleasedKey) -> Any:
    """Verify, decrypt in memory and open a bundle with a released secret, as the service's recipient stanza.

    The same checks as ``bundles.open_bundle``: owner signature, the signed data-key commitment and this stanza's
    payload MAC, so a released secret cannot open a model other than the one the owner signed.
    """
    from edgeshield.bundles import _api

    with _api._open_for_read(bundle) as (read_at, size):
        manifest = _api._authenticated_manifest(read_at, size, owner_key)
        if manifest.bundle_id != released.bundle_id:
            raise KeyCommitmentError("the released key is for another bundle")
        stanza = next((r for r in manifest.recipients if r.key_id == released.recipient_key_id), None)
        if stanza is None:
            raise NotARecipientError(f"{released.recipient_key_id} is not a recipient of this bundle")
        if len(released.secret) != 64:
            raise KeyCommitmentError("the released data key is not the one the manifest commits to")
        plaintext = _api.decrypt_payload(read_at, size, manifest, stanza, released.secret[:32], released.secret[32:],
                                         check_digest=False, whose_key="the released data key", whose_mac="")
    return _api.session_from_image(manifest, plaintext)

