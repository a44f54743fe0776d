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

from edgeshield.fl._config import DPConfig, FLConfig
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


def test_central_dp_with_robust_aggregators_reports_epsilon_for_the_run_s_sampling(sim: Simulator) -> None:
    """Central DP × trimmed mean (fixed-size cohorts, replace-one RDP, no PLD) and × FLTrust (its count form,
    Poisson); every accepted cell of the whole matrix runs in tests/fl/test_matrix.py."""
    from edgeshield.privacy import epsilon_for

    z = 1.0
    base = FLConfig(clients=7, clients_per_round=5, rounds=2, lr=0.5, fltrust_root=50,
                    dp=DPConfig(mode="central", noise_multiplier=z, clip=1.0))
    trimmed = sim.run(base.with_(aggregator="trimmed_mean", aggregator_params={"beta": 0.2}),
                      malicious={0: "nan", 1: "nan"})
    assert trimmed.config.sampling_scheme == "fixed"
    for rnd, r in enumerate(trimmed.history, start=1):
        assert len(r.clients) == 5 and len(set(r.clients)) == 5  # exactly m, without replacement
        assert r.epsilon_rdp == pytest.approx(epsilon_for(z, 5 / 7, rnd, 1e-5, sampling="fixed").rdp)
        assert r.epsilon_pld is None  # dp-accounting has no PLD for sampling without replacement
        # a sampled NaN sender is rejected at the door and counted as the zero vector (m stays 5)
        bad = {"client-0", "client-1"} & set(r.clients)
        assert set(r.rejected) == bad and all(r.rejected[c].startswith("nonfinite") for c in bad)
    meta = trimmed.metadata()
    assert meta["fl.sampling"] == "fixed" and meta["fl.epsilon_pld"] == "none" and meta["fl.mode"] == "central"
    assert float(meta["fl.epsilon"]) == pytest.approx(trimmed.epsilon, rel=1e-5)
    assert all(np.isfinite(p).all() for p in trimmed.params)

    fltrust = sim.run(base.with_(aggregator="fltrust"))
    assert fltrust.config.sampling_scheme == "poisson" and fltrust.metadata()["fl.sampling"] == "poisson"
    last = fltrust.history[-1]
    want = epsilon_for(z, 5 / 7, 2, 1e-5)
    assert last.epsilon_rdp == pytest.approx(want.rdp) and last.epsilon_pld == pytest.approx(want.pld)


def test_central_dp_fixed_sampling_charges_a_fixed_sampling_ledger(sim: Simulator, tmp_path: Path) -> None:
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.privacy import PrivacyLedger, epsilon_for

    cfg = FLConfig(clients=6, clients_per_round=5, rounds=2, aggregator="krum", aggregator_params={"f": 1},
                   dp=DPConfig(mode="central", noise_multiplier=2.0, clip=1.0))
    poisson_ledger = PrivacyLedger(tmp_path / "poisson.sqlite", epsilon_budget=100.0, delta=1e-5)
    with pytest.raises(InvalidArgumentError, match="sampling='fixed'"):
        sim.run(cfg, ledger=poisson_ledger)  # refused before the run starts
    budget = epsilon_for(2.0, 5 / 6, 1, 1e-5, sampling="fixed").rdp * 1.001
    ledger = PrivacyLedger(tmp_path / "fixed.sqlite", epsilon_budget=budget, delta=1e-5, sampling="fixed")
    res = sim.run(cfg, ledger=ledger)
    assert len(res.history) == 1 and res.stop_reason is not None and "round 2" in res.stop_reason
    assert ledger.epsilon("client-5") == pytest.approx(res.history[-1].epsilon_rdp, rel=1e-6)


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
