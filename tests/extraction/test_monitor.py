from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import (
    LabelOnly,
    OodRateSignal,
    PradaDetector,
    QueryMonitor,
    ResponsePolicy,
    Rounding,
    SignalState,
)


@dataclass
class Scripted:
    """A detector whose alarms a test sets per client (to exercise the response policy alone)."""

    name: str
    alarms: set[str] = field(default_factory=set)

    def observe(self, client_id, x, predicted):
        return SignalState(self.name, client_id in self.alarms, {"seen": len(x)})

    def reset(self, client_id):
        self.alarms.discard(client_id)


X, Y = np.zeros((2, 4)), np.zeros(2, dtype=int)


def test_actions_follow_alarms_escalation_and_stickiness():
    a, b = Scripted("a"), Scripted("b")
    seen = []
    monitor = QueryMonitor(
        [a, b],
        ResponsePolicy(on_alarm={"a": "throttle"}, default="flag", escalate={2: "block"}),
        on_alert=[lambda client, verdict: seen.append((client, verdict.action))],
    )
    assert monitor.observe("c", X, Y).action == "allow" and seen == []
    b.alarms.add("c")
    v = monitor.observe("c", X, Y)
    assert (v.action, v.reasons) == ("flag", ("b",)) and v.stats["a"] == {"seen": 2}
    a.alarms.add("c")
    assert monitor.observe("c", X, Y).action == "block"
    a.alarms.clear(), b.alarms.clear()
    assert monitor.observe("c", X, Y).action == "block"  # sticky
    assert monitor.observe("other", X, Y).action == "allow"
    monitor.reset("c")
    assert monitor.action("c") == "allow" and monitor.observe("c", X, Y).action == "allow"
    assert seen == [("c", "flag"), ("c", "block"), ("c", "block")]


def test_non_sticky_policy_relaxes():
    a = Scripted("a", {"c"})
    monitor = QueryMonitor([a], ResponsePolicy(on_alarm={"a": "degrade"}, sticky=False))
    assert monitor.observe("c", X, Y).action == "degrade"
    a.alarms.clear()
    assert monitor.observe("c", X, Y).action == "allow"


def test_output_for_picks_the_strongest_configured_policy_at_or_below_the_action():
    policy = ResponsePolicy(outputs={"allow": Rounding(2), "degrade": LabelOnly()})
    assert isinstance(policy.output_for("throttle"), Rounding)
    assert isinstance(policy.output_for("block"), LabelOnly)
    assert ResponsePolicy().output_for("degrade") is None


def test_bad_configuration():
    with pytest.raises(InvalidArgumentError):
        ResponsePolicy(on_alarm={"a": "explode"})
    with pytest.raises(InvalidArgumentError):
        ResponsePolicy(escalate={0: "block"})
    with pytest.raises(InvalidArgumentError):
        QueryMonitor([Scripted("a"), Scripted("a")])
    with pytest.raises(InvalidArgumentError):
        QueryMonitor([])


def test_real_detectors_end_to_end(digits):
    ood = OodRateSignal.fit(digits.x_train[:1000], digits.x_train[1000:], window=100, min_samples=50)
    alerts = []
    monitor = QueryMonitor(
        [PradaDetector(), ood],
        ResponsePolicy(on_alarm={"prada": "degrade", "ood_rate": "throttle"}, escalate={2: "block"}),
        on_alert=[lambda client, verdict: alerts.append(client)],
    )
    for batch in np.array_split(digits.x_test, 20):
        benign = monitor.observe("benign", batch, digits.predict(batch))
    assert benign.action == "allow" and set(benign.stats) == {"prada", "ood_rate"}
    rng = np.random.default_rng(0)
    for _ in range(10):
        probe = rng.uniform(0, 1, (10, 64)).astype(np.float32)
        verdict = monitor.observe("prober", probe, digits.predict(probe))
    assert verdict.action in ("throttle", "block") and "ood_rate" in verdict.reasons
    assert set(alerts) == {"prober"}
