"""Bounded-memory sketches of a stream of canonical input keys: a Bloom filter (was this key seen?) and a
HyperLogLog (how many distinct keys?), both serialisable for the monitor's state store.

Both hash each key with a keyed BLAKE2b under a random 32-byte secret drawn when the sketch is made and kept in its
serialised form (the state file is private, mode 0600). The secret matters: with a public hash a client could
choose, offline, inputs whose keys land on bits its earlier inputs already set (free "repeats" past a Bloom
filter) or whose hashes have few leading zeros (a HyperLogLog that never grows); without the secret it cannot tell
which inputs those are.

* :class:`BloomFilter` ``(capacity, fp_rate)``: ``m = ceil(-capacity·ln(fp_rate) / ln(2)²)`` bits and
  ``k = round(m/capacity·ln 2)`` probes by double hashing (Kirsch–Mitzenmacher: probe ``i`` is ``h1 + i·h2 mod m``).
  No false negatives; while at most ``capacity`` keys are in it, a new key is reported seen with probability about
  ``fp_rate`` (tested: measured at most twice the design rate).
* :class:`HyperLogLog` ``(precision=p)``: ``2**p`` one-byte registers; relative standard error ``1.04/sqrt(2**p)``
  (p = 12: 4 KiB, 1.6 %), with Ertl's improved estimator (its small-range behaviour is linear counting's, and it
  has no bias where the classic estimator switches to linear counting); 64-bit hashes need no large-range
  correction. Two sketches with the same secret and precision merge (register-wise max).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeshield.errors import ExtractionStateError, InvalidArgumentError

__all__ = ["BloomFilter", "HyperLogLog"]

_SECRET_BYTES = 32
_BLOOM_MAGIC, _HLL_MAGIC = b"ESBF2", b"ESHL2"


def _hashes(secret: bytes, keys: Sequence[bytes]) -> np.ndarray:
    """Two 64-bit words per key, uint64 [N, 2]: keyed BLAKE2b-128 of the key."""
    if not keys:
        return np.zeros((0, 2), dtype=np.uint64)
    keyed = hashlib.blake2b(digest_size=16, key=secret)

    def one(k: bytes) -> bytes:
        h = keyed.copy()  # the keyed state once, copied per key: faster than keying every call
        h.update(k)
        return h.digest()

    raw = b"".join(map(one, keys))
    return np.frombuffer(raw, dtype="<u8").reshape(len(keys), 2).astype(np.uint64)


def _check_secret(secret: bytes | None) -> bytes:
    if secret is None:
        return os.urandom(_SECRET_BYTES)
    if not isinstance(secret, bytes | bytearray) or len(secret) != _SECRET_BYTES:
        raise InvalidArgumentError(f"a sketch secret is {_SECRET_BYTES} bytes")
    return bytes(secret)


def frame(magic: bytes, header: dict[str, Any], *parts: bytes) -> bytes:
    """A small self-describing blob: ``magic``, a JSON header and byte parts, each length-prefixed (uint32 LE).
    No pickle, and an order of magnitude cheaper than ``np.savez``'s zip for the many small rows an eviction writes."""
    head = json.dumps(header, sort_keys=True).encode()
    out = [magic, struct.pack("<II", len(head), len(parts)), head]
    for part in parts:
        out += [struct.pack("<I", len(part)), part]
    return b"".join(out)


def unframe(what: str, magic: bytes, data: object) -> tuple[dict[str, Any], list[bytes]]:
    """(header, parts) of a :func:`frame` blob; ExtractionStateError naming ``what`` when it is not one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ExtractionStateError(f"{what}: not bytes")
    raw = bytes(data)
    try:
        if raw[: len(magic)] != magic:
            raise ValueError(f"not a serialised {what}")
        at = len(magic)
        head_len, count = struct.unpack_from("<II", raw, at)
        at += 8
        header = json.loads(raw[at:at + head_len])
        at += head_len
        if not isinstance(header, dict) or count > 1024:
            raise ValueError("bad header")
        parts = []
        for _ in range(count):
            (n,) = struct.unpack_from("<I", raw, at)
            at += 4
            if at + n > len(raw):
                raise ValueError("truncated")
            parts.append(raw[at:at + n])
            at += n
        if at != len(raw):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ExtractionStateError(f"{what}: malformed ({exc})") from None
    return header, parts


class BloomFilter:
    """Set membership with no false negatives and a designed false-positive rate at ``capacity`` keys."""

    def __init__(self, capacity: int, fp_rate: float = 1e-3, *, secret: bytes | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer) or capacity < 1:
            raise InvalidArgumentError(f"Bloom filter capacity must be a positive integer, not {capacity!r}")
        if isinstance(fp_rate, bool) or not isinstance(fp_rate, int | float) or not 0.0 < fp_rate < 1.0:
            raise InvalidArgumentError(f"Bloom filter fp_rate must lie in (0, 1), not {fp_rate!r}")
        self.capacity, self.fp_rate = int(capacity), float(fp_rate)
        self.bits = max(8, math.ceil(-self.capacity * math.log(self.fp_rate) / math.log(2) ** 2))
        self.probes = max(1, round(self.bits / self.capacity * math.log(2)))
        self._secret = _check_secret(secret)
        self._array = np.zeros((self.bits + 7) // 8, dtype=np.uint8)
        self.count = 0  # keys added that were not already (reported) in it

    def _positions(self, keys: Sequence[bytes]) -> np.ndarray:
        h = _hashes(self._secret, keys)
        h2 = h[:, 1] | np.uint64(1)  # odd: the probes never collapse onto one position
        i = np.arange(self.probes, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around mod 2**64 is part of the scheme
            return (h[:, :1] + i[None, :] * h2[:, None]) % np.uint64(self.bits)

    def _test(self, pos: np.ndarray) -> np.ndarray:
        bits = (self._array[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return np.asarray(bits.all(axis=1), dtype=bool)

    def contains(self, keys: Sequence[bytes]) -> np.ndarray:
        """bool [N]: each key possibly seen (False: certainly not)."""
        return self._test(self._positions(keys))

    def add(self, keys: Sequence[bytes]) -> np.ndarray:
        """Add ``keys``; bool [N]: True for each key that was new (not reported seen, before it or earlier in the
        same call)."""
        new = np.zeros(len(keys), dtype=bool)
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(bytes(k), i)
        order = list(first.values())
        pos = self._positions([keys[i] for i in order])
        fresh = ~self._test(pos)
        new[np.asarray(order, dtype=np.int64)[fresh]] = True
        flat = pos[fresh].reshape(-1)
        np.bitwise_or.at(self._array, flat >> np.uint64(3), (1 << (flat & np.uint64(7))).astype(np.uint8))
        self.count += int(fresh.sum())
        return new

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def to_bytes(self) -> bytes:
        return frame(_BLOOM_MAGIC, {"capacity": self.capacity, "count": self.count, "fp": self.fp_rate},
                     self._secret, self._array.tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> BloomFilter:
        header, parts = unframe("Bloom filter", _BLOOM_MAGIC, data)
        try:
            secret, bits = parts
            count = int(header["count"])
            bloom = cls(int(header["capacity"]), float(header["fp"]), secret=secret)
        except (InvalidArgumentError, ValueError, TypeError, KeyError) as exc:
            raise ExtractionStateError(f"Bloom filter: bad parameters ({exc})") from None
        if len(bits) != bloom._array.size or not 0 <= count:
            raise ExtractionStateError("Bloom filter: the bit array does not match its parameters")
        bloom._array, bloom.count = np.frombuffer(bits, dtype=np.uint8).copy(), count
        return bloom


class HyperLogLog:
    """Distinct count of keys in ``2**precision`` bytes, relative standard error ``1.04/sqrt(2**precision)``."""

    def __init__(self, precision: int = 12, *, secret: bytes | None = None) -> None:
        if isinstance(precision, bool) or not isinstance(precision, int | np.integer) or not 4 <= precision <= 18:
            raise InvalidArgumentError(f"HyperLogLog precision must be an integer in 4..18, not {precision!r}")
        self.precision = int(precision)
        self.m = 1 << self.precision
        self._secret = _check_secret(secret)
        self.registers = np.zeros(self.m, dtype=np.uint8)

    @property
    def standard_error(self) -> float:
        """The relative standard error of :meth:`estimate` (1.04/sqrt(m))."""
        return 1.04 / math.sqrt(self.m)

    def add(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        word = _hashes(self._secret, keys)[:, 0]
        p = np.uint64(self.precision)
        index = (word >> (np.uint64(64) - p)).astype(np.int64)
        rest = word << p  # the other 64-p bits, left-aligned
        rho = _leading_zeros(rest) + 1
        rho = np.minimum(rho, 64 - self.precision + 1).astype(np.uint8)
        np.maximum.at(self.registers, index, rho)

    def estimate(self) -> float:
        """Ertl's improved estimator (arXiv:1702.01284, algorithm 6): unbiased across the whole range, with the
        small-range behaviour of linear counting built in, so there is no switch-over bias near ``2.5·m``."""
        m, q = self.m, 64 - self.precision
        counts = np.bincount(self.registers, minlength=q + 2).astype(np.float64)
        z = m * _tau(1.0 - counts[q + 1] / m)
        for k in range(q, 0, -1):
            z = 0.5 * (z + counts[k])
        z += m * _sigma(counts[0] / m)
        return float(m * m / (2.0 * math.log(2.0)) / z)

    def merge(self, other: HyperLogLog) -> None:
        """Fold ``other`` in (the union of both streams); both need the same precision and secret."""
        if other.precision != self.precision or other._secret != self._secret:
            raise InvalidArgumentError("only HyperLogLogs of the same precision and secret merge")
        np.maximum(self.registers, other.registers, out=self.registers)

    def copy_empty(self) -> HyperLogLog:
        """An empty sketch that merges with this one."""
        return HyperLogLog(self.precision, secret=self._secret)

    def to_bytes(self) -> bytes:
        return frame(_HLL_MAGIC, {"precision": self.precision}, self._secret, self.registers.tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> HyperLogLog:
        header, parts = unframe("HyperLogLog", _HLL_MAGIC, data)
        try:
            secret, registers = parts
            hll = cls(int(header["precision"]), secret=secret)
        except (InvalidArgumentError, ValueError, TypeError, KeyError) as exc:
            raise ExtractionStateError(f"HyperLogLog: bad parameters ({exc})") from None
        regs = np.frombuffer(registers, dtype=np.uint8)
        if regs.shape != (hll.m,) or int(regs.max(initial=0)) > 64 - hll.precision + 1:
            raise ExtractionStateError("HyperLogLog: the registers do not match its precision")
        hll.registers = regs.copy()
        return hll


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous, z = z, z + x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if z == previous:
            return z / 3.0


def _leading_zeros(w: np.ndarray) -> np.ndarray:
    """Count of leading zero bits of each uint64 (64 for 0), exactly (no float rounding)."""
    w = w.astype(np.uint64).copy()
    n = np.zeros(w.shape, dtype=np.int64)
    zero = w == 0
    for shift in (32, 16, 8, 4, 2, 1):
        small = w < (np.uint64(1) << np.uint64(64 - shift))
        n += np.where(small, shift, 0)
        w = np.where(small, w << np.uint64(shift), w)
    n[zero] = 64
    return n
