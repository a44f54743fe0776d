"""PRADA on a plain install: no scipy (its Shapiro–Wilk test is edgeshield._stats.shapiro)."""

from __future__ import annotations

import sys

import numpy as np


def test_prada_needs_no_scipy(monkeypatch, digits):
    """A plain install has no scipy: PRADA's normality test used to raise MissingDependencyError (HTTP 500)."""
    from edgeshield.extraction import PradaDetector, calibrate_dup_distance

    for name in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` now raises ImportError
    state = PradaDetector(min_samples=30).observe("c", digits.x_test[:80], digits.predict(digits.x_test[:80]))
    assert state.w is not None and 0.9 < state.w <= 1.0
    x = digits.x_train[:200]
    retakes = (x + np.float32(0.01)).astype(np.float32)
    dup = calibrate_dup_distance(retakes, x, digits.x_train)  # the near-duplicate path needs no scipy either
    state = PradaDetector(min_samples=30, dup_distance=dup).observe("d", np.concatenate([x, retakes]),
                                                                   digits.predict(np.concatenate([x, retakes])))
    assert state.ignored >= 1 and state.w is not None
