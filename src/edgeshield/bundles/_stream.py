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

Chunks are independent, so hashing, MACs and decryption run on several cores (cryptography and hashlib release
the GIL).
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
# Reads ``length`` bytes at ``offset`` of the plaintext being sealed (a view of it will do).
ReadPlain = Callable[[int, int], bytes | memoryview]


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
