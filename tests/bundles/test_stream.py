"""The chunked AES-256-GCM STREAM layer: round trips at the chunk boundaries and every way to break a stream."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.bundles import _stream
from edgeshield.errors import ChunkAuthenticationError

KEY = bytes(range(32))
AAD = b"0123456789abcdef"


def seal(data: bytes, chunk: int, key: bytes = KEY) -> list[bytes]:
    return list(_stream.encrypt_chunks(key, AAD, len(data), chunk, lambda o, n: data[o : o + n]))


def open_sealed(sealed: bytes, size: int, chunk: int, key: bytes = KEY, workers: int | None = None) -> bytes:
    out = bytearray(size)
    _stream.process_payload(key, AAD, size, chunk, lambda o, n: sealed[o : o + n], memoryview(out), workers=workers)
    return bytes(out)


@pytest.mark.parametrize("chunk", [16, 4096, 1 << 20])
def test_round_trip_at_chunk_boundaries(chunk: int) -> None:
    for size in (0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7):
        data = os.urandom(size)
        chunks = seal(data, chunk)
        assert len(chunks) == _stream.chunk_count(size, chunk)
        blob = b"".join(chunks)
        assert len(blob) == _stream.payload_size(size, chunk)
        assert open_sealed(blob, size, chunk) == data
        assert open_sealed(blob, size, chunk, workers=1) == data


def test_multi_megabyte_round_trip_and_digest_is_order_sensitive() -> None:
    data = os.urandom(5 * (1 << 20) + 12345)
    chunks = seal(data, 1 << 20)
    blob = b"".join(chunks)
    assert open_sealed(blob, len(data), 1 << 20) == data
    digest, mac = _stream.process_payload(None, AAD, len(data), 1 << 20, lambda o, n: blob[o : o + n])
    import hashlib

    assert mac is None
    assert digest == _stream.digest_of_chunk_digests([hashlib.sha256(c).digest() for c in chunks])
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    assert _stream.digest_of_chunk_digests([hashlib.sha256(c).digest() for c in swapped]) != digest


def test_empty_plaintext_is_one_authenticated_chunk() -> None:
    chunks = seal(b"", 64)
    assert len(chunks) == 1 and len(chunks[0]) == _stream.TAG_SIZE
    with pytest.raises(ChunkAuthenticationError):
        open_sealed(bytes(16), 0, 64)


def test_nonce_binds_index_and_last_flag() -> None:
    assert _stream.nonce(0, False) == bytes(12)
    assert _stream.nonce(1, True) == bytes(10) + b"\x01\x01"
    assert _stream.nonce(2**32, False)[:11] == (2**32).to_bytes(11, "big")


streams = st.tuples(st.binary(min_size=0, max_size=3000), st.integers(min_value=16, max_value=700))


@settings(max_examples=150, deadline=None)
@given(streams, st.data())
def test_any_single_byte_change_is_rejected(stream: tuple[bytes, int], data: st.DataObject) -> None:
    plain, chunk = stream
    blob = bytearray(b"".join(seal(plain, chunk)))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ChunkAuthenticationError):
        open_sealed(bytes(blob), len(plain), chunk)


@settings(max_examples=150, deadline=None)
@given(streams, st.data())
def test_any_truncation_is_rejected(stream: tuple[bytes, int], data: st.DataObject) -> None:
    plain, chunk = stream
    blob = b"".join(seal(plain, chunk))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ChunkAuthenticationError):
        open_sealed(blob[:cut], len(plain), chunk)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=100, max_size=2000), st.integers(16, 48), st.data())
def test_reordered_dropped_duplicated_or_extended_chunks_are_rejected(plain: bytes, chunk: int,
                                                                      data: st.DataObject) -> None:
    chunks = seal(plain, chunk)
    n = len(chunks)
    assert n >= 3
    i = data.draw(st.integers(0, n - 2))
    j = data.draw(st.integers(i + 1, n - 1))
    full = len(plain)
    attacks = {
        # Each tampered stream is fed with the plaintext size an attacker would have to claim for it.
        "swap": ([*chunks[:i], chunks[j], *chunks[i + 1:j], chunks[i], *chunks[j + 1:]], full),
        "drop last": (chunks[:-1], (n - 1) * chunk),
        "drop middle": (chunks[:i] + chunks[i + 1 :], full - chunk),
        "duplicate": ([*chunks[:i + 1], chunks[i], *chunks[i + 1:-1], chunks[-1]], full + chunk),
        "extend": ([*chunks, chunks[-1]], full + len(chunks[-1]) - _stream.TAG_SIZE),
    }
    for name, (tampered, size) in attacks.items():
        if len(tampered) == n and tampered == chunks:
            continue
        blob = b"".join(tampered)
        if len(blob) != _stream.payload_size(size, chunk):
            continue  # the bundle layer rejects a length mismatch before any chunk is read
        with pytest.raises(ChunkAuthenticationError):
            open_sealed(blob, size, chunk)
        assert name


def test_wrong_key_or_aad_is_rejected() -> None:
    blob = b"".join(seal(b"model bytes" * 100, 64))
    with pytest.raises(ChunkAuthenticationError):
        open_sealed(blob, 1100, 64, key=bytes(32))
    out = bytearray(1100)
    with pytest.raises(ChunkAuthenticationError):
        _stream.process_payload(KEY, b"another bundle!!", 1100, 64, lambda o, n: blob[o : o + n], memoryview(out))


def test_payload_mac_is_gmac_per_chunk_under_the_recipient_key() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(1000)
    chunks = seal(data, 256)
    blob = b"".join(chunks)
    mac_key = os.urandom(32)
    out = bytearray(len(data))
    digest, mac = _stream.process_payload(
        KEY, AAD, len(data), 256, lambda o, n: blob[o : o + n], memoryview(out), mac_key=mac_key, digest=False
    )
    assert digest is None and bytes(out) == data
    gmac = AESGCM(mac_key)
    tags = [gmac.encrypt(_stream.nonce(i, i == len(chunks) - 1), b"", c) for i, c in enumerate(chunks)]
    assert mac == _stream.digest_of_chunk_digests(tags)
    _, other = _stream.process_payload(None, AAD, len(data), 256, lambda o, n: blob[o : o + n], mac_key=os.urandom(32))
    assert other != mac  # a MAC under another recipient's key says nothing about this one
