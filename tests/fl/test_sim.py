"""Federated runs on Flower's real simulation engine (Ray): one shared runtime for the module, plus one
`fl simulate` through the CLI on a fresh runtime that ends in a protected bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from edgeshield.fl._config import AGGREGATOR_NAMES, DPConfig, FLConfig, UnsupportedCombinationError, check_combination
from edgeshield.fl._sim import Simulator

MAX_CLIENTS = 10


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(MAX_CLIENTS, num_cpus=2, client_cpus=1) as s:
        yield s


class Events:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.seen.append(event)


def test_bad_updates_are_rejected_reported_and_never_averaged(sim: Simulator) -> None:
    cfg = FLConfig(clients=4, clients_per_round=4, rounds=2, aggregator="fedavg", lr=0.5)
    events = Events()
    res = sim.run(cfg, malicious={1: "nan", 2: "stale_round"}, events=events)
    for r in res.history:
        assert r.rejected["client-1"].startswith("nonfinite")
        assert r.rejected["client-2"].startswith("round")
        assert "client-0" not in r.rejected
    kinds = {(e.kind, e.actor, e.data["round"]) for e in events.seen}
    assert ("fl.update_rejected", "client-1", 1) in kinds and ("fl.update_rejected", "client-2", 2) in kinds
    assert all(np.isfinite(p).all() for p in res.params)  # the NaN was never averaged in
    assert res.accuracy > 0.3


@pytest.mark.parametrize("aggregator", ["median", "krum"])
def test_sign_flip_attacker_is_resisted(sim: Simulator, aggregator: str) -> None:
    params = {"krum": {"f": 1}}.get(aggregator, {})
    base = FLConfig(clients=7, clients_per_round=7, rounds=3, lr=0.5, alpha=100.0, min_examples=60,
                    aggregator=aggregator, aggregator_params=params)
    attacked = sim.run(base, malicious={6: "sign_flip"})
    fedavg = sim.run(base.with_(aggregator="fedavg", aggregator_params={}), malicious={6: "sign_flip"})
    assert attacked.accuracy > 0.7
    assert attacked.accuracy > fedavg.accuracy
    if aggregator == "krum":
        assert all("client-6" in r.rejected for r in attacked.history)


def _runnable(mode: str, aggregator: str) -> FLConfig:
    params: dict[str, Any] = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1},
                              "norm_bound": {"max_norm": 1.0}}.get(aggregator, {})
    dp = DPConfig(mode=mode, noise_multiplier=0.8, clip=1.0) if mode != "none" else DPConfig()
    return FLConfig(clients=7, clients_per_round=7, rounds=1, dp=dp, aggregator=aggregator,
                    aggregator_params=params)


def test_every_accepted_combination_runs(sim: Simulator) -> None:
    """The runnable half of the {mode} × {aggregator} matrix (the refusals: tests/fl/test_config.py)."""
    ran, refused = [], []
    for mode in ("none", "central", "local"):
        for aggregator in AGGREGATOR_NAMES:
            cfg = _runnable(mode, aggregator)
            try:
                check_combination(cfg)
            except UnsupportedCombinationError:
                refused.append((mode, aggregator))
                continue
            res = sim.run(cfg)
            assert len(res.history) == 1 and np.isfinite(res.history[0].accuracy)
            ran.append((mode, aggregator))
    assert len(ran) == 8 + 2 + 8 and len(refused) == 6


def test_local_dp_client_refuses_over_its_budget(sim: Simulator) -> None:
    from edgeshield.privacy import epsilon_for

    z = 2.0
    one_round = epsilon_for(z, 1.0, 1, 1e-5).rdp
    cfg = FLConfig(clients=3, clients_per_round=3, rounds=2,
                   dp=DPConfig(mode="local", noise_multiplier=z, clip=1.0, client_budget=one_round * 1.01))
    res = sim.run(cfg)
    assert res.history[0].refused == {}
    assert set(res.history[1].refused) == {"client-0", "client-1", "client-2"}
    assert all("budget" in reason for reason in res.history[1].refused.values())


def test_central_dp_server_ledger_stops_before_an_over_budget_release(sim: Simulator, tmp_path: Path) -> None:
    from edgeshield.privacy import PrivacyLedger, epsilon_for

    cfg = FLConfig(clients=4, clients_per_round=2, rounds=3,
                   dp=DPConfig(mode="central", noise_multiplier=1.5, clip=1.0))
    budget = epsilon_for(1.5, 0.5, 2, 1e-5).rdp * 1.001
    ledger = PrivacyLedger(tmp_path / "server-ledger.sqlite", epsilon_budget=budget, delta=1e-5)
    res = sim.run(cfg, ledger=ledger)
    assert len(res.history) == 2 and res.stop_reason is not None and "round 3" in res.stop_reason
    assert ledger.epsilon("client-3") == pytest.approx(res.history[-1].epsilon_rdp, rel=1e-6)
