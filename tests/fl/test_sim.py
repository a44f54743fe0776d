"""Federated runs on Flower's real simulation engine (Ray): one shared runtime for the module, plus one
`fl simulate` through the CLI on a fresh runtime that ends in a protected bundle."""

from __future__ import annotations

import json
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


def _privacy_ready() -> bool:
    import edgeshield.privacy as privacy

    return all(hasattr(privacy, n) for n in ("gaussian_noise", "epsilon_for", "PrivacyLedger"))


needs_privacy = pytest.mark.skipif(not _privacy_ready(), reason="edgeshield.privacy is not complete yet")


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


@needs_privacy
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


@needs_privacy
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


@needs_privacy
def test_central_dp_server_ledger_stops_before_an_over_budget_release(sim: Simulator, tmp_path: Path) -> None:
    from edgeshield.privacy import PrivacyLedger, epsilon_for

    cfg = FLConfig(clients=4, clients_per_round=2, rounds=3,
                   dp=DPConfig(mode="central", noise_multiplier=1.5, clip=1.0))
    budget = epsilon_for(1.5, 0.5, 2, 1e-5).rdp * 1.001
    ledger = PrivacyLedger(tmp_path / "server-ledger.sqlite", epsilon_budget=budget, delta=1e-5)
    res = sim.run(cfg, ledger=ledger)
    assert len(res.history) == 2 and res.stop_reason is not None and "round 3" in res.stop_reason
    assert ledger.epsilon("client-3") == pytest.approx(res.history[-1].epsilon_rdp, rel=1e-6)


@needs_privacy
def test_fl_simulate_cli_reports_epsilon_per_round_and_protects_the_model(tmp_path: Path, keyset: Any) -> None:
    """A fresh Flower runtime through `fl simulate`: central DP, ε per round = epsilon_for, bundle opens."""
    from typer.testing import CliRunner

    from edgeshield.bundles import open_session
    from edgeshield.cli import _fl
    from edgeshield.models import load_digits_split
    from edgeshield.privacy import epsilon_for

    (tmp_path / "fl.toml").write_text(
        "clients = 4\nclients_per_round = 3\nrounds = 2\nlr = 0.5\n"
        "[dp]\nmode = 'central'\nnoise_multiplier = 1.2\nclip = 1.0\ndelta = 1e-5\n", encoding="utf-8")
    out = tmp_path / "fl.esb"
    result = CliRunner().invoke(_fl.app, [
        "simulate", "--config", str(tmp_path / "fl.toml"), "--out", str(out),
        "--signing-key", str(keyset.dir / "owner.key"), "--recipient", str(keyset.dir / "device.pub"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for rnd, record in enumerate(summary["history"], start=1):
        want = epsilon_for(1.2, 0.75, rnd, 1e-5)
        assert record["epsilon_rdp"] == pytest.approx(want.rdp)
        assert record["epsilon_pld"] == pytest.approx(want.pld)
    meta = summary["metadata"]
    assert meta["fl.mode"] == "central" and meta["fl.clip"] == "1" and meta["fl.clients"] == "4"
    session = open_session(out, keyset.owner_pub, keyset.device_priv)
    x = load_digits_split().x_test[:5]
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (5, 10)


def test_bad_config_through_the_cli_is_an_input_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeshield.cli import _fl
    from edgeshield.errors import InvalidArgumentError

    (tmp_path / "fl.toml").write_text("clients = 4\nwhat = 1\n", encoding="utf-8")
    result = CliRunner().invoke(_fl.app, ["simulate", "--config", str(tmp_path / "fl.toml")])
    assert isinstance(result.exception, InvalidArgumentError) and result.exception.exit_code == 2
