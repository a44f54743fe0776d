"""Flower's SecAgg+ with distributed DP on the real simulation engine, and the grid/range arithmetic behind it.

The runs share one Simulation Runtime started with the test-only hooks directory (``EDGESHIELD_TEST_SECAGG_HOOKS``):
each client writes there the integer vector it fed SecAgg+ (before masking), which lets the test compare the
server's decoded sum with the plain sum of what the clients sent, and a ``drop.json`` there makes a client leave
the protocol after it has shared its keys.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from edgeshield.fl._config import DPConfig, FLConfig, UnsupportedCombinationError, check_combination
from edgeshield.fl._secagg import (
    HOOKS_ENV,
    MODULUS,
    SecAggRoundInfo,
    conditional_round,
    plan_secagg,
    zcdp_epsilon,
)
from edgeshield.fl._sim import FLResult, Simulator

CLIENTS = 4


def _cfg(mode: str = "distributed", rounds: int = 1, z: float = 1.0) -> FLConfig:
    dp = DPConfig(mode=mode, noise_multiplier=z, clip=1.0) if mode != "none" else DPConfig(clip=1.0)
    return FLConfig(clients=CLIENTS, clients_per_round=CLIENTS, rounds=rounds, dp=dp, secagg=True, batch_size=64)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secagg-hooks")


@pytest.fixture(scope="module")
def sim(hooks: Path) -> Iterator[Simulator]:
    saved = os.environ.get(HOOKS_ENV)
    os.environ[HOOKS_ENV] = str(hooks)  # before Ray starts: its workers inherit the environment
    try:
        with Simulator(CLIENTS, num_cpus=2, client_cpus=1) as s:
            yield s
    finally:
        if saved is None:
            os.environ.pop(HOOKS_ENV, None)
        else:
            os.environ[HOOKS_ENV] = saved


def _run(sim: Simulator, hooks: Path, cfg: FLConfig, drop: dict[str, object] | None = None) -> FLResult:
    for f in hooks.iterdir():
        f.unlink()
    if drop is not None:
        (hooks / "drop.json").write_text(json.dumps(drop), encoding="utf-8")
    return sim.run(cfg)


def _sent(hooks: Path, rnd: int, key: str) -> dict[int, np.ndarray]:
    out = {}
    for f in sorted(hooks.glob(f"r{rnd}-c*.npz")):
        with np.load(f) as z:
            out[int(f.stem.split("-c")[1])] = np.asarray(z[key])
    return out


def _rounds(res: FLResult) -> list[SecAggRoundInfo]:
    rounds = res.extra["secagg"]["rounds"]
    assert all(isinstance(r, SecAggRoundInfo) for r in rounds)
    return list(rounds)


def test_aggregate_is_the_exact_sum_carries_the_noise_and_hides_every_update(sim: Simulator, hooks: Path) -> None:
    res = _run(sim, hooks, _cfg(rounds=2))
    plan = res.extra["secagg"]["plan"]
    assert len(res.history) == 2
    for info in _rounds(res):
        sent = _sent(hooks, info.round, "sent")
        clean = _sent(hooks, info.round, "clean")
        assert sorted(sent) == list(range(CLIENTS)) and len(info.contributors) == CLIENTS
        assert info.total is not None
        # exact: the server's decoded SecAgg+ sum is the plain sum of the clients' quantised, noised vectors
        np.testing.assert_array_equal(info.total, sum(sent.values()))
        # the server's strategy was handed one parameter set for every client (the aggregate), none of theirs
        assert info.received_distinct == 1
        assert not any(np.array_equal(v, info.total) for v in sent.values())
        # distributed DP: the sum carries discrete Gaussian noise of variance sigma_total² (n shares of sigma_c²)
        noise = info.total - sum(clean.values())
        ratio = float(np.var(noise)) / plan["sigma_total"] ** 2
        assert 0.75 < ratio < 1.33, ratio  # d = 650 coordinates: the variance estimate's std is ~6 %
        assert abs(float(np.mean(noise))) < 5 * plan["sigma_total"] / math.sqrt(noise.size)
        for v in clean.values():  # the rounded clipped update respects the conditional-rounding bound
            assert float(np.linalg.norm(v)) <= plan["bound"]
    rec = res.history[-1]
    assert rec.epsilon_rdp is not None and rec.epsilon_pld is not None and rec.epsilon_pld <= rec.epsilon_rdp
    assert res.extra["secagg"]["z_effective_min"] == pytest.approx(1.0)
    assert res.extra["secagg"]["tau"] == 0.0
    assert res.metadata()["fl.mode"] == "distributed"


def test_a_client_dropping_out_mid_protocol_is_reconstructed(sim: Simulator, hooks: Path) -> None:
    res = _run(sim, hooks, _cfg(), drop={"round": 1, "cids": [2]})
    (info,) = _rounds(res)
    assert info.dropped == ["client-2"] and sorted(info.contributors) == ["client-0", "client-1", "client-3"]
    sent = _sent(hooks, 1, "sent")
    assert sorted(sent) == [0, 1, 3]
    assert info.total is not None
    # client 2's pairwise masks were in the others' vectors: the server rebuilt its key from the shares to remove them
    np.testing.assert_array_equal(info.total, sum(sent.values()))
    assert "dropped out of SecAgg+" in res.history[0].rejected["client-2"]
    # its noise share is missing: the accountant is told the noise that was actually added
    assert res.extra["secagg"]["z_effective_min"] == pytest.approx(math.sqrt(3 / 4))


def test_secagg_without_dp_sums_the_clipped_rounded_updates(sim: Simulator, hooks: Path) -> None:
    res = _run(sim, hooks, _cfg(mode="none"))
    (info,) = _rounds(res)
    sent, clean = _sent(hooks, 1, "sent"), _sent(hooks, 1, "clean")
    assert all(np.array_equal(sent[c], clean[c]) for c in sent)  # no noise
    assert info.total is not None
    np.testing.assert_array_equal(info.total, sum(sent.values()))
    assert res.history[0].epsilon_rdp is None


def test_plan_fits_the_modulus_and_flowers_int32_quantiser() -> None:
    for clients, z in ((2, 0.5), (4, 1.0), (50, 3.0), (300, 1.0)):
        cfg = FLConfig(clients=clients, clients_per_round=clients, rounds=1, secagg=True,
                       dp=DPConfig(mode="distributed", noise_multiplier=z, clip=2.0))
        plan = plan_secagg(cfg, 650, z)
        assert clients * plan.quantization_range < MODULUS  # the modular sum and the weight sum never wrap
        assert plan.quantization_range < 2**31  # Flower casts the quantised values to int32
        assert plan.quantization_range == 2 * plan.clip_range  # Flower's quantiser is the identity + R
        assert plan.gamma == pytest.approx(2.0 / plan.grid_steps)
        # an honest value stays inside the range unless a noise draw passes 14 sigma
        assert plan.bound + 1 + 14 * plan.sigma_client <= plan.clip_range
        assert plan.sigma_total == pytest.approx(z * plan.bound)
        assert plan.bound / plan.grid_steps - 1 < 1e-4  # the rounding costs almost nothing in sensitivity


def test_too_many_clients_for_the_modulus_is_refused() -> None:
    cfg = FLConfig(clients=50_000, clients_per_round=10, rounds=1, secagg=True,
                   dp=DPConfig(mode="distributed", noise_multiplier=20.0))
    with pytest.raises(UnsupportedCombinationError, match="grid steps per clip"):
        plan_secagg(cfg, 650, 20.0)


def test_conditional_rounding_is_unbiased_and_bounded() -> None:
    x = np.array([0.25, -1.5, 3.75, 0.0, 10.5])
    draws = np.stack([conditional_round(x, math.inf) for _ in range(4000)])
    assert np.all(draws - np.floor(x) >= 0) and np.all(draws - np.floor(x) <= 1)
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=0.05)
    bound = float(np.linalg.norm(x)) + 0.2
    assert all(np.linalg.norm(conditional_round(x, bound)) <= bound for _ in range(200))


def test_zcdp_bound_matches_the_continuous_gaussian_on_a_fine_grid() -> None:
    cfg = _cfg(rounds=3)
    plan = plan_secagg(cfg, 650, 1.0)
    eps, tau = zcdp_epsilon(plan, [CLIENTS] * 3, 1e-5)
    rho = 3 / 2  # three rounds of the Gaussian mechanism at z = 1: rho = 1/(2 z²) each
    assert tau == 0.0
    assert eps == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)), rel=1e-6)


def test_secagg_refuses_per_update_defences_and_distributed_needs_secagg() -> None:
    with pytest.raises(UnsupportedCombinationError, match="hides individual updates"):
        check_combination(FLConfig(secagg=True, aggregator="median"))
    with pytest.raises(UnsupportedCombinationError, match="needs secagg = true"):
        check_combination(FLConfig(dp=DPConfig(mode="distributed", noise_multiplier=1.0)))
    with pytest.raises(UnsupportedCombinationError, match="cannot see under secure aggregation"):
        check_combination(FLConfig(secagg=True, dp=DPConfig(mode="central", noise_multiplier=1.0, adaptive=True)))
