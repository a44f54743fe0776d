"""Attestation-gated key release: the owner-side service that hands a bundle's data key to an attested device.

Bundles for an attested fleet name the *release service* as their recipient. The service holds that recipient's
X25519 key, so it can unwrap a bundle's secret (data key || the service's payload MAC key, see docs/bundle-format.md
section 6), and re-wraps that secret with RSA-OAEP-SHA256 to a device's TPM-resident release key — only after a fresh
quote from an enrolled TPM shows the expected PCR values, and the same attestation key certified the release key
(TPM2_Certify), so the secret can be decrypted only inside that TPM. The device then opens the bundle as the
service's recipient stanza: the signed data-key commitment and payload MAC still pin the model.

Refused, audited and emitted as ``attestation.failed``: an unknown TPM or attestation key, a replayed or expired
nonce, a changed PCR, a restored TPM state, a revoked device, and a request outside the bundle's licence.
Everything runs over mutual TLS 1.3 with EdgeShield's PKI (``edgeshield.transport``).
"""

from __future__ import annotations

import base64
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

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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


class LicenceError(KeyMaterialError):
    """The bundle's licence does not allow this release (expired, device limit reached, wrong device group)."""

    reason = "licence"


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
            at.check_endorsement_key(ek, ek_cert, trust)
            secret = secrets.token_bytes(32)
            blob, enc = at.make_credential(ek, ak, secret)
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
                certify_attest: bytes, certify_signature: bytes) -> tuple[str, bytes, Licence | None]:
        """Verify everything, then return (recipient key id, RSA-OAEP ciphertext of the secret, licence)."""

        def run() -> tuple[str, bytes, Licence | None]:
            self.store.use_nonce(device, nonce)  # first: a replay is refused before any work
            rec = self.store.device(device)
            if rec is None:
                raise at.UnknownAttestationKeyError(f"device {device} has no enrolled attestation key")
            ak_raw, group, last, revoked, _ = rec
            if revoked:
                raise DeviceRevokedError(f"device {device} is revoked")
            ak = at.parse_public(ak_raw)
            verified = at.verify_quote(quote, ak, nonce, self.policy, last)
            key = at.parse_public(release_public)
            at.check_release_key(key)
            at.verify_certification(certify_attest, certify_signature, ak, key, nonce)
            self.store.record_quote(device, last, verified.clock)
            path = self.bundles.get(bundle_id)
            if path is None:
                raise UnknownBundleError(f"this service holds no bundle {bundle_id}")
            licence = self.licences.get(bundle_id)
            if licence is not None:
                if licence.not_after is not None and datetime.now(UTC) > licence.not_after:
                    raise LicenceError(f"the licence for bundle {bundle_id} expired at {licence.not_after}")
                if licence.groups and group not in licence.groups:
                    raise LicenceError(f"device {device} (group {group}) is not in the licence's device groups")
            rid, secret_ = self._unwrap(path)
            self.store.admit_release(bundle_id, device, licence)
            assert isinstance(key.key, rsa.RSAPublicKey)  # noqa: S101 - check_release_key made sure
            wrapped = key.key.encrypt(secret_, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                            at.release_label(bundle_id, nonce)))
            return rid, wrapped, licence

        rid, wrapped, licence = self._guard(device, "release", run, bundle_id=bundle_id)
        self._emit("keyrelease.released", device, {"device": device, "bundle_id": bundle_id,
                                                    "licence": licence.to_dict() if licence else None})
        return rid, wrapped, licence

    def _unwrap(self, path: Path) -> tuple[str, bytes]:
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
        return rid, data_key + mac_key


# --- HTTP over mutual TLS ------------------------------------------------------------------------------------------
_STATUS = {IntegrityError: 403, KeyMaterialError: 403, InputError: 400}


def _status_for(exc: EdgeShieldError) -> int:
    return next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(obj: Mapping[str, Any], key: str) -> bytes:
    return at._unb64(obj.get(key), key)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ReleaseServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name; no secrets, no stderr
        pass

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
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise InvalidArgumentError("request body missing or too large")
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise InvalidArgumentError("the request body is a JSON object")
            self._reply(200, self._route(device, body))
        except EdgeShieldError as exc:
            self._reply(_status_for(exc), {"error": getattr(exc, "reason", type(exc).__name__), "message": str(exc)})
        except (ValueError, UnicodeDecodeError):
            self._reply(400, {"error": "bad-request", "message": "the request body is not JSON"})

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
            rid, wrapped, licence = service.release(
                device, str(body.get("bundle_id")), _unb64(body, "nonce"), at.Quote.from_dict(body.get("quote")),
                _unb64(body, "release_public"), _unb64(body, "certify_attest"), _unb64(body, "certify_signature"))
            return {"recipient_key_id": rid, "wrapped": _b64(wrapped),
                    "licence": licence.to_dict() if licence else None}
        raise InvalidArgumentError(f"no such endpoint {self.path}")

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
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
        finally:
            conn.close()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="edgeshield-keyrelease", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# --- the device's client ---------------------------------------------------------------------------------------------
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
        except ValueError:
            raise ConnectionFailedError("the release service answered something that is not JSON") from None
        if resp.status != 200:
            raise ServerRefusedError(resp.status, f"{obj.get('error')}: {obj.get('message')}")
        return obj  # type: ignore[no-any-return]

    def enrol(self, tpm: at.DeviceTpm, keys: at.DeviceKeys) -> None:
        ek, cert = tpm.endorsement()
        body = {"ek_public": _b64(ek), "ak_public": _b64(keys.ak_public)}
        if cert:
            body["ek_certificate"] = _b64(cert)
        ch = self.call("/v1/enrol/begin", body)
        secret = tpm.activate_credential(keys, _unb64(ch, "credential_blob"), _unb64(ch, "encrypted_secret"))
        self.call("/v1/enrol/finish", {"challenge_id": ch["challenge_id"], "secret": _b64(secret)})

    def fetch_key(self, tpm: at.DeviceTpm, keys: at.DeviceKeys, bundle_id: str, pcrs: Sequence[int]) -> ReleasedKey:
        nonce = _unb64(self.call("/v1/nonce", {}), "nonce")
        quote = tpm.quote(keys, nonce, pcrs)
        attest, sig = tpm.certify_release_key(keys, nonce)
        answer = self.call("/v1/release", {
            "bundle_id": bundle_id, "nonce": _b64(nonce), "quote": quote.to_dict(),
            "release_public": _b64(keys.release_public), "certify_attest": _b64(attest),
            "certify_signature": _b64(sig)})
        secret = tpm.decrypt_released(keys, _unb64(answer, "wrapped"), at.release_label(bundle_id, nonce))
        return ReleasedKey(bundle_id, str(answer.get("recipient_key_id")), secret, answer.get("licence"))


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

