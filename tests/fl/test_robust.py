"""Robust aggregators: known answers, agreement with Flower's own functions, and robustness to poisoned updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeshield.errors import EdgeShieldError, InvalidArgumentError
from edgeshield.fl._robust import (
    AGGREGATORS,
    Aggregator,
    AggregatorConfigError,
    Bulyan,
    FedAvg,
    FLTrust,
    Krum,
    Median,
    MissingRootUpdateError,
    NormBound,
    TooFewClientsError,
    TrimmedMean,
    is_poisson_sound,
    make_aggregator,
    outliers,
    project_l2_ball,
    sensitivity_of,
)


def _rows(*rows: list[float]) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.float64) for r in rows]


# --- known answers ----------------------------------------------------------------------------------------------
def test_fedavg_is_the_example_weighted_mean() -> None:
    r = FedAvg().aggregate(_rows([1, 2], [3, 4]), [1, 3])
    assert r.vector.tolist() == [2.5, 3.5]
    assert r.rejected == [] and r.reasons == {} and r.clipped == []


def test_median_odd_and_even_counts() -> None:
    assert Median().aggregate(_rows([1, -4], [5, 0], [3, 9]), [1, 1, 100]).vector.tolist() == [3, 0]
    assert Median().aggregate(_rows([1], [5], [3], [4]), [1] * 4).vector.tolist() == [3.5]


def test_trimmed_mean_cuts_each_coordinate_separately() -> None:
    ups = _rows([0, 100], [1, 1], [2, 2], [3, 3], [100, 0])
    r = TrimmedMean(beta=0.2).aggregate(ups, [1] * 5)  # drops 1 low and 1 high per coordinate
    assert r.vector.tolist() == [2.0, 2.0]
    assert r.rejected == []  # trimmed coordinates are not rejections: every client counted somewhere
    assert TrimmedMean(beta=0.0).aggregate(ups, [1] * 5).vector.tolist() == [21.2, 21.2]


def test_krum_and_multi_krum_on_a_line() -> None:
    # 1-D points 0, 1, 2, 4, 100 with f = 1: each is scored by its n - f - 2 = 2 nearest (squared distances):
    # 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 4 = 5, 4 -> 4 + 9 = 13, 100 -> 96^2 + 98^2
    ups = _rows([0], [1], [2], [4], [100])
    r = Krum(f=1).aggregate(ups, [1] * 5)
    assert r.vector.tolist() == [1.0]
    assert r.rejected == [0, 2, 3, 4] and set(r.reasons) == {0, 2, 3, 4}
    assert np.allclose(r.scores, np.array([5, 2, 5, 13, 96**2 + 98**2]) / 5)  # Krum score / median score
    m = Krum(f=1, m=3).aggregate(ups, [1, 1, 2, 1, 1])
    assert m.vector.tolist() == [(0 + 1 + 2 * 2) / 4]  # weighted mean of the three lowest scores
    assert m.rejected == [3, 4]
    assert Krum(f=1, m=None).aggregate(ups, [1] * 5).rejected == [4]  # m = n - f
    assert make_aggregator("multi_krum", f=1, m=3).name == make_aggregator("multi_krum", f=1).name == "multi_krum"
    assert make_aggregator("krum", f=1).name == "krum"


def test_bulyan_known_answer() -> None:
    # n = 7, f = 1: theta = 5 selected by iterated Krum (the two far points go), beta = 3 closest to the median
    ups = _rows([0, 0], [1, 10], [2, 20], [3, 30], [4, 40], [50, -500], [-60, 600])
    r = Bulyan(f=1).aggregate(ups, [1] * 7)
    assert r.rejected == [5, 6]
    assert r.vector.tolist() == [2.0, 20.0]  # median 2 / 20 and its 3 nearest: 1, 2, 3 and 10, 20, 30


def test_fltrust_known_answer() -> None:
    root = np.array([1.0, 0.0])
    ups = _rows([2, 0], [0, 3], [-1, 0], [1, 1], [0, 0])
    r = FLTrust().aggregate(ups, [1] * 5, root_update=root)
    t = 1 / np.sqrt(2)  # trust of [1, 1]; rescaled to |root| = 1 it is [t, t]
    assert np.allclose(r.vector, (np.array([1.0, 0.0]) + t * np.array([t, t])) / (1 + t))
    assert r.rejected == [1, 2, 4]  # orthogonal, opposite, zero
    assert "zero update" in r.reasons[4] and "cosine" in r.reasons[2]
    assert np.allclose(r.scores, [0, 1, 1, 1 - t, 1])
    # every client against the root update: the model does not move
    none = FLTrust().aggregate(_rows([-1, 0], [0, -2]), [1, 1], root_update=root)
    assert none.vector.tolist() == [0.0, 0.0] and none.rejected == [0, 1]


def test_norm_bound_clips_then_runs_the_inner_aggregator() -> None:
    r = NormBound(1.0, FedAvg()).aggregate(_rows([3, 4], [0.5, 0]), [1, 1])
    assert np.allclose(r.vector, [0.55, 0.4])  # [3, 4] scaled to [0.6, 0.8]
    assert r.clipped == [0] and r.rejected == []
    inner = make_aggregator("norm_bound", max_norm=2.0, inner="fltrust")
    fr = inner.aggregate(_rows([30, 0], [-1, 0], [1, 1]), [1] * 3, root_update=np.array([1.0, 0.0]))
    assert fr.rejected == [1] and fr.clipped == [0]
    assert inner.name == "norm_bound(fltrust)"


# --- refusals ---------------------------------------------------------------------------------------------------
def test_too_few_clients_are_refused_with_the_bound() -> None:
    ups = _rows(*([i] for i in range(6)))
    with pytest.raises(TooFewClientsError, match=r"at least 7 .*4f \+ 3") as info:
        Bulyan(f=1).aggregate(ups, [1] * 6)
    assert (info.value.needed, info.value.got) == (7, 6)
    with pytest.raises(TooFewClientsError, match="2f"):
        Krum(f=2).aggregate(ups, [1] * 6)
    with pytest.raises(TooFewClientsError, match="m = 6"):
        Krum(f=1, m=6).aggregate(ups, [1] * 6)
    assert Bulyan(f=2).min_clients() == 11 and Krum(f=2).min_clients() == 7
    assert isinstance(info.value, EdgeShieldError)


def test_fltrust_refuses_without_a_usable_root_update() -> None:
    ups = _rows([1, 0], [0, 1])
    for root in (None, np.zeros(2), np.ones(3), np.array([np.nan, 1.0])):
        with pytest.raises(MissingRootUpdateError):
            FLTrust().aggregate(ups, [1, 1], root_update=root)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedsgd", {}, "unknown aggregator"),
        ("krum", {}, "missing"),
        ("krum", {"f": 1, "k": 2}, "unknown parameter"),
        ("krum", {"f": -1}, "integer >= 0"),
        ("krum", {"f": True}, "integer"),
        ("krum", {"f": 1.5}, "integer"),
        ("multi_krum", {"f": 1, "m": 0}, "integer >= 1"),
        ("trimmed_mean", {"beta": 0.5}, r"\[0, 0.5\)"),
        ("trimmed_mean", {"beta": "0.1"}, "number"),
        ("median", {"beta": 0.1}, "takes none"),
        ("norm_bound", {"max_norm": 0}, "positive"),
        ("norm_bound", {"max_norm": float("inf")}, "finite"),
        ("norm_bound", {"max_norm": 1, "inner": "nope"}, "unknown aggregator"),
        ("norm_bound", {"max_norm": 1, "inner": "krum", "inner_params": {"x": 1}}, "unknown parameter"),
        ("norm_bound", {"max_norm": 1, "inner": FedAvg(), "inner_params": {"f": 1}}, "by name"),
    ],
)
def test_make_aggregator_refuses_bad_configuration(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(AggregatorConfigError, match=match):
        make_aggregator(name, **params)


def test_every_name_builds() -> None:
    params: dict[str, dict[str, object]] = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1}}
    params["norm_bound"] = {"max_norm": 1.0, "inner": "median"}
    for name in AGGREGATORS:
        agg: Aggregator = make_aggregator(name, **params.get(name, {}))
        assert agg.name.startswith(name.split("_")[0]) or name == "multi_krum"


def test_bad_inputs_are_argument_errors() -> None:
    agg = Median()
    for ups, w in (([], []), (_rows([1], [2]), [1]), (_rows([1], [2, 3]), [1, 1]), (_rows([np.nan]), [1])):
        with pytest.raises(InvalidArgumentError):
            agg.aggregate(ups, w)
    for w in ([0, 0], [-1, 2], [np.inf, 1]):
        with pytest.raises(InvalidArgumentError):
            FedAvg().aggregate(_rows([1], [2]), w)


# --- the same answers as Flower's own functions -----------------------------------------------------------------
def _flower_results(ups: list[np.ndarray], w: list[int]) -> list[tuple[list[np.ndarray], int]]:
    # Flower works on lists of layers: split each flat vector into two "layers" of different shapes
    return [([u[:6].reshape(2, 3).copy(), u[6:].copy()], n) for u, n in zip(ups, w, strict=True)]


def _flat(layers: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in layers])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalence_to_flower(seed: int) -> None:
    agg = pytest.importorskip("flwr.server.strategy.aggregate")
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    rng = np.random.default_rng(seed)
    n, f = 11, 2
    ups = [rng.normal(size=20) for _ in range(n)]
    ups[3] = ups[3] * 30  # an outlier, so the robust rules have something to do
    w = [int(v) for v in rng.integers(1, 50, size=n)]
    res = _flower_results(ups, w)

    assert np.allclose(FedAvg().aggregate(ups, w).vector, _flat(agg.aggregate(res)))
    assert np.allclose(Median().aggregate(ups, w).vector, _flat(agg.aggregate_median(res)))
    for beta in (0.0, 0.1, 0.2, 0.3):
        ours = TrimmedMean(beta).aggregate(ups, w).vector
        assert np.allclose(ours, _flat(agg.aggregate_trimmed_avg(res, beta)))
        assert np.allclose(ours, trim_mean(np.stack(ups), beta))
    assert np.array_equal(Krum(f).aggregate(ups, w).vector, _flat(agg.aggregate_krum(res, f, 0)))
    for m in (2, 5, 9):
        assert np.allclose(Krum(f, m).aggregate(ups, w).vector, _flat(agg.aggregate_krum(res, f, m)))
    flower_bulyan = agg.aggregate_bulyan(list(res), f, agg.aggregate_krum, to_keep=0)
    assert np.allclose(Bulyan(f).aggregate(ups, w).vector, _flat(flower_bulyan))


def test_multi_krum_selects_what_flowers_strategy_selects() -> None:
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    rng = np.random.default_rng(7)
    ups = [rng.normal(size=12) for _ in range(9)]
    ups[0] = -5 * ups[0]
    contents = [
        RecordDict({"arrays": ArrayRecord([u[:4].copy(), u[4:].copy()]), "m": MetricRecord({"num-examples": 1})})
        for u in ups
    ]
    for m in (1, 3, 6):
        picked = sorted(next(i for i, c in enumerate(contents) if c is s) for s in select_multikrum(contents, 2, m))
        r = Krum(2, m).aggregate(ups, [1] * 9)
        assert sorted(set(range(9)) - set(r.rejected)) == picked


# --- robustness: f attackers among honest clients ---------------------------------------------------------------
N, F, D = 20, 4, 50


def _honest(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    mu = np.ones(D)
    return mu, [mu + 0.1 * rng.normal(size=D) for _ in range(N - F)]


def _attack(kind: str, mu: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "huge":
        return [1e3 * mu + rng.normal(size=D) for _ in range(F)]
    return [-10 * mu + 0.1 * rng.normal(size=D) for _ in range(F)]  # sign flip, boosted


ROBUST: list[tuple[str, Aggregator]] = [
    ("median", Median()),
    ("trimmed_mean", TrimmedMean(beta=0.25)),
    ("krum", Krum(F)),
    ("multi_krum", Krum(F, m=N - 2 * F)),
    ("bulyan", Bulyan(F)),
    ("fltrust", FLTrust()),
    ("norm_bound_median", NormBound(2 * np.sqrt(D), Median())),
]


@pytest.mark.parametrize("kind", ["huge", "sign_flip"])
@pytest.mark.parametrize("seed", [0, 1])
def test_robust_aggregates_stay_near_the_honest_mean_and_fedavg_does_not(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mu, honest = _honest(rng)
    ups = honest + _attack(kind, mu, rng)  # attackers are the last F clients
    attackers = set(range(N - F, N))
    w = [float(v) for v in rng.integers(10, 100, size=N)]
    honest_mean = np.mean(honest, axis=0)
    root = mu + 0.1 * rng.normal(size=D)  # the server's update on its own clean root set
    scale = float(np.linalg.norm(mu))  # 7.07

    fedavg = FedAvg().aggregate(ups, w, root_update=root)
    assert np.linalg.norm(fedavg.vector - honest_mean) > scale
    assert set(outliers(fedavg.scores)) == attackers  # its scores still point at the attackers

    for name, agg in ROBUST:
        r = agg.aggregate(ups, w, root_update=root)
        err = float(np.linalg.norm(r.vector - honest_mean))
        assert err < 0.15 * scale, (name, err)
        assert set(r.rejected) <= set(range(N)) and set(r.reasons) == set(r.rejected)
        if name == "fltrust" and kind == "huge":
            # boosted along the honest direction: full trust, rescaled to the root norm, so harmless, not flagged
            assert r.rejected == [] and outliers(r.scores) == []
            continue
        assert set(outliers(r.scores)) == attackers, name
        if name in ("krum", "multi_krum", "fltrust"):
            assert attackers <= set(r.rejected), name
        if name == "bulyan":  # its Krum phase leaves 2f out; attackers it keeps are cut coordinate by coordinate
            assert len(r.rejected) == 2 * F


def test_outliers_rule() -> None:
    assert outliers([1.0, 1.1, 0.9, 1.0, 9.0]) == [4]
    assert outliers([1.0, 1.0, 1.0, 1.0, 5.0]) == [4]  # MAD = 0: the mean absolute deviation stands in
    assert outliers([2.0] * 6) == []
    assert outliers([0.0, 100.0]) == []  # too few to call anything unusual
    assert outliers([1.0, 1.1, 0.9, 1.0, -9.0]) == []  # only high scores are suspicious
    with pytest.raises(InvalidArgumentError):
        outliers([1.0, np.nan, 2.0])


# --- properties over arbitrary (finite) inputs ------------------------------------------------------------------
_updates = st.integers(1, 12).flatmap(
    lambda n: st.integers(1, 6).flatmap(
        lambda d: hnp.arrays(np.float64, (n, d), elements=st.floats(-1e6, 1e6)).map(list)
    )
)
ALL: list[Aggregator] = [FedAvg(), Median(), TrimmedMean(0.2), Krum(1), Krum(1, 3), Bulyan(1), FLTrust()]
ALL.append(NormBound(10.0, Krum(1)))


@settings(max_examples=100, deadline=None)
@given(ups=_updates, root_seed=st.integers(0, 2**32 - 1))
def test_every_aggregator_returns_a_finite_result_or_a_typed_refusal(ups: list[np.ndarray], root_seed: int) -> None:
    n, d = len(ups), ups[0].shape[0]
    root = np.random.default_rng(root_seed).normal(size=d)
    for agg in ALL:
        if n < getattr(agg, "min_clients", lambda: 1)():
            with pytest.raises(TooFewClientsError):
                agg.aggregate(ups, [1.0] * n, root_update=root)
            continue
        r = agg.aggregate(ups, [1.0] * n, root_update=root)
        assert r.vector.shape == (d,) and np.all(np.isfinite(r.vector))
        assert r.scores.shape == (n,) and np.all(np.isfinite(r.scores)) and np.all(r.scores >= 0)
        assert set(r.rejected) <= set(range(n)) and set(r.reasons) == set(r.rejected)
        assert len(r.rejected) < n or agg.name == "fltrust"  # only FLTrust may trust nobody


def test_identical_updates_give_zero_scores() -> None:
    ups = [np.ones(4)] * 7
    for agg in ALL:
        r = agg.aggregate(ups, [1.0] * 7, root_update=np.ones(4))
        assert np.allclose(r.vector, 1.0), agg.name
        assert np.all(r.scores == 0.0), agg.name


def test_krum_distances_survive_a_large_common_offset() -> None:
    # raw weights far from the origin: ‖a‖² + ‖b‖² − 2a·b would cancel without the median centring
    rng = np.random.default_rng(3)
    ups = [1e8 + rng.normal(size=30) for _ in range(9)]
    x = np.stack(ups)
    exact = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(exact, np.inf)
    expected = np.sort(exact, axis=1)[:, : 9 - 2 - 2].sum(axis=1)
    r = Krum(2).aggregate(ups, [1.0] * 9)
    assert np.allclose(r.scores, expected / np.median(expected), rtol=1e-6)


# --- replace-one sensitivity under central DP: property tests that try to break each stated bound ----------------
DP_FORMS: list[Aggregator] = [
    FedAvg(), TrimmedMean(0.2), TrimmedMean(0.34), Median(), Krum(1), Krum(1, 3), Krum(1, None), Bulyan(1),
    FLTrust("count"), FLTrust("trust"), FLTrust("count", "sign"), NormBound(0.5, FedAvg()), NormBound(0.7, Median()),
    NormBound(0.6, FLTrust("count")), NormBound(0.4, TrimmedMean(0.2)), NormBound(0.3, Krum(1)),
]
REPLACEMENTS = ("random", "antipode", "zero", "copy", "against_output", "axis", "root_antipode")


def _ball(v: np.ndarray, c: float) -> np.ndarray:
    return project_l2_ball(v, c)


def _replacement(kind: str, x: list[np.ndarray], i: int, b: np.ndarray, out: np.ndarray, root: np.ndarray,
                 c: float, j: int) -> np.ndarray:
    d = x[0].shape[0]
    if kind == "random":
        return _ball(b * c, c)
    if kind == "antipode":  # the replaced update reversed, pushed to the sphere
        n = float(np.linalg.norm(x[i]))
        return _ball(-x[i] * (c / n), c) if n > 0 else _ball(b * c, c)  # a subnormal n rescales inexactly
    if kind == "zero":  # a dropout or a rejected update under the fixed scheme
        return np.zeros(d)
    if kind == "copy":  # duplicate another client: tips a Krum/median majority
        return x[j % len(x)].copy()
    if kind == "against_output":
        n = float(np.linalg.norm(out))
        return _ball(-out * (c / n), c) if n > 0 else _ball(b * c, c)
    if kind == "axis":
        e = np.zeros(d)
        e[j % d] = c if j % 2 else -c
        return e
    return -root * (c / float(np.linalg.norm(root)))  # against FLTrust's reference


def _released(agg: Aggregator, x: list[np.ndarray], root: np.ndarray, c: float) -> np.ndarray:
    return _ball(agg.aggregate(x, [1.0] * len(x), root_update=root).vector, c)


@settings(max_examples=200, deadline=None)
@given(
    data=st.integers(1, 11).flatmap(lambda m: st.integers(1, 5).flatmap(lambda d: st.tuples(
        hnp.arrays(np.float64, (m, d), elements=st.floats(-1.5, 1.5)),
        hnp.arrays(np.float64, (d,), elements=st.floats(-1.5, 1.5)),
        hnp.arrays(np.float64, (d,), elements=st.floats(-1.5, 1.5)),
        st.integers(0, m - 1), st.integers(0, 50),
    ))),
    c=st.sampled_from([1.0, 0.05, 3.7]),
    kind=st.sampled_from(REPLACEMENTS),
    clusters=st.booleans(),
)
def test_replace_one_moves_each_aggregate_at_most_its_stated_sensitivity(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, int, int], c: float, kind: str, clusters: bool,
) -> None:
    raw, b, g, i, j = data
    m = raw.shape[0]
    if clusters:  # two antipodal clusters ±C·e, the first `plus` rows on +C·e (plus near m/2 half the time): where
        # one client tips Krum's selection or an order statistic from one side to the other
        e = np.zeros(raw.shape[1])
        e[0] = c
        plus = (m + 1) // 2 if j % 2 else j % (m + 1)
        x = [_ball((e if k < plus else -e) + 1e-3 * c * r, c) for k, r in enumerate(raw)]
    else:
        x = [_ball(r * c, c) for r in raw]  # inside the C-ball, many on its sphere (the inputs central DP clips)
    root = _ball(g * c, c)
    if not np.linalg.norm(root) > 0:
        root = np.full(raw.shape[1], c / (2 * np.sqrt(raw.shape[1])))
    for agg in DP_FORMS:
        if m < getattr(agg, "min_clients", lambda: 1)():
            continue
        out = _released(agg, x, root, c)
        y = list(x)
        y[i] = _replacement(kind, x, i, b, out, root, c, j)
        assert np.linalg.norm(y[i]) <= c * (1 + 1e-12)
        moved = float(np.linalg.norm(_released(agg, y, root, c) - out))
        bound = sensitivity_of(agg, m, c)
        assert moved <= bound + 1e-9 * max(1.0, c), (agg.name, kind, m, moved, bound)


def _two_clusters(m: int, plus: int, c: float, d: int = 3) -> list[np.ndarray]:
    e = np.zeros(d)
    e[0] = c
    return [e.copy() for _ in range(plus)] + [-e for _ in range(m - plus)]


@pytest.mark.parametrize("agg", [Median(), Krum(1), Krum(1, 3), Bulyan(1)], ids=lambda a: a.name)
def test_tipping_the_majority_moves_selection_and_order_statistics_by_the_full_diameter(agg: Aggregator) -> None:
    """The adversarial neighbour that makes 2C tight: two antipodal clusters ±C·e, one client switching sides."""
    c, m = 1.0, 7
    x, y = _two_clusters(m, 4, c), _two_clusters(m, 3, c)  # client 3 moves from +C·e to −C·e
    root = np.array([1.0, 0.0, 0.0])
    moved = float(np.linalg.norm(_released(agg, x, root, c) - _released(agg, y, root, c)))
    assert moved == pytest.approx(2 * c) and sensitivity_of(agg, m, c) == 2 * c


def test_trimmed_mean_bound_is_tight() -> None:
    c, m, agg = 1.0, 5, TrimmedMean(0.2)  # k = 1 cut at each end, m − 2k = 3 kept
    x, y = _two_clusters(m, 3, c), _two_clusters(m, 2, c)
    moved = float(np.linalg.norm(_released(agg, x, np.ones(3), c) - _released(agg, y, np.ones(3), c)))
    assert moved == pytest.approx(2 * c / 3) == sensitivity_of(agg, m, c)


def test_the_price_of_sensitivity_is_stated() -> None:
    c, m = 1.0, 10
    mean = sensitivity_of(FedAvg(), m, c)
    assert mean == pytest.approx(2 * c / m)
    for agg in (Median(), Krum(1), Krum(2, None), Bulyan(1), FLTrust("trust")):
        assert sensitivity_of(agg, m, c) == pytest.approx(m * mean), agg.name  # m times fedavg's noise
    assert sensitivity_of(TrimmedMean(0.2), m, c) == pytest.approx(2 * c / 6)
    assert sensitivity_of(FLTrust("count"), m, c) == pytest.approx(mean)
    assert sensitivity_of(NormBound(0.25, FedAvg()), m, c) == pytest.approx(2 * 0.25 / m)
    assert sensitivity_of(NormBound(4.0, Median()), m, c) == pytest.approx(2 * c)  # C' = min(C, max_norm)
    with pytest.raises(InvalidArgumentError):
        sensitivity_of(FedAvg(), 0, c)
    with pytest.raises(InvalidArgumentError):
        sensitivity_of(Median(), 3, float("nan"))


def test_poisson_soundness_flags() -> None:
    sound = [FedAvg(), FLTrust("count"), NormBound(1.0, FedAvg()), NormBound(1.0, FLTrust("count"))]
    unsound = [Median(), TrimmedMean(), Krum(1), Krum(1, 3), Bulyan(1), FLTrust(), NormBound(1.0, Median())]
    assert all(is_poisson_sound(a) for a in sound)
    assert not any(is_poisson_sound(a) for a in unsound)


def test_fltrust_count_form_divides_by_the_count_and_norm_bound_clips_the_root() -> None:
    root = np.array([3.0, 0.0])
    ups = _rows([2, 0], [0, 3], [-1, 0], [1, 1])
    r = FLTrust("count").aggregate(ups, [1] * 4, root_update=root)
    t = 1 / np.sqrt(2)
    assert np.allclose(r.vector, (3 * np.array([1.0, 0.0]) + t * 3 * np.array([t, t])) / 4)
    assert r.rejected == [1, 2]
    # the second clip bounds the root update too: FLTrust's rescaled terms cannot exceed max_norm
    nb = NormBound(0.5, FLTrust()).aggregate(ups, [1] * 4, root_update=root)
    assert np.linalg.norm(nb.vector) <= 0.5 + 1e-12
    with pytest.raises(AggregatorConfigError, match="normalise"):
        make_aggregator("fltrust", normalise="sum")


def test_fltrust_sign_gate_keeps_aligned_updates_at_full_size() -> None:
    root = np.array([3.0, 0.0])
    ups = _rows([2, 0], [0, 3], [-1, 0], [1, 1])
    r = FLTrust("count", "sign").aggregate(ups, [1] * 4, root_update=root)
    t = 1 / np.sqrt(2)
    # the aligned updates enter rescaled to the root's norm with trust 1 (not their cosine); the rest are dropped
    assert np.allclose(r.vector, (3 * np.array([1.0, 0.0]) + 3 * np.array([t, t])) / 4)
    assert r.rejected == [1, 2]
    assert is_poisson_sound(FLTrust("count", "sign"))
    with pytest.raises(AggregatorConfigError, match="trust"):
        make_aggregator("fltrust", trust="relu")
