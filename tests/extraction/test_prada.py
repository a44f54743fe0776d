from __future__ import annotations

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import PradaDetector, calibrate_delta, shapiro_w


def _stream(detector: PradaDetector, client: str, batches, predict) -> list:
    return [detector.observe(client, b, predict(b)) for b in batches]


def test_benign_digit_stream_never_alarms(digits):
    detector = PradaDetector(delta=0.9, min_samples=30)
    x = digits.x_test
    states = _stream(detector, "benign", np.array_split(x, len(x) // 10), digits.predict)
    assert states[-1].distances > 400
    assert all(not s.alarm for s in states)
    assert min(s.w for s in states if s.w is not None) > 0.93


def _jacobian_style(seeds: np.ndarray, generations: int, seed: int, step: float = 0.1) -> list[np.ndarray]:
    """Papernot-style augmentation: each generation re-queries every point so far moved by ``step·sign(·)``.

    The sign of a random vector stands in for the sign of the model's Jacobian (same geometry: every new query
    sits a fixed L∞ step from an earlier one), which is what PRADA keys on.
    """
    rng = np.random.default_rng(seed)
    pool, queries = seeds, [seeds]
    for _ in range(generations):
        new = np.clip(pool + step * rng.choice([-1.0, 1.0], pool.shape), 0, 1)
        queries.append(new)
        pool = np.concatenate([pool, new])
    flat = np.concatenate(queries).astype(np.float32)
    return np.array_split(flat, len(flat) // 10)


def test_jacobian_style_synthetic_queries_alarm_quickly(digits):
    batches = _jacobian_style(digits.x_train[:10], 5, seed=0)
    states = _stream(PradaDetector(delta=0.9, min_samples=30), "attacker", batches, digits.predict)
    first = next(i for i, s in enumerate(states) if s.alarm)
    assert sum(len(b) for b in batches[: first + 1]) <= 300
    assert states[first].w < 0.9
    assert states[-1].alarm  # and it stays raised while the attack goes on


def test_clients_are_independent(digits):
    detector = PradaDetector(min_samples=30)
    for q in _jacobian_style(digits.x_train[5:10], 6, seed=1):
        detector.observe("attacker", q, digits.predict(q))
    benign = detector.observe("benign", digits.x_test[:100], digits.predict(digits.x_test[:100]))
    assert detector.state("attacker").alarm
    assert not benign.alarm


def test_memory_bound_per_client(digits):
    detector = PradaDetector(min_samples=30, max_history=7, max_distances=50)
    rng = np.random.default_rng(3)
    for _ in range(30):
        q = rng.uniform(0, 1, (40, 64)).astype(np.float32)
        state = detector.observe("c", q, digits.predict(q))
        assert detector.stored_queries("c") <= 10 * 7
        assert state.distances <= 50
    assert detector.stored_queries("c") > 7  # several classes are used
    detector.reset("c")
    assert detector.stored_queries("c") == 0


def test_too_few_distances_gives_no_statistic():
    state = PradaDetector(min_samples=30).observe("c", np.eye(10), np.zeros(10, dtype=int))
    assert state.w is None and not state.alarm and state.distances == 9


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        PradaDetector(delta=0)
    with pytest.raises(InvalidArgumentError):
        PradaDetector(min_samples=2)
    with pytest.raises(InvalidArgumentError):
        PradaDetector().observe("c", np.zeros((3, 4)), np.zeros(2))
    with pytest.raises(InvalidArgumentError):
        shapiro_w(np.ones(2))


def test_shapiro_w_separates_normal_from_bimodal():
    rng = np.random.default_rng(0)
    assert shapiro_w(rng.normal(size=300)) > 0.98
    assert shapiro_w(np.r_[np.zeros(150), np.ones(150)] + rng.normal(0, 0.01, 300)) < 0.8
    assert shapiro_w(np.ones(50)) == 0.0
    assert calibrate_delta(np.array([0.95, 0.97, 0.99]), quantile=0.0) == 0.95


def test_exact_repeats_do_not_alarm(digits):
    """Honest retries and resends (the same inputs again) teach an attacker nothing and must not look like one."""
    detector = PradaDetector(delta=0.9, min_samples=30)
    repeated = np.repeat(digits.x_test[:5], 40, axis=0)
    states = _stream(detector, "retrying", np.array_split(repeated, 20), digits.predict)
    assert not any(s.alarm for s in states)
