"""Oblivious HTTP (RFC 9458) over Binary HTTP (RFC 9292): key configurations, request and response
encapsulation, and the client identity that travels inside the encapsulated request.

Pure functions and small objects over bytes; no I/O except the key-pair file. The HPKE context (the response needs
its exporter) comes from ``pyhpke`` (the ``ohttp`` extra, imported when first used); the response AEAD and HKDF
come from ``cryptography``. Suites: DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256 and AES-128-GCM (RFC 9458's
vectors), AES-256-GCM or ChaCha20-Poly1305.

Identity through a relay: the relay's TLS identity is the relay's, so the client proves who it is *inside* the
encapsulation. Its inner request carries its certificate (``edgeshield-client-cert``), a millisecond timestamp
(``edgeshield-client-time``) and a signature with its private key (``edgeshield-client-signature``) over
:func:`assertion_transcript`: a domain-separated digest of the HPKE ``enc`` of this very request, the timestamp,
the method, the path, the content type and the SHA-256 of the body. The gateway checks the chain against its CA,
the signature, the time window and that ``enc`` was not seen before (:class:`ReplayGuard`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import EdgeShieldError, InputError, IntegrityError, KeyFileError, MissingDependencyError

if TYPE_CHECKING:
    from edgeshield.transport._pki import Identity

KEM_X25519 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM, AEAD_AES_256_GCM, AEAD_CHACHA20 = 0x0001, 0x0002, 0x0003
_AEAD_SIZES = {AEAD_AES_128_GCM: (16, 12), AEAD_AES_256_GCM: (32, 12), AEAD_CHACHA20: (32, 12)}  # (Nk, Nn)
DEFAULT_SUITES = ((KDF_HKDF_SHA256, AEAD_AES_128_GCM), (KDF_HKDF_SHA256, AEAD_CHACHA20))
REQUEST_TYPE, RESPONSE_TYPE, KEYS_TYPE = "message/ohttp-req", "message/ohttp-res", "application/ohttp-keys"
_REQUEST_LABEL, _RESPONSE_LABEL = b"message/bhttp request", b"message/bhttp response"
_NPK = 32  # X25519 public key and enc
_HDR = 7  # key_id(1) kem_id(2) kdf_id(2) aead_id(2)
CERT_HEADER, TIME_HEADER, SIGNATURE_HEADER = b"edgeshield-client-cert", b"edgeshield-client-time", \
    b"edgeshield-client-signature"
KEYS_SIGNATURE_HEADER, GATEWAY_CERT_HEADER = "edgeshield-ohttp-keys-signature", "edgeshield-ohttp-gateway-cert"
_ASSERTION_DOMAIN = b"EdgeShield OHTTP client assertion v1\x00"
_KEYS_DOMAIN = b"EdgeShield OHTTP key configuration v1\x00"
_KEY_FORMAT = "edgeshield-ohttp-key-v1"


# --- errors -------------------------------------------------------------------------------------------------------
class OhttpError(EdgeShieldError):
    """An Oblivious HTTP message, key configuration or client assertion that cannot be used."""

    status = 400


class OhttpMalformedError(OhttpError, InputError):
    """Bytes that are not a well-formed (or are a truncated or oversized) OHTTP or Binary HTTP message."""


class OhttpUnknownKeyError(OhttpError):
    """The encapsulated request names a key id the gateway does not hold (RFC 9458 §5.2: 422 is not mandated;
    we answer 400 so the relay learns nothing more)."""


class OhttpSuiteError(OhttpError):
    """A KEM, KDF or AEAD this key configuration does not offer."""


class OhttpDecryptError(OhttpError, IntegrityError):
    """The AEAD refused the ciphertext: tampered, truncated, or sealed to another key."""


class OhttpReplayError(OhttpError):
    """This encapsulation (its HPKE ``enc``) was already accepted within the gateway's window."""

    status = 409


class OhttpIdentityError(OhttpError):
    """The client assertion inside the request is missing, forged, stale, not from our CA, or revoked."""

    status = 401


class OhttpKeyConfigError(OhttpError, IntegrityError):
    """A key configuration whose signature or gateway certificate does not verify against the pinned CA."""


def _hpke() -> Any:
    try:
        import pyhpke
    except ImportError:
        raise MissingDependencyError("Oblivious HTTP needs the ohttp extra: pip install 'edgeshield[ohttp]'") \
            from None
    return pyhpke


# --- QUIC variable-length integers (RFC 9000 §16), the framing Binary HTTP uses -----------------------------------
def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("a varint is non-negative")
    if value < 1 << 6:
        return bytes([value])
    if value < 1 << 14:
        return struct.pack(">H", value | 0x4000)
    if value < 1 << 30:
        return struct.pack(">I", value | 0x8000_0000)
    if value < 1 << 62:
        return struct.pack(">Q", value | 0xC000_0000_0000_0000)
    raise ValueError("a varint holds at most 62 bits")


class _Reader:
    """A cursor over bytes whose every read is bounds-checked (truncation → OhttpMalformedError)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise OhttpMalformedError(f"truncated: {what} needs {n} bytes, {self.left} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def varint(self, what: str) -> int:
        first = self.take(1, what)[0]
        size = 1 << (first >> 6)
        rest = self.take(size - 1, what) if size > 1 else b""
        return int.from_bytes(bytes([first & 0x3F]) + rest, "big")


# --- key configuration (RFC 9458 §3) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyConfig:
    """One gateway key: its id, KEM, public key and the (KDF, AEAD) pairs it accepts."""

    key_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...] = DEFAULT_SUITES
    kem_id: int = KEM_X25519

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 255:
            raise OhttpMalformedError(f"key id {self.key_id} is not one byte")
        if self.kem_id != KEM_X25519:
            raise OhttpSuiteError(f"KEM 0x{self.kem_id:04x} is not supported (only DHKEM(X25519, HKDF-SHA256))")
        if len(self.public_key) != _NPK:
            raise OhttpMalformedError(f"an X25519 public key is {_NPK} bytes, not {len(self.public_key)}")
        if not self.suites:
            raise OhttpMalformedError("a key configuration offers at least one symmetric suite")

    def encode(self) -> bytes:
        algs = b"".join(struct.pack(">HH", kdf, aead) for kdf, aead in self.suites)
        return struct.pack(">BH", self.key_id, self.kem_id) + self.public_key + struct.pack(">H", len(algs)) + algs

    @classmethod
    def parse(cls, data: bytes) -> KeyConfig:
        r = _Reader(bytes(data))
        config = cls._read(r)
        if r.left:
            raise OhttpMalformedError(f"{r.left} bytes after the key configuration")
        return config

    @classmethod
    def _read(cls, r: _Reader) -> KeyConfig:
        key_id, kem_id = r.uint(1, "key id"), r.uint(2, "KEM id")
        if kem_id != KEM_X25519:
            raise OhttpSuiteError(f"KEM 0x{kem_id:04x} is not supported (only DHKEM(X25519, HKDF-SHA256))")
        public = r.take(_NPK, "public key")
        length = r.uint(2, "symmetric algorithms length")
        if length == 0 or length % 4:
            raise OhttpMalformedError(f"symmetric algorithms length {length} is not a positive multiple of 4")
        algs = _Reader(r.take(length, "symmetric algorithms"))
        suites = tuple((algs.uint(2, "KDF id"), algs.uint(2, "AEAD id")) for _ in range(length // 4))
        return cls(key_id, public, suites, kem_id)


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """The ``application/ohttp-keys`` form (RFC 9458 §3.2): each configuration behind a 2-byte length."""
    return b"".join(struct.pack(">H", len(c)) + c for c in (k.encode() for k in configs))


def parse_key_configs(data: bytes, *, max_configs: int = 16) -> list[KeyConfig]:
    r, out = _Reader(bytes(data)), list[KeyConfig]()
    while r.left:
        if len(out) >= max_configs:
            raise OhttpMalformedError(f"more than {max_configs} key configurations")
        out.append(KeyConfig.parse(r.take(r.uint(2, "key configuration length"), "key configuration")))
    if not out:
        raise OhttpMalformedError("no key configuration")
    return out


@dataclass(frozen=True)
class KeyPair:
    """The gateway's private key with its configuration."""

    key_id: int
    private_key: x25519.X25519PrivateKey
    suites: tuple[tuple[int, int], ...] = DEFAULT_SUITES

    @classmethod
    def generate(cls, key_id: int | None = None, suites: Sequence[tuple[int, int]] = DEFAULT_SUITES) -> KeyPair:
        return cls(secrets.randbelow(256) if key_id is None else key_id, x25519.X25519PrivateKey.generate(),
                   tuple(suites))

    @property
    def config(self) -> KeyConfig:
        return KeyConfig(self.key_id, self.private_key.public_key().public_bytes_raw(), self.suites)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically, 0600 from the start."""
        doc = {"format": _KEY_FORMAT, "key_id": self.key_id, "suites": [list(s) for s in self.suites],
               "private_key": self.private_key.private_bytes_raw().hex()}
        atomic_write_bytes(path, (json.dumps(doc) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        p = check_readable_file(path, what="OHTTP key")
        try:
            doc = json.loads(p.read_bytes()[:64 * 1024])
            if doc.get("format") != _KEY_FORMAT:
                raise ValueError("not an EdgeShield OHTTP key file")
            private = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["private_key"]))
            return cls(int(doc["key_id"]), private, tuple((int(a), int(b)) for a, b in doc["suites"]))
        except (ValueError, KeyError, TypeError, AttributeError, OhttpError) as exc:
            raise KeyFileError(f"{p} is not an OHTTP key file: {exc}") from None

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> KeyPair:
        if Path(path).exists():
            return cls.load(path)
        pair = cls.generate()
        pair.save(path)
        return pair


# --- request and response encapsulation (RFC 9458 §4.3, §4.4) -----------------------------------------------------
def _suite(kdf_id: int, aead_id: int) -> Any:
    if kdf_id != KDF_HKDF_SHA256 or aead_id not in _AEAD_SIZES:
        raise OhttpSuiteError(f"suite KDF 0x{kdf_id:04x} / AEAD 0x{aead_id:04x} is not supported")
    h = _hpke()
    return h.CipherSuite.new(h.KEMId.DHKEM_X25519_HKDF_SHA256, h.KDFId.HKDF_SHA256, h.AEADId(aead_id))


def _header(key_id: int, kdf_id: int, aead_id: int) -> bytes:
    return struct.pack(">BHHH", key_id, KEM_X25519, kdf_id, aead_id)


def request_info(key_id: int, kdf_id: int, aead_id: int) -> bytes:
    """The HPKE ``info`` of a request: ``"message/bhttp request" || 0x00 || hdr``."""
    return _REQUEST_LABEL + b"\x00" + _header(key_id, kdf_id, aead_id)


def _pyca_key(h: Any, key: x25519.X25519PrivateKey | x25519.X25519PublicKey) -> Any:
    return h.KEMKey.from_pyca_cryptography_key(key)


@dataclass
class _Context:
    enc: bytes
    hpke: Any
    aead_id: int

    def _response_key(self, nonce: bytes) -> tuple[bytes, bytes]:
        nk, nn = _AEAD_SIZES[self.aead_id]
        secret = self.hpke.export(_RESPONSE_LABEL, max(nn, nk))
        h = HMAC(self.enc + nonce, hashes.SHA256())  # HKDF-Extract(salt = enc || response_nonce, secret)
        h.update(secret)
        prk = h.finalize()
        key = HKDFExpand(hashes.SHA256(), nk, b"key").derive(prk)
        iv = HKDFExpand(hashes.SHA256(), nn, b"nonce").derive(prk)
        return key, iv

    def _aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(key) if self.aead_id == AEAD_CHACHA20 else AESGCM(key)

    @property
    def nonce_size(self) -> int:
        nk, nn = _AEAD_SIZES[self.aead_id]
        return max(nn, nk)


class RequestSender(_Context):
    """A client's HPKE context for one request: ``enc`` is known before the request is sealed, so the client
    assertion can bind it; then ``seal`` the request and ``open_response`` the answer."""

    def __init__(self, config: KeyConfig, suite: tuple[int, int] | None = None, *,
                 ephemeral: x25519.X25519PrivateKey | None = None) -> None:
        kdf_id, aead_id = suite or config.suites[0]
        if (kdf_id, aead_id) not in config.suites:
            raise OhttpSuiteError(f"the key configuration does not offer KDF 0x{kdf_id:04x} / AEAD 0x{aead_id:04x}")
        h = _hpke()
        hpke_suite = _suite(kdf_id, aead_id)
        pk = _pyca_key(h, x25519.X25519PublicKey.from_public_bytes(config.public_key))
        eks = None
        if ephemeral is not None:  # test vectors only: a fixed ephemeral key
            eks = h.KEMKeyPair(_pyca_key(h, ephemeral), _pyca_key(h, ephemeral.public_key()))
        self.header = _header(config.key_id, kdf_id, aead_id)
        enc, ctx = hpke_suite.create_sender_context(pk, info=request_info(config.key_id, kdf_id, aead_id), eks=eks)
        super().__init__(bytes(enc), ctx, aead_id)

    def seal(self, request: bytes) -> bytes:
        """The encapsulated request: ``hdr || enc || ct``."""
        return self.header + self.enc + bytes(self.hpke.seal(request, b""))

    def open_response(self, data: bytes) -> bytes:
        n = self.nonce_size
        if len(data) < n + 16:
            raise OhttpMalformedError(f"an encapsulated response is at least {n + 16} bytes, not {len(data)}")
        key, iv = self._response_key(data[:n])
        try:
            return self._aead(key).decrypt(iv, data[n:], b"")
        except InvalidTag:
            raise OhttpDecryptError("the encapsulated response does not open: tampered or not ours") from None


class RequestReceiver(_Context):
    """The gateway's side of one request, after :func:`decapsulate_request`: seals the response."""

    def __init__(self, enc: bytes, ctx: Any, aead_id: int, key_id: int) -> None:
        super().__init__(enc, ctx, aead_id)
        self.key_id = key_id

    def seal_response(self, response: bytes, *, nonce: bytes | None = None) -> bytes:
        """``response_nonce || ct``; ``nonce`` is for test vectors only."""
        nonce = secrets.token_bytes(self.nonce_size) if nonce is None else nonce
        if len(nonce) != self.nonce_size:
            raise ValueError(f"the response nonce is {self.nonce_size} bytes")
        key, iv = self._response_key(nonce)
        return nonce + self._aead(key).encrypt(iv, response, b"")


def encapsulate_request(config: KeyConfig, request: bytes, suite: tuple[int, int] | None = None, *,
                        ephemeral: x25519.X25519PrivateKey | None = None) -> tuple[bytes, RequestSender]:
    """Seal ``request`` (Binary HTTP bytes) to ``config``: (encapsulated request, the context for the answer)."""
    sender = RequestSender(config, suite, ephemeral=ephemeral)
    return sender.seal(request), sender


def peek_key_id(data: bytes) -> int:
    if len(data) < _HDR:
        raise OhttpMalformedError(f"an encapsulated request is at least {_HDR + _NPK + 16} bytes")
    return data[0]


def decapsulate_request(keys: Sequence[KeyPair], data: bytes, *,
                        max_bytes: int = 1 << 20) -> tuple[bytes, RequestReceiver]:
    """Open an encapsulated request with the gateway's key for its key id: (Binary HTTP bytes, the context)."""
    if len(data) > max_bytes:
        raise OhttpMalformedError(f"the encapsulated request is over {max_bytes} bytes")
    if len(data) < _HDR + _NPK + 16:
        raise OhttpMalformedError(f"an encapsulated request is at least {_HDR + _NPK + 16} bytes, not {len(data)}")
    key_id, kem_id, kdf_id, aead_id = struct.unpack(">BHHH", data[:_HDR])
    pair = next((k for k in keys if k.key_id == key_id), None)
    if pair is None:
        raise OhttpUnknownKeyError(f"unknown key id {key_id}")
    if kem_id != KEM_X25519 or (kdf_id, aead_id) not in pair.suites:
        raise OhttpSuiteError(f"key {key_id} does not offer KEM 0x{kem_id:04x} / KDF 0x{kdf_id:04x} / "
                              f"AEAD 0x{aead_id:04x}")
    h = _hpke()
    enc, ct = data[_HDR:_HDR + _NPK], data[_HDR + _NPK:]
    try:
        ctx = _suite(kdf_id, aead_id).create_recipient_context(
            enc, _pyca_key(h, pair.private_key), info=request_info(key_id, kdf_id, aead_id))
        plain = bytes(ctx.open(ct, b""))
    except (h.OpenError, ValueError) as exc:  # a low-order enc point fails the DH: ValueError
        raise OhttpDecryptError(f"the encapsulated request does not open: {type(exc).__name__}") from None
    except h.PyHPKEError as exc:
        raise OhttpDecryptError(f"the encapsulated request does not open: {type(exc).__name__}") from None
    return plain, RequestReceiver(bytes(enc), ctx, aead_id, key_id)


# --- Binary HTTP, known-length messages (RFC 9292) ----------------------------------------------------------------
Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class BhttpLimits:
    max_fields: int = 64
    max_field_bytes: int = 16 * 1024  # one name or value
    max_section_bytes: int = 64 * 1024
    max_content_bytes: int = 4 * 1024 * 1024
    max_informational: int = 8


@dataclass(frozen=True)
class BhttpRequest:
    method: bytes
    path: bytes
    scheme: bytes = b"https"
    authority: bytes = b""
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def encode(self) -> bytes:
        out = [encode_varint(0)] + [_vbytes(x) for x in (self.method, self.scheme, self.authority, self.path)]
        return b"".join([*out, _section(self.headers), _vbytes(self.content), _section(self.trailers)])

    @classmethod
    def parse(cls, data: bytes, limits: BhttpLimits = BhttpLimits()) -> BhttpRequest:
        r = _Reader(bytes(data))
        if r.varint("framing indicator") != 0:
            raise OhttpMalformedError("not a known-length Binary HTTP request (framing indicator 0)")
        method, scheme, authority, path = (r.take(r.varint(w), w) for w in ("method", "scheme", "authority", "path"))
        if not method or not _is_token(method):
            raise OhttpMalformedError("the request method is not an HTTP token")
        if not path.startswith(b"/") or any(c < 0x21 or c > 0x7E for c in path):
            raise OhttpMalformedError("the request path is not an origin-form path")
        headers, content, trailers = _rest(r, limits)
        return cls(method, path, scheme, authority, headers, content, trailers)


@dataclass(frozen=True)
class BhttpResponse:
    status: int
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def encode(self) -> bytes:
        return b"".join([encode_varint(1), encode_varint(self.status), _section(self.headers),
                         _vbytes(self.content), _section(self.trailers)])

    @classmethod
    def parse(cls, data: bytes, limits: BhttpLimits = BhttpLimits()) -> BhttpResponse:
        r = _Reader(bytes(data))
        if r.varint("framing indicator") != 1:
            raise OhttpMalformedError("not a known-length Binary HTTP response (framing indicator 1)")
        for _ in range(limits.max_informational + 1):
            status = r.varint("status")
            if not 100 <= status <= 599:
                raise OhttpMalformedError(f"status {status} is not 100-599")
            if status >= 200:
                break
            _fields(r, limits)  # an informational response's fields: read and dropped
        else:
            raise OhttpMalformedError(f"more than {limits.max_informational} informational responses")
        headers, content, trailers = _rest(r, limits)
        return cls(status, headers, content, trailers)


def _vbytes(b: bytes) -> bytes:
    return encode_varint(len(b)) + b


def _section(fields: Fields) -> bytes:
    return _vbytes(b"".join(_vbytes(n) + _vbytes(v) for n, v in fields))


def _is_token(b: bytes) -> bool:
    return all(chr(c).isalnum() or chr(c) in "!#$%&'*+-.^_`|~" for c in b) and all(c < 0x80 for c in b)


def _fields(r: _Reader, limits: BhttpLimits) -> Fields:
    size = r.varint("field section length")
    if size > limits.max_section_bytes:
        raise OhttpMalformedError(f"a field section of {size} bytes is over {limits.max_section_bytes}")
    s, out = _Reader(r.take(size, "field section")), list[tuple[bytes, bytes]]()
    while s.left:
        if len(out) >= limits.max_fields:
            raise OhttpMalformedError(f"more than {limits.max_fields} fields")
        name = s.take(s.varint("field name length"), "field name")
        value = s.take(s.varint("field value length"), "field value")
        if not name or not _is_token(name) or name != name.lower():
            raise OhttpMalformedError("a field name is not a lowercase HTTP token")
        if len(value) > limits.max_field_bytes or any(c in b"\r\n\x00" for c in value):
            raise OhttpMalformedError("a field value is too long or holds CR, LF or NUL")
        out.append((name, value))
    return tuple(out)


def _rest(r: _Reader, limits: BhttpLimits) -> tuple[Fields, bytes, Fields]:
    """Header section, content and trailer section; RFC 9292 §3.8: trailing empty sections may be truncated away,
    and what follows the message must be zero padding."""
    headers: Fields = _fields(r, limits) if r.left else ()
    content = b""
    if r.left:
        size = r.varint("content length")
        if size > limits.max_content_bytes:
            raise OhttpMalformedError(f"content of {size} bytes is over {limits.max_content_bytes}")
        content = r.take(size, "content")
    trailers: Fields = _fields(r, limits) if r.left else ()
    if any(r.take(r.left, "padding")):
        raise OhttpMalformedError("bytes after the message that are not zero padding")
    return headers, content, trailers


# --- the client assertion inside the encapsulated request ---------------------------------------------------------
def assertion_transcript(enc: bytes, time_ms: int, method: bytes, path: bytes, content_type: bytes,
                         body: bytes) -> bytes:
    """What the client signs: domain, then length-prefixed fields, binding this encapsulation (``enc``)."""
    parts = [enc, struct.pack(">Q", time_ms), method, path, content_type, hashlib.sha256(body).digest()]
    return _ASSERTION_DOMAIN + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise InputError(f"cannot sign with a {type(key).__name__}: use an ECDSA P-256 or Ed25519 key")


def _verify(public: Any, signature: bytes, data: bytes) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
    else:
        raise InvalidSignature


def signed_request(sender: RequestSender, method: str, path: str, body: bytes, *, cert_der: bytes, key: Any,
                   content_type: str = "application/json", authority: str = "", now_ms: int | None = None,
                   extra_headers: Fields = ()) -> BhttpRequest:
    """The inner request, carrying the client's certificate and its signature over this encapsulation."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    m, p, ctype = method.upper().encode(), path.encode(), content_type.encode()
    sig = _sign(key, assertion_transcript(sender.enc, ts, m, p, ctype, body))
    headers = ((b"content-type", ctype), *extra_headers, (CERT_HEADER, base64.b64encode(cert_der)),
               (TIME_HEADER, str(ts).encode()), (SIGNATURE_HEADER, base64.b64encode(sig)))
    return BhttpRequest(m, p, authority=authority.encode(), headers=headers, content=body)


def _b64(value: bytes | None, what: str) -> bytes:
    if value is None:
        raise OhttpIdentityError(f"the request carries no {what}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise OhttpIdentityError(f"the {what} is not base64") from None


def _check_issued(cert: x509.Certificate, cas: Sequence[x509.Certificate], purpose: x509.ObjectIdentifier,
                  now: datetime) -> None:
    """The certificate is directly issued by one of ``cas``, within its validity, and for ``purpose``."""
    for ca in cas:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        break
    else:
        raise OhttpIdentityError("the certificate is not issued by this server's CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise OhttpIdentityError("the certificate is not valid now (expired or not yet valid)")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if purpose not in eku:
        raise OhttpIdentityError("the certificate is not for this purpose (extended key usage)")


def verify_assertion(request: BhttpRequest, enc: bytes, cas: Sequence[x509.Certificate], *,
                     now_ms: int | None = None) -> tuple[Identity, int]:
    """(the verified inner identity, its timestamp) from the request's client assertion, bound to ``enc``. The
    caller checks the time window, replay and revocation (its CRL is live)."""
    from edgeshield.transport._pki import identity_from_der

    der = _b64(request.header(CERT_HEADER), "client certificate")
    sig = _b64(request.header(SIGNATURE_HEADER), "client signature")
    raw_ts = request.header(TIME_HEADER)
    if raw_ts is None or not raw_ts.isdigit() or len(raw_ts) > 16:
        raise OhttpIdentityError("the request carries no valid client timestamp")
    ts = int(raw_ts)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise OhttpIdentityError("the client certificate is not DER X.509") from None
    now = datetime.now(UTC) if now_ms is None else datetime.fromtimestamp(now_ms / 1000, UTC)
    _check_issued(cert, cas, ExtendedKeyUsageOID.CLIENT_AUTH, now)
    transcript = assertion_transcript(enc, ts, request.method, request.path, request.header(b"content-type") or b"",
                                      request.content)
    try:
        _verify(cert.public_key(), sig, transcript)
    except (InvalidSignature, ValueError):
        raise OhttpIdentityError("the client signature does not verify for this request") from None
    try:
        return identity_from_der(der), ts
    except EdgeShieldError as exc:
        raise OhttpIdentityError(str(exc)) from None


@dataclass
class ReplayGuard:
    """Refuses an encapsulation seen before and any timestamp outside [max(now − window, started), now + skew].

    ``enc`` values are kept for as long as their timestamps can still be accepted (at most window + skew after
    they arrived), in arrival order, so eviction is a pop from the front; at most ``max_entries`` at once (over
    that, new requests are refused rather than old entries forgotten). ``started``: a restart empties the memory,
    and this lower bound keeps what was accepted before it from being accepted again.
    """

    window_s: float = 30.0
    skew_s: float = 2.0
    max_entries: int = 100_000
    started: float = field(default_factory=time.time)
    _seen: OrderedDict[bytes, float] = field(default_factory=OrderedDict, repr=False)

    def check(self, enc: bytes, ts_ms: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        ts = ts_ms / 1000
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest + self.window_s + self.skew_s >= now:
                break
            self._seen.popitem(last=False)
        if ts < max(now - self.window_s, self.started):
            raise OhttpIdentityError("the request's timestamp is outside the gateway's window (too old, or from "
                                     "before the gateway started)")
        if ts > now + self.skew_s:
            raise OhttpIdentityError("the request's timestamp is in the future")
        if enc in self._seen:
            raise OhttpReplayError("this encapsulated request was already accepted (replay)")
        if len(self._seen) >= self.max_entries:
            raise OhttpError("the gateway's replay memory is full: retry later")
        self._seen[enc] = now

    def __len__(self) -> int:
        return len(self._seen)


# --- the signed key configuration ---------------------------------------------------------------------------------
def sign_key_configs(keys: bytes, key: Any) -> bytes:
    """Sign ``application/ohttp-keys`` bytes with the gateway's TLS private key (domain-separated)."""
    return _sign(key, _KEYS_DOMAIN + keys)


def verify_key_configs(keys: bytes, signature: bytes, gateway_cert_der: bytes, cas: Sequence[x509.Certificate], *,
                       gateway_name: str | None = None) -> list[KeyConfig]:
    """Check the key configurations are signed by a gateway certificate our CA issued for serverAuth (and, if
    given, whose CN is ``gateway_name``); a relay that substitutes its own keys fails here."""
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_der_x509_certificate(gateway_cert_der)
        _check_issued(cert, cas, ExtendedKeyUsageOID.SERVER_AUTH, datetime.now(UTC))
        if gateway_name is not None:
            cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
            if cns != [gateway_name]:
                raise OhttpIdentityError(f"the gateway certificate names {cns}, not {gateway_name!r}")
        _verify(cert.public_key(), signature, _KEYS_DOMAIN + keys)
    except (ValueError, InvalidSignature, OhttpIdentityError) as exc:
        raise OhttpKeyConfigError(f"the OHTTP key configuration is not the gateway's: {str(exc) or 'bad signature'}") \
            from None
    return parse_key_configs(keys)


def load_cas(ca: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The CA certificates of a CA directory (its ca.crt) or a PEM file."""
    p = Path(ca)
    p = p / "ca.crt" if p.is_dir() else p
    return x509.load_pem_x509_certificates(check_readable_file(p, what="CA certificate").read_bytes())


def load_signing_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Any:
    return serialization.load_pem_private_key(check_readable_file(path, what="private key").read_bytes(), passphrase)
