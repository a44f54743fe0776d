"""Version 2 open path: verified chunks streamed into ONNX Runtime, each authenticated before it is passed on."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield import bundles, keys
from edgeshield.bundles import _api, _format, _session, _stream, _wrap
from edgeshield.errors import ChunkAuthenticationError, MalformedBundleError, PayloadDigestError

from conftest import KeySet, make_matmul_model


def _run(session, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _options(prepack: bool):  # type: ignore[no-untyped-def]
    from edgeshield.bundles._ort import onnxruntime as ort

    opts = ort.SessionOptions()
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


@pytest.fixture(scope="module")
def matmul(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_matmul_model(tmp_path_factory.mktemp("stream") / "mm.onnx", d=256, blocks=3)  # 768 KiB of weights


@pytest.mark.parametrize("prepack", [True, False])
def test_streamed_open_gives_the_plain_models_outputs(tmp_path: Path, keyset: KeySet, matmul: Path,
                                                      prepack: bool) -> None:
    from edgeshield.bundles._ort import onnxruntime as ort

    m = bundles.protect(matmul, tmp_path / "m.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub],
                        chunk_size=64 * 1024)
    assert m.format_version == 2 and _api.streams(m) and _stream.chunk_count(m.plaintext_size, m.chunk_size) > 10
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    plain = ort.InferenceSession(str(matmul), _options(prepack), providers=["CPUExecutionProvider"])
    for check_digest in (False, True):
        session = bundles.open_session(tmp_path / "m.esb", keyset.owner_pub, keyset.device_priv,
                                       session_options=_options(prepack), check_digest=check_digest)
        np.testing.assert_array_equal(_run(session, x), _run(plain, x))
    # the in-memory path (the key-release service's) gives the same session from the same image
    manifest, image = _api._decrypt_image(tmp_path / "m.esb", keyset.owner_pub, keyset.device_priv, False)
    from_image = _api.session_from_image(manifest, image, session_options=_options(prepack)).session
    np.testing.assert_array_equal(_run(from_image, x), _run(plain, x))


def test_version_1_bundles_still_open(tmp_path: Path, keyset: KeySet, matmul: Path) -> None:
    m = bundles.protect(matmul, tmp_path / "v1.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub],
                        format_version=1)
    data = (tmp_path / "v1.esb").read_bytes()
    assert data[8:10] == b"\x00\x01" and m.format_version == 1 and m.image.weights_size > 0 and not _api.streams(m)
    assert all(not r.chunk_macs for r in m.recipients) and b"chunk_macs" not in data[:4096]
    assert bundles.verify(tmp_path / "v1.esb", keyset.owner_pub) == m
    x = np.ones((2, 256), np.float32)
    v2 = bundles.protect(matmul, tmp_path / "v2.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub])
    assert v2.format_version == 2
    np.testing.assert_array_equal(
        _run(bundles.open_session(tmp_path / "v1.esb", keyset.owner_pub, keyset.device_priv), x),
        _run(bundles.open_session(tmp_path / "v2.esb", keyset.owner_pub, keyset.device_priv), x))


def _reseal_chunk(data: bytes, manifest: _format.Manifest, keyset: KeySet, index: int) -> bytes:
    """What a recipient that knows the data key can do: change chunk ``index`` and seal it again (valid GCM tag)."""
    bid = bytes.fromhex(manifest.bundle_id)
    data_key, _ = _wrap.unwrap_key(manifest.recipients[0].wrapped_key, keyset.device_priv, bid)
    n = _stream.chunk_count(manifest.plaintext_size, manifest.chunk_size)
    payload_start = len(data) - manifest.payload_size
    start = payload_start + index * (manifest.chunk_size + _stream.TAG_SIZE)
    length = min(manifest.chunk_size, manifest.plaintext_size - index * manifest.chunk_size) + _stream.TAG_SIZE
    aead = AESGCM(data_key)
    plain = bytearray(aead.decrypt(_stream.nonce(index, index == n - 1), data[start : start + length], bid))
    plain[len(plain) // 2] ^= 0x01
    sealed = aead.encrypt(_stream.nonce(index, index == n - 1), bytes(plain), bid)
    return data[:start] + sealed + data[start + length :]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_tampered_chunk_is_refused_before_onnx_runtime_sees_it(
    tmp_path: Path, keyset: KeySet, matmul: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    m = bundles.protect(matmul, tmp_path / "m.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub],
                        chunk_size=64 * 1024)
    n = _stream.chunk_count(m.plaintext_size, m.chunk_size)
    index = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    (tmp_path / "t.esb").write_bytes(_reseal_chunk((tmp_path / "m.esb").read_bytes(), m, keyset, index))
    handed: list[bytes] = []  # every chunk handed towards ONNX Runtime's loader, in order
    real = _session.from_stream

    def observed(chunks, *args, **kwargs):  # type: ignore[no-untyped-def]
        def watch():  # type: ignore[no-untyped-def]
            for c in chunks:
                handed.append(bytes(c))
                yield c
        return real(watch(), *args, **kwargs)

    monkeypatch.setattr(_session, "from_stream", observed)
    with pytest.raises(ChunkAuthenticationError, match=f"chunk {index} of {n}"):
        bundles.open_session(tmp_path / "t.esb", keyset.owner_pub, keyset.device_priv)
    assert len(handed) == index  # exactly the chunks before the tampered one, all of them authentic
    _, image = _api._decrypt_image(tmp_path / "m.esb", keyset.owner_pub, keyset.device_priv, False)
    assert b"".join(handed) == bytes(image[: index * m.chunk_size])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3000), chunk=st.integers(16, 700), flip=st.integers(0, 10**6))
def test_verified_chunks_yield_the_plaintext_and_stop_at_the_first_forgery(size: int, chunk: int, flip: int) -> None:
    rng = np.random.default_rng(size * 1000 + chunk)
    plain = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    key, mac_key, aad = bytes(range(32)), bytes(range(32, 64)), b"b" * 16
    sealed = b"".join(_stream.encrypt_chunks(key, aad, size, chunk, lambda o, k: plain[o : o + k]))
    n = _stream.chunk_count(size, chunk)
    gmac = AESGCM(mac_key)
    spans = [(i * (chunk + 16), min(chunk, size - i * chunk) + 16) for i in range(n)]
    tags = [_stream.chunk_mac(gmac, i, i == n - 1, sealed[o : o + ln]) for i, (o, ln) in enumerate(spans)]
    digests: list[bytes] = []
    out = [bytes(c) for c in _stream.verified_chunks(key, mac_key, aad, size, chunk, lambda o, k: sealed[o : o + k],
                                                     tags.__getitem__, digest=digests, workers=2)]
    assert b"".join(out) == plain and len(out) == n
    assert _stream.digest_of_chunk_digests(digests) == _stream.process_payload(
        None, aad, size, chunk, lambda o, k: sealed[o : o + k])[0]
    bad = bytearray(sealed)
    bad[flip % len(bad)] ^= 0x80
    first_bad = next(i for i, (o, ln) in enumerate(spans) if o <= flip % len(bad) < o + ln)
    got: list[bytes] = []
    stream = _stream.verified_chunks(key, mac_key, aad, size, chunk, lambda o, k: bytes(bad[o : o + k]),
                                     tags.__getitem__, workers=2)
    with pytest.raises(ChunkAuthenticationError, match=f"chunk {first_bad} "):
        got.extend(stream)
    assert len(got) == first_bad


_TINY: dict[str, _format.Manifest] = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delta=st.integers(-3, 3), at=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_chunk_macs_framing_round_trips_and_refuses_any_other_length_or_content(
    tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, tiny_model: Path, delta: int, at: int, bit: int
) -> None:
    if "m" not in _TINY:
        out = tmp_path_factory.mktemp("frame") / "m.esb"
        _TINY["m"] = bundles.protect(tiny_model, out, signing_key=keyset.owner_priv, recipients=[keyset.device_pub],
                                     chunk_size=64)
    m = _TINY["m"]
    assert _format.decode_manifest(m.encode()) == m
    tags = m.recipients[0].chunk_macs
    if delta == 0:  # same length, one bit changed: no longer the tags the payload MAC commits to
        other = bytearray(tags)
        other[at % len(tags)] ^= 1 << bit
        forged = dataclasses.replace(m, recipients=(dataclasses.replace(m.recipients[0], chunk_macs=bytes(other)),))
        with pytest.raises(MalformedBundleError, match="hash to its payload_mac"):
            _format.decode_manifest(forged.encode())
        return
    # a wrong count of tags, even with the payload MAC recomputed to match them
    other = tags[: len(tags) + 16 * delta] if delta < 0 else tags + tags[: 16 * delta]
    r = dataclasses.replace(m.recipients[0], chunk_macs=other, payload_mac=hashlib.sha256(other).hexdigest())
    with pytest.raises(MalformedBundleError, match="must hold"):
        _format.decode_manifest(dataclasses.replace(m, recipients=(r,)).encode())


def test_check_digest_on_the_stream_refuses_an_owner_equivocation(tmp_path: Path, keyset: KeySet,
                                                                  matmul: Path) -> None:
    """An owner that signs MACs for one file and a digest for another: the streamed open with check_digest refuses
    it before the session is returned."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    m = bundles.protect(matmul, tmp_path / "m.esb", signing_key=keyset.owner_priv,
                        recipients=[keyset.device_pub], chunk_size=64 * 1024)
    n = _stream.chunk_count(m.plaintext_size, m.chunk_size)
    data = _reseal_chunk((tmp_path / "m.esb").read_bytes(), m, keyset, n // 2)  # one weight's byte changes
    payload = data[len(data) - m.payload_size :]
    bid = bytes.fromhex(m.bundle_id)
    _, mac_key = _wrap.unwrap_key(m.recipients[0].wrapped_key, keyset.device_priv, bid)
    gmac = AESGCM(mac_key)
    step = m.chunk_size + _stream.TAG_SIZE
    tags = b"".join(_stream.chunk_mac(gmac, i, i == n - 1, payload[i * step : (i + 1) * step]) for i in range(n))
    r = dataclasses.replace(m.recipients[0], chunk_macs=tags, payload_mac=hashlib.sha256(tags).hexdigest())
    raw = dataclasses.replace(m, recipients=(r,)).encode()
    sig = keyset.owner_priv.sign(_format.signed_message(raw), ec.ECDSA(hashes.SHA256()))
    (tmp_path / "e.esb").write_bytes(_format.encode_header(raw, sig) + payload)
    bundles.open_session(tmp_path / "e.esb", keyset.owner_pub, keyset.device_priv)  # the owner vouched for it
    with pytest.raises(PayloadDigestError):
        bundles.open_session(tmp_path / "e.esb", keyset.owner_pub, keyset.device_priv, check_digest=True)
    assert keys.key_id(keyset.device_pub) == r.key_id
