"""TLS 1.3 contexts for the inference server and its clients: mutual authentication, revocation checked.

Both sides speak TLS 1.3 only. The server requires a client certificate from the device CA and checks it against
the CA's CRL (``VERIFY_CRL_CHECK_LEAF``); it keeps TLS 1.3 session tickets on, so clients can resume.

How a CRL gets into Python's ``ssl``: ``load_verify_locations(cafile=...)`` hands the file to OpenSSL's
``X509_load_cert_crl_file``, which adds every certificate *and every CRL* in it to the context's X509_STORE
(``cadata`` only takes certificates). The store never drops a CRL, but when it holds several CRLs of one issuer
OpenSSL verifies against the one with the latest lastUpdate, so loading a newer CRL into a live context revokes in
place for every later full handshake (``reload_crl``; tests/transport/test_tls.py shows it).

Two things ``reload_crl`` cannot do, so the server must: a resumed TLS 1.3 session is not re-verified, so a client
revoked after it got a ticket can resume until the ticket expires (OpenSSL's default: 2 hours); Python cannot
rotate a context's ticket keys or flush its session cache. So the server takes every connection's identity from
``peer_identity``, which also refuses serials in ``revoked_serials(context)`` (a set lookup); a freshly built
context would do too, since its ticket keys are new. And the store keeps every CRL it was given: a few hundred
bytes per revocation, fine for a device's lifetime.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeshield._io import check_readable_file
from edgeshield.errors import (
    CertificateRevokedError,
    CrlError,
    IntegrityError,
    InvalidArgumentError,
    KeyFileError,
    PassphraseError,
)
from edgeshield.transport._pki import (
    CA_CERT,
    CLOCK_SKEW,
    CRL_FILE,
    CrlInfo,
    Identity,
    check_key_pair,
    identity_from_der,
    load_certificate,
    load_crl,
    load_private_key,
)

PathLike = str | os.PathLike[str]

# The CRL each server context last loaded, to refuse rollbacks and to answer revoked_serials().
_loaded: weakref.WeakKeyDictionary[ssl.SSLContext, CrlInfo] = weakref.WeakKeyDictionary()
_loaded_lock = threading.Lock()


def server_context(ca: PathLike, cert: PathLike, key: PathLike, *, crl: PathLike | None = None,
                   passphrase: bytes | None = None, allow_expired_crl: bool = False) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from ``ca`` which its CRL does not revoke.

    ``ca`` is a CA directory (its ``ca.crt`` and ``crl.pem`` are used) or a CA certificate file, in which case
    ``crl`` must be given: this server never runs without revocation checking. ``passphrase`` decrypts ``key``.
    ``allow_expired_crl`` accepts a CRL past its nextUpdate (see :func:`reload_crl`); OpenSSL then refuses every
    full handshake until the caller clears ``VERIFY_CRL_CHECK_LEAF`` and checks serials itself.
    """
    ca_path, crl_path = _resolve_ca(ca, crl)
    if crl_path is None:
        raise InvalidArgumentError("give the CA's CRL (crl=...): the server always checks revocation")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    _load_chain(ctx, cert, key, passphrase)
    _load_ca(ctx, ca_path)
    reload_crl(ctx, crl_path, allow_expired=allow_expired_crl)
    return ctx


def client_context(ca: PathLike, cert: PathLike, key: PathLike, *,
                   passphrase: bytes | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents ``cert`` and accepts only a server certified by ``ca`` for the host
    name or IP address it connects to. ``ca`` is a CA directory or a CA certificate file."""
    ca_path, _ = _resolve_ca(ca, None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    _load_ca(ctx, ca_path)
    _load_chain(ctx, cert, key, passphrase)
    return ctx


def reload_crl(context: ssl.SSLContext, crl_path: PathLike, *, allow_expired: bool = False) -> CrlInfo:
    """Load a newer CRL into a live server context; every later full handshake is checked against it.

    The CRL must be signed by a CA the context trusts, be current (unless ``allow_expired``: an operator's explicit
    choice to keep revoking with the last CRL rather than refuse everyone), and be newer than the one loaded before
    (an older CRL number is refused as a rollback; the same CRL again is a no-op). Only the parsed CRL is handed to
    OpenSSL, so a certificate appended to the file cannot sneak into the trust store.
    """
    issuers = [x509.load_der_x509_certificate(der) for der in context.get_ca_certs(binary_form=True)]
    if not issuers:
        raise InvalidArgumentError("the context trusts no CA to check a CRL against")
    crl_obj, info = _verified_crl(crl_path, issuers)
    now = datetime.now(UTC)
    if info.next_update <= now and not allow_expired:
        raise CrlError(f"{crl_path} expired at {info.next_update.isoformat()}: publish a fresh CRL")
    if info.last_update > now + CLOCK_SKEW:
        raise CrlError(f"{crl_path} is not valid until {info.last_update.isoformat()}: check the clocks")
    with _loaded_lock:
        previous = _loaded.get(context)
        if previous is not None:
            if info.number == previous.number and info.last_update == previous.last_update:
                return previous
            if info.number <= previous.number:
                raise CrlError(
                    f"{crl_path} has CRL number {info.number}, not newer than the loaded {previous.number}: refusing"
                )
            if info.last_update <= previous.last_update:
                raise CrlError(f"{crl_path} has no later lastUpdate than the loaded CRL, so cannot supersede it")
        with tempfile.TemporaryDirectory(prefix="edgeshield-crl-") as tmp:
            clean = Path(tmp) / "crl.pem"
            clean.write_bytes(crl_obj.public_bytes(serialization.Encoding.PEM))
            try:
                context.load_verify_locations(cafile=str(clean))
            except ssl.SSLError as exc:
                raise InvalidArgumentError(f"OpenSSL refused {crl_path}: {exc.reason or exc}") from exc
        _loaded[context] = info
    return info


def loaded_crl(context: ssl.SSLContext) -> CrlInfo | None:
    """The CRL the context last loaded (its number, dates and revoked serials), or None."""
    with _loaded_lock:
        return _loaded.get(context)


def revoked_serials(context: ssl.SSLContext) -> frozenset[int]:
    """The serials the context's current CRL revokes: check them on resumed sessions, which skip verification."""
    with _loaded_lock:
        info = _loaded.get(context)
    return info.revoked if info is not None else frozenset()


def peer_identity(conn: ssl.SSLSocket | ssl.SSLObject) -> Identity:
    """Who is on the other end of a server connection, refused if the context's current CRL revokes them.

    Use it on every connection, not just fresh ones: a resumed session skips certificate verification, so this is
    what stops a client revoked after it got its ticket.
    """
    der = conn.getpeercert(binary_form=True)
    if not der:
        raise InvalidArgumentError("the peer presented no certificate")
    identity = identity_from_der(der)
    if identity.serial in revoked_serials(conn.context):
        raise CertificateRevokedError(f"certificate 0x{identity.serial:x} ({identity.name}) is revoked")
    return identity


# --- private helpers ----------------------------------------------------------------------------------------------
def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION


def _resolve_ca(ca: PathLike, crl: PathLike | None) -> tuple[Path, Path | None]:
    """The CA certificate and the CRL: a CA directory's own, or the files given (no CRL if none is given)."""
    p = Path(ca)
    if p.is_dir():
        return check_readable_file(p / CA_CERT, what="CA certificate"), Path(crl) if crl else p / CRL_FILE
    return check_readable_file(p, what="CA certificate"), Path(crl) if crl else None


def _load_ca(ctx: ssl.SSLContext, ca_path: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca_path))
    except ssl.SSLError as exc:
        raise InvalidArgumentError(f"{ca_path} is not a PEM CA certificate: {exc.reason or exc}") from exc


def _verified_crl(crl_path: PathLike, issuers: list[x509.Certificate]) -> tuple[x509.CertificateRevocationList,
                                                                                  CrlInfo]:
    errors: list[IntegrityError] = []
    for issuer in issuers:
        try:
            return load_crl(crl_path, issuer)
        except IntegrityError as exc:
            errors.append(exc)
    raise errors[0] if len(issuers) == 1 else CrlError(f"{crl_path} is not signed by a CA this context trusts")


def _load_chain(ctx: ssl.SSLContext, cert: PathLike, key: PathLike, passphrase: bytes | None) -> None:
    # Check with cryptography first for precise errors; OpenSSL's are opaque ("PEM lib").
    cert_path = check_readable_file(cert, what="certificate")
    key_path = check_readable_file(key, what="private key")
    check_key_pair(load_certificate(cert_path), load_private_key(key_path, passphrase), cert_path, key_path)

    # Never let OpenSSL fall back to prompting on the terminal for a passphrase.
    def no_passphrase() -> bytes:
        raise PassphraseError(f"{key_path} is encrypted: give its passphrase (--passphrase-env VAR)")

    try:
        ctx.load_cert_chain(cert_path, key_path, password=passphrase if passphrase is not None else no_passphrase)
    except ssl.SSLError as exc:
        raise KeyFileError(f"cannot use {cert_path} with {key_path}: {exc.reason or exc}") from exc
