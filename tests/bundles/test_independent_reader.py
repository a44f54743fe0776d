"""An independent reader for EdgeShield bundle format v1, written from docs/bundle-format.md alone.

The reader below (everything above the tests) uses no EdgeShield code: only ``cryptography`` (ECDSA, HPKE,
AES-GCM, GMAC), ``hashlib``, ``json``, ``struct`` and ``base64``. EdgeShield itself is used only to MAKE the
bundles under test (keys, ``bundles.protect``), to find the original digits model and, in the tampering tests,
to check that the reference device reaches the same decision as this reader, so these tests check that the
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
SECRET_SIZE = 64  # what HPKE wraps per recipient: data key (32) || that recipient's payload MAC key (32)
WRAPPED_KEY_SIZE = 32 + SECRET_SIZE + TAG  # enc || AES-256-GCM(secret) = 112 bytes
WEIGHTS_FILE = "edgeshield.weights"
TOP_LEVEL_FIELDS = {
    "aead", "bundle_id", "chunk_size", "created", "format", "format_version", "image", "key_wrap", "metadata",
    "model_format", "model_sha256", "model_size", "model_version", "payload_sha256", "payload_size",
    "data_key_commitment",
    "plaintext_sha256", "plaintext_size", "recipients", "signer_key_id",
}  # fmt: skip
RECIPIENT_FIELDS = {"key_id", "payload_mac", "wrapped_key"}
RECIPIENT_FIELDS_V2 = RECIPIENT_FIELDS | {"chunk_macs"}  # section 4.2: version 2 adds the per-chunk MAC tags


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
    if version not in (1, 2):
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


def is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


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
    if m["format_version"] not in (1, 2):
        raise ReaderError("UnsupportedFormatVersion", "manifest")
    if (m["aead"] != "AES-256-GCM-STREAM-v1"
            or m["key_wrap"] != "HPKE-Base/DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"):
        raise ReaderError("Malformed", "suite")
    if m["model_format"] != "onnx":
        raise ReaderError("Malformed", "model format")
    for name in ("chunk_size", "plaintext_size", "payload_size", "model_size", "model_version"):
        if type(m[name]) is not int or m[name] < 0:
            raise ReaderError("Malformed", name)
    if not is_hex(m["bundle_id"], 32):
        raise ReaderError("Malformed", "bundle_id")
    if not 16 <= m["chunk_size"] <= 64 * 1024 * 1024:
        raise ReaderError("Malformed", "chunk size")
    if m["payload_size"] != m["plaintext_size"] + TAG * chunk_count(m["plaintext_size"], m["chunk_size"]):
        raise ReaderError("Malformed", "payload size")
    img = m["image"]
    if img["weights_location"] != WEIGHTS_FILE:
        raise ReaderError("Malformed", "weights location")
    if (not 0 < img["graph_size"] <= img["weights_offset"]
            or img["weights_offset"] + img["weights_size"] != m["plaintext_size"]):
        raise ReaderError("Malformed", "image layout")
    recipients = m["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise ReaderError("Malformed", "recipients")
    for r in recipients:
        if not isinstance(r, dict) or set(r) != (RECIPIENT_FIELDS_V2 if m["format_version"] == 2 else RECIPIENT_FIELDS):
            raise ReaderError("Malformed", "recipient fields")
        if m["format_version"] == 2:
            try:
                tags = base64.b64decode(r["chunk_macs"], validate=True)
            except (ValueError, TypeError):
                raise ReaderError("Malformed", "chunk_macs is not base64") from None
            if len(tags) != TAG * chunk_count(m["plaintext_size"], m["chunk_size"]):
                raise ReaderError("Malformed", "chunk_macs length")
            if hashlib.sha256(tags).hexdigest() != r["payload_mac"]:
                raise ReaderError("Malformed", "chunk_macs do not hash to payload_mac")
        if not is_hex(r["key_id"], 16) or not is_hex(r["payload_mac"], 64) or not isinstance(r["wrapped_key"], str):
            raise ReaderError("Malformed", "recipient values")
        try:
            wrapped = base64.b64decode(r["wrapped_key"], validate=True)
        except ValueError:
            raise ReaderError("Malformed", "wrapped key is not base64") from None
        if len(wrapped) != WRAPPED_KEY_SIZE:
            raise ReaderError("Malformed", "wrapped key size")
    ids = [r["key_id"] for r in recipients]
    if len(set(ids)) != len(ids):
        raise ReaderError("Malformed", "duplicate recipients")
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


def payload_digest(chunks: list[bytes]) -> str:
    """Section 8.1: SHA-256 over the SHA-256 digests of the sealed chunks."""
    return hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()


def payload_mac(mac_key: bytes, chunks: list[bytes]) -> str:
    """Section 8.2: SHA-256 over the GMAC tags (AES-GCM, empty plaintext, aad = sealed chunk, same nonce)."""
    gmac = AESGCM(mac_key)
    tags = [gmac.encrypt(stream_nonce(i, i == len(chunks) - 1), b"", c) for i, c in enumerate(chunks)]
    assert all(len(tag) == TAG for tag in tags)
    return hashlib.sha256(b"".join(tags)).hexdigest()


def unwrap_secret(stanza: dict[str, Any], device: x25519.X25519PrivateKey, bundle_id: bytes) -> tuple[bytes, bytes]:
    """Section 6: HPKE-open the wrapped secret and split it into (data key, this device's MAC key)."""
    wrapped = base64.b64decode(stanza["wrapped_key"], validate=True)
    if len(wrapped) != WRAPPED_KEY_SIZE:
        raise ReaderError("Malformed", "wrapped key size")
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    try:
        secret = suite.decrypt(wrapped, device, info=HPKE_INFO_PREFIX + bundle_id)  # enc(32) || ct(80), aad empty
    except (InvalidTag, ValueError):
        raise ReaderError("KeyUnwrap", "cannot unwrap") from None
    if len(secret) != SECRET_SIZE:
        raise ReaderError("KeyUnwrap", "wrapped secret has the wrong size")
    return secret[:32], secret[32:]


def authenticate(data: bytes, owner: ec.EllipticCurvePublicKey) -> tuple[Parsed, dict[str, Any]]:
    """Steps 1-13: container, signature, manifest, signer, payload length."""
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
    return p, m


def check_payload_digest(p: Parsed, m: dict[str, Any]) -> None:
    """Step 14."""
    digest = payload_digest(sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"]))
    if not hmac.compare_digest(digest, m["payload_sha256"]):
        raise ReaderError("PayloadDigest", "payload digest mismatch")


def gateway_verify(data: bytes, owner: ec.EllipticCurvePublicKey) -> tuple[Parsed, dict[str, Any]]:
    """Everything a gateway checks without a device key: steps 1-14."""
    p, m = authenticate(data, owner)
    check_payload_digest(p, m)
    return p, m


def device_open(
    data: bytes, owner: ec.EllipticCurvePublicKey, device: x25519.X25519PrivateKey, *, check_digest: bool = False
) -> tuple[dict[str, Any], bytes]:
    """Steps 1-13 and 15-18 (step 14 only if asked: MAY): returns (manifest, plaintext image)."""
    p, m = authenticate(data, owner)
    if m["format_version"] != struct.unpack(">H", p.prefix[8:10])[0]:
        raise ReaderError("Malformed", "manifest and header versions differ")
    my_id = spec_key_id(device.public_key())
    stanza = next((r for r in m["recipients"] if r["key_id"] == my_id), None)
    if stanza is None:
        raise ReaderError("NotARecipient", my_id)
    bundle_id = bytes.fromhex(m["bundle_id"])
    data_key, mac_key = unwrap_secret(stanza, device, bundle_id)
    commitment = hashlib.sha256(KEY_COMMITMENT_CONTEXT + bundle_id + data_key).hexdigest()  # the data key only
    if not hmac.compare_digest(commitment, m["data_key_commitment"]):
        raise ReaderError("KeyCommitment", "unwrapped data key does not match the manifest's commitment")
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    if m["format_version"] == 2:  # section 8.3: every chunk's own tag, before anything of it is used
        tags = base64.b64decode(stanza["chunk_macs"])
        gmac = AESGCM(mac_key)
        for i, c in enumerate(chunks):
            if not hmac.compare_digest(gmac.encrypt(stream_nonce(i, i == len(chunks) - 1), b"", c),
                                       tags[i * TAG : (i + 1) * TAG]):
                raise ReaderError("ChunkAuthentication", f"chunk {i} does not match this device's chunk MAC")
    plaintext = decrypt_stream(data_key, bundle_id, chunks)
    assert len(plaintext) == m["plaintext_size"]
    if not hmac.compare_digest(payload_mac(mac_key, chunks), stanza["payload_mac"]):
        raise ReaderError("PayloadDigest", "payload MAC mismatch for this device")
    if check_digest:
        check_payload_digest(p, m)
    return m, plaintext


def write_container(manifest: dict[str, Any], payload: bytes, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """Sections 3-5 from the writer's side: canonical manifest, signed prefix and manifest, then the payload."""
    raw = canonical(manifest)
    prefix = MAGIC + struct.pack(">HI", 1, len(raw))
    signature = signer.sign(SIGNING_CONTEXT + prefix + raw, ec.ECDSA(hashes.SHA256()))
    return prefix + raw + struct.pack(">H", len(signature)) + signature + payload


def write_onnx(manifest: dict[str, Any], plaintext: bytes, directory: Path) -> Path:
    """Rebuild an ordinary ONNX model: the graph file plus ``edgeshield.weights`` beside it."""
    img = manifest["image"]
    graph_path = directory / "model.onnx"
    graph_path.write_bytes(plaintext[: img["graph_size"]])
    start = img["weights_offset"]
    (directory / WEIGHTS_FILE).write_bytes(plaintext[start : start + img["weights_size"]])
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


@pytest.fixture(scope="module")
def device_b_key(keydir: Path) -> x25519.X25519PrivateKey:
    keys.add_device(keydir, "device-b")
    return keys.load_device_private_key(keydir / "device-b.key")


def _make_bundle(keydir: Path, out: Path, chunk_size: int, devices: tuple[str, ...] = ("device",),
                 format_version: int = 1) -> bytes:
    """A bundle of the digits model; version 1 (what earlier releases wrote, still read) unless asked."""
    bundles.protect(
        models.digits_model_path(),
        out,
        signing_key=keys.load_owner_private_key(keydir / "owner.key"),
        recipients=[keys.load_device_public_key(keydir / f"{name}.pub") for name in devices],
        model_version=7,
        metadata={"name": "digits"},
        chunk_size=chunk_size,
        format_version=format_version,
    )
    return out.read_bytes()


@pytest.fixture(scope="module")
def small_chunk_bundle(keydir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _make_bundle(keydir, tmp_path_factory.mktemp("reader-bundle") / "small.esb", 4096)


@pytest.fixture(scope="module")
def two_device_bundle(keydir: Path, device_b_key: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("reader-bundle2") / "two.esb"
    return _make_bundle(keydir, out, 4096, devices=("device", "device-b"))


def _reference_device_error(data: bytes, keydir: Path, device: str, tmp_path: Path) -> str | None:
    """The reference device's decision on ``data``: the error class name, or None if it opens."""
    path = tmp_path / f"ref-{device}.esb"
    path.write_bytes(data)
    try:
        owner = keys.load_owner_public_key(keydir / "owner.pub")
        bundles.open_session(path, owner, keys.load_device_private_key(keydir / f"{device}.key"))
    except Exception as exc:  # noqa: BLE001 - the class name is the decision under test
        return type(exc).__name__
    return None


@pytest.mark.parametrize("chunk_size", [4096, 1024 * 1024])
def test_independent_reader_runs_the_model(
    keydir: Path, owner_pub: Any, device_key: Any, tmp_path: Path, chunk_size: int
) -> None:
    data = _make_bundle(keydir, tmp_path / "b.esb", chunk_size)
    manifest, plaintext = device_open(data, owner_pub, device_key, check_digest=True)

    n = chunk_count(manifest["plaintext_size"], chunk_size)
    if chunk_size == 4096:
        assert n > 10  # many chunks, so chunk indices and the last flag really matter
    else:
        assert n == 1
    assert hashlib.sha256(plaintext).hexdigest() == manifest["plaintext_sha256"]
    assert manifest["model_version"] == 7 and manifest["metadata"]["name"] == "digits"
    # the one other entry: the model's inputs and outputs, as docs/bundle-format.md describes them
    assert json.loads(manifest["metadata"].pop("edgeshield.model_io")) == {
        "inputs": [{"dtype": "float32", "name": "input", "shape": ["batch", 64]}],
        "outputs": [{"dtype": "float32", "name": "logits", "shape": ["batch", 10]}]}
    assert manifest["metadata"] == {"name": "digits"}
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
    for g, w in zip(got, want, strict=True):
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
        assert list(r) == ["key_id", "payload_mac", "wrapped_key"]  # canonical (sorted) member order
        assert len(r["wrapped_key"]) == 152 and r["wrapped_key"].endswith("==")
        assert len(base64.b64decode(r["wrapped_key"])) == WRAPPED_KEY_SIZE == 112
        assert is_hex(r["payload_mac"], 64)
    # The signature covers the context, the 14-byte prefix and the manifest: any change to the prefix breaks it.
    with pytest.raises(InvalidSignature):
        owner_pub.verify(p.signature, SIGNING_CONTEXT + p.manifest_raw, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        owner_pub.verify(p.signature, p.prefix + p.manifest_raw, ec.ECDSA(hashes.SHA256()))


def test_independent_reader_rejects_flipped_payload_byte(
    small_chunk_bundle: bytes, owner_pub: Any, device_key: Any, keydir: Path, tmp_path: Path
) -> None:
    data = bytearray(small_chunk_bundle)
    data[len(data) - 5000] ^= 0x01  # inside the payload, a few chunks before the end
    with pytest.raises(ReaderError) as exc:
        gateway_verify(bytes(data), owner_pub)
    assert exc.value.kind == "PayloadDigest"
    # A device does not run step 14: the chunk's own GCM tag fails first (step 17), as in the reference.
    with pytest.raises(ReaderError) as exc:
        device_open(bytes(data), owner_pub, device_key)
    assert exc.value.kind == "ChunkAuthentication"
    assert _reference_device_error(bytes(data), keydir, "device", tmp_path) == "ChunkAuthenticationError"
    # And the payload MAC of the altered chunks no longer matches either (recomputed with nothing else changed).
    p, m = authenticate(bytes(data), owner_pub)
    _, mac_key = unwrap_secret(m["recipients"][0], device_key, bytes.fromhex(m["bundle_id"]))
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    assert payload_mac(mac_key, chunks) != m["recipients"][0]["payload_mac"]


def test_independent_reader_rejects_missing_last_chunk(small_chunk_bundle: bytes, owner_pub: Any,
                                                       device_key: Any) -> None:
    p, m = gateway_verify(small_chunk_bundle, owner_pub)
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    assert len(chunks) > 2
    cut = small_chunk_bundle[: len(small_chunk_bundle) - len(chunks[-1])]
    with pytest.raises(ReaderError) as exc:
        device_open(cut, owner_pub, device_key)
    assert exc.value.kind == "Truncated"
    # Even a stream decoder that ignored the signed sizes would notice: the new last chunk was sealed with last=0.
    bundle_id = bytes.fromhex(m["bundle_id"])
    data_key, _ = unwrap_secret(m["recipients"][0], device_key, bundle_id)
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


def test_independent_reader_each_recipient_has_its_own_mac_key(
    two_device_bundle: bytes, owner_pub: Any, device_key: Any, device_b_key: Any
) -> None:
    p, m = gateway_verify(two_device_bundle, owner_pub)
    bundle_id = bytes.fromhex(m["bundle_id"])
    by_id = {r["key_id"]: r for r in m["recipients"]}
    stanza_a, stanza_b = by_id[spec_key_id(device_key.public_key())], by_id[spec_key_id(device_b_key.public_key())]
    key_a, mac_a = unwrap_secret(stanza_a, device_key, bundle_id)
    key_b, mac_b = unwrap_secret(stanza_b, device_b_key, bundle_id)
    assert key_a == key_b  # one data key per bundle, committed to in the manifest
    assert hashlib.sha256(KEY_COMMITMENT_CONTEXT + bundle_id + key_a).hexdigest() == m["data_key_commitment"]
    assert mac_a != mac_b and key_a not in (mac_a, mac_b)  # but a MAC key per recipient
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    assert payload_mac(mac_a, chunks) == stanza_a["payload_mac"]
    assert payload_mac(mac_b, chunks) == stanza_b["payload_mac"] != stanza_a["payload_mac"]
    assert payload_mac(key_a, chunks) not in (stanza_a["payload_mac"], stanza_b["payload_mac"])
    for device in (device_key, device_b_key):
        manifest, plaintext = device_open(two_device_bundle, owner_pub, device)
        assert hashlib.sha256(plaintext).hexdigest() == manifest["plaintext_sha256"]


def test_independent_reader_refuses_a_model_re_sealed_by_another_recipient(
    two_device_bundle: bytes, owner_pub: Any, device_key: Any, device_b_key: Any, keydir: Path, tmp_path: Path
) -> None:
    """Insider attack: device A, which knows the data key, re-seals a chunk with valid GCM tags; B must refuse."""
    p, m = gateway_verify(two_device_bundle, owner_pub)
    bundle_id = bytes.fromhex(m["bundle_id"])
    stanza_a = next(r for r in m["recipients"] if r["key_id"] == spec_key_id(device_key.public_key()))
    data_key, _ = unwrap_secret(stanza_a, device_key, bundle_id)
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    i = len(chunks) - 1
    aead = AESGCM(data_key)
    plain = bytearray(aead.decrypt(stream_nonce(i, True), chunks[i], bundle_id))
    plain[0] ^= 0xFF
    forged_chunks = [*chunks[:i], aead.encrypt(stream_nonce(i, True), bytes(plain), bundle_id)]
    forged = two_device_bundle[: len(two_device_bundle) - len(p.payload)] + b"".join(forged_chunks)
    assert decrypt_stream(data_key, bundle_id, forged_chunks)  # every GCM tag is valid: step 17 passes
    for device, name in ((device_b_key, "device-b"), (device_key, "device")):
        with pytest.raises(ReaderError) as exc:
            device_open(forged, owner_pub, device)
        assert exc.value.kind == "PayloadDigest"
        assert _reference_device_error(forged, keydir, name, tmp_path) == "PayloadDigestError"
    with pytest.raises(ReaderError) as exc:
        gateway_verify(forged, owner_pub)
    assert exc.value.kind == "PayloadDigest"


def test_independent_reader_rejects_another_recipients_payload_mac(
    two_device_bundle: bytes, owner_pub: Any, device_key: Any, device_b_key: Any, keydir: Path, tmp_path: Path
) -> None:
    """Swap the two recipients' payload MACs and re-sign: the gateway cannot tell, each device refuses."""
    p, _m = gateway_verify(two_device_bundle, owner_pub)
    swapped = json.loads(p.manifest_raw)
    first, second = swapped["recipients"]
    first["payload_mac"], second["payload_mac"] = second["payload_mac"], first["payload_mac"]
    data = write_container(swapped, p.payload, keys.load_owner_private_key(keydir / "owner.key"))
    gateway_verify(data, owner_pub)  # payload_sha256 still matches: only a device can check its own MAC
    for device, name in ((device_key, "device"), (device_b_key, "device-b")):
        with pytest.raises(ReaderError) as exc:
            device_open(data, owner_pub, device)
        assert exc.value.kind == "PayloadDigest"
        assert _reference_device_error(data, keydir, name, tmp_path) == "PayloadDigestError"
    # The container written from the spec is otherwise a valid bundle: unswapped, both readers open it.
    original = write_container(json.loads(p.manifest_raw), p.payload, keys.load_owner_private_key(keydir / "owner.key"))
    device_open(original, owner_pub, device_b_key, check_digest=True)
    assert _reference_device_error(original, keydir, "device-b", tmp_path) is None


# --- version 2: per-chunk MACs, one self-contained model ---------------------------------------------------------
def test_independent_reader_opens_a_version_2_bundle(keydir: Path, owner_pub: Any, device_key: Any,
                                                     tmp_path: Path) -> None:
    data = _make_bundle(keydir, tmp_path / "v2.esb", 4096, format_version=2)
    assert data[8:10] == b"\x00\x02"
    manifest, plaintext = device_open(data, owner_pub, device_key, check_digest=True)
    img = manifest["image"]
    assert manifest["format_version"] == 2 and img["weights_size"] == 0  # the graph is the whole model
    assert list(manifest["recipients"][0]) == ["chunk_macs", "key_id", "payload_mac", "wrapped_key"]
    x = models.load_digits_split().x_test[:20]
    got = ort.InferenceSession(plaintext[: img["graph_size"]], providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    want = ort.InferenceSession(str(models.digits_model_path()), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    np.testing.assert_array_equal(got[0], want[0])
    assert _reference_device_error(data, keydir, "device", tmp_path) is None


def test_independent_reader_v2_chunk_resealed_by_another_recipient_fails_its_chunk_mac(
    keydir: Path, owner_pub: Any, device_key: Any, device_b_key: Any, tmp_path: Path
) -> None:
    data = _make_bundle(keydir, tmp_path / "v2two.esb", 4096, devices=("device", "device-b"), format_version=2)
    p, m = gateway_verify(data, owner_pub)
    stanza = next(r for r in m["recipients"] if r["key_id"] == spec_key_id(device_key.public_key()))
    bundle_id = bytes.fromhex(m["bundle_id"])
    data_key, _ = unwrap_secret(stanza, device_key, bundle_id)
    chunks = sealed_chunks(p.payload, m["plaintext_size"], m["chunk_size"])
    plain = bytearray(AESGCM(data_key).decrypt(stream_nonce(0, False), chunks[0], bundle_id))
    plain[-1] ^= 1
    chunks[0] = AESGCM(data_key).encrypt(stream_nonce(0, False), bytes(plain), bundle_id)
    forged = data[: len(data) - len(p.payload)] + b"".join(chunks)
    with pytest.raises(ReaderError) as exc:
        device_open(forged, owner_pub, device_b_key)
    assert exc.value.kind == "ChunkAuthentication"
    assert _reference_device_error(forged, keydir, "device-b", tmp_path) == "ChunkAuthenticationError"
