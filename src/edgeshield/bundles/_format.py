"""The bundle container: header encoding, the manifest, and the bytes the owner signs.

Layout (all integers big-endian; see docs/bundle-format.md for the full specification):

    magic            8   89 45 53 42 0D 0A 1A 0A   ("\\x89ESB\\r\\n\\x1a\\n")
    format version   2   u16 = 2 (writers; 1 is still read, see SUPPORTED_VERSIONS)
    manifest length  4   u32, 1..MAX_MANIFEST_SIZE
    manifest         M   canonical JSON (sorted keys, no spaces, ASCII)
    signature length 2   u16, 1..MAX_SIGNATURE_SIZE
    signature        S   DER ECDSA P-256 / SHA-256 over SIGNING_CONTEXT || bytes[0 : 14 + M]
    payload          P   sealed chunks (see _stream.py), exactly manifest.payload_size bytes, then end of file
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from edgeshield.bundles import _stream, _wrap
from edgeshield.errors import (
    MalformedBundleError,
    NotABundleError,
    TruncatedBundleError,
    UnsupportedFormatVersionError,
)

MAGIC = b"\x89ESB\r\n\x1a\n"
FORMAT_VERSION = 2
# Version 2 adds each recipient's per-chunk MAC tags (``chunk_macs``), which let a device authenticate every chunk
# before ONNX Runtime sees it, so decryption can stream into session creation; version 1 bundles still open.
SUPPORTED_VERSIONS = (1, 2)
FORMAT_NAME = "edgeshield.bundle"
SIGNING_CONTEXT = b"EdgeShield bundle signature v1\x00"
MAX_MANIFEST_SIZE = 1024 * 1024
MAX_SIGNATURE_SIZE = 256
PREFIX_SIZE = 8 + 2 + 4  # magic, version, manifest length
AEAD_NAME = "AES-256-GCM-STREAM-v1"
WEIGHTS_LOCATION = "edgeshield.weights"
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 1024
MAX_INT = 2**63 - 1
# All patterns are matched with fullmatch: no trailing newline, ASCII digits only.
_META_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_BUNDLE_ID = re.compile(r"[0-9a-f]{32}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_KEY_COMMITMENT_CONTEXT = b"EdgeShield data key commitment v1\x00"


def data_key_commitment(bundle_id: bytes, data_key: bytes) -> str:
    """Hash committing the manifest to one data key, so every recipient decrypts the same plaintext.

    AES-GCM is not key-committing: without this, a malicious owner could wrap different keys for different devices
    under which one ciphertext decrypts to different models. Revealing a hash of a random 256-bit key is safe.
    """
    return hashlib.sha256(_KEY_COMMITMENT_CONTEXT + bundle_id + data_key).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class Recipient:
    key_id: str
    wrapped_key: bytes
    payload_mac: str  # hex SHA-256 over the GMAC tags of the sealed chunks under this recipient's MAC key
    chunk_macs: bytes = b""  # version 2: those tags themselves, 16 bytes per chunk in order (empty in version 1)

    def to_dict(self) -> dict[str, str]:
        d = {
            "key_id": self.key_id,
            "payload_mac": self.payload_mac,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
        }
        if self.chunk_macs:
            d["chunk_macs"] = base64.b64encode(self.chunk_macs).decode()
        return d

    def chunk_mac(self, index: int) -> bytes:
        """The signed GMAC tag of sealed chunk ``index`` (version 2 only)."""
        return self.chunk_macs[index * _stream.TAG_SIZE : (index + 1) * _stream.TAG_SIZE]


@dataclass(frozen=True)
class Image:
    """Where the ONNX graph and its weights lie in the decrypted plaintext."""

    graph_size: int
    weights_offset: int
    weights_size: int
    weights_location: str = WEIGHTS_LOCATION


@dataclass(frozen=True)
class Manifest:
    """Everything the owner signs. Sizes and digests refer to the plaintext image and the sealed payload."""

    bundle_id: str
    created: str
    model_format: str
    model_version: int
    model_sha256: str
    model_size: int
    metadata: dict[str, str]
    signer_key_id: str
    chunk_size: int
    plaintext_size: int
    plaintext_sha256: str
    payload_size: int
    payload_sha256: str
    data_key_commitment: str
    recipients: tuple[Recipient, ...]
    image: Image
    aead: str = AEAD_NAME
    key_wrap: str = _wrap.SUITE_NAME
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def recipient_key_ids(self) -> list[str]:
        return [r.key_id for r in self.recipients]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["recipients"] = [r.to_dict() for r in self.recipients]
        return d

    def to_public_dict(self) -> dict[str, Any]:
        """The manifest as ``inspect`` shows it: wrapped keys reduced to their ids."""
        d = self.to_dict()
        d["recipients"] = [{"key_id": r.key_id} for r in self.recipients]
        return d

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())


_T = TypeVar("_T")


def _req(d: dict[str, Any], key: str, typ: type[_T], where: str = "manifest") -> _T:
    if key not in d:
        raise MalformedBundleError(f"{where} lacks field {key!r}")
    value = d[key]
    if typ is int and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT):
        raise MalformedBundleError(f"{where} field {key!r} must be an integer between 0 and 2**63-1")
    if not isinstance(value, typ):  # an int has passed the check above
        raise MalformedBundleError(f"{where} field {key!r} must be of type {typ.__name__}")
    return value


def _match(pattern: re.Pattern[str], value: str, name: str) -> str:
    if not pattern.fullmatch(value):
        raise MalformedBundleError(f"manifest field {name!r} is malformed")
    return value


def validate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise MalformedBundleError(f"at most {MAX_METADATA_ENTRIES} metadata entries are allowed")
    for k, v in metadata.items():
        if not isinstance(k, str) or not _META_KEY_RE.fullmatch(k):
            raise MalformedBundleError(f"metadata key {k!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE or not _is_unicode_text(v):
            raise MalformedBundleError(f"metadata value for {k!r} must be text of at most 1024 characters")
    return dict(metadata)


def _is_unicode_text(value: str) -> bool:
    try:
        value.encode("utf-8")  # rejects lone surrogates, which many JSON parsers refuse
    except UnicodeEncodeError:
        return False
    return True


def _exact_fields(d: dict[str, Any], expected: set[str], where: str) -> None:
    if set(d) != expected:
        raise MalformedBundleError(f"{where} has unexpected or missing fields: {sorted(set(d) ^ expected)}")


def decode_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes; they must be exactly the canonical encoding of what they contain."""
    try:
        d = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedBundleError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise MalformedBundleError("manifest is not a JSON object")
    try:
        if canonical_json(d) != raw:
            raise MalformedBundleError("manifest is not in canonical form")
    except ValueError:
        raise MalformedBundleError("manifest holds non-finite numbers") from None
    if _req(d, "format", str) != FORMAT_NAME:
        raise MalformedBundleError("manifest format name is wrong")
    version = _req(d, "format_version", int)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatVersionError(f"unsupported manifest format version {d['format_version']}")
    recipients = []
    for r in _req(d, "recipients", list):
        if not isinstance(r, dict):
            raise MalformedBundleError("manifest recipient entry is not an object")
        _exact_fields(r, _RECIPIENT_FIELDS[version], "recipient")
        kid = _match(KEY_ID_RE, _req(r, "key_id", str, "recipient"), "recipient key_id")
        try:
            wrapped = base64.b64decode(_req(r, "wrapped_key", str, "recipient"), validate=True)
        except binascii.Error:
            raise MalformedBundleError("recipient wrapped_key is not base64") from None
        if len(wrapped) != _wrap.WRAPPED_KEY_SIZE:
            raise MalformedBundleError("recipient wrapped_key has the wrong length")
        mac = _match(_HEX64, _req(r, "payload_mac", str, "recipient"), "recipient payload_mac")
        chunk_macs = b""
        if version >= 2:
            try:
                chunk_macs = base64.b64decode(_req(r, "chunk_macs", str, "recipient"), validate=True)
            except binascii.Error:
                raise MalformedBundleError("recipient chunk_macs is not base64") from None
            if not chunk_macs:
                raise MalformedBundleError("recipient chunk_macs is empty")
        recipients.append(Recipient(kid, wrapped, mac, chunk_macs))
    if not recipients:
        raise MalformedBundleError("manifest names no recipients")
    img = _req(d, "image", dict)
    _exact_fields(img, {"graph_size", "weights_offset", "weights_size", "weights_location"}, "manifest image")
    image = Image(
        graph_size=_req(img, "graph_size", int, "image"),
        weights_offset=_req(img, "weights_offset", int, "image"),
        weights_size=_req(img, "weights_size", int, "image"),
        weights_location=_req(img, "weights_location", str, "image"),
    )
    m = Manifest(
        bundle_id=_match(_BUNDLE_ID, _req(d, "bundle_id", str), "bundle_id"),
        created=_match(_DATE, _req(d, "created", str), "created"),
        model_format=_req(d, "model_format", str),
        model_version=_req(d, "model_version", int),
        model_sha256=_match(_HEX64, _req(d, "model_sha256", str), "model_sha256"),
        model_size=_req(d, "model_size", int),
        metadata=validate_metadata(_req(d, "metadata", dict)),
        signer_key_id=_match(KEY_ID_RE, _req(d, "signer_key_id", str), "signer_key_id"),
        chunk_size=_req(d, "chunk_size", int),
        plaintext_size=_req(d, "plaintext_size", int),
        plaintext_sha256=_match(_HEX64, _req(d, "plaintext_sha256", str), "plaintext_sha256"),
        payload_size=_req(d, "payload_size", int),
        payload_sha256=_match(_HEX64, _req(d, "payload_sha256", str), "payload_sha256"),
        data_key_commitment=_match(_HEX64, _req(d, "data_key_commitment", str), "data_key_commitment"),
        recipients=tuple(recipients),
        image=image,
        aead=_req(d, "aead", str),
        key_wrap=_req(d, "key_wrap", str),
        format_version=version,
    )
    _exact_fields(d, set(m.to_dict()), "manifest")
    _check_consistency(m)
    return m


def _check_consistency(m: Manifest) -> None:
    if m.model_format != "onnx":
        raise MalformedBundleError(f"unsupported model format {m.model_format!r}")
    if m.aead != AEAD_NAME or m.key_wrap != _wrap.SUITE_NAME:
        raise MalformedBundleError("manifest names an unsupported cipher suite")
    if not _stream.MIN_CHUNK_SIZE <= m.chunk_size <= _stream.MAX_CHUNK_SIZE:
        raise MalformedBundleError("manifest chunk size is out of range")
    if _stream.chunk_count(m.plaintext_size, m.chunk_size) > _stream.MAX_CHUNKS:
        raise MalformedBundleError("manifest declares too many chunks")
    if m.payload_size != _stream.payload_size(m.plaintext_size, m.chunk_size):
        raise MalformedBundleError("manifest payload size does not match its plaintext size")
    img = m.image
    if img.weights_location != WEIGHTS_LOCATION:
        raise MalformedBundleError("manifest weights location is unsupported")
    if (img.graph_size == 0 or img.graph_size > img.weights_offset
            or img.weights_offset + img.weights_size != m.plaintext_size):
        raise MalformedBundleError("manifest image layout does not match the plaintext size")
    if len({r.key_id for r in m.recipients}) != len(m.recipients):
        raise MalformedBundleError("manifest lists a recipient twice")
    if m.format_version >= 2:
        n = _stream.chunk_count(m.plaintext_size, m.chunk_size)
        for r in m.recipients:
            if len(r.chunk_macs) != _stream.TAG_SIZE * n:
                raise MalformedBundleError(f"recipient chunk_macs must hold {n} tags of {_stream.TAG_SIZE} bytes")
            # The payload MAC is the hash of these tags: one commitment, checkable chunk by chunk or at the end.
            if hashlib.sha256(r.chunk_macs).hexdigest() != r.payload_mac:
                raise MalformedBundleError("recipient chunk_macs do not hash to its payload_mac")


_RECIPIENT_FIELDS = {1: {"key_id", "payload_mac", "wrapped_key"},
                     2: {"chunk_macs", "key_id", "payload_mac", "wrapped_key"}}


@dataclass(frozen=True)
class Header:
    """The parsed head of a bundle file, before anything is trusted."""

    manifest_raw: bytes
    signature: bytes
    payload_offset: int
    version: int = FORMAT_VERSION


def encode_prefix(manifest_len: int, version: int = FORMAT_VERSION) -> bytes:
    return MAGIC + struct.pack(">HI", version, manifest_len)


def encode_header(manifest_raw: bytes, signature: bytes, version: int = FORMAT_VERSION) -> bytes:
    return encode_prefix(len(manifest_raw), version) + manifest_raw + struct.pack(">H", len(signature)) + signature


def signed_message(manifest_raw: bytes, version: int = FORMAT_VERSION) -> bytes:
    return SIGNING_CONTEXT + encode_prefix(len(manifest_raw), version) + manifest_raw


def parse_header(read_at: _stream.ReadAt, file_size: int) -> Header:
    """Parse magic, version, manifest and signature; raise a typed error for each way this can be broken."""
    if file_size == 0:
        raise NotABundleError("file is empty, not an EdgeShield bundle")
    head = read_at(0, PREFIX_SIZE)
    if head[: len(MAGIC)] != MAGIC[: len(head)] or len(head) < len(MAGIC):
        if head[: len(MAGIC)] == MAGIC[: len(head)]:
            raise TruncatedBundleError("bundle is truncated inside its magic bytes")
        raise NotABundleError("not an EdgeShield bundle (bad magic bytes)")
    if len(head) < PREFIX_SIZE:
        raise TruncatedBundleError("bundle is truncated inside its header")
    version, manifest_len = struct.unpack(">HI", head[8:PREFIX_SIZE])
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatVersionError(f"unsupported bundle format version {version} "
                                            f"(this build reads {', '.join(map(str, SUPPORTED_VERSIONS))})")
    if not 0 < manifest_len <= MAX_MANIFEST_SIZE:
        raise MalformedBundleError(f"manifest length {manifest_len} is out of range")
    if PREFIX_SIZE + manifest_len + 2 > file_size:
        raise TruncatedBundleError("bundle is truncated inside its manifest")
    manifest_raw = read_at(PREFIX_SIZE, manifest_len)
    (sig_len,) = struct.unpack(">H", read_at(PREFIX_SIZE + manifest_len, 2))
    if not 0 < sig_len <= MAX_SIGNATURE_SIZE:
        raise MalformedBundleError(f"signature length {sig_len} is out of range")
    sig_off = PREFIX_SIZE + manifest_len + 2
    if sig_off + sig_len > file_size:
        raise TruncatedBundleError("bundle is truncated inside its signature")
    return Header(manifest_raw, read_at(sig_off, sig_len), sig_off + sig_len, version)
