"""An independent reader for EdgeShield bundle format v1, written from docs/bundle-format.md alone.

The reader below (everything above the tests) uses no EdgeShield code: only ``cryptography`` (ECDSA, HPKE,
AES-GCM), ``hashlib``, ``json``, ``struct`` and ``base64``. EdgeShield itself is used only to MAKE the bundles
under test (keys, ``bundles.protect``) and to find the original digits model, so these tests check that the
specification is complete and that the implementation follows it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import edgeshield  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)
from edgeshield import bundles, keys, models

pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")


# ================================================================================================================
# The independent reader (spec: docs/bundle-format.md)
# ================================================================================================================
MAGIC = b"\x89ESB\r\n\x1a\n"
PREFIX_SIZE = 14
MAX_MANIFEST_SIZE = 1 << 20
MAX_SIGNATURE_SIZE = 256
SIGNING_CONTEXT = b"EdgeShield bundle signature v1\x00"  # 31 bytes
HPKE_INFO_PREFIX = b"EdgeShield bundle v1 data key\x00"  # 30 bytes, then the 16 raw bundle_id bytes
KEY_COMMITMENT_CONTEXT = b"EdgeShield data key commitment v1\x00"  # 34 bytes, then bundle_id, then the data key
TAG = 16
WRAPPED_KEY_SIZE = 80
WEIGHTS_FILE = "edgeshield.weights"
TOP_LEVEL_FIELDS = {
    "aead", "bundle_id", "chunk_size", "created", "format", "format_version", "image", "key_wrap", "metadata",
    "model_format", "model_sha256", "model_size", "model_version", "payload_sha256", "payload_size",
    "data_key_commitment",
    "plaintext_sha256", "plaintext_size", "recipients", "signer_key_id",
}  # fmt: skip


class ReaderError(Exception):
    """Rejection by the independent reader; ``kind`` names the spec's error class."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass
class Parsed:
    prefix: bytes
    manifest_raw: bytes
    signature: bytes
    payload: bytes


def spec_key_id(public_key: Any) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def parse_container(data: bytes) -> Parsed:
    if len(data) == 0:
        raise ReaderError("NotABundle", "empty file")
    if data[:8] != MAGIC[: len(data[:8])]:
        raise ReaderError("NotABundle", "bad magic")
    if len(data) < PREFIX_SIZE:
        raise ReaderError("Truncated", "header")
    version, m_len = struct.unpack(">HI", data[8:14])
    if version != 1:
        raise ReaderError("UnsupportedFormatVersion", str(version))
    if not 1 <= m_len <= MAX_MANIFEST_SIZE:
        raise ReaderError("Malformed", "manifest length")
    if PREFIX_SIZE + m_len + 2 > len(data):
        raise ReaderError("Truncated", "manifest")
    manifest_raw = data[14 : 14 + m_len]
    (s_len,) = struct.unpack(">H", data[14 + m_len : 16 + m_len])
    if not 1 <= s_len <= MAX_SIGNATURE_SIZE:
        raise ReaderError("Malformed", "signature length")
    sig_end = 16 + m_len + s_len
    if sig_end > len(data):
        raise ReaderError("Truncated", "signature")
    return Parsed(data[:14], manifest_raw, data[16 + m_len : sig_end], data[sig_end:])


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def parse_manifest(raw: bytes) -> dict[str, Any]:
    try:
        m = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReaderError("Malformed", f"not JSON: {exc}") from None
    if not isinstance(m, dict):
        raise ReaderError("Malformed", "not an object")
    try:
        if canonical(m) != raw:
            raise ReaderError("Malformed", "not canonical")
    except ValueError:
        raise ReaderError("Malformed", "non-finite number") from None
    if set(m) != TOP_LEVEL_FIELDS:
        raise ReaderError("Malformed", "wrong field set")
    if m["format"] != "edgeshield.bundle":
        raise ReaderError("Malformed", "format")
    if m["format_version"] != 1:
        raise ReaderError("UnsupportedFormatVersion", "manifest")
    if m["aead"] != "AES-256-GCM-STREAM-v1" or m["key_wrap"] != "HPKE-Base/DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM":
        raise ReaderError("Malformed", "suite")
    if m["model_format"] != "onnx":
        raise ReaderError("Malformed", "model format")
    for name in ("chunk_size", "plaintext_size", "payload_size", "model_size", "model_version"):
        if type(m[name]) is not int or m[name] < 0:
            raise ReaderError("Malformed", name)
    bid = m["bundle_id"]
    if not (isinstance(bid, str) and len(bid) == 32 and all(c in "0123456789abcdef" for c in bid)):
        raise ReaderError("Malformed", "bundle_id")
    if not 16 <= m["chunk_size"] <= 64 * 1024 * 1024:
        raise ReaderError("Malformed", "chunk size")
    if m["payload_size"] != m["plaintext_size"] + TAG * chunk_count(m["plaintext_size"], m["chunk_size"]):
        raise ReaderError("Malformed", "payload size")
    img = m["image"]
    if img["weights_location"] != WEIGHTS_FILE:
        raise ReaderError("Malformed", "weights location")
    if not 0 < img["graph_size"] <= img["weights_offset"] or img["weights_offset"] + img["weights_size"] != m["plaintext_size"]:
        raise ReaderError("Malformed", "image layout")
    ids = [r["key_id"] for r in m["recipients"]]
    if not ids or len(set(ids)) != len(ids):
        raise ReaderError("Malformed", "recipients")
    return m


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_size // chunk_size))


def sealed_chunks(payload: bytes, plaintext_size: int, chunk_size: int) -> list[bytes]:
    """Cut the payload into sealed chunks (ciphertext || tag) by the spec's chunking rule."""
    n = chunk_count(plaintext_size, chunk_size)
    out = []
    for i in range(n):
        start = i * chunk_size
        length = min(chunk_size, plaintext_size - start)
        out.append(payload[start + i * TAG : start + i * TAG + length + TAG])
    return out


def stream_nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def decrypt_stream(data_key: bytes, bundle_id: bytes, chunks: list[bytes]) -> bytes:
    aead = AESGCM(data_key)
    try:
        return b"".join(aead.decrypt(stream_nonce(i, i == len(chunks) - 1), c, bundle_id) for i, c in enumerate(chunks))
    except InvalidTag:
        raise ReaderError("ChunkAuthentication", "a chunk failed authentication") from None


def gateway_verify(data: bytes, owner: ec.EllipticCurvePublicKey) -> tuple[Parsed, dict[str, Any]]:
    """Everything a gateway checks without a device key."""
    p = parse_container(data)
    try:
        owner.verify(p.signature, SIGNING_CONTEXT + p.prefix + p.manifest_raw, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ReaderError("Signature", "bad signature") from None
    m = parse_manifest(p.manifest_raw)
    if m["signer_key_id"] != spec_key_id(owner):
        raise ReaderError("WrongOwnerKey", "signer")
    if len(p.payload) < m["payload_size"]:
        raise ReaderError("Truncated", "payload")
    if len(p.payload) > m["payload_size"]:
        raise ReaderError("TrailingData", "payload")
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    digest = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    if not hmac.compare_digest(digest, m["payload_sha256"]):
        raise ReaderError("PayloadDigest", "payload digest mismatch")
    return p, m


def device_open(data: bytes, owner: ec.EllipticCurvePublicKey, device: x25519.X25519PrivateKey) -> tuple[dict[str, Any], bytes]:
    """Gateway checks, then unwrap the data key and decrypt: returns (manifest, plaintext image)."""
    p, m = gateway_verify(data, owner)
    my_id = spec_key_id(device.public_key())
    stanza = next((r for r in m["recipients"] if r["key_id"] == my_id), None)
    if stanza is None:
        raise ReaderError("NotARecipient", my_id)
    wrapped = base64.b64decode(stanza["wrapped_key"], validate=True)
    if len(wrapped) != WRAPPED_KEY_SIZE:
        raise ReaderError("Malformed", "wrapped key size")
    bundle_id = bytes.fromhex(m["bundle_id"])
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    try:
        data_key = suite.decrypt(wrapped, device, info=HPKE_INFO_PREFIX + bundle_id)  # enc(32) || ct(48), aad empty
    except (InvalidTag, ValueError):
        raise ReaderError("KeyUnwrap", "cannot unwrap") from None
    assert len(data_key) == 32
    commitment = hashlib.sha256(KEY_COMMITMENT_CONTEXT + bundle_id + data_key).hexdigest()
    if not hmac.compare_digest(commitment, m["data_key_commitment"]):
        raise ReaderError("KeyCommitment", "unwrapped data key does not match the manifest's commitment")
    plaintext = decrypt_stream(data_key, bundle_id, sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"]))
    assert len(plaintext) == m["plaintext_size"]
    return m, plaintext


def write_onnx(manifest: dict[str, Any], plaintext: bytes, directory: Path) -> Path:
    """Rebuild an ordinary ONNX model: the graph file plus ``edgeshield.weights`` beside it."""
    img = manifest["image"]
    graph_path = directory / "model.onnx"
    graph_path.write_bytes(plaintext[: img["graph_size"]])
    (directory / WEIGHTS_FILE).write_bytes(plaintext[img["weights_offset"] : img["weights_offset"] + img["weights_size"]])
    return graph_path


# ================================================================================================================
# Tests
# ================================================================================================================
@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reader-keys")
    keys.init_keys(d)
    return d


@pytest.fixture(scope="module")
def owner_pub(keydir: Path) -> ec.EllipticCurvePublicKey:
    return keys.load_owner_public_key(keydir / "owner.pub")


@pytest.fixture(scope="module")
def device_key(keydir: Path) -> x25519.X25519PrivateKey:
    return keys.load_device_private_key(keydir / "device.key")


def _make_bundle(keydir: Path, out: Path, chunk_size: int) -> bytes:
    bundles.protect(
        models.digits_model_path(),
        out,
        signing_key=keys.load_owner_private_key(keydir / "owner.key"),
        recipients=[keys.load_device_public_key(keydir / "device.pub")],
        model_version=7,
        metadata={"name": "digits"},
        chunk_size=chunk_size,
    )
    return out.read_bytes()


@pytest.fixture(scope="module")
def small_chunk_bundle(keydir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _make_bundle(keydir, tmp_path_factory.mktemp("reader-bundle") / "small.esb", 4096)


@pytest.mark.parametrize("chunk_size", [4096, 1024 * 1024])
def test_independent_reader_runs_the_model(
    keydir: Path, owner_pub: Any, device_key: Any, tmp_path: Path, chunk_size: int
) -> None:
    data = _make_bundle(keydir, tmp_path / "b.esb", chunk_size)
    manifest, plaintext = device_open(data, owner_pub, device_key)

    n = chunk_count(manifest["plaintext_size"], chunk_size)
    if chunk_size == 4096:
        assert n > 10  # many chunks, so chunk indices and the last flag really matter
    else:
        assert n == 1
    assert hashlib.sha256(plaintext).hexdigest() == manifest["plaintext_sha256"]
    assert manifest["model_version"] == 7 and manifest["metadata"] == {"name": "digits"}
    assert manifest["model_sha256"] == hashlib.sha256(models.digits_model_path().read_bytes()).hexdigest()
    img = manifest["image"]
    assert img["weights_offset"] % 64 == 0 and img["weights_size"] > 0
    assert plaintext[img["graph_size"] : img["weights_offset"]] == bytes(img["weights_offset"] - img["graph_size"])

    out_dir = tmp_path / "rebuilt"
    out_dir.mkdir()
    graph_path = write_onnx(manifest, plaintext, out_dir)
    x = models.load_digits_split().x_test[:20]
    rebuilt = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(models.digits_model_path()), providers=["CPUExecutionProvider"])
    got = rebuilt.run(None, {"input": x})
    want = original.run(None, {"input": x})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_independent_reader_layout_and_signed_bytes(small_chunk_bundle: bytes, owner_pub: Any) -> None:
    data = small_chunk_bundle
    assert data[:8] == bytes.fromhex("894553420d0a1a0a")
    assert data[8:10] == b"\x00\x01"
    p, m = gateway_verify(data, owner_pub)
    assert struct.unpack(">I", data[10:14])[0] == len(p.manifest_raw)
    assert len(p.payload) == m["payload_size"] == m["plaintext_size"] + 16 * chunk_count(m["plaintext_size"], 4096)
    assert m["chunk_size"] == 4096
    for r in m["recipients"]:
        assert len(r["wrapped_key"]) == 108 and len(base64.b64decode(r["wrapped_key"])) == WRAPPED_KEY_SIZE
    # The signature covers the context, the 14-byte prefix and the manifest: any change to the prefix breaks it.
    with pytest.raises(InvalidSignature):
        owner_pub.verify(p.signature, SIGNING_CONTEXT + p.manifest_raw, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        owner_pub.verify(p.signature, p.prefix + p.manifest_raw, ec.ECDSA(hashes.SHA256()))


def test_independent_reader_rejects_flipped_payload_byte(small_chunk_bundle: bytes, owner_pub: Any, device_key: Any) -> None:
    data = bytearray(small_chunk_bundle)
    data[len(data) - 5000] ^= 0x01  # inside the payload, a few chunks before the end
    with pytest.raises(ReaderError) as exc:
        gateway_verify(bytes(data), owner_pub)
    assert exc.value.kind == "PayloadDigest"
    with pytest.raises(ReaderError) as exc:
        device_open(bytes(data), owner_pub, device_key)
    assert exc.value.kind == "PayloadDigest"


def test_independent_reader_rejects_missing_last_chunk(small_chunk_bundle: bytes, owner_pub: Any, device_key: Any) -> None:
    p, m = gateway_verify(small_chunk_bundle, owner_pub)
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    assert len(chunks) > 2
    cut = small_chunk_bundle[: len(small_chunk_bundle) - len(chunks[-1])]
    with pytest.raises(ReaderError) as exc:
        device_open(cut, owner_pub, device_key)
    assert exc.value.kind == "Truncated"
    # Even a stream decoder that ignored the signed sizes would notice: the new last chunk was sealed with last=0.
    key_stanza = m["recipients"][0]
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    bundle_id = bytes.fromhex(m["bundle_id"])
    data_key = suite.decrypt(base64.b64decode(key_stanza["wrapped_key"]), device_key, info=HPKE_INFO_PREFIX + bundle_id)
    assert len(decrypt_stream(data_key, bundle_id, chunks)) == m["plaintext_size"]
    with pytest.raises(ReaderError) as exc:
        decrypt_stream(data_key, bundle_id, chunks[:-1])
    assert exc.value.kind == "ChunkAuthentication"
    with pytest.raises(ReaderError):  # swapped chunks fail too: the index is in the nonce
        decrypt_stream(data_key, bundle_id, [chunks[1], chunks[0], *chunks[2:]])
    with pytest.raises(ReaderError):  # and so does another bundle id as associated data
        decrypt_stream(data_key, bytes(16), chunks)


def test_independent_reader_rejects_non_canonical_manifest(small_chunk_bundle: bytes, owner_pub: Any) -> None:
    p, _ = gateway_verify(small_chunk_bundle, owner_pub)
    m = json.loads(p.manifest_raw)
    assert parse_manifest(canonical(m)) == m
    for variant in (
        json.dumps(m, sort_keys=True, separators=(", ", ": ")).encode(),  # spaces
        json.dumps(dict(reversed(m.items())), separators=(",", ":")).encode(),  # keys not sorted
        p.manifest_raw + b"\n",  # trailing newline
        p.manifest_raw.replace(b'"model_version":7', b'"model_version":7.0'),  # float for an integer
    ):
        assert variant != p.manifest_raw
        with pytest.raises(ReaderError) as exc:
            parse_manifest(variant)
        assert exc.value.kind == "Malformed"


def test_independent_reader_rejects_other_owner_and_tampered_manifest(
    small_chunk_bundle: bytes, owner_pub: Any, tmp_path: Path
) -> None:
    keys.init_keys(tmp_path / "other")
    other = keys.load_owner_public_key(tmp_path / "other" / "owner.pub")
    with pytest.raises(ReaderError) as exc:
        gateway_verify(small_chunk_bundle, other)
    assert exc.value.kind == "Signature"
    tampered = small_chunk_bundle.replace(b'"model_version":7', b'"model_version":8', 1)
    assert tampered != small_chunk_bundle
    with pytest.raises(ReaderError) as exc:
        gateway_verify(tampered, owner_pub)
    assert exc.value.kind == "Signature"
