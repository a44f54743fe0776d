from __future__ import annotations

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import OodRateSignal, QueryBudget


@pytest.fixture(scope="module")
def signal(digits):
    return OodRateSignal.fit(digits.x_train[:1000], digits.x_train[1000:], components=20, window=100)


def test_benign_clients_do_not_alarm(signal, digits):
    for start in range(0, 300, 20):  # tested after every batch, as the server does
        state = signal.observe("benign", digits.x_test[start : start + 20])
        assert not state.alarm
    assert state.stats["ood_rate"] < 0.1 and state.stats["p_value"] > 1e-3


def test_uniform_probes_alarm_within_ten(signal):
    rng = np.random.default_rng(0)
    assert not signal.observe("probe", rng.uniform(0, 1, (5, 64))).alarm  # below min_samples
    state = signal.observe("probe", rng.uniform(0, 1, (5, 64)))
    assert state.alarm and state.stats["ood_rate"] > 0.9 and state.stats["p_value"] < 1e-6


def test_a_few_probes_among_clean_queries_alarm(signal, digits):
    rng = np.random.default_rng(1)
    signal.observe("mixed", digits.x_test[:10])
    assert signal.observe("mixed", rng.uniform(0, 1, (6, 64))).alarm


def test_window_is_bounded(signal, digits):
    for _ in range(5):
        signal.observe("w", digits.x_test[:60])
    assert signal.state("w").stats["window"] == 100
    signal.reset("w")
    assert signal.state("w").stats["window"] == 0


def test_bad_arguments(signal):
    with pytest.raises(InvalidArgumentError):
        OodRateSignal(signal.detector, 1.0, window=10, min_samples=20)
    with pytest.raises(InvalidArgumentError):
        OodRateSignal(signal.detector, 1.0, null_rate=1.5)
    with pytest.raises(InvalidArgumentError):
        OodRateSignal(signal.detector, 1.0, alpha=0.0)
    with pytest.raises(InvalidArgumentError):
        QueryBudget(0)
    with pytest.raises(InvalidArgumentError):
        QueryBudget(10, window_s=0)


# --- query budget --------------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_counts_distinct_inputs_only(digits):
    budget = QueryBudget(50)
    for _ in range(10):  # an honest client resending the same 40 inputs
        assert not budget.observe("repeat", digits.x_test[:40]).alarm
    assert budget.state("repeat").stats["distinct"] == 40
    assert not budget.observe("new", digits.x_test[:50]).alarm
    state = budget.observe("new", digits.x_test[50:51])
    assert state.alarm and state.stats["distinct"] == 51


def test_budget_window_forgets_old_inputs(digits):
    clock = _Clock()
    budget = QueryBudget(30, window_s=60.0, clock=clock)
    budget.observe("c", digits.x_test[:30])
    clock.now = 61.0
    assert not budget.observe("c", digits.x_test[30:60]).alarm
    assert budget.state("c").stats["distinct"] == 30
    clock.now = 62.0
    assert budget.observe("c", digits.x_test[60:61]).alarm


def test_budget_memory_is_bounded(digits):
    budget = QueryBudget(10)
    budget.observe("big", digits.x_train)
    assert len(budget._seen["big"]) == 11 and budget.state("big").alarm
    budget.reset("big")
    assert budget.state("big").stats["distinct"] == 0


def test_budget_sees_tiny_perturbations_as_new(digits):
    budget = QueryBudget(5)
    x = np.repeat(digits.x_test[:1], 6, axis=0) + np.arange(6, dtype=np.float32)[:, None] * 1e-6
    assert budget.observe("noise", x).alarm
