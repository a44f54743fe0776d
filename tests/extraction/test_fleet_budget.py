"""FleetBudget: twelve Sybil identities of one role trip the group's daily union, twelve honest devices do not."""

from __future__ import annotations

import numpy as np
import pytest

from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction import DecayingBudget, FleetBudget, QueryMonitor, ResponsePolicy

DAY = 86400.0
PER_GROUP_DAY = 1_800  # twelve honest devices of at most 100 new inputs a day, with a 50 % margin


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0 - 1_800_000_000.0 % DAY + 3600  # 01:00 UTC

    def __call__(self) -> float:
        return self.t


def _keys(rng: np.random.Generator, n: int) -> list[bytes]:
    raw = rng.bytes(32 * n)
    return [raw[i:i + 32] for i in range(0, 32 * n, 32)]


def _day(fleet: FleetBudget, clock: Clock, sends: dict[str, list[bytes]], group: str, batch: int = 10) -> set[str]:
    """Interleave every identity's batches over the day; the identities alarmed at any point."""
    alarmed: set[str] = set()
    rounds = max(len(k) for k in sends.values()) // batch
    for r in range(rounds):
        clock.t += 60
        for who, keys in sends.items():
            part = keys[r * batch:(r + 1) * batch]
            if part and fleet.observe(who, np.zeros((len(part), 4)), None, keys=part, group=group).alarm:
                alarmed.add(who)
    return alarmed


def test_twelve_sybils_trip_the_group_budget_twelve_honest_devices_do_not() -> None:
    rng = np.random.default_rng(0)
    clock = Clock()
    fleet = FleetBudget(PER_GROUP_DAY, clock=clock)
    # honest: 100 new inputs each, a third of them shared with the others (one deployment sees the same scenes)
    common = _keys(rng, 400)
    honest = {f"dev-{i}": [*_keys(rng, 67), *[common[j] for j in rng.choice(400, 33, replace=False)]]
              for i in range(12)}
    assert _day(fleet, clock, honest, "client") == set()
    sybils = {f"sybil-{i}": _keys(rng, 250) for i in range(12)}  # 3,000 distinct in all
    alarmed = _day(fleet, clock, sybils, "thief")
    assert alarmed == set(sybils)  # every identity of the group alarms on its next query
    state = fleet.state("thief")
    assert state.alarm and abs(state.stats["estimate"] / 3000 - 1) < 0.08 and state.stats["standard_error"] > 0


def test_groups_are_separate_and_a_new_utc_day_starts_afresh() -> None:
    rng = np.random.default_rng(1)
    clock = Clock()
    fleet = FleetBudget(1_000, clock=clock)
    fleet.observe("a", np.zeros((1200, 1)), None, keys=_keys(rng, 1200), group="client")
    assert fleet.state("client").alarm and not fleet.state("sensor").alarm
    assert not fleet.observe("b", np.zeros((10, 1)), None, keys=_keys(rng, 10), group="sensor").alarm
    clock.t += DAY
    assert not fleet.state("client").alarm and fleet.state("client").stats["estimate"] == 0.0


def test_repeats_and_the_sketch_error_margin() -> None:
    rng = np.random.default_rng(2)
    clock = Clock()
    fleet = FleetBudget(1_000, clock=clock)
    keys = _keys(rng, 1_000)
    for _ in range(5):  # the whole fleet sending the same 1,000 inputs: the union is 1,000, at the limit
        assert not fleet.observe("x", np.zeros((1000, 1)), None, keys=keys, group="g").alarm
    assert fleet.limit == pytest.approx(1_000 * (1 + 3 * 1.04 / 64))


def test_the_monitor_passes_the_group_and_persists_the_union(tmp_path) -> None:
    from edgeshield.extraction import MonitorStore

    rng = np.random.default_rng(3)
    clock = Clock()
    store = MonitorStore(tmp_path / "state.db")
    monitor = QueryMonitor([DecayingBudget(300, 100, clock=clock), FleetBudget(500, clock=clock)],
                           ResponsePolicy(on_alarm={"fleet_budget": "flag"}), store=store, clock=clock)
    for i in range(3):
        x = rng.uniform(0, 1, (200, 8)).astype(np.float32)
        verdict = monitor.observe(f"id-{i}", x, np.zeros(200, dtype=int), group="thief")
    assert verdict.action == "flag" and verdict.reasons == ("fleet_budget",)
    assert verdict.stats["fleet_budget"]["group"] == "thief"
    monitor.close()
    store = MonitorStore(tmp_path / "state.db")
    fleet = FleetBudget(500, clock=clock)
    QueryMonitor([fleet], store=store, clock=clock)  # the union read back at start-up
    assert fleet.state("thief").alarm
    store.put("fleet_budget", "thief", b"junk")
    with pytest.raises(ExtractionStateError, match=r"fleet_budget.*thief"):
        QueryMonitor([FleetBudget(500, clock=clock)], store=store, clock=clock)
    store.close()


def test_bad_parameters() -> None:
    with pytest.raises(InvalidArgumentError):
        FleetBudget(0)
    with pytest.raises(InvalidArgumentError):
        FleetBudget(10, precision=30)
