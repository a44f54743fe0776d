"""Served-watermark units (issue 14): decisions per canonical key or keyed region, the jitter-majority thief, one
trial per unit in verify_copy, the provability bound and the evidence store's schema 3 (unit column)."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.errors import EvidenceIntegrityError, InvalidArgumentError
from edgeshield.watermark import (
    UNIT_SIZE,
    Evidence,
    EvidenceStore,
    Marks,
    ServedWatermark,
    digest_units,
    marks_needed,
    provable_session,
    verify_copy,
)

KEY = bytes(range(32))
K = 10


def _rows(n: int, seed: int = 0, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


def _keys(x: np.ndarray) -> list[bytes]:
    """A canonical key per row: what the server's InputKeys gives every jittered copy of that row."""
    return [hashlib.sha256(b"test-key" + r.tobytes()).digest() for r in np.ascontiguousarray(x, np.float32)]


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(K, dtype=np.float32)[labels]


def _jitter(x: np.ndarray, rng: np.random.Generator, size: float = 5e-5) -> np.ndarray:
    return (x + rng.uniform(-size, size, x.shape)).astype(np.float32)


# --- units and decisions -------------------------------------------------------------------------------------------
def test_mark_is_the_same_for_every_jittered_copy_sharing_a_key() -> None:
    x, rng = _rows(2000), np.random.default_rng(1)
    labels = rng.integers(0, K, len(x))
    keys = _keys(x)
    wm = ServedWatermark(KEY, 0.2, classes=K)
    first = wm.mark(x, labels, keys=keys)
    assert isinstance(first, Marks) and first.marked.dtype == np.bool_ and first.labels.dtype == np.int64
    assert all(len(u) == UNIT_SIZE for u in first.units) and 300 < first.marked.sum() < 500
    assert first.marked_units() == [u for u, k in zip(first.units, first.marked, strict=True) if k]
    for _ in range(3):
        again = wm.mark(_jitter(x, rng), labels, keys=keys)
        assert np.array_equal(again.marked, first.marked) and np.array_equal(again.labels, first.labels)
        assert again.units == first.units
    # without keys each jittered copy is its own unit: a fresh coin flip
    jittered = _jitter(x, rng)
    loose = wm.mark(jittered, labels)
    assert loose.units == digest_units(jittered) and not np.array_equal(loose.marked, first.marked)
    assert wm.mark(x, labels).units == digest_units(x)  # keys=None: sha256 of the canonical row bytes


def test_relabel_apply_and_swap_top_agree_with_mark() -> None:
    x, rng = _rows(300, seed=2), np.random.default_rng(2)
    probs = rng.random((300, K))
    probs /= probs.sum(1, keepdims=True)
    keys = _keys(x)
    for regions in (None, 8):
        wm = ServedWatermark(KEY, 0.3, classes=K, regions=regions)
        m = wm.mark(x, probs.argmax(1), keys=keys)
        out, marked = wm.apply(x, probs, keys=keys)
        assert np.array_equal(marked, m.marked) and np.array_equal(out.argmax(1), m.labels)
        assert np.array_equal(out, wm.swap_top(probs, m))
        assert out[~marked].tobytes() == probs[~marked].tobytes()
        labels, mask = wm.relabel(x, probs.argmax(1), keys=keys)
        assert np.array_equal(labels, m.labels) and np.array_equal(mask, m.marked)
        assert (m.labels[m.marked] != probs.argmax(1)[m.marked]).all()


def test_region_units_mark_every_input_of_a_class_in_a_region_alike() -> None:
    x = _rows(4000, seed=3, d=8)
    labels = np.random.default_rng(3).integers(0, 3, len(x))
    wm = ServedWatermark(KEY, 0.3, classes=K, regions=4)
    m = wm.mark(x, labels, keys=_keys(x))  # keys do not matter for region units
    codes = wm.region_codes(x)
    assert codes.dtype == np.uint64 and int(codes.max()) < 16
    assert m.units == wm.mark(x, labels).units
    seen: dict[tuple[int, int], tuple[bytes, bool, int]] = {}
    for code, v, u, k, a in zip(codes.tolist(), labels.tolist(), m.units, m.marked.tolist(), m.labels.tolist(),
                                strict=True):
        assert seen.setdefault((code, v), (u, k, a)) == (u, k, a)  # one unit, one decision, one answered label
    assert len({u for u, _, _ in seen.values()}) == len(seen)  # distinct (region, label) pairs: distinct units
    assert any(k for _, k, _ in seen.values()) and not all(k for _, k, _ in seen.values())
    other = ServedWatermark(bytes(range(1, 33)), 0.3, classes=K, regions=4)
    assert not np.array_equal(other.region_codes(x), codes)  # the hyperplanes are keyed
    with pytest.raises(InvalidArgumentError):
        wm.units(x)  # region units need the victim's labels
    with pytest.raises(InvalidArgumentError):
        ServedWatermark(KEY, classes=K).region_codes(x)
    for bad in (0, 65, True, 2.5):
        with pytest.raises(InvalidArgumentError):
            ServedWatermark(KEY, classes=K, regions=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        ServedWatermark(KEY, classes=K, regions=4, bounds=(1.0, 0.0))


def test_unit_offsets_are_uniform_over_the_wrong_labels() -> None:
    wm = ServedWatermark(KEY, 0.5, classes=K, regions=12)
    x = _rows(20000, seed=4)
    labels = np.random.default_rng(4).integers(0, K, len(x))
    m = wm.mark(x, labels)
    unit_labels = {u: (int(a) - int(v)) % K for u, a, v, k in zip(m.units, m.labels, labels, m.marked, strict=True)
                   if k}
    counts = np.bincount(list(unit_labels.values()), minlength=K)
    assert counts[0] == 0 and len(unit_labels) > 2000
    expected = len(unit_labels) / (K - 1)
    assert float(((counts[1:] - expected) ** 2 / expected).sum()) < 40  # chi2, 8 degrees of freedom


def test_malformed_keys_and_units_are_refused() -> None:
    wm = ServedWatermark(KEY, 0.1, classes=K)
    x = _rows(3)
    for keys in ([b"x" * 31] * 3, [b"x" * 32] * 2, b"x" * 96, ["a" * 32] * 3):
        with pytest.raises(InvalidArgumentError):
            wm.mark(x, np.zeros(3, np.int64), keys=keys)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        wm.decide([b"short"])
    with pytest.raises(InvalidArgumentError):
        verify_copy(lambda z: _one_hot(np.zeros(len(z), np.int64)), x, np.zeros(3, np.int64), classes=K,
                    units=[b"u" * 16, b"u" * 15, b"u" * 16])


# --- the jitter-majority thief -------------------------------------------------------------------------------------
def _nn(train_x: np.ndarray, train_y: np.ndarray):  # type: ignore[no-untyped-def]
    def scores(z: np.ndarray) -> np.ndarray:
        d = (z**2).sum(1)[:, None] - 2 * z @ train_x.T + (train_x**2).sum(1)[None, :]
        return _one_hot(train_y[d.argmin(1)])

    return scores


@pytest.mark.parametrize("with_keys", [True, False])
def test_the_jitter_majority_thief_keeps_the_marks_only_when_keys_are_given(with_keys: bool) -> None:
    """Every input asked as 3 jittered copies, the thief keeps the majority label and memorises it (a 1-NN copy);
    the evidence is every marked answer with its unit."""
    x, rng = _rows(1000, seed=5), np.random.default_rng(5)
    victim = rng.integers(0, K, len(x))
    keys = _keys(x) if with_keys else None
    wm = ServedWatermark(KEY, 0.05, classes=K)
    answers, ev_x, ev_y, ev_u = [], [], [], []
    for _ in range(3):
        xj = _jitter(x, rng)
        m = wm.mark(xj, victim, keys=keys)
        answers.append(m.labels)
        ev_x.append(xj[m.marked])
        ev_y.append(m.labels[m.marked])
        ev_u += [u for u, k in zip(m.units, m.marked, strict=True) if k]
    votes = np.stack(answers)
    majority = np.array([np.bincount(votes[:, i], minlength=K).argmax() for i in range(len(x))])
    copy = _nn(x, majority)
    res = verify_copy(copy, np.concatenate(ev_x), np.concatenate(ev_y), classes=K, units=ev_u)
    if with_keys:
        assert res.present and res.matches == res.units >= 30 and res.evidence == 3 * res.units
    else:  # each copy its own coin flip: the majority is the victim's label almost everywhere
        assert res.p_value > 0.01 and res.match_rate < 0.15 and res.units > 100


# --- verify_copy: one trial per unit -------------------------------------------------------------------------------
def test_a_unit_counts_once_however_many_rows_it_has() -> None:
    x = _rows(50, seed=6)
    answered = np.full(50, 3)
    units = [b"U" * UNIT_SIZE] * 50
    res = verify_copy(lambda z: _one_hot(np.full(len(z), 3)), x, answered, classes=K, units=units)
    assert (res.units, res.matches, res.evidence) == (1, 1, 50)
    assert res.p_value == pytest.approx(1 / 9) and not res.present  # never below one trial's
    without = verify_copy(lambda z: _one_hot(np.full(len(z), 3)), x, answered, classes=K)
    assert without.units == without.evidence == 50 and without.present  # the old count: one trial per input


def test_majority_per_unit_and_ties_are_no_match() -> None:
    x = _rows(12, seed=7)
    answered = np.full(12, 4)
    units = [b"a" * 16] * 4 + [b"b" * 16] * 4 + [b"c" * 16] * 4
    predicted = np.array([4, 4, 4, 1, 4, 4, 1, 1, 1, 1, 1, 4])  # units a, b, c

    def suspect(z: np.ndarray) -> np.ndarray:
        return _one_hot(predicted[: len(z)])

    res = verify_copy(suspect, x, answered, classes=K, units=units)
    assert (res.units, res.matches) == (3, 1)  # a: majority 4 (match); b: a tie (no match); c: majority 1


def test_victim_labels_are_excluded_so_partly_learnt_units_match() -> None:
    x = _rows(9, seed=14)
    answered, victim = np.full(9, 4), np.full(9, 1)
    units = [b"a" * 16] * 3 + [b"b" * 16] * 3 + [b"c" * 16] * 3
    predicted = np.array([1, 1, 4, 1, 1, 1, 1, 7, 4])  # units a, b, c

    def suspect(z: np.ndarray) -> np.ndarray:
        return _one_hot(predicted[: len(z)])

    plain = verify_copy(suspect, x, answered, classes=K, units=units)
    assert (plain.units, plain.matches) == (3, 0)  # the victim's label wins every majority
    res = verify_copy(suspect, x, answered, classes=K, units=units, victim=victim)
    assert (res.units, res.matches) == (3, 1)  # a: 4 among the others (match); b: nothing else; c: a 7-4 tie
    assert verify_copy(suspect, x, answered, classes=K, units=units, victim=lambda z: _one_hot(victim)).matches == 1
    with pytest.raises(InvalidArgumentError):
        verify_copy(suspect, x, answered, classes=K, units=units, victim=victim[:5])


def test_repeated_rows_count_once_within_their_unit() -> None:
    x = np.repeat(_rows(2, seed=8), [5, 1], axis=0)  # row 0 five times, row 1 once, one unit
    predicted = np.array([2] * 5 + [7])
    res = verify_copy(lambda z: _one_hot(np.where((z == x[0]).all(1), 2, 7)), x, np.full(6, 7), classes=K,
                      units=[b"u" * 16] * 6)
    assert res.evidence == 2 and res.units == 1 and res.matches == 0  # a tie 1-1 after de-duplication
    assert predicted.size == 6


def test_no_false_claims_on_independent_suspects_at_the_threshold() -> None:
    """600 random suspects against region units' evidence (several rows each), with and without the victim's labels:
    no claim, p-values conservative."""
    wm = ServedWatermark(KEY, 0.5, classes=K, regions=7)
    x = _rows(800, seed=9)
    victim = np.random.default_rng(9).integers(0, K, len(x))
    m = wm.mark(x, victim)
    ev_x, ev_y = x[m.marked], m.labels[m.marked]
    ev_u = [u for u, k in zip(m.units, m.marked, strict=True) if k]
    rng = np.random.default_rng(10)
    ps, units = [], set()
    for i in range(600):
        if i % 2:  # the worst case under H0: anything but the victim's label
            pred = (victim[m.marked] + rng.integers(1, K, len(ev_x))) % K
            suspect = lambda z, p=pred: _one_hot(p)  # noqa: E731
        else:
            suspect = lambda z: rng.random((len(z), K))  # noqa: E731
        res = verify_copy(suspect, ev_x, ev_y, classes=K, units=ev_u, victim=victim[m.marked] if i % 3 else None)
        ps.append(res.p_value)
        units.add(res.units)
    arr = np.array(ps)
    assert units == {len(set(ev_u))} and 50 < len(set(ev_u)) < len(ev_u) / 2
    assert arr.min() > 1e-6 and (arr < 0.05).mean() <= 0.07 and (arr < 0.5).mean() <= 0.55


# --- the bound -----------------------------------------------------------------------------------------------------
def test_marks_needed_and_provable_session() -> None:
    assert marks_needed(10) == 7 and (1 / 9) ** 7 < 1e-6 <= (1 / 9) ** 6
    assert marks_needed(3) == 20 and marks_needed(10, 1e-3) == 4 and marks_needed(100) == 4
    with pytest.raises(InvalidArgumentError):
        marks_needed(2)
    with pytest.raises(InvalidArgumentError):
        marks_needed(10, 0.0)
    assert not provable_session(600, 0.01, 10)  # 6 marked units at most: short of 7
    assert provable_session(700, 0.01, 10) and provable_session(1000, 0.01, 10)
    assert not provable_session(1000, 0.01, 10, inherit=0.5)
    assert provable_session(1000, 0.05, 10, inherit=0.5) and not provable_session(1000, 0.05, 10, inherit=0.5,
                                                                                 rows_per_unit=5)
    assert not provable_session(1000, 0.05, 10, rows_per_unit=200) and not provable_session(10**6, 0.5, 2)


@settings(max_examples=40, deadline=None)
@given(queries=st.integers(1, 5000), rate=st.sampled_from([0.005, 0.01, 0.02, 0.05]))
def test_provable_session_needs_marks_needed_units(queries: int, rate: float) -> None:
    assert provable_session(queries, rate, 10) == (math.floor(queries * rate) >= marks_needed(10))


# --- evidence store: schema 3 --------------------------------------------------------------------------------------
_V1 = ("CREATE TABLE evidence (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, client TEXT NOT NULL,"
       " digest TEXT NOT NULL, label INTEGER NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL,"
       " UNIQUE (client, digest))")


def _old_store(path: Path, version: int, x: np.ndarray) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1163089750")  # "ESWV"
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute(_V1)
        if version == 2:
            conn.execute("ALTER TABLE evidence ADD COLUMN subject TEXT")
        for i, row in enumerate(x):
            data = row.tobytes()
            conn.execute("INSERT INTO evidence (time, client, digest, label, shape, dtype, data) VALUES"
                         " ('2026-01-01T00:00:00.000+00:00', 'old', ?, ?, '[8]', '<f4', ?)",
                         (hashlib.sha256(data).hexdigest(), i % K, data))
    conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_old_stores_migrate_to_schema_3_and_their_rows_are_their_own_units(tmp_path: Path, version: int) -> None:
    path, old = tmp_path / f"v{version}.db", _rows(4, seed=11, d=8)
    _old_store(path, version, old)
    with EvidenceStore(path, create=False) as store:  # read as it is, without migrating
        ev = store.evidence()
        assert ev.units == digest_units(old)
        with pytest.raises(InvalidArgumentError, match=f"schema {version}"):
            store.add("new", _rows(1, d=8), np.zeros(1, np.int64))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    conn.close()
    new = _rows(3, seed=12, d=8)
    with EvidenceStore(path) as store:
        assert store.add("new", new, np.ones(3, np.int64), subject="s", units=[b"n" * 16] * 3) == 3
        ev = store.evidence()
        assert isinstance(ev, Evidence) and len(ev.units) == 7
        assert ev.units[:4] == digest_units(old) and ev.units[4:] == [b"n" * 16] * 3
        assert ev.clients == ["old"] * 4 + ["new"] * 3 and np.array_equal(ev.x[4:], new)
        assert store.erase_subject("s") == 3
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert {r[1] for r in conn.execute("PRAGMA table_info(evidence)")} >= {"subject", "unit"}
    conn.close()


def test_units_round_trip_and_malformed_units_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    x = _rows(6, seed=13, d=8)
    units = [bytes([i]) * 16 for i in range(6)]
    with EvidenceStore(path) as store:
        for bad in ([b"u" * 15] * 6, [b"u" * 16] * 5, ["u" * 16] * 6, b"u" * 96):
            with pytest.raises(InvalidArgumentError):
                store.add("a", x, np.zeros(6, np.int64), units=bad)  # type: ignore[arg-type]
        assert store.count() == 0
        assert store.add("a", x[:4], np.arange(4), units=units[:4]) == 4
        assert store.add("b", x[4:], np.arange(2)) == 2
        ev = store.evidence("a")
        assert ev.units == units[:4] and np.array_equal(ev.labels, np.arange(4))
        assert store.evidence("b").units == digest_units(x[4:])
        xs, _, _, digests = store.load()
        assert len(xs) == 6 and digests == store.evidence().digests
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE evidence SET unit = x'0102' WHERE seq = 2")
    conn.close()
    with EvidenceStore(path, create=False) as store, pytest.raises(EvidenceIntegrityError, match="seq 2") as info:
        store.evidence()
    assert info.value.seq == 2


def test_reference_planes_split_the_reference_and_are_reproducible() -> None:
    ref = _rows(2000, seed=15) ** 3  # skewed towards 0, as digit pixels are: planes through the cube's middle miss
    wm = ServedWatermark(KEY, 0.1, classes=K, regions=12, reference=ref)
    side = (wm.region_codes(ref)[:, None] >> np.arange(12, dtype=np.uint64)) & np.uint64(1)
    share = side.astype(float).mean(axis=0)
    assert ((share > 0.15) & (share < 0.85)).all(), share  # each plane at a keyed 20..80 % quantile
    same = ServedWatermark(KEY, 0.1, classes=K, regions=12, reference=ref)
    assert np.array_equal(same.region_codes(ref.astype(np.float64)), wm.region_codes(ref))
    blind = ServedWatermark(KEY, 0.1, classes=K, regions=12)  # no reference: planes through bounds^d
    assert len(np.unique(blind.region_codes(ref))) < len(np.unique(wm.region_codes(ref)))
    assert wm.describe() == {"scheme": "served-dawn-v2", "rate": 0.1, "classes": K, "regions": 12,
                             "bounds": [0.0, 1.0]}
    for bad in (ref[:1], np.full((4, 16), np.nan)):
        with pytest.raises(InvalidArgumentError):
            ServedWatermark(KEY, 0.1, classes=K, regions=12, reference=bad)


def test_region_units_survive_the_jitter_majority_thief_without_keys() -> None:
    """Region units are computed from the row: a 5e-5 jitter rarely crosses a plane, so the 3 copies of an input
    share its unit and the majority keeps the mark even when the server has no canonical keys."""
    x, rng = _rows(1500, seed=16), np.random.default_rng(16)
    victim = rng.integers(0, K, len(x))
    wm = ServedWatermark(KEY, 0.1, classes=K, regions=10, reference=x)
    copies = [_jitter(x, rng) for _ in range(3)]
    marks = [wm.mark(xj, victim) for xj in copies]
    crossed = np.mean([u != v for u, v in zip(marks[0].units, marks[1].units, strict=True)])
    assert crossed < 0.01
    votes = np.stack([m.labels for m in marks])
    majority = np.array([np.bincount(votes[:, i], minlength=K).argmax() for i in range(len(x))])
    ev_x = np.concatenate([xj[m.marked] for xj, m in zip(copies, marks, strict=True)])
    ev_y = np.concatenate([m.labels[m.marked] for m in marks])
    ev_u = [u for m in marks for u in m.marked_units()]
    res = verify_copy(_nn(x, majority), ev_x, ev_y, classes=K, units=ev_u, victim=np.concatenate(
        [victim[m.marked] for m in marks]))
    assert res.present and res.matches >= 0.9 * res.units and res.units < res.evidence
