"""The aggregation wrappers without Flower's runtime: robust aggregation reports, central DP clips, noises from
edgeshield.privacy (never np.random) and divides by the expected number of clients; adaptive clipping tracks the
quantile."""

from __future__ import annotations

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.fl._config import DPConfig, FLConfig
from edgeshield.fl._robust import make_aggregator
from edgeshield.fl._strategy import AdaptiveClip, CentralDP, ClientUpdate, RobustAggregation, build_aggregation


def _updates(vectors: list[np.ndarray]) -> list[ClientUpdate]:
    return [ClientUpdate(f"client-{i}", v.astype(np.float64), 10.0) for i, v in enumerate(vectors)]


def test_robust_aggregation_reports_scores_and_outliers() -> None:
    rng = np.random.default_rng(0)
    honest = [np.ones(20) + 0.01 * rng.standard_normal(20) for _ in range(6)]
    out = RobustAggregation(make_aggregator("median"), uniform_weights=False).aggregate(
        1, _updates([*honest, -50 * np.ones(20)]), 20, root_update=None)
    assert np.allclose(out.update, 1.0, atol=0.05)
    assert out.outliers == ["client-6"]
    assert max(out.scores, key=lambda k: out.scores[k]) == "client-6"


def test_krum_left_out_clients_are_rejected_with_a_reason() -> None:
    honest = [np.full(5, 1.0 + 0.01 * i) for i in range(6)]
    out = RobustAggregation(make_aggregator("krum", f=1), uniform_weights=True).aggregate(
        1, _updates([*honest, np.full(5, 40.0)]), 5, root_update=None)
    assert out.rejected.get("client-6")


def test_too_few_clients_skips_the_round_and_says_why() -> None:
    out = RobustAggregation(make_aggregator("bulyan", f=1), uniform_weights=True).aggregate(
        1, _updates([np.ones(3)] * 3), 3, root_update=None)
    assert not out.update.any() and all("needs at least" in r for r in out.rejected.values())


def test_central_dp_clips_sums_and_divides_by_the_expected_count(monkeypatch: pytest.MonkeyPatch) -> None:

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("np.random used for privacy noise")

    for name in ("normal", "standard_normal", "laplace"):
        monkeypatch.setattr(np.random, name, forbidden)
    dp = CentralDP(RobustAggregation(make_aggregator("fedavg"), uniform_weights=True),
                   clip=1.0, noise_multiplier=1e-9, expected_clients=4.0)
    vectors = [np.array([3.0, 4.0]), np.array([0.3, 0.4]), np.array([0.0, 0.0])]
    out = dp.aggregate(1, _updates(vectors), 2, root_update=None)
    # clipped: (0.6, 0.8), (0.3, 0.4), (0, 0); sum (0.9, 1.2); ÷ 4 expected clients (not the 3 that came)
    assert np.allclose(out.update, [0.225, 0.3], atol=1e-6)
    assert out.clipped == ["client-0"] and out.clip == 1.0


def test_central_dp_noise_has_the_stated_scale() -> None:
    dp = CentralDP(RobustAggregation(make_aggregator("fedavg"), uniform_weights=True),
                   clip=2.0, noise_multiplier=1.5, expected_clients=10.0)
    out = dp.aggregate(1, [], 20_000, root_update=None)  # nobody sampled: the release is pure noise
    assert out.noise_std == pytest.approx(0.3)
    assert float(np.std(out.update)) == pytest.approx(0.3, rel=0.03)


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    clip = AdaptiveClip(clip=1.0, target_quantile=0.5, lr=0.2, count_stddev=0.0)
    clip.update(unclipped=10, expected_clients=10)  # every update under the clip: it shrinks
    assert clip.clip == pytest.approx(np.exp(-0.2 * 0.5))
    clip.update(unclipped=0, expected_clients=10)
    assert clip.clip == pytest.approx(1.0)


def test_build_aggregation_follows_the_config() -> None:
    assert isinstance(build_aggregation(FLConfig(aggregator="median"), None), RobustAggregation)
    agg = build_aggregation(FLConfig(clients=40, clients_per_round=30, dp=DPConfig(
        mode="central", noise_multiplier=1.0, adaptive=True)), 1.0)
    assert isinstance(agg, CentralDP) and agg.adaptive is not None
    # z split between updates and count (Andrew et al.): the update noise is larger than z
    assert agg.update_noise_multiplier > 1.0
    assert agg.adaptive.count_stddev == pytest.approx(30 / 20)  # expected clients / 20 (Andrew et al.'s default)


# --- central DP with every aggregator: the fixed-size scheme ------------------------------------------------------
def _fixed(name: str, m: int, *, clip: float = 1.0, z: float = 1.0, **params: object) -> CentralDP:
    return CentralDP(RobustAggregation(make_aggregator(name, **params), uniform_weights=True),
                     clip=clip, noise_multiplier=z, expected_clients=float(m), sampling="fixed")


def test_fixed_scheme_counts_a_missing_or_rejected_update_as_zero() -> None:
    """m stays the cohort size whoever answers: a sampled client whose update is missing (dropout) or was rejected at
    the door is the zero vector, so the output is the one a zero update would give, and Δ does not change."""
    rng = np.random.default_rng(5)
    vectors = [rng.normal(size=6) for _ in range(3)]
    for name, params in (("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1})):
        dp = _fixed(name, 5, **params)
        three, out3 = dp.fixed_aggregate(1, _updates(vectors), 6, root_update=None)
        five, _ = dp.fixed_aggregate(1, _updates([*vectors, np.zeros(6), np.zeros(6)]), 6, root_update=None)
        assert np.allclose(three, five), name
        assert set(out3.scores) == {"client-0", "client-1", "client-2"}  # the stand-ins are never reported
        assert all(not c.startswith("(absent") for c in [*out3.accepted, *out3.rejected, *out3.outliers])
        assert dp.sensitivity == _fixed(name, 5, **params).sensitivity
    mean, _ = _fixed("fedavg", 5).fixed_aggregate(1, _updates(vectors), 6, root_update=None)
    clipped = [v / max(1.0, float(np.linalg.norm(v))) for v in vectors]
    assert np.allclose(mean, np.sum(clipped, axis=0) / 5)  # ÷ m, not ÷ the 3 that came
    with pytest.raises(InvalidArgumentError, match="cohort of 2"):
        _fixed("median", 2).fixed_aggregate(1, _updates(vectors), 6, root_update=None)


def test_fixed_scheme_projects_onto_the_clip_ball_and_noises_with_z_times_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("np.random used for privacy noise")

    # the coordinate-wise median of three unit vectors leaves the unit ball: (1, 1, 1)/√2 has norm 1.22
    s = 1 / np.sqrt(2)
    vectors = [np.array([s, s, 0.0]), np.array([s, 0.0, s]), np.array([0.0, s, s])]
    dp = _fixed("median", 3, clip=1.0, z=1e-6)
    before, _ = dp.fixed_aggregate(1, _updates(vectors), 3, root_update=None)
    assert np.allclose(before, np.ones(3) / np.sqrt(3))
    for name in ("normal", "standard_normal", "laplace"):
        monkeypatch.setattr(np.random, name, forbidden)
    out = dp.aggregate(1, _updates(vectors), 3, root_update=None)
    assert np.allclose(out.update, before, atol=1e-4) and out.clip == 1.0
    monkeypatch.undo()
    # nobody answered: the release is pure noise, its std z·Δ with Δ = 2C for the median (m times fedavg's 2C/m)
    med = _fixed("median", 5, clip=2.0, z=1.5)
    assert med.sensitivity == pytest.approx(4.0)
    noise = med.aggregate(1, [], 20_000, root_update=None)
    assert noise.noise_std == pytest.approx(6.0)
    assert float(np.std(noise.update)) == pytest.approx(6.0, rel=0.03)
    assert _fixed("fedavg", 5, clip=2.0, z=1.5).aggregate(1, [], 10, root_update=None).noise_std == \
        pytest.approx(1.5 * 4.0 / 5)


def test_build_aggregation_picks_the_scheme_and_the_fltrust_form() -> None:
    central = DPConfig(mode="central", noise_multiplier=1.0, clip=0.5)
    med = build_aggregation(FLConfig(clients=20, clients_per_round=8, aggregator="median", dp=central), 1.0)
    assert isinstance(med, CentralDP) and med.sampling == "fixed" and med.cohort_size == 8
    assert med.sensitivity == pytest.approx(1.0)  # 2C
    trim = build_aggregation(FLConfig(clients=20, clients_per_round=8, aggregator="trimmed_mean",
                                      aggregator_params={"beta": 0.25}, dp=central), 1.0)
    assert isinstance(trim, CentralDP) and trim.sensitivity == pytest.approx(1.0 / 4)  # 2C/(m − 2k), k = 2
    fl = build_aggregation(FLConfig(clients=20, clients_per_round=8, aggregator="fltrust", dp=central), 1.0)
    assert isinstance(fl, CentralDP) and fl.sampling == "poisson"
    assert getattr(fl.inner.aggregator, "normalise", None) == "count"
    with pytest.raises(InvalidArgumentError, match="not Poisson-sound"):
        CentralDP(RobustAggregation(make_aggregator("median"), uniform_weights=True),
                  clip=1.0, noise_multiplier=1.0, expected_clients=4.0)


def test_fltrust_under_poisson_releases_the_sum_of_its_terms_over_the_expected_count() -> None:
    dp = CentralDP(RobustAggregation(make_aggregator("fltrust", normalise="count"), uniform_weights=True),
                   clip=1.0, noise_multiplier=1e-9, expected_clients=4.0)
    root = np.array([5.0, 0.0])  # clipped to C = 1 before FLTrust rescales to its norm
    out = dp.aggregate(1, _updates([np.array([2.0, 0.0]), np.array([1.0, 1.0]), np.array([-1.0, 0.0])]), 2,
                       root_update=root)
    t = 1 / np.sqrt(2)
    assert np.allclose(out.update, (np.array([1.0, 0.0]) + t * np.array([t, t])) / 4, atol=1e-6)


def test_draw_cohort_fixed_is_exactly_m_distinct_clients() -> None:
    from edgeshield.fl._sim import _SystemSampler
    from edgeshield.fl._strategy import draw_cohort

    for rng in (_SystemSampler(), np.random.default_rng(1)):
        seen = set()
        for _ in range(50):
            c = draw_cohort(rng, 12, 5, "fixed")
            assert len(c) == len(set(c)) == 5 and c == sorted(c) and all(0 <= i < 12 for i in c)
            seen.update(c)
        assert seen == set(range(12))
    sizes = {len(draw_cohort(np.random.default_rng(s), 12, 5, "poisson")) for s in range(30)}
    assert len(sizes) > 1  # Poisson: the count varies


def test_target_epsilon_is_calibrated_with_the_run_s_sampling_scheme() -> None:
    from edgeshield.fl._sim import effective_noise_multiplier
    from edgeshield.privacy import epsilon_for

    cfg = FLConfig(clients=20, clients_per_round=8, rounds=5, aggregator="median",
                   dp=DPConfig(mode="central", target_epsilon=4.0))
    assert cfg.sampling_scheme == "fixed"
    z = effective_noise_multiplier(cfg)
    assert z is not None
    got = epsilon_for(z, 8 / 20, 5, 1e-5, sampling="fixed")
    assert got.pld is None and 3.9 < got.rdp <= 4.0  # the replace-one accountant confirms the target
    assert epsilon_for(z, 8 / 20, 5, 1e-5).rdp < got.rdp  # not this run's figure (another scheme)
