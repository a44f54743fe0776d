"""A small device PKI: one CA directory that issues client and server certificates, each carrying a role.

Layout of a CA directory (created 0700)::

    ca.key       the CA's private key: PKCS#8 PEM, 0600, optionally encrypted with a passphrase
    ca.crt       the self-signed CA certificate (ECDSA P-256 or Ed25519)
    crl.pem      the current CRL: every revoked serial, a CRL number that only grows, nextUpdate 7 days out
    index.json   every certificate issued: serial, name, role, kind, validity, revocation
    issued/      NAME.key (ECDSA P-256, 0600) and NAME.crt for each issued certificate

The role is carried twice: as the subject's OU and in a non-critical private extension, ``ROLE_OID``, whose value
is the DER UTF8String of the role. The extension is authoritative; the OU is a human-readable fallback. Any valid
role identifier may be issued (``KNOWN_ROLES`` are the ones the default RBAC policy names); the policy file, not
the CA, decides what a role may do.

``ROLE_OID`` is 2.25.<UUID>.1 (ITU-T X.667): a UUID-derived arc needs no registration and cannot collide with
anyone's enterprise number (1.3.6.1.4.1.57264, for instance, belongs to Sigstore).

A CRL expires after ``CRL_DAYS``; a server checking revocation then refuses every client, so refresh it with
``update_crl`` (``edgeshield pki crl``) well before, e.g. daily from cron.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeGuard, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import (
    AlreadyRevokedError,
    CaIndexError,
    CertificateError,
    CrlError,
    EdgeShieldError,
    InvalidArgumentError,
    KeyFileError,
    NotAFileError,
    OutputExistsError,
    PathNotFoundError,
    UnknownCertificateError,
    UnknownSerialError,
)

ROLE_OID = x509.ObjectIdentifier("2.25.127714824559065485825676563085213816711.1")
KNOWN_ROLES = ("admin", "operator", "auditor", "client")
ALGORITHMS = ("ecdsa-p256", "ed25519")
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
CRL_DAYS = 7
# notBefore and a CRL's lastUpdate are backdated so a device whose clock runs a little behind the CA's accepts them.
CLOCK_SKEW = timedelta(minutes=5)

CA_KEY, CA_CERT, CRL_FILE, INDEX_FILE, ISSUED_DIR = "ca.key", "ca.crt", "crl.pem", "index.json", "issued"
_LOCK_FILE = ".lock"
_INDEX_FORMAT = "edgeshield-ca-index"
_MAX_DAYS = 36500
_MAX_FILE = 64 * 1024 * 1024

_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEC_RE = re.compile(r"[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

Kind = Literal["client", "server"]
Status = Literal["valid", "revoked", "expired", "not-yet-valid"]
CaPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# --- results ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaInfo:
    """The CA a directory holds."""

    directory: Path
    name: str
    algorithm: str
    serial: int
    not_after: datetime
    fingerprint_sha256: str
    encrypted: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "directory": str(self.directory),
            "name": self.name,
            "algorithm": self.algorithm,
            "serial": _hex(self.serial),
            "not_after": self.not_after.isoformat(),
            "fingerprint_sha256": self.fingerprint_sha256,
            "encrypted": self.encrypted,
        }


@dataclass(frozen=True)
class CertInfo:
    """One certificate the CA issued, as its index records it."""

    serial: int
    name: str
    role: str
    kind: Kind
    not_before: datetime
    not_after: datetime
    sans: tuple[str, ...]
    fingerprint_sha256: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None

    @property
    def serial_hex(self) -> str:
        return _hex(self.serial)

    def status(self, now: datetime | None = None) -> Status:
        now = now or _now()
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.not_after:
            return "expired"
        if now < self.not_before:
            return "not-yet-valid"
        return "valid"

    def to_dict(self, now: datetime | None = None) -> dict[str, object]:
        return {
            "serial": self.serial_hex,
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "sans": list(self.sans),
            "fingerprint_sha256": self.fingerprint_sha256,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "revocation_reason": self.revocation_reason,
            "status": self.status(now),
        }


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued certificate and where its files are."""

    info: CertInfo
    cert_path: Path
    key_path: Path
    encrypted: bool

    @property
    def serial(self) -> int:
        return self.info.serial

    def to_dict(self) -> dict[str, object]:
        return {**self.info.to_dict(), "certificate": str(self.cert_path), "private_key": str(self.key_path),
                "encrypted": self.encrypted}


@dataclass(frozen=True)
class CrlInfo:
    """A CRL the CA published (or a server loaded)."""

    number: int
    last_update: datetime
    next_update: datetime
    revoked: frozenset[int]

    def to_dict(self) -> dict[str, object]:
        return {
            "crl_number": self.number,
            "last_update": self.last_update.isoformat(),
            "next_update": self.next_update.isoformat(),
            "revoked": sorted(_hex(s) for s in self.revoked),
        }


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a verified TLS connection."""

    name: str
    role: str | None
    serial: int
    fingerprint_sha256: str


# --- validators -------------------------------------------------------------------------------------------------
def validate_role(role: str) -> str:
    """A role is a lowercase identifier: a letter, then up to 31 of a-z, 0-9, '_' or '-'."""
    if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
        raise InvalidArgumentError(
            f"invalid role {role!r}: use a lowercase letter then up to 31 of a-z, 0-9, '_' or '-'"
        )
    return role


def validate_name(name: str) -> str:
    """A certificate name is its CN and its file name: 1-64 letters, digits, '.', '_' or '-', not starting with one
    of '.', '_', '-'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_serial(text: str | int) -> int:
    """Parse a certificate serial given as decimal or as hex with a 0x prefix (RFC 5280: positive, <= 20 octets)."""
    if isinstance(text, bool):
        raise InvalidArgumentError(f"invalid serial {text!r}")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str) and _DEC_RE.fullmatch(text):
        value = int(text, 10)
    elif isinstance(text, str) and _HEX_RE.fullmatch(text):
        value = int(text[2:], 16)
    else:
        raise InvalidArgumentError(f"invalid serial {text!r}: give it in decimal or as hex with a 0x prefix")
    if value <= 0 or value.bit_length() > 159:
        raise InvalidArgumentError(f"invalid serial {text!r}: must be positive and at most 20 octets")
    return value


def parse_san(text: str) -> x509.GeneralName:
    """A subjectAltName entry: an IPv4/IPv6 address, else an ASCII DNS name (no wildcards)."""
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError(f"invalid SAN {text!r}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise InvalidArgumentError(f"invalid SAN {text!r}: an IPv6 scope id cannot be certified")
        return x509.IPAddress(address)
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise InvalidArgumentError(f"invalid SAN {text!r}: give a DNS name (like localhost) or an IP address")
    return x509.DNSName(text.lower())


# --- creating a CA and issuing --------------------------------------------------------------------------------
def init_ca(
    directory: str | os.PathLike[str],
    *,
    algorithm: str = "ecdsa-p256",
    name: str = "EdgeShield Root CA",
    days: int = 3650,
    passphrase: bytes | None = None,
) -> CaInfo:
    """Create a CA in ``directory``: key, self-signed certificate, an empty signed CRL and the index.

    Refuses to touch a directory that already holds any CA file: a new CA key orphans every certificate issued.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidArgumentError(f"unknown CA algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    _check_days(days)
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidArgumentError(f"invalid CA name {name!r}: use 1-64 printable characters")
    d = _new_ca_dir(directory)
    key: CaPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ecdsa-p256" else ed25519.Ed25519PrivateKey.generate()
    )
    now = _now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _hash_for(key))
    )
    with _locked(d):
        for fname in (CA_KEY, CA_CERT, CRL_FILE, INDEX_FILE):
            if (d / fname).exists():
                raise OutputExistsError(f"{d} already holds a CA ({fname}): refusing to overwrite it")
        (d / ISSUED_DIR).mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(d / CA_KEY, _private_pem(key, passphrase), mode=0o600, overwrite=False)
        atomic_write_bytes(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite=False)
        index: dict[str, Any] = {"format": _INDEX_FORMAT, "version": 1, "algorithm": algorithm, "crl": None,
                                 "certificates": []}
        _publish_crl(d, index, cert, key, overwrite=False)
    return _ca_info(d, cert, algorithm, bool(passphrase))


def issue(
    directory: str | os.PathLike[str],
    *,
    name: str,
    role: str,
    days: int = 365,
    server: bool = False,
    sans: Sequence[str] = (),
    passphrase: bytes | None = None,
    key_passphrase: bytes | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCert:
    """Issue an ECDSA P-256 key and a certificate for ``name`` with ``role``; write them to ``issued/``.

    ``server`` makes a serverAuth certificate, which needs ``sans`` (DNS names or IP addresses); otherwise the
    certificate is for clientAuth. ``passphrase`` unlocks the CA key, ``key_passphrase`` encrypts the new key.
    ``not_before``/``not_after`` (timezone-aware) override the validity window: they are for tests and rotation
    drills, e.g. to issue an already-expired certificate. A name with an active certificate is refused until that
    one is revoked or has expired; the new files then replace the old ones.
    """
    validate_name(name)
    validate_role(role)
    _check_days(days)
    general_names = list(dict.fromkeys(parse_san(s) for s in sans))
    if server and not general_names:
        raise InvalidArgumentError("a server certificate needs at least one SAN (a DNS name or an IP address)")
    if not server and general_names:
        raise InvalidArgumentError("SANs are only for server certificates (--server)")
    d = _ca_dir(directory)
    with _locked(d):
        index = _read_index(d)
        ca_cert, ca_key = _load_ca(d, passphrase)
        now = _now()
        start, end = _validity(now, days, not_before, not_after, ca_cert)
        entries = _entries(index)
        same_name = [e for e in entries if e.name == name]
        active = [e for e in same_name if e.revoked_at is None and e.not_after > now]
        if active:
            raise OutputExistsError(
                f"{name!r} already has an active certificate (serial {active[0].serial_hex}): revoke it first"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.UnrecognizedExtension(ROLE_OID, encode_role(role)), critical=False)
        )
        if general_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        cert = builder.sign(ca_key, _hash_for(ca_key))
        info = CertInfo(
            serial=cert.serial_number, name=name, role=role, kind="server" if server else "client",
            not_before=start, not_after=end, sans=tuple(_san_text(g) for g in general_names),
            fingerprint_sha256=_fingerprint(cert),
        )
        key_path, cert_path = d / ISSUED_DIR / f"{name}.key", d / ISSUED_DIR / f"{name}.crt"
        # Files of a revoked or expired certificate under the same name are replaced; strays are not.
        replace_ok = bool(same_name)
        atomic_write_bytes(key_path, _private_pem(key, key_passphrase), mode=0o600, overwrite=replace_ok)
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite=replace_ok)
        index["certificates"].append(_entry_to_json(info))
        _write_index(d, index)
    return IssuedCert(info, cert_path, key_path, bool(key_passphrase))


def revoke(
    directory: str | os.PathLike[str],
    serial: int | str | None = None,
    *,
    name: str | None = None,
    reason: str | None = None,
    passphrase: bytes | None = None,
) -> CertInfo:
    """Mark one certificate revoked in the index and publish a new CRL listing every revoked serial.

    Give exactly one of ``serial`` and ``name``. A name picks the one certificate of that name that is still active
    (not revoked, not expired), which ``issue`` keeps unique. A name with no active certificate is refused
    (``AlreadyRevokedError`` when all of its certificates are revoked, else ``UnknownCertificateError``), and so is
    one with several (an index edited by hand): use the serial then.
    """
    if (serial is None) == (name is None):
        raise InvalidArgumentError("give exactly one of a serial and a name")
    value = parse_serial(serial) if serial is not None else None
    if name is not None:
        validate_name(name)
    if reason is not None and reason not in REVOCATION_REASONS:
        raise InvalidArgumentError(f"unknown revocation reason {reason!r}: use one of {', '.join(REVOCATION_REASONS)}")
    d = _ca_dir(directory)
    with _locked(d):
        index = _read_index(d)
        ca_cert, ca_key = _load_ca(d, passphrase)  # before changing anything: a wrong passphrase changes nothing
        entries = _entries(index)
        i = _find_serial(entries, value, d) if value is not None else _find_name(entries, name or "", d)
        if entries[i].revoked_at is not None:
            raise AlreadyRevokedError(f"certificate {entries[i].serial_hex} ({entries[i].name}) is already revoked")
        revoked = replace(entries[i], revoked_at=_now(), revocation_reason=reason)
        index["certificates"][i] = _entry_to_json(revoked)
        _publish_crl(d, index, ca_cert, ca_key)
    return revoked


def _find_serial(entries: list[CertInfo], serial: int, d: Path) -> int:
    match = [i for i, e in enumerate(entries) if e.serial == serial]
    if not match:
        raise UnknownSerialError(f"no certificate with serial {_hex(serial)} in {d}")
    return match[0]


def _find_name(entries: list[CertInfo], name: str, d: Path) -> int:
    """The index of the one active certificate (not revoked, not expired: what `issue` keeps unique) named ``name``."""
    now = _now()
    same = [i for i, e in enumerate(entries) if e.name == name]
    valid = [i for i in same if entries[i].revoked_at is None and now < entries[i].not_after]
    if len(valid) == 1:
        return valid[0]
    if len(valid) > 1:
        serials = ", ".join(entries[i].serial_hex for i in valid)
        raise UnknownCertificateError(f"{len(valid)} valid certificates are named {name!r} ({serials}): "
                                      "revoke one by --serial")
    if not same:
        raise UnknownCertificateError(f"no certificate named {name!r} in {d}")
    if all(entries[i].revoked_at is not None for i in same):
        last = entries[same[-1]]
        raise AlreadyRevokedError(f"certificate {last.serial_hex} ({name}) is already revoked")
    states = ", ".join(f"{entries[i].serial_hex} {entries[i].status(now)}" for i in same)
    raise UnknownCertificateError(f"no valid certificate named {name!r} ({states}): revoke one by --serial")


def update_crl(directory: str | os.PathLike[str], *, passphrase: bytes | None = None,
               days: int = CRL_DAYS) -> CrlInfo:
    """Re-sign the CRL with fresh dates and the next CRL number (run it regularly: a CRL expires after ``days``)."""
    _check_days(days)
    d = _ca_dir(directory)
    with _locked(d):
        index = _read_index(d)
        ca_cert, ca_key = _load_ca(d, passphrase)
        return _publish_crl(d, index, ca_cert, ca_key, days=days)


def list_certs(directory: str | os.PathLike[str]) -> list[CertInfo]:
    """Every certificate the CA issued, in the order it issued them."""
    d = _ca_dir(directory)
    return _entries(_read_index(d))


def read_ca(directory: str | os.PathLike[str]) -> x509.Certificate:
    """The CA certificate of a CA directory."""
    return load_certificate(_ca_dir(directory) / CA_CERT)


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read one PEM certificate."""
    data = _read_small(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate") from exc


def load_crl(path: str | os.PathLike[str], issuer: x509.Certificate) -> tuple[x509.CertificateRevocationList, CrlInfo]:
    """Read a PEM CRL and check it is signed by ``issuer`` and carries a CRL number and a nextUpdate."""
    data = _read_small(path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM CRL") from exc
    key = issuer.public_key()
    if crl.issuer != issuer.subject or not _can_sign(key) or not crl.is_signature_valid(key):
        raise CrlError(f"{path} is not a CRL signed by {issuer.subject.rfc4514_string()}")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound as exc:
        raise CrlError(f"{path} has no CRL number") from exc
    if crl.next_update_utc is None:
        raise CrlError(f"{path} has no nextUpdate")
    info = CrlInfo(number, crl.last_update_utc, crl.next_update_utc, frozenset(r.serial_number for r in crl))
    return crl, info


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None, *,
                     what: str = "private key") -> PrivateKeyTypes:
    """A PEM private key, with a PassphraseError when it is encrypted and the passphrase is missing or wrong."""
    from edgeshield.keys import load_private_key as load_pem_private_key

    _read_small(path, what)  # the path checks, named after what the key is for
    return load_pem_private_key(path, passphrase)


def check_key_pair(cert: x509.Certificate, key: PrivateKeyTypes, cert_path: str | os.PathLike[str],
                   key_path: str | os.PathLike[str]) -> None:
    """Refuse a private key that does not belong to the certificate (OpenSSL would only say "key values mismatch")."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        mine = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    except (AttributeError, ValueError) as exc:
        raise KeyFileError(f"{key_path} holds an unsupported private key") from exc
    if mine != cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise KeyFileError(f"{key_path} does not belong to {cert_path}")


# --- reading roles and identities ---------------------------------------------------------------------------------
def encode_role(role: str) -> bytes:
    """DER UTF8String of a (valid, so at most 32-byte) role: the value of the ``ROLE_OID`` extension."""
    raw = validate_role(role).encode()
    return bytes([0x0C, len(raw)]) + raw


def decode_role(value: bytes) -> str | None:
    """The role in a ``ROLE_OID`` extension value, or None if it is not a DER UTF8String holding a valid role."""
    if len(value) < 2 or value[0] != 0x0C or value[1] != len(value) - 2 or value[1] > 32:
        return None
    text = value[2:].decode("utf-8", errors="replace")
    return text if _ROLE_RE.fullmatch(text) else None


def read_role(cert: x509.Certificate) -> str | None:
    """The certificate's role: the ``ROLE_OID`` extension if present (a malformed one means no role), else a single
    valid OU."""
    try:
        ext = cert.extensions.get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if len(ous) == 1 and isinstance(ous[0].value, str) and _ROLE_RE.fullmatch(ous[0].value):
            return ous[0].value
        return None
    except ValueError:  # duplicate or unparsable extensions
        return None
    value = ext.value
    return decode_role(value.value) if isinstance(value, x509.UnrecognizedExtension) else None


def identity_from_der(der: bytes) -> Identity:
    """Who a verified peer certificate names (``SSLSocket.getpeercert(binary_form=True)``)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, TypeError) as exc:
        raise CertificateError("peer certificate is not a DER X.509 certificate") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise CertificateError("peer certificate has no single common name")
    return Identity(cns[0].value, read_role(cert), cert.serial_number, _fingerprint(cert))


# --- private helpers ----------------------------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _hex(serial: int) -> str:
    return f"0x{serial:x}"


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _can_sign(key: CertificatePublicKeyTypes) -> TypeGuard[CertificateIssuerPublicKeyTypes]:
    """Whether a certificate's key is of a kind that signs certificates and CRLs (X25519/X448 keys do not)."""
    return isinstance(key, get_args(CertificateIssuerPublicKeyTypes))


def _hash_for(key: CaPrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _san_text(name: x509.GeneralName) -> str:
    return str(name.value)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise InvalidArgumentError(f"invalid number of days {days!r}: use 1 to {_MAX_DAYS}")


def _validity(now: datetime, days: int, not_before: datetime | None, not_after: datetime | None,
              ca_cert: x509.Certificate) -> tuple[datetime, datetime]:
    for when in (not_before, not_after):
        if when is not None and when.tzinfo is None:
            raise InvalidArgumentError("not_before/not_after must be timezone-aware datetimes")
    start = (not_before.astimezone(UTC) if not_before else now - CLOCK_SKEW).replace(microsecond=0)
    end = (not_after.astimezone(UTC) if not_after else start + CLOCK_SKEW + timedelta(days=days))
    end = end.replace(microsecond=0)
    if end <= start:
        raise InvalidArgumentError("the certificate would end before it starts")
    if end > ca_cert.not_valid_after_utc:
        raise InvalidArgumentError(
            f"the certificate would outlive the CA (which expires {ca_cert.not_valid_after_utc.isoformat()})"
        )
    return start, end


def _private_pem(key: CaPrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _read_small(path: str | os.PathLike[str], what: str, limit: int = 1024 * 1024) -> bytes:
    p = check_readable_file(path, what=what)
    if p.stat().st_size > limit:
        raise InvalidArgumentError(f"{p} is too large to be a {what}")
    return p.read_bytes()


def _new_ca_dir(directory: str | os.PathLike[str]) -> Path:
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotAFileError(f"CA directory is not a directory: {d}")
    if d.exists():
        for fname in (CA_KEY, CA_CERT, CRL_FILE, INDEX_FILE):
            if (d / fname).exists():
                raise OutputExistsError(f"{d} already holds a CA ({fname}): refusing to overwrite it")
        d.chmod(0o700)
    else:
        d.mkdir(parents=True, mode=0o700)
    return d


def _ca_dir(directory: str | os.PathLike[str]) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise PathNotFoundError(f"CA directory not found: {d}")
    for fname in (CA_CERT, INDEX_FILE):
        if not (d / fname).is_file():
            raise PathNotFoundError(f"not a CA directory (no {fname}): {d}")
    return d


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise changes to one CA directory across processes (index and CRL are read-modify-write)."""
    fd = os.open(d / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_ca(d: Path, passphrase: bytes | None) -> tuple[x509.Certificate, CaPrivateKey]:
    cert = load_certificate(d / CA_CERT)
    key = load_private_key(d / CA_KEY, passphrase, what="CA key")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyFileError(f"{d / CA_KEY} is not an ECDSA or Ed25519 key")
    check_key_pair(cert, key, d / CA_CERT, d / CA_KEY)
    return cert, key


def _ca_info(d: Path, cert: x509.Certificate, algorithm: str, encrypted: bool) -> CaInfo:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CaInfo(d, str(cn[0].value) if cn else "", algorithm, cert.serial_number, cert.not_valid_after_utc,
                  _fingerprint(cert), encrypted)


def _publish_crl(d: Path, index: dict[str, Any], ca_cert: x509.Certificate, ca_key: CaPrivateKey, *,
                 days: int = CRL_DAYS, overwrite: bool = True) -> CrlInfo:
    """Sign the next CRL from the index, record it in the index, then write the CRL.

    The index is written first: if writing the CRL then fails, the next CRL still lists every revocation. Each
    lastUpdate is strictly later than the one before, because OpenSSL, holding several CRLs of one issuer, trusts
    the one with the latest lastUpdate (that is what lets a live server take a new CRL in place).
    """
    previous = index.get("crl")
    number = int(previous["number"]) + 1 if previous else 1
    now = _now()
    last_update = now - CLOCK_SKEW
    if previous:
        last_update = max(last_update, _parse_time(previous["last_update"]) + timedelta(seconds=1))
        if last_update > now + timedelta(seconds=2):
            raise EdgeShieldError(
                f"the last CRL's lastUpdate ({previous['last_update']}) is in the future: check this machine's clock"
            )
        if last_update > now:  # only after hundreds of CRLs within a second
            time.sleep((last_update - now).total_seconds())
    next_update = now + timedelta(days=days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    revoked = [(e, e.revoked_at) for e in _entries(index) if e.revoked_at is not None]
    for e, revoked_at in revoked:
        rb = x509.RevokedCertificateBuilder().serial_number(e.serial).revocation_date(revoked_at)
        if e.revocation_reason:
            rb = rb.add_extension(x509.CRLReason(REVOCATION_REASONS[e.revocation_reason]), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    crl = builder.sign(ca_key, _hash_for(ca_key))
    index["crl"] = {"number": number, "last_update": last_update.isoformat(), "next_update": next_update.isoformat()}
    _write_index(d, index)
    atomic_write_bytes(d / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    return CrlInfo(number, last_update, next_update, frozenset(e.serial for e, _ in revoked))


def _read_index(d: Path) -> dict[str, Any]:
    path = d / INDEX_FILE
    try:
        index = json.loads(_read_small(path, "CA index", limit=_MAX_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaIndexError(f"{path} is not valid JSON") from exc
    if not isinstance(index, dict) or index.get("format") != _INDEX_FORMAT or index.get("version") != 1 or \
            not isinstance(index.get("certificates"), list):
        raise CaIndexError(f"{path} is not an EdgeShield CA index (version 1)")
    _entries(index)  # validate every entry once, here
    return index


def _write_index(d: Path, index: dict[str, Any]) -> None:
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(d / INDEX_FILE, data, mode=0o644)


def _entries(index: dict[str, Any]) -> list[CertInfo]:
    try:
        return [_entry_from_json(e) for e in index["certificates"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CaIndexError(f"CA index has a malformed certificate entry: {exc}") from exc


def _entry_to_json(info: CertInfo) -> dict[str, object]:
    return {
        "serial": f"{info.serial:x}",
        "name": info.name,
        "role": info.role,
        "kind": info.kind,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "sans": list(info.sans),
        "fingerprint_sha256": info.fingerprint_sha256,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
        "revocation_reason": info.revocation_reason,
    }


def _entry_from_json(e: dict[str, Any]) -> CertInfo:
    kind = e["kind"]
    if kind not in ("client", "server"):
        raise ValueError(f"kind {kind!r}")
    reason = e.get("revocation_reason")
    if reason is not None and reason not in REVOCATION_REASONS:
        raise ValueError(f"revocation reason {reason!r}")
    return CertInfo(
        serial=int(e["serial"], 16),
        name=str(e["name"]),
        role=str(e["role"]),
        kind=kind,
        not_before=_parse_time(e["not_before"]),
        not_after=_parse_time(e["not_after"]),
        sans=tuple(str(s) for s in e.get("sans", [])),
        fingerprint_sha256=str(e["fingerprint_sha256"]),
        revoked_at=_parse_time(e["revoked_at"]) if e.get("revoked_at") else None,
        revocation_reason=reason,
    )


def _parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"time without a timezone: {text!r}")
    return when.astimezone(UTC)
