"""Canonical input keys: jittered copies share one key, distinct honest inputs do not, the registry persists."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield._arrays import canonical
from edgeshield.adversarial import InputSpec
from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction import GridKeys, LeaderKeys, collision_rate, digest_keys, keys_for

_TAG = b"edgeshield/key/leader/v1"


def _oracle(rows: np.ndarray, threshold: float) -> list[bytes]:
    """Brute force: each row, in order, takes the earliest leader within the threshold or becomes one."""
    leaders = np.empty((0, rows.shape[1]), dtype=np.float32)
    out = []
    for row in rows.astype(np.float32):
        near = np.flatnonzero(np.abs(leaders - row).max(axis=1, initial=0) <= np.float32(threshold))
        if not near.size:
            leaders = np.concatenate([leaders, row[None]])
        out.append(hashlib.sha256(_TAG + (leaders[near[0]] if near.size else row).tobytes()).digest())
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), features=st.integers(1, 12), centres=st.integers(1, 40),
       rows=st.integers(1, 300), spread=st.sampled_from([0.02, 0.04, 0.06, 0.1]), batches=st.integers(1, 5))
def test_indexed_lookup_equals_brute_force(seed, features, centres, rows, spread, batches):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, 1, (centres, features))
    x = (c[rng.integers(0, centres, rows)] + rng.uniform(-spread, spread, (rows, features))).astype(np.float32)
    keys = LeaderKeys(0.04)
    got = [k for part in np.array_split(x, batches) if len(part) for k in keys.keys(part)]
    assert got == _oracle(x, keys.match_radius)


def test_indexed_lookup_equals_brute_force_past_reindexing():
    """Enough leaders for the index to re-choose its coordinates several times (at 64, 128, 256, ... leaders)."""
    rng = np.random.default_rng(7)
    c = rng.uniform(0, 1, (700, 16))
    spread = np.where(rng.random((1500, 1)) < 0.5, 0.02, 0.05)  # half the copies match a leader, half barely not
    x = (c[rng.integers(0, 700, 1500)] + rng.uniform(-1, 1, (1500, 16)) * spread).astype(np.float32)
    keys = LeaderKeys(0.04)
    got = [k for part in np.array_split(x, 9) for k in keys.keys(part)]
    assert got == _oracle(x, keys.match_radius)
    assert 700 < len(set(got)) < 1400  # lookups across calls (the index) decided many of them


def _jitter(kind: str, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    copy = centre.astype(np.float64)
    if kind == "pixel":  # the attack: one pixel moved by 1e-6..5e-5
        copy[rng.integers(copy.size)] += rng.choice([-1, 1]) * rng.uniform(1e-6, 5e-5)
    elif kind == "uniform":  # every pixel moved, up to radius/2
        copy += rng.uniform(-0.02, 0.02, copy.shape)
    elif kind == "sparse":
        idx = rng.choice(copy.size, rng.integers(1, copy.size + 1), replace=False)
        copy[idx] += rng.choice([-0.02, 0.02], idx.size)
    return copy.astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), copies=st.integers(2, 12),
       kinds=st.lists(st.sampled_from(["pixel", "uniform", "sparse", "same"]), min_size=1, max_size=4))
def test_every_copy_within_half_radius_shares_one_key_whichever_came_first(digits, seed, copies, kinds):
    rng = np.random.default_rng(seed)
    centre = digits.x_test[rng.integers(len(digits.x_test))]
    jittered = np.stack([_jitter(kinds[i % len(kinds)], centre, rng) for i in range(copies)])
    others = digits.x_train[:50]  # distinct honest inputs interleaved: they must not capture a copy
    stream = np.concatenate([jittered, others])[rng.permutation(copies + 50)]
    keys = LeaderKeys(0.04)
    got = [k for part in np.array_split(stream, 3) for k in keys.keys(part)]
    copy_keys = {k for k, row in zip(got, stream, strict=True) if any((row == j).all() for j in jittered)}
    assert len(copy_keys) == 1
    assert copy_keys.isdisjoint(k for k, row in zip(got, stream, strict=True) if any((row == o).all() for o in others))


def test_a_copy_just_beyond_the_radius_is_a_new_input(digits):
    """The claim's edge, so that the test above can fail: beyond L∞ radius of every leader, a new key."""
    keys = LeaderKeys(0.04)
    x = digits.x_test[:1]
    far = x.copy()
    far[0, 30] += 0.0401 if far[0, 30] < 0.5 else -0.0401
    near = x.copy()
    near[0, 30] += 0.0399 if near[0, 30] < 0.5 else -0.0399
    a, b, c = keys.keys(x)[0], keys.keys(far)[0], keys.keys(near)[0]
    assert a == c != b


def _noisy(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0, sigma, x.shape), 0, 1).astype(np.float32)


def test_distinct_digits_never_collide(digits):
    """Distinct load_digits images (values k/16) differ by at least 1/16 > 0.04 in some pixel: no honest collision.
    With sensor noise added they stay absent (measured: none at sigma 0.01 or 0.05, five seeds, 1797 images)."""
    x = np.concatenate([digits.x_train, digits.x_test])
    assert collision_rate(LeaderKeys(0.04), x) == 0.0
    for sigma, seed in ((0.01, 1), (0.05, 2)):
        assert collision_rate(LeaderKeys(0.04), _noisy(x, sigma, seed)) <= 0.005


def test_collision_rate_counts_rows_that_share_a_key():
    x = np.array([[0.0], [0.01], [0.5], [0.5], [0.9]], dtype=np.float32)
    assert collision_rate(LeaderKeys(0.04), x) == pytest.approx(2 / 4)  # [0.5] counted once: rows are distinct
    with pytest.raises(InvalidArgumentError):
        collision_rate(LeaderKeys(0.04), np.empty((0, 3), dtype=np.float32))


def test_grid_keys_one_key_per_grid_point():
    spec = InputSpec(shape=(None, 4), quantum=1 / 16)
    k = np.array([0, 1, 7, 16])
    ways = [
        (k / 16).astype(np.float32),
        k.astype(np.float32) * np.float32(1 / 16),
        k.astype(np.float32) / np.float32(16),
        np.float32(k * 0.0625),
        (k / 16).astype(np.float64),
        np.nextafter((k / 16).astype(np.float32), np.float32(2)),  # one ulp up: still on the grid for validate
    ]
    keys = GridKeys(1 / 16)
    got = {keys.keys(w[None])[0] for w in ways}
    assert len(got) == 1
    assert spec.on_grid(ways[-1]).all()
    snapped = canonical(spec.snap(ways[1][None]))
    assert got == {hashlib.sha256(b"edgeshield/key/grid/v1" + snapped[0].tobytes()).digest()}
    assert keys.keys((np.array([0, 1, 7, 15]) / 16).astype(np.float32)[None])[0] not in got
    assert keys.export_state() is None and keys.describe() == {"kind": "grid", "quantum": 0.0625}


def test_keys_for_picks_grid_or_leader():
    assert isinstance(keys_for(InputSpec(shape=(None, 4), quantum=1 / 255)), GridKeys)
    assert isinstance(keys_for(InputSpec(shape=(None, 4))), LeaderKeys)
    assert keys_for(None, radius=0.1).describe()["radius"] == 0.1


def test_digest_keys_is_the_old_exact_digest():
    x = np.random.default_rng(0).uniform(0, 1, (5, 2, 3))
    assert digest_keys(x) == [hashlib.sha256(canonical(x)[i].tobytes()).digest() for i in range(5)]
    jittered = x.copy()
    jittered[0, 0, 0] += 1e-6
    assert digest_keys(jittered)[0] != digest_keys(x)[0]


def test_bad_inputs_are_typed_errors():
    keys = LeaderKeys(0.04)
    keys.keys(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        keys.keys(np.zeros((2, 5), dtype=np.float32))
    for bad in (np.nan, np.inf):
        with pytest.raises(InvalidArgumentError):
            keys.keys(np.full((1, 4), bad, dtype=np.float32))
        with pytest.raises(InvalidArgumentError):
            GridKeys(0.5).keys(np.full((1, 4), bad))
    for radius in (0, -1, float("nan"), True):
        with pytest.raises(InvalidArgumentError):
            LeaderKeys(radius)
    with pytest.raises(InvalidArgumentError):
        LeaderKeys(max_leaders=0)
    with pytest.raises(InvalidArgumentError):
        GridKeys(0)
    assert keys.keys(np.zeros((0, 4), dtype=np.float32)) == []


def test_export_import_round_trip(digits):
    keys = LeaderKeys(0.04)
    first = keys.keys(digits.x_test[:200])
    restored = LeaderKeys(0.04)
    restored.import_state(keys.export_state())
    jittered = (digits.x_test[:200] + np.float32(0.015)).astype(np.float32)
    assert restored.keys(jittered) == first == keys.keys(jittered)
    assert restored.describe() == keys.describe()
    empty = LeaderKeys(0.04)
    empty.import_state(LeaderKeys(0.04).export_state())
    assert len(empty) == 0


def test_eviction_forgets_the_least_recently_used():
    keys = LeaderKeys(0.04, max_leaders=32)
    rows = (np.arange(40, dtype=np.float32)[:, None] * np.float32(0.1)).repeat(3, axis=1)
    first = keys.keys(rows[:32])
    keys.keys(rows[:4])  # touch the four oldest: now the most recently used
    keys.keys(rows[32:])
    assert len(keys) <= 32
    assert keys.keys(rows[:4]) == first[:4]  # kept
    assert keys.keys(rows[4:5] + np.float32(0.01)) != first[4:5]  # forgotten: a jittered copy is a new input


def _blob(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_malformed_state_is_refused():
    good = LeaderKeys(0.04)
    good.keys(np.random.default_rng(0).uniform(0, 1, (10, 4)).astype(np.float32))
    with np.load(io.BytesIO(good.export_state())) as npz:
        arrays = {k: npz[k] for k in npz.files}
    variants = [
        b"not a zip",
        b"",
        _blob(**{k: v for k, v in arrays.items() if k != "used"}),
        _blob(**{**arrays, "leaders": arrays["leaders"].astype(np.float64)}),
        _blob(**{**arrays, "radius": np.asarray(0.05)}),
        _blob(**{**arrays, "version": np.asarray(2)}),
        _blob(**{**arrays, "used": arrays["used"][:-1]}),
        _blob(**{**arrays, "used": arrays["used"] + 10**9}),
        _blob(**{**arrays, "features": np.asarray(5)}),
        _blob(**{**arrays, "leaders": np.where(arrays["leaders"] > 0.5, np.float32(np.nan), arrays["leaders"])}),
        _blob(**{**arrays, "leaders": np.concatenate([arrays["leaders"][:1]] * 10)}),
        _blob(**{**arrays, "leaders": np.array([object()] * 10, dtype=object)}),
    ]
    for data in variants:
        fresh = LeaderKeys(0.04)
        with pytest.raises(ExtractionStateError):
            fresh.import_state(data)
    with pytest.raises(ExtractionStateError):
        LeaderKeys(0.04).import_state("text")  # type: ignore[arg-type]


def test_import_beyond_max_leaders_keeps_the_most_recent():
    big = LeaderKeys(0.04)
    rows = (np.arange(50, dtype=np.float32)[:, None] * np.float32(0.1)).repeat(2, axis=1)
    keys = big.keys(rows)
    small = LeaderKeys(0.04, max_leaders=10)
    small.import_state(big.export_state())
    assert len(small) == 10 and small.keys(rows[40:]) == keys[40:]


def test_thread_safe(digits):
    keys = LeaderKeys(0.04)
    x = digits.x_test[:100]
    results: list[list[bytes]] = []

    def work(seed: int) -> None:
        jitter = np.random.default_rng(seed).uniform(-0.02, 0.02, x.shape)
        results.append(keys.keys((x + jitter).astype(np.float32)))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert len(keys) == 100
