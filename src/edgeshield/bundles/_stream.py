"""Chunked AES-256-GCM streaming encryption (the STREAM construction of Hoang, Reyhanitabar, Rogaway, Vizár).

The plaintext is cut into chunks of ``chunk_size`` bytes (the last one may be shorter, or empty for an empty
plaintext). Chunk ``i`` of ``n`` is sealed with AES-256-GCM under the bundle's data key with the 12-byte nonce

    nonce(i) = i as an 11-byte big-endian integer || (0x01 if i == n - 1 else 0x00)

and the bundle id as associated data, as age's STREAM does. Because the index and the last-chunk flag are in the
nonce, a reordered, dropped, duplicated, truncated or extended stream fails authentication; the data key is fresh
for every bundle, so a (key, nonce) pair is never reused.

GCM tags alone do not stop a recipient that knows the data key from forging chunks for the other recipients, so
the owner also signs two commitments to the sealed chunks:

* the payload digest, SHA-256 over the concatenated SHA-256 digests of the sealed chunks, which anyone can check
  (a gateway verifies a bundle with no device key);
* per recipient, a payload MAC: SHA-256 over the concatenated GMAC tags of the sealed chunks under that
  recipient's own MAC key (``AES-256-GCM(mac_key).encrypt(nonce(i), b"", aad=sealed_i)``). The MAC key is
  wrapped only for that device, so another recipient cannot forge it. This is what a device checks: GMAC runs
  at several times SHA-256's speed, which keeps opening a bundle close to the cost of decryption alone.

Format version 2 also signs the GMAC tags themselves (``chunk_macs``, whose SHA-256 is the payload MAC), so a
device authenticates each chunk on its own before using it: ``verified_chunks`` yields chunk ``i`` only once its tag
and its GCM tag have both verified, which lets decryption stream into ONNX Runtime's loader (``_session``).

Chunks are independent, so hashing, MACs and decryption run on several cores (cryptography and hashlib release
the GIL).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeshield.errors import ChunkAuthenticationError, InvalidArgumentError

TAG_SIZE = 16
KEY_SIZE = 32
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNKS = 2**32

# Reads ``length`` bytes at ``offset`` of the payload.
ReadAt = Callable[[int, int], bytes]
# Reads ``length`` bytes at ``offset`` of the plaintext being sealed (a view of it will do).
ReadPlain = Callable[[int, int], bytes | memoryview]
# Reads the payload at ``offset`` into a buffer, returning how many bytes it read (``os.preadv`` does).
ReadInto = Callable[[int, memoryview], int]
RING_BYTES = 8 * 1024 * 1024  # what verified_chunks keeps in flight, at most (and at least two chunks)


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Number of chunks for a plaintext: at least one, so that even an empty plaintext is authenticated."""
    return max(1, -(-plaintext_size // chunk_size))


def payload_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG_SIZE * chunk_count(plaintext_size, chunk_size)


def nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def digest_of_chunk_digests(chunk_digests: list[bytes]) -> bytes:
    """SHA-256 over the concatenated per-chunk values (SHA-256 digests or GMAC tags), in chunk order."""
    return hashlib.sha256(b"".join(chunk_digests)).digest()


def _bounds(plaintext_size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(plaintext offset, plaintext length) of chunk ``index``."""
    start = index * chunk_size
    return start, min(chunk_size, plaintext_size - start)


def encrypt_chunks(
    key: bytes, aad: bytes, plaintext_size: int, chunk_size: int, read_plain: ReadPlain
) -> Iterator[bytes]:
    """Yield the sealed chunks (ciphertext || tag) in order; ``read_plain(offset, n)`` supplies the plaintext."""
    check_chunk_size(chunk_size)
    n = chunk_count(plaintext_size, chunk_size)
    if n > MAX_CHUNKS:
        raise InvalidArgumentError("plaintext too large for this chunk size")
    aead = AESGCM(key)
    for i in range(n):
        start, length = _bounds(plaintext_size, chunk_size, i)
        yield aead.encrypt(nonce(i, i == n - 1), read_plain(start, length), aad)


def chunk_mac(mac: AESGCM, index: int, last: bool, sealed: bytes | memoryview) -> bytes:
    """GMAC tag of one sealed chunk under a recipient's MAC key (AES-GCM with an empty plaintext)."""
    return mac.encrypt(nonce(index, last), b"", sealed)


def process_payload(
    key: bytes | None,
    aad: bytes,
    plaintext_size: int,
    chunk_size: int,
    read_sealed: ReadAt,
    out: memoryview | None = None,
    *,
    mac_key: bytes | None = None,
    digest: bool = True,
    workers: int | None = None,
) -> tuple[bytes | None, bytes | None]:
    """Walk the sealed chunks once: optionally decrypt into ``out``, hash, and MAC them.

    Returns ``(payload digest or None, payload MAC or None)``. ``read_sealed(offset, n)`` must be safe to call
    from several threads (``os.pread`` is). Raises ``ChunkAuthenticationError`` naming the first chunk that fails
    authentication.
    """
    check_chunk_size(chunk_size)
    n = chunk_count(plaintext_size, chunk_size)
    aead = AESGCM(key) if key is not None else None
    mac = AESGCM(mac_key) if mac_key is not None else None
    if aead is not None and (out is None or len(out) != plaintext_size):
        raise InvalidArgumentError("decryption needs an output buffer of the plaintext size")
    decrypt = (aead, out) if aead is not None and out is not None else None  # both or neither, as just checked

    def one(i: int) -> tuple[bytes, bytes]:
        start, length = _bounds(plaintext_size, chunk_size, i)
        sealed = read_sealed(start + i * TAG_SIZE, length + TAG_SIZE)
        if len(sealed) != length + TAG_SIZE:
            raise ChunkAuthenticationError(f"chunk {i} is truncated")
        last = i == n - 1
        if decrypt is not None:
            aead, buf = decrypt
            try:
                aead.decrypt_into(nonce(i, last), sealed, aad, buf[start : start + length])
            except InvalidTag:
                raise ChunkAuthenticationError(f"chunk {i} of {n} failed authentication") from None
        return (
            hashlib.sha256(sealed).digest() if digest else b"",
            chunk_mac(mac, i, last, sealed) if mac is not None else b"",
        )

    workers = workers or min(4, os.cpu_count() or 1)
    if workers == 1 or n == 1:
        results = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, range(n)))
    return (
        digest_of_chunk_digests([r[0] for r in results]) if digest else None,
        digest_of_chunk_digests([r[1] for r in results]) if mac is not None else None,
    )


def verified_chunks(
    key: bytes,
    mac_key: bytes,
    aad: bytes,
    plaintext_size: int,
    chunk_size: int,
    read_sealed: ReadAt,
    expected_mac: Callable[[int], bytes],
    *,
    read_into: ReadInto | None = None,
    digest: list[bytes] | None = None,
    workers: int | None = None,
) -> Iterator[memoryview]:
    """Yield the plaintext chunks in order, each only once it is authenticated twice over.

    Chunk ``i`` is yielded only after (1) its GMAC tag under this recipient's ``mac_key`` equals ``expected_mac(i)``
    (the signed per-chunk tag, which no other recipient can forge) and (2) AES-GCM under the data key has verified
    its own tag. ``workers`` threads read, check and decrypt a few chunks ahead (the GIL is released), so a consumer
    that parses chunk ``i`` overlaps the decryption of the next ones. With ``digest`` (an empty list), the SHA-256 of
    every sealed chunk is appended to it, for the gateway's payload digest. Raises ``ChunkAuthenticationError``
    naming the first chunk that fails; nothing of that chunk or any later one is yielded.

    A yielded view is valid until the next chunk is asked for: chunks go through a small ring of buffers allocated
    once (``read_into(offset, view)``, where given, reads the sealed chunk straight into one), so a stream of any
    length allocates nothing per chunk and leaves no freed chunks behind in the allocator's arenas.
    """
    import hmac

    check_chunk_size(chunk_size)
    n = chunk_count(plaintext_size, chunk_size)
    aead, mac = AESGCM(key), AESGCM(mac_key)
    workers = workers or min(4, os.cpu_count() or 1)
    span = min(chunk_size, plaintext_size)  # the longest chunk
    ahead = max(1, min(2 * workers, n, RING_BYTES // max(1, span)))  # chunks in flight beyond the one handed out
    ring = [(bytearray(span + TAG_SIZE), bytearray(span)) for _ in range(ahead + 1)]

    def one(i: int) -> tuple[memoryview, bytes]:
        start, length = _bounds(plaintext_size, chunk_size, i)
        sealed_buf, plain_buf = ring[i % len(ring)]
        sealed = memoryview(sealed_buf)[: length + TAG_SIZE]
        if read_into is not None:
            got = read_into(start + i * TAG_SIZE, sealed)
        else:
            data = read_sealed(start + i * TAG_SIZE, length + TAG_SIZE)
            got = len(data)
            sealed[:got] = data[: length + TAG_SIZE]
        if got != length + TAG_SIZE:
            raise ChunkAuthenticationError(f"chunk {i} is truncated")
        last = i == n - 1
        if not hmac.compare_digest(chunk_mac(mac, i, last, sealed), expected_mac(i)):
            raise ChunkAuthenticationError(f"chunk {i} of {n} does not match the MAC the signed manifest holds "
                                           "for this device")
        plain = memoryview(plain_buf)[:length]
        try:
            aead.decrypt_into(nonce(i, last), sealed, aad, plain)
        except InvalidTag:
            raise ChunkAuthenticationError(f"chunk {i} of {n} failed authentication") from None
        return plain, hashlib.sha256(sealed).digest() if digest is not None else b""

    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Slot i % (ahead + 1) is refilled by chunk i + ahead + 1, submitted only once chunk i + 1 is asked for,
        # i.e. once the consumer is done with chunk i.
        pending: list[Future[tuple[memoryview, bytes]] | None] = [pool.submit(one, i) for i in range(ahead)]
        try:
            for i in range(n):
                future = pending[i]
                assert future is not None  # noqa: S101 - each index is consumed once
                plain, sealed_digest = future.result()
                pending[i] = future = None
                if i + ahead < n:
                    pending.append(pool.submit(one, i + ahead))
                if digest is not None:
                    digest.append(sealed_digest)
                yield plain
        finally:
            for f in pending:
                if f is not None:
                    f.cancel()
