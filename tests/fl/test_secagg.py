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
    MIN_COHORT,
    MODULUS,
    NoiseShareError,
    SecAggRoundInfo,
    client_share,
    client_vector,
    conditional_round,
    plan_secagg,
    skip_probability,
    zcdp_epsilon,
)
from edgeshield.fl._sim import FLResult, Simulator, effective_noise_multiplier
from edgeshield.privacy import epsilon_for

CLIENTS = 4


def _cfg(mode: str = "distributed", rounds: int = 1, z: float = 1.0, per_round: int = CLIENTS) -> FLConfig:
    dp = DPConfig(mode=mode, noise_multiplier=z, clip=1.0) if mode != "none" else DPConfig(clip=1.0)
    return FLConfig(clients=CLIENTS, clients_per_round=per_round, rounds=rounds, dp=dp, secagg=True, batch_size=64)


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
    # its share was fixed for a cohort of 4 before it left: ε rises to what 3 shares buy, and is reported so
    assert info.cohort == CLIENTS and info.z_charged == pytest.approx(math.sqrt(3 / 4))
    rec = res.history[0]
    assert rec.epsilon_rdp is not None
    assert rec.epsilon_rdp == pytest.approx(epsilon_for(math.sqrt(3 / 4), 1.0, 1, 1e-5).rdp)
    assert rec.epsilon_rdp > epsilon_for(1.0, 1.0, 1, 1e-5).rdp


def test_poisson_cohorts_of_any_size_carry_the_full_noise_and_meet_the_target(sim: Simulator, hooks: Path) -> None:
    target, rounds = 4.0, 8
    cfg = _cfg(rounds=rounds, per_round=2).with_(dp=DPConfig(mode="distributed", target_epsilon=target, clip=1.0))
    z = effective_noise_multiplier(cfg)
    assert z is not None
    res = _run(sim, hooks, cfg)
    plan = res.extra["secagg"]["plan"]
    infos = _rounds(res)
    assert [i.round for i in infos] == list(range(1, rounds + 1)) and len(res.history) == rounds
    for info in infos:
        assert info.cohort == len(info.sampled) and info.dropped == []
        assert info.z_charged == pytest.approx(z)  # every round is charged z: summed at full noise, or skipped
        if info.cohort < MIN_COHORT:  # decided from the draw alone: nothing was sent, nothing summed
            assert info.status == "skipped" and not list(hooks.glob(f"r{info.round}-c*.npz"))
            continue
        assert info.status == "summed" and len(info.contributors) == info.cohort
        assert info.share_sigma == pytest.approx(plan["sigma_total"] / math.sqrt(info.cohort))
        assert info.z_effective == pytest.approx(z)
        # the shares the clients added (grid units) sum to z·Δ₂ whatever the cohort
        assert info.total is not None
        noise = info.total - sum(_sent(hooks, info.round, "clean").values())
        assert 0.75 < float(np.var(noise)) / plan["sigma_total"] ** 2 < 1.33
    eps = res.history[-1].epsilon_rdp
    assert eps is not None
    assert eps == pytest.approx(epsilon_for(z, 0.5, rounds, 1e-5).rdp)
    assert 0.99 * target <= eps <= target  # the calibration's tolerance, from below: the target is met
    p = skip_probability(CLIENTS, 0.5)
    assert p == pytest.approx(0.5)  # P(Binomial(3, 1/2) < 2)
    assert res.extra["secagg"]["skip_delta"] == pytest.approx(min(1.0, (1 + math.exp(eps)) * rounds * p))
    assert res.extra["secagg_skip_delta"] == res.extra["secagg"]["skip_delta"]


def test_a_missing_or_tampered_noise_share_is_refused() -> None:
    cfg = FLConfig(clients=10, clients_per_round=5, rounds=1, secagg=True,
                   dp=DPConfig(mode="distributed", noise_multiplier=1.0))
    plan = plan_secagg(cfg, 650, 1.0).to_dict()
    good = plan["sigma_total"] / math.sqrt(3)
    assert client_share(plan, {"cohort": 3, "noise-share": good}, sample_num=3) == pytest.approx(good)
    bad: list[tuple[dict[str, object], str]] = [
        ({"cohort": 3, "noise-share": good / 2}, "plan gives"),  # a smaller share than the cohort needs
        ({"cohort": 6, "noise-share": plan["sigma_total"] / math.sqrt(6)}, "setup announced"),  # a larger cohort
        ({"cohort": 1, "noise-share": plan["sigma_total"]}, "outside"),  # below the minimum cohort
        ({"cohort": 11, "noise-share": plan["sigma_total"] / math.sqrt(11)}, "outside"),  # more than N
        ({"noise-share": good}, "'cohort' is missing"),
        ({"cohort": 3}, "'noise-share' is missing"),
        ({"cohort": True, "noise-share": good}, "'cohort'"),
        ({"cohort": 3, "noise-share": math.nan}, "finite"),
        ({"cohort": 3, "noise-share": str(good)}, "'noise-share'"),
    ]
    for config, match in bad:
        with pytest.raises(NoiseShareError, match=match):
            client_share(plan, config, sample_num=3)
    with pytest.raises(NoiseShareError, match="outside"):  # the share a client adds never exceeds what the grid holds
        client_vector(np.zeros(650), plan, z=1.0, share=2 * plan["sigma_max"], ledger=None)
    assert client_share(plan_secagg(cfg.with_(dp=DPConfig(clip=1.0)), 650, None).to_dict(), {}) == 0.0


def test_the_client_app_refuses_a_tampered_share_before_training(tmp_path: Path) -> None:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from edgeshield.fl._secagg import _masked_train

    cfg = _cfg(per_round=2)
    plan = plan_secagg(cfg, 650, 1.0)
    config: dict[str, bool | bytes | float | int | str] = {
        "server-round": 1, "cid": 0, "job": json.dumps(cfg.to_dict()), "plan": json.dumps(plan.to_dict()),
        "attack": "", "ledger-dir": str(tmp_path), "cohort": 2,
        "noise-share": plan.share_sigma(4),  # the share for 4 sent to a cohort of 2: half the noise
    }
    fitins = FitIns(ndarrays_to_parameters([np.zeros(650)]), config)
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")
    state = RecordDict()
    state.config_records[RECORD_KEY_STATE] = ConfigRecord({"sample_num": 2})
    with pytest.raises(NoiseShareError, match="plan gives"):
        _masked_train(msg, Context(run_id=1, node_id=1, node_config={}, state=state, run_config={}))


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
        # an honest value stays inside the range unless a noise draw passes 14 sigma, for the largest share a round
        # can ask for (the smallest cohort SecAgg+ sums)
        assert plan.sigma_max == pytest.approx(plan.share_sigma(MIN_COHORT))
        assert plan.bound + 1 + 14 * plan.sigma_max <= plan.clip_range
        assert plan.sigma_total == pytest.approx(z * plan.bound)
        for n in range(MIN_COHORT, clients + 1):  # n shares of sigma_c(n) sum to z·Δ₂, and none exceeds sigma_max
            assert plan.share_sigma(n) <= plan.sigma_max
            assert math.sqrt(n) * plan.share_sigma(n) == pytest.approx(plan.sigma_total)
            assert plan.z_effective(n, n) == pytest.approx(z)
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


def test_the_benchmarks_grids_hold_with_room_for_the_smallest_cohort() -> None:
    # 1,247 one-example clients, 25 expected per round, z for ε = 1 over 20 rounds at δ = 1e-5 (1.154)
    cfg = FLConfig(clients=1247, clients_per_round=25, rounds=20, secagg=True,
                   dp=DPConfig(mode="distributed", noise_multiplier=1.154, clip=0.3))
    plan = plan_secagg(cfg, 650, 1.154)
    assert plan.grid_steps > 100 * 1000 and plan.bound / plan.grid_steps - 1 < 1e-5
    assert skip_probability(1247, 25 / 1247) < 1e-9
    assert skip_probability(20, 1.0) == 0.0


def test_zcdp_bound_matches_the_continuous_gaussian_on_a_fine_grid() -> None:
    cfg = _cfg(rounds=3)
    plan = plan_secagg(cfg, 650, 1.0)
    eps, tau = zcdp_epsilon(plan, [(CLIENTS, CLIENTS), (2, 2), (3, 3)], 1e-5)
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
