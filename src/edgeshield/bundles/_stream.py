"""Chunked AES-256-GCM streaming encryption (the STREAM construction of Hoang, Reyhanitabar, Rogaway, Vizár).

The plaintext is cut into chunks of ``chunk_size`` bytes (the last one may be shorter, or empty for an empty
plaintext). Chunk ``i`` of ``n`` is sealed with AES-256-GCM under the bundle's data key with the 12-byte nonce

    nonce(i) = i as an 11-byte big-endian integer || (0x01 if i == n - 1 else 0x00)

and the bundle id as associated data, as age's STREAM does. Because the index and the last-chunk flag are in the
nonce, a reordered, dropped, duplicated, truncated or extended stream fails authentication; the data key is fresh
for every bundle, so a (key, nonce) pair is never reused.

Each sealed chunk (ciphertext || 16-byte tag) is also hashed with SHA-256, and the payload digest is SHA-256 over
the concatenated chunk digests. The owner signs that digest, so a gateway without the data key can check the
ciphertext, and a recipient device that knows the data key still cannot swap in a model of its own: GCM tags
alone are forgeable by anyone holding the key. Chunks are independent, so both hashing and decryption run on
several cores (hashlib and cryptography release the GIL).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
    return hashlib.sha256(b"".join(chunk_digests)).digest()


def _bounds(plaintext_size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(plaintext offset, plaintext length) of chunk ``index``."""
    start = index * chunk_size
    return start, min(chunk_size, plaintext_size - start)


def encrypt_chunks(
    key: bytes, aad: bytes, plaintext_size: int, chunk_size: int, read_plain: ReadAt
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


def process_payload(
    key: bytes | None,
    aad: bytes,
    plaintext_size: int,
    chunk_size: int,
    read_sealed: ReadAt,
    out: memoryview | None = None,
    *,
    workers: int | None = None,
) -> bytes:
    """Hash every sealed chunk and, given ``key`` and ``out``, decrypt it into ``out``; return the payload digest.

    ``read_sealed(offset, n)`` must be safe to call from several threads (``os.pread`` is). Raises
    ``ChunkAuthenticationError`` naming the first chunk that fails authentication.
    """
    check_chunk_size(chunk_size)
    n = chunk_count(plaintext_size, chunk_size)
    aead = AESGCM(key) if key is not None else None
    if aead is not None and (out is None or len(out) != plaintext_size):
        raise InvalidArgumentError("decryption needs an output buffer of the plaintext size")

    def one(i: int) -> bytes:
        start, length = _bounds(plaintext_size, chunk_size, i)
        sealed = read_sealed(start + i * TAG_SIZE, length + TAG_SIZE)
        if len(sealed) != length + TAG_SIZE:
            raise ChunkAuthenticationError(f"chunk {i} is truncated")
        if aead is not None:
            assert out is not None
            try:
                aead.decrypt_into(nonce(i, i == n - 1), sealed, aad, out[start : start + length])
            except InvalidTag:
                raise ChunkAuthenticationError(f"chunk {i} of {n} failed authentication") from None
        return hashlib.sha256(sealed).digest()

    workers = workers or min(4, os.cpu_count() or 1)
    if workers == 1 or n == 1:
        digests = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(one, range(n)))
    return digest_of_chunk_digests(digests)
