"""BloomFilter and HyperLogLog: the error rates they state, measured; serialisation refuses junk."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction import BloomFilter, HyperLogLog


def _keys(n: int, seed: int) -> list[bytes]:
    raw = np.random.default_rng(seed).bytes(32 * n)
    return [raw[i:i + 32] for i in range(0, 32 * n, 32)]


@pytest.mark.parametrize("n", [1_000, 10_000, 100_000])
def test_hyperloglog_relative_error_within_three_standard_errors(n: int) -> None:
    se = 1.04 / math.sqrt(2**12)
    errors = []
    for seed in range(20):  # the secret fixed per seed: a deterministic test (a fresh sketch draws its own)
        hll = HyperLogLog(12, secret=bytes([seed]) * 32)
        hll.add(_keys(n, seed))
        errors.append(hll.estimate() / n - 1.0)
    errors_a = np.abs(np.array(errors))
    assert hll.standard_error == pytest.approx(se)
    assert errors_a.max() <= 3 * se, errors
    assert math.sqrt(float((errors_a**2).mean())) <= 1.5 * se  # about the stated error, not just a loose bound


def test_hyperloglog_ignores_repeats_and_merges_to_the_union() -> None:
    keys = _keys(6_000, 1)
    a = HyperLogLog(12)
    a.add(keys[:4_000])
    a.add(keys[:4_000])  # repeats: no change
    b = a.copy_empty()
    b.add(keys[2_000:])
    a.merge(b)
    assert abs(a.estimate() / 6_000 - 1) < 0.05
    with pytest.raises(InvalidArgumentError):
        a.merge(HyperLogLog(12))  # another secret: not the same hash, no union
    assert HyperLogLog(12).estimate() == 0.0


def test_hyperloglog_round_trip_and_refusals() -> None:
    hll = HyperLogLog(10)
    hll.add(_keys(500, 2))
    back = HyperLogLog.from_bytes(hll.to_bytes())
    assert back.estimate() == hll.estimate() and back.precision == 10
    for junk in (b"", b"ESHL1junk", hll.to_bytes()[:-20], BloomFilter(10).to_bytes()):
        with pytest.raises(ExtractionStateError):
            HyperLogLog.from_bytes(junk)
    with pytest.raises(InvalidArgumentError):
        HyperLogLog(3)


def test_bloom_false_positive_rate_at_most_twice_the_design() -> None:
    for fp in (1e-2, 1e-3):
        bloom = BloomFilter(20_000, fp)
        assert bloom.add(_keys(20_000, 3)).all()  # no key reported seen before it was added (none are repeats)
        assert bloom.contains(_keys(20_000, 3)).all()  # no false negatives
        measured = float(bloom.contains(_keys(100_000, 4)).mean())
        assert measured <= 2 * fp, (fp, measured)


def test_bloom_add_reports_new_keys_including_repeats_within_a_batch() -> None:
    keys = _keys(10, 5)
    bloom = BloomFilter(100)
    assert bloom.add([keys[0], keys[1], keys[0]]).tolist() == [True, True, False]
    assert bloom.add(keys[:3]).tolist() == [False, False, True] and bloom.count == 3


def test_bloom_round_trip_and_refusals() -> None:
    bloom = BloomFilter(1_000, 1e-3)
    keys = _keys(500, 6)
    bloom.add(keys)
    back = BloomFilter.from_bytes(bloom.to_bytes())
    assert back.contains(keys).all() and back.count == 500
    data = bytearray(bloom.to_bytes())
    for junk in (b"", b"ESBF1" + b"\0" * 40, bytes(data[:-30]), HyperLogLog(8).to_bytes()):
        with pytest.raises(ExtractionStateError):
            BloomFilter.from_bytes(junk)
    with pytest.raises(InvalidArgumentError):
        BloomFilter(0)
    with pytest.raises(InvalidArgumentError):
        BloomFilter(10, 1.5)
