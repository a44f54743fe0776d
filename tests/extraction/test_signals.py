from __future__ import annotations

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import OodRateSignal


@pytest.fixture(scope="module")
def signal(digits):
    return OodRateSignal.fit(digits.x_train[:1000], digits.x_train[1000:], components=20, window=100, min_samples=50)


def test_benign_clients_stay_below_alarm_rate(signal, digits):
    state = signal.observe("benign", digits.x_test[:100])
    assert not state.alarm and state.stats["ood_rate"] < 0.1


def test_uniform_probes_alarm(signal):
    rng = np.random.default_rng(0)
    assert not signal.observe("probe", rng.uniform(0, 1, (20, 64))).alarm  # too few yet
    state = signal.observe("probe", rng.uniform(0, 1, (40, 64)))
    assert state.alarm and state.stats["ood_rate"] > 0.9


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
        OodRateSignal(signal.detector, 1.0, alarm_rate=1.5)
