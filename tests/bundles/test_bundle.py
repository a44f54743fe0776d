"""Bundles end to end: round trips, and a typed rejection for every way a bundle can be wrong."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield import bundles, keys
from edgeshield.bundles import _format, _stream
from edgeshield.errors import (
    ChunkAuthenticationError,
    EdgeShieldError,
    EmptyFileError,
    IntegrityError,
    InvalidArgumentError,
    MalformedBundleError,
    NotABundleError,
    NotAFileError,
    NotARecipientError,
    OutputExistsError,
    PathNotFoundError,
    PayloadDigestError,
    SignatureError,
    TrailingDataError,
    TruncatedBundleError,
    UnsupportedFormatVersionError,
    UnsupportedModelError,
    WrongOwnerKeyError,
)

from conftest import KeySet, make_matmul_model


def protect(model: Path, out: Path, ks: KeySet, **kw) -> bundles.Manifest:  # type: ignore[no-untyped-def]
    return bundles.protect(model, out, signing_key=ks.owner_priv, recipients=[ks.device_pub], **kw)


def run_model(session, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def plain_session(path: Path):  # type: ignore[no-untyped-def]
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- round trips -----------------------------------------------------------------------------------------------
def test_digits_round_trip_matches_plain_model(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    from edgeshield.models import load_digits_split

    m = protect(digits_model, tmp_path / "d.esb", keyset, model_version=3, metadata={"team": "vision"})
    assert bundles.verify(tmp_path / "d.esb", keyset.owner_pub) == m
    session = bundles.open_session(tmp_path / "d.esb", keyset.owner_pub, keyset.device_priv)
    x = load_digits_split().x_test
    np.testing.assert_array_equal(run_model(session, x), run_model(plain_session(digits_model), x))
    assert m.model_version == 3 and {k: v for k, v in m.metadata.items() if k != "edgeshield.model_io"} == {
        "team": "vision"}
    assert m.model_size == digits_model.stat().st_size
    import hashlib

    assert m.model_sha256 == hashlib.sha256(digits_model.read_bytes()).hexdigest()
    # version 2: the weights stay inside the one self-contained graph, which the device streams into ONNX Runtime
    assert m.format_version == 2 and m.image.weights_size == 0
    assert m.recipient_key_ids == [keys.key_id(keyset.device_pub)]


def test_plaintext_sizes_around_the_chunk_size(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    size = protect(tiny_model, tmp_path / "probe.esb", keyset).plaintext_size
    x = np.ones((3, 16), np.float32)
    want = run_model(plain_session(tiny_model), x)
    for chunk in (size - 1, size, size + 1, 16, 17):
        out = tmp_path / f"c{chunk}.esb"
        m = protect(tiny_model, out, keyset, chunk_size=chunk)
        assert m.payload_size == _stream.payload_size(size, chunk)
        session = bundles.open_session(out, keyset.owner_pub, keyset.device_priv)
        np.testing.assert_array_equal(run_model(session, x), want)


def test_multi_megabyte_model_round_trip(tmp_path: Path, keyset: KeySet) -> None:
    model = make_matmul_model(tmp_path / "big.onnx", d=512, blocks=3)  # 3 MiB of weights
    m = protect(model, tmp_path / "big.esb", keyset, chunk_size=1 << 20)
    assert m.plaintext_size > 3 * (1 << 20) and _stream.chunk_count(m.plaintext_size, m.chunk_size) == 4
    x = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    got = run_model(bundles.open_session(tmp_path / "big.esb", keyset.owner_pub, keyset.device_priv), x)
    np.testing.assert_array_equal(got, run_model(plain_session(model), x))


def test_several_recipients_each_open_it(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    second = keys.add_device(keyset.dir, "edge-2")
    bundles.protect(
        tiny_model, tmp_path / "m.esb", signing_key=keyset.owner_priv,
        recipients=[keyset.device_pub, keys.load_device_public_key(second.public_path)],
    )
    for name in ("device", "edge-2"):
        device = keys.load_device_private_key(keyset.dir / f"{name}.key")
        bundles.open_session(tmp_path / "m.esb", keyset.owner_pub, device)


def test_inspect_without_key_is_unverified_and_shows_no_secret(tmp_path: Path, keyset: KeySet,
                                                                tiny_model: Path) -> None:
    m = protect(tiny_model, tmp_path / "m.esb", keyset)
    shown, verified = bundles.inspect(tmp_path / "m.esb")
    assert shown == m and not verified
    assert bundles.inspect(tmp_path / "m.esb", keyset.owner_pub)[1]
    public = json.dumps(m.to_public_dict())
    assert "wrapped_key" not in public


# --- rejections ------------------------------------------------------------------------------------------------
def _bundle_bytes(tmp_path: Path, ks: KeySet, model: Path, **kw) -> bytes:  # type: ignore[no-untyped-def]
    protect(model, tmp_path / "orig.esb", ks, **kw)
    return (tmp_path / "orig.esb").read_bytes()


def _rejected(path: Path, ks: KeySet) -> list[EdgeShieldError]:
    """Both the gateway check and the device open must reject; return what each raised."""
    errors = []
    for attempt in (
        lambda: bundles.verify(path, ks.owner_pub),
        lambda: bundles.open_session(path, ks.owner_pub, ks.device_priv),
    ):
        with pytest.raises(EdgeShieldError) as info:
            attempt()
        errors.append(info.value)
    return errors


def test_every_single_byte_flip_is_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = _bundle_bytes(tmp_path, keyset, tiny_model, chunk_size=256)
    bad = tmp_path / "bad.esb"
    for pos in range(len(data)):
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        bad.write_bytes(bytes(tampered))
        with pytest.raises((IntegrityError, NotABundleError, UnsupportedFormatVersionError)):
            bundles.verify(bad, keyset.owner_pub)


def test_every_truncation_is_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = _bundle_bytes(tmp_path, keyset, tiny_model, chunk_size=256)
    bad = tmp_path / "bad.esb"
    for cut in range(len(data)):
        bad.write_bytes(data[:cut])
        with pytest.raises((IntegrityError, NotABundleError, EmptyFileError)):
            bundles.verify(bad, keyset.owner_pub)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_changes_in_the_digits_bundle_never_open(
    tmp_path: Path, keyset: KeySet, digits_model: Path, data: st.DataObject
) -> None:
    path = tmp_path / "digits.esb"
    if not path.exists():
        protect(digits_model, path, keyset, chunk_size=4096)
    original = path.read_bytes()
    pos = data.draw(st.integers(0, len(original) - 1))
    tampered = bytearray(original)
    tampered[pos] ^= data.draw(st.integers(1, 255))
    bad = tmp_path / "bad.esb"
    bad.write_bytes(bytes(tampered))
    for err in _rejected(bad, keyset):
        assert isinstance(err, (IntegrityError, NotABundleError, UnsupportedFormatVersionError))


def test_extended_file_is_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = _bundle_bytes(tmp_path, keyset, tiny_model)
    (tmp_path / "ext.esb").write_bytes(data + b"\x00")
    assert all(isinstance(e, TrailingDataError) for e in _rejected(tmp_path / "ext.esb", keyset))
    (tmp_path / "cut.esb").write_bytes(data[:-1])
    assert all(isinstance(e, TruncatedBundleError) for e in _rejected(tmp_path / "cut.esb", keyset))


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    (mlen,) = struct.unpack(">I", data[10:14])
    manifest = data[14 : 14 + mlen]
    (slen,) = struct.unpack(">H", data[14 + mlen : 16 + mlen])
    return manifest, data[16 + mlen : 16 + mlen + slen], data[16 + mlen + slen :]


def test_swapped_chunks_are_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = _bundle_bytes(tmp_path, keyset, tiny_model, chunk_size=64)
    manifest, signature, payload = _split(data)
    sealed = 64 + _stream.TAG_SIZE
    swapped = payload[sealed : 2 * sealed] + payload[:sealed] + payload[2 * sealed :]
    (tmp_path / "swap.esb").write_bytes(_format.encode_header(manifest, signature) + swapped)
    verify_err, open_err = _rejected(tmp_path / "swap.esb", keyset)
    assert isinstance(verify_err, PayloadDigestError)
    assert isinstance(open_err, (ChunkAuthenticationError, PayloadDigestError))


def test_edited_and_reserialised_manifest_is_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = _bundle_bytes(tmp_path, keyset, tiny_model)
    manifest, signature, payload = _split(data)
    d = json.loads(manifest)
    d["model_version"] = 99  # e.g. a rollback or forward-version attack
    edited = _format.canonical_json(d)
    (tmp_path / "edit.esb").write_bytes(_format.encode_header(edited, signature) + payload)
    assert all(isinstance(e, SignatureError) for e in _rejected(tmp_path / "edit.esb", keyset))
    pretty = json.dumps(json.loads(manifest), indent=1).encode()  # same content, different bytes
    (tmp_path / "pretty.esb").write_bytes(_format.encode_header(pretty, signature) + payload)
    assert all(isinstance(e, SignatureError) for e in _rejected(tmp_path / "pretty.esb", keyset))


def test_resigned_by_an_attacker_is_a_wrong_owner(
    tmp_path: Path, keyset: KeySet, other_keyset: KeySet, tiny_model: Path
) -> None:
    bundles.protect(tiny_model, tmp_path / "evil.esb", signing_key=other_keyset.owner_priv,
                    recipients=[keyset.device_pub])
    errors = _rejected(tmp_path / "evil.esb", keyset)
    assert all(isinstance(e, WrongOwnerKeyError) and e.exit_code == 3 for e in errors)


def test_non_recipient_device_gets_a_key_error(
    tmp_path: Path, keyset: KeySet, other_keyset: KeySet, tiny_model: Path
) -> None:
    protect(tiny_model, tmp_path / "m.esb", keyset)
    with pytest.raises(NotARecipientError) as info:
        bundles.open_session(tmp_path / "m.esb", keyset.owner_pub, other_keyset.device_priv)
    assert info.value.exit_code == 4


def test_unknown_format_version(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    data = bytearray(_bundle_bytes(tmp_path, keyset, tiny_model))
    data[8:10] = struct.pack(">H", 3)
    (tmp_path / "v3.esb").write_bytes(bytes(data))
    assert all(isinstance(e, UnsupportedFormatVersionError) and e.exit_code == 2
               for e in _rejected(tmp_path / "v3.esb", keyset))


def test_not_a_bundle_empty_directory_and_missing(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    (tmp_path / "empty.esb").write_bytes(b"")
    cases = {
        tiny_model: NotABundleError,
        tmp_path / "empty.esb": EmptyFileError,
        tmp_path: NotAFileError,
        tmp_path / "missing.esb": PathNotFoundError,
    }
    for path, err in cases.items():
        with pytest.raises(err):
            bundles.verify(path, keyset.owner_pub)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", EmptyFileError),
        (b"this is not an onnx model\n" * 10, UnsupportedModelError),
        (os.urandom(4096), UnsupportedModelError),
    ],
)
def test_protect_rejects_bad_models_and_writes_nothing(
    tmp_path: Path, keyset: KeySet, content: bytes, error: type[Exception]
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(error):
        protect(model, out_dir / "m.esb", keyset)
    assert list(out_dir.iterdir()) == []


def test_protect_failure_leaves_an_existing_bundle_untouched(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    out = tmp_path / "m.esb"
    protect(tiny_model, out, keyset)
    before = out.read_bytes()
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(UnsupportedModelError):
        protect(tmp_path / "bad.onnx", out, keyset)
    assert out.read_bytes() == before
    with pytest.raises(OutputExistsError):
        protect(tiny_model, out, keyset, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_protect_argument_checks(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    for kw in (
        {"chunk_size": 8},
        {"model_version": -1},
        {"metadata": {"bad key": "v"}},
        {"recipients": []},
        {"recipients": [keyset.device_pub, keyset.device_pub]},
    ):
        args = {"signing_key": keyset.owner_priv, "recipients": [keyset.device_pub]} | kw
        with pytest.raises(InvalidArgumentError):
            bundles.protect(tiny_model, tmp_path / "m.esb", **args)
    assert not (tmp_path / "m.esb").exists()


def test_malformed_but_validly_signed_manifest_is_rejected(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    """A buggy writer's manifest fails validation even though its signature is good."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    manifest, _, payload = _split(_bundle_bytes(tmp_path, keyset, tiny_model))
    d = json.loads(manifest)
    d["chunk_size"] = 1
    raw = _format.canonical_json(d)
    sig = keyset.owner_priv.sign(_format.signed_message(raw), ec.ECDSA(hashes.SHA256()))
    (tmp_path / "m.esb").write_bytes(_format.encode_header(raw, sig) + payload)
    with pytest.raises(MalformedBundleError):
        bundles.verify(tmp_path / "m.esb", keyset.owner_pub)


def _resign(tmp_path: Path, ks: KeySet, manifest: dict, payload: bytes, name: str) -> Path:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = _format.canonical_json(manifest)
    sig = ks.owner_priv.sign(_format.signed_message(raw), ec.ECDSA(hashes.SHA256()))
    out = tmp_path / name
    out.write_bytes(_format.encode_header(raw, sig) + payload)
    return out


def test_device_rejects_a_key_wrap_the_manifest_does_not_commit_to(
    tmp_path: Path, keyset: KeySet, tiny_model: Path
) -> None:
    """A malicious owner cannot hand different devices different data keys for one ciphertext."""
    import base64

    from edgeshield.bundles import _wrap
    from edgeshield.errors import KeyCommitmentError

    manifest, _, payload = _split(_bundle_bytes(tmp_path, keyset, tiny_model))
    d = json.loads(manifest)
    other_keys = os.urandom(64)  # another data key (and MAC key) than the one committed to
    d["recipients"][0]["wrapped_key"] = base64.b64encode(
        _wrap.wrap_key(other_keys, keyset.device_pub, bytes.fromhex(d["bundle_id"]))
    ).decode()
    bad = _resign(tmp_path, keyset, d, payload, "mixed.esb")
    bundles.verify(bad, keyset.owner_pub)  # a gateway cannot tell: it never sees the data key
    with pytest.raises(KeyCommitmentError):
        bundles.open_session(bad, keyset.owner_pub, keyset.device_priv)


def test_hostile_unsigned_manifest_values_are_rejected_cleanly(tmp_path: Path, keyset: KeySet,
                                                               tiny_model: Path) -> None:
    manifest, signature, payload = _split(_bundle_bytes(tmp_path, keyset, tiny_model))
    for value in ("\u00e9" * 16, "ABCDEF0123456789", 12345, None):
        d = json.loads(manifest)
        d["signer_key_id"] = value
        raw = _format.canonical_json(d)
        (tmp_path / "h.esb").write_bytes(_format.encode_header(raw, signature) + payload)
        with pytest.raises(SignatureError):
            bundles.verify(tmp_path / "h.esb", keyset.owner_pub)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bundle_id", "00112233445566778899aabbccddeeff\n"),
        ("created", "2026-11-25T10:00:00Z\n"),
        ("created", "\u0662026-11-25T10:00:00Z"),
        ("model_version", 2**63),
        ("metadata", {"k": "\ud800"}),
        ("image", {"graph_size": 1, "weights_offset": 1, "weights_size": 1, "weights_location": "edgeshield.weights",
                   "x": 1}),
    ],
)
def test_signed_but_invalid_manifest_values(
    tmp_path: Path, keyset: KeySet, tiny_model: Path, field: str, value: object
) -> None:
    manifest, _, payload = _split(_bundle_bytes(tmp_path, keyset, tiny_model))
    d = json.loads(manifest)
    d[field] = value
    with pytest.raises(MalformedBundleError):
        bundles.verify(_resign(tmp_path, keyset, d, payload, "v.esb"), keyset.owner_pub)


@pytest.mark.parametrize(("version", "device_error"), [(1, PayloadDigestError), (2, ChunkAuthenticationError)])
def test_a_recipient_that_knows_the_data_key_cannot_swap_the_model_for_another(
    tmp_path: Path, keyset: KeySet, tiny_model: Path, version: int, device_error: type[Exception]
) -> None:
    """Insider attack: device A re-encrypts a chunk with the shared data key (valid GCM tags); B must refuse it.

    Version 1 refuses it at the payload MAC, after the pass; version 2 at that chunk's own signed MAC.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edgeshield.bundles import _wrap

    device_b = keys.add_device(keyset.dir, "device-b")
    b_priv = keys.load_device_private_key(device_b.private_path)
    bundles.protect(
        tiny_model, tmp_path / "m.esb", signing_key=keyset.owner_priv,
        recipients=[keyset.device_pub, keys.load_device_public_key(device_b.public_path)], chunk_size=64,
        format_version=version,
    )
    manifest_raw, signature, payload = _split((tmp_path / "m.esb").read_bytes())
    m = _format.decode_manifest(manifest_raw)
    stanza_a = next(r for r in m.recipients if r.key_id == keys.key_id(keyset.device_pub))
    data_key, _ = _wrap.unwrap_key(stanza_a.wrapped_key, keyset.device_priv, bytes.fromhex(m.bundle_id))
    # A decrypts the last chunk, alters it, and seals it again under the shared data key.
    n = _stream.chunk_count(m.plaintext_size, m.chunk_size)
    start = (n - 1) * (m.chunk_size + _stream.TAG_SIZE)
    aead = AESGCM(data_key)
    plain = bytearray(aead.decrypt(_stream.nonce(n - 1, True), payload[start:], bytes.fromhex(m.bundle_id)))
    plain[0] ^= 0xFF
    forged = payload[:start] + aead.encrypt(_stream.nonce(n - 1, True), bytes(plain), bytes.fromhex(m.bundle_id))
    (tmp_path / "forged.esb").write_bytes(_format.encode_header(manifest_raw, signature, version) + forged)
    with pytest.raises(device_error):
        bundles.open_session(tmp_path / "forged.esb", keyset.owner_pub, b_priv)
    with pytest.raises(PayloadDigestError):
        bundles.verify(tmp_path / "forged.esb", keyset.owner_pub)


def test_check_digest_pins_the_file_even_against_the_owner(tmp_path: Path, keyset: KeySet, tiny_model: Path) -> None:
    """The owner knows every key: it can sign MACs for a payload other than the one its digest names.

    A device's MAC check accepts that (the owner vouched for it); ``check_digest=True`` refuses it, as a gateway does.
    """
    import dataclasses

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edgeshield.bundles import _wrap

    manifest_raw, _, payload = _split(_bundle_bytes(tmp_path, keyset, tiny_model, chunk_size=64))
    m = _format.decode_manifest(manifest_raw)
    bid = bytes.fromhex(m.bundle_id)
    data_key, mac_key = _wrap.unwrap_key(m.recipients[0].wrapped_key, keyset.device_priv, bid)
    n = _stream.chunk_count(m.plaintext_size, m.chunk_size)
    start = (n - 1) * (m.chunk_size + _stream.TAG_SIZE)
    aead = AESGCM(data_key)
    plain = bytearray(aead.decrypt(_stream.nonce(n - 1, True), payload[start:], bid))
    plain[-1] ^= 0x01  # padding-free last byte of the weights
    other = payload[:start] + aead.encrypt(_stream.nonce(n - 1, True), bytes(plain), bid)
    _, mac = _stream.process_payload(None, bid, m.plaintext_size, m.chunk_size, lambda o, k: other[o : o + k],
                                     mac_key=mac_key, digest=False)
    assert mac is not None
    gmac = AESGCM(mac_key)
    step = m.chunk_size + _stream.TAG_SIZE
    tags = b"".join(_stream.chunk_mac(gmac, i, i == n - 1, other[i * step : (i + 1) * step]) for i in range(n))
    forged = dataclasses.replace(m, recipients=(dataclasses.replace(m.recipients[0], payload_mac=mac.hex(),
                                                                    chunk_macs=tags),))
    path = _resign(tmp_path, keyset, forged.to_dict(), other, "equivocal.esb")
    bundles.open_session(path, keyset.owner_pub, keyset.device_priv)  # the owner's MAC vouches for it
    with pytest.raises(PayloadDigestError):
        bundles.open_session(path, keyset.owner_pub, keyset.device_priv, check_digest=True)
    with pytest.raises(PayloadDigestError):
        bundles.verify(path, keyset.owner_pub)


def test_decrypt_model_gives_back_the_original_bytes(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    import hashlib

    m = protect(digits_model, tmp_path / "d.esb", keyset)
    model = bundles.decrypt_model(tmp_path / "d.esb", keyset.owner_pub, keyset.device_priv)
    assert hashlib.sha256(model).hexdigest() == m.model_sha256 and model == digits_model.read_bytes()


def test_protect_can_embed_the_owner_watermark(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    from edgeshield import watermark

    key = watermark.generate_key(tmp_path / "wm.key")
    m = protect(digits_model, tmp_path / "d.esb", keyset, watermark_key=key)
    assert m.metadata["edgeshield.watermark"] == watermark.SCHEME
    shipped = bundles.decrypt_model(tmp_path / "d.esb", keyset.owner_pub, keyset.device_priv)
    assert watermark.verify(shipped, key).present
    assert not watermark.verify(digits_model.read_bytes(), key).present
