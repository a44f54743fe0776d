"""The aggregation wrappers without Flower's runtime: robust aggregation reports, central DP clips, noises from
edgeshield.privacy (never np.random) and divides by the expected number of clients; adaptive clipping tracks the
quantile."""

from __future__ import annotations

import numpy as np
import pytest

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
