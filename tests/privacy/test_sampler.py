"""The sampler check of benchmarks/_sampler.py at tiny sizes: Mironov's leak is found in the textbook sampler and
not in ours, and the privacy-loss audit passes ours and catches a mechanism with half the noise it claims."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _sampler
from edgeshield.privacy import LaplaceMechanism


def test_mironov_leak_in_the_textbook_sampler_only() -> None:
    counts = _sampler.mironov_counts(3000, 1.0)
    assert counts["textbook_self_misses"] == 0  # the inverter finds every output of M(0) under M(0)
    assert counts["textbook"] > 0.3 * 3000  # most textbook outputs are impossible under the neighbour
    assert counts["ours"] == 0


def test_the_inverter_is_exact_on_hand_picked_outputs() -> None:
    j = np.array([1, 12345, 2**52 + 12345, 2**53 - 2], dtype=np.int64)
    y = 1.0 + _sampler._textbook_noise(j, 2.0)
    assert _sampler._possible_textbook(y, 1.0, 2.0).all()
    # Between two neighbouring u the output jumps by many floats near the centre: the floats in between are
    # outputs no u gives.
    a, b = (1.0 + _sampler._textbook_noise(np.array([k], dtype=np.int64), 2.0)[0] for k in (2**52, 2**52 + 1))
    between = np.nextafter(a, b)
    assert between != b and not _sampler._possible_textbook(np.array([between]), 1.0, 2.0).any()


def test_empirical_loss_within_epsilon_for_ours() -> None:
    result = _sampler.empirical_privacy_loss(1.0, 4000, 10)
    assert result["ratio_to_epsilon"] <= 1.0
    assert result["lower_bound"] <= result["max_log_ratio"] <= result["upper_bound"]
    assert result["events"] == 20 and result["draws"] == 4000


def test_the_audit_catches_a_mechanism_with_half_its_noise() -> None:
    claimed = 1.0
    broken = LaplaceMechanism(1.0, 2 * claimed)  # noise for eps = 2, claiming eps = 1
    s0 = np.asarray(broken.release(np.zeros(20_000)))
    s1 = np.asarray(broken.release(np.ones(20_000)))
    result = _sampler.audit_samples(s0, s1, _sampler.thresholds_for(claimed, 20), claimed)
    assert result["ratio_to_epsilon"] > 1.2
