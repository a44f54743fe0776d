"""FLConfig at the edge: TOML in, one-line typed errors out, and the refused combinations with their reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeshield.errors import EXIT_INPUT, InvalidArgumentError
from edgeshield.fl._config import (
    AGGREGATOR_NAMES,
    DP_MODES,
    DPConfig,
    FLConfig,
    UnsupportedCombinationError,
    check_combination,
)
from edgeshield.fl._data import federated_data, partition

GOOD = """
clients = 12
clients_per_round = 6
rounds = 3
alpha = 0.5
min_examples = 20
model = "mlp"
aggregator = "trimmed_mean"

[aggregator_params]
beta = 0.2

[dp]
mode = "local"
clip = 0.5
noise_multiplier = 1.1
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fl.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_from_toml_reads_every_section(tmp_path: Path) -> None:
    cfg = FLConfig.from_toml(_write(tmp_path, GOOD))
    assert (cfg.clients, cfg.clients_per_round, cfg.rounds, cfg.model) == (12, 6, 3, "mlp")
    assert cfg.aggregator_params == {"beta": 0.2}
    assert cfg.dp == DPConfig(mode="local", clip=0.5, noise_multiplier=1.1)
    assert cfg.sampling_rate == 0.5
    # an [fl] table works the same, and the dict form round-trips
    wrapped = "[fl]\n" + GOOD.replace("[aggregator_params]", "[fl.aggregator_params]").replace("[dp]", "[fl.dp]")
    assert FLConfig.from_toml(_write(tmp_path, wrapped)) == cfg
    assert FLConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("clients = 3\nbogus = 1\n", "bogus: unknown key"),
        ("[dp]\nmode = 'central'\nnoise = 1.0\n", "dp.noise: unknown key"),
        ("clients = 0\n", "clients: must be at least 1"),
        ("clients = 'ten'\n", "clients: must be an integer"),
        ("clients = 4\nclients_per_round = 5\n", "exceeds clients"),
        ("lr = -0.1\n", "lr: must lie in"),
        ("model = 'resnet'\n", "model: must be one of"),
        ("aggregator = 'mean'\n", "aggregator: must be one of"),
        ("aggregator = 'krum'\n[aggregator_params]\nf = -1\n", "krum"),
        ("[dp]\nmode = 'central'\n", "exactly one of noise_multiplier and target_epsilon"),
        ("[dp]\nmode = 'central'\nnoise_multiplier = 1.0\ntarget_epsilon = 1.0\n", "exactly one of"),
        ("[dp]\nmode = 'central'\nnoise_multiplier = 0.0\n", "must be positive"),
        ("[dp]\nmode = 'central'\nnoise_multiplier = 1.0\ndelta = 0.5\n", "dp.delta"),
        ("[dp]\nmode = 'secret'\n", "dp.mode: must be one of"),
        ("[dp]\nadaptive = true\n", "adaptive clipping needs a DP mode"),
        ("aggregator = 'fltrust'\nfltrust_root = 0\n", "fltrust needs a root set"),
        ("clients = [", "not valid TOML"),
        ("sampling = 'uniform'\n", "sampling: must be one of"),
        ("sampling = 1\n", "sampling: must be one of"),
        ("aggregator = 'fltrust'\n[aggregator_params]\nnormalise = 'sum'\n", "normalise must be one of"),
    ],
)
def test_bad_config_is_one_typed_line(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        FLConfig.from_toml(_write(tmp_path, text))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert info.value.exit_code == EXIT_INPUT


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError.__mro__[1]):  # InputError: PathNotFoundError
        FLConfig.from_toml(tmp_path / "absent.toml")


def _cfg(mode: str, aggregator: str, **extra: object) -> FLConfig:
    params: dict[str, object] = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1},
                                 "norm_bound": {"max_norm": 1.0}}.get(aggregator, {})  # type: ignore[assignment]
    dp = DPConfig(mode=mode, noise_multiplier=1.0) if mode != "none" else DPConfig()
    return FLConfig(clients=7, clients_per_round=7, rounds=1, dp=dp, aggregator=aggregator,
                    aggregator_params=params, **extra)  # type: ignore[arg-type]


REFUSED = {("distributed", a): "needs secagg = true" for a in AGGREGATOR_NAMES}  # central DP: every aggregator runs
POISSON_SOUND = ("fedavg", "norm_bound", "fltrust")  # fltrust in its count form, norm_bound with a fedavg inner


@pytest.mark.parametrize("mode", DP_MODES)
@pytest.mark.parametrize("aggregator", AGGREGATOR_NAMES)
@pytest.mark.parametrize("secagg", [False, True])
def test_combination_matrix_refusals(mode: str, aggregator: str, secagg: bool) -> None:
    """Every {mode} × {SecAgg} × {aggregator}: accepted, or refused with the stated reason (the accepted ones run
    in tests/fl/test_sim.py's matrix)."""
    cfg = _cfg(mode, aggregator, secagg=secagg)
    reason = REFUSED.get((mode, aggregator))
    if secagg:  # SecAgg+ (tests/fl/test_matrix.py, tests/fl/test_secagg.py): fedavg only, any DP mode
        reason = None if aggregator == "fedavg" else "secure aggregation hides individual updates"
    if reason is None:
        check_combination(cfg)
        return
    with pytest.raises(UnsupportedCombinationError, match=reason):
        check_combination(cfg)


def test_adaptive_clipping_only_central() -> None:
    with pytest.raises(UnsupportedCombinationError, match="central mode"):
        check_combination(FLConfig(dp=DPConfig(mode="local", noise_multiplier=1.0, adaptive=True)))
    check_combination(FLConfig(dp=DPConfig(mode="central", noise_multiplier=1.0, adaptive=True)))


@pytest.mark.parametrize("aggregator", AGGREGATOR_NAMES)
def test_sampling_resolves_per_aggregator_under_central_dp(aggregator: str) -> None:
    """auto: fixed exactly for the aggregators that are not Poisson-sound; explicit poisson with one of those is
    refused with the reason, explicit fixed always runs; without central DP auto is poisson."""
    cfg = _cfg("central", aggregator)
    sound = aggregator in POISSON_SOUND
    assert cfg.sampling == "auto" and cfg.sampling_scheme == ("poisson" if sound else "fixed")
    check_combination(cfg)
    check_combination(cfg.with_(sampling="fixed"))
    poisson = cfg.with_(sampling="poisson")
    if sound:
        check_combination(poisson)
    else:
        with pytest.raises(UnsupportedCombinationError, match=r"under sampling 'poisson'.*use sampling 'fixed'"):
            check_combination(poisson)
    for mode in ("none", "local"):
        assert _cfg(mode, aggregator).sampling_scheme == "poisson"
        check_combination(_cfg(mode, aggregator, sampling="fixed"))  # local DP: sampling changes no accounting


def test_poisson_soundness_follows_the_aggregator_form() -> None:
    central = DPConfig(mode="central", noise_multiplier=1.0)
    # FLTrust's trust form renormalises by everyone's trust: fixed under auto, refused under explicit poisson
    trust = FLConfig(dp=central, aggregator="fltrust", aggregator_params={"normalise": "trust"})
    assert trust.sampling_scheme == "fixed"
    with pytest.raises(UnsupportedCombinationError, match="'fltrust' under sampling 'poisson'"):
        check_combination(trust.with_(sampling="poisson"))
    inner = FLConfig(dp=central, aggregator="norm_bound", aggregator_params={"max_norm": 1.0, "inner": "median"})
    assert inner.sampling_scheme == "fixed"
    check_combination(inner)
    with pytest.raises(UnsupportedCombinationError, match="norm_bound\\(median\\)"):
        check_combination(inner.with_(sampling="poisson"))
    nb_trust = FLConfig(dp=central, aggregator="norm_bound", aggregator_params={"max_norm": 1.0, "inner": "fltrust"})
    assert nb_trust.sampling_scheme == "poisson"  # inner FLTrust takes its count form under central DP


def test_fixed_sampling_refusals_state_the_reason() -> None:
    adaptive = DPConfig(mode="central", noise_multiplier=1.0, adaptive=True)
    with pytest.raises(UnsupportedCombinationError, match=r"adaptive.*sampling 'fixed'"):
        check_combination(FLConfig(dp=adaptive, aggregator="median"))  # auto resolves to fixed
    with pytest.raises(UnsupportedCombinationError, match=r"adaptive.*sampling 'fixed'"):
        check_combination(FLConfig(dp=adaptive, sampling="fixed"))
    check_combination(FLConfig(dp=adaptive))  # fedavg: Poisson, as before
    with pytest.raises(UnsupportedCombinationError, match="needs at least 5"):
        check_combination(FLConfig(clients=10, clients_per_round=4, aggregator="krum", aggregator_params={"f": 1},
                                   dp=DPConfig(mode="central", noise_multiplier=1.0)))
    secagg = FLConfig(clients=4, clients_per_round=4, secagg=True, sampling="fixed")
    with pytest.raises(UnsupportedCombinationError, match=r"sampling .fixed.*Poisson"):
        check_combination(secagg)
    assert secagg.with_(sampling="auto", dp={"mode": "central", "noise_multiplier": 1.0}).sampling_scheme == "poisson"
    assert FLConfig.from_dict(FLConfig(sampling="fixed").to_dict()).sampling == "fixed"


def test_partition_is_dirichlet_skewed_disjoint_and_seeded() -> None:
    cfg = FLConfig(clients=20, clients_per_round=20, alpha=0.3, min_examples=30, fltrust_root=100)
    data = federated_data(cfg)
    sizes = [len(y) for _, y in data.clients]
    assert min(sizes) >= 30
    assert sum(sizes) + len(data.root[1]) == 1347  # every training example exactly once: clients + root
    assert len(data.root[1]) == 100 and len(set(data.root[1].tolist())) == 10  # the root set covers every class
    # label skew: with alpha 0.3 a typical client is dominated by a few labels
    dominant = [max((y == c).mean() for c in range(10)) for _, y in data.clients]
    assert sorted(dominant)[len(dominant) // 2] > 0.3
    x, _ = data.clients[0]
    again = partition(*_rest(cfg), cfg)
    assert all((a[1] == b[1]).all() for a, b in zip(again, data.clients, strict=True))
    assert x.dtype.name == "float32"


def _rest(cfg: FLConfig) -> tuple[object, object]:
    from edgeshield.fl._data import split_root
    from edgeshield.models import load_digits_split

    s = load_digits_split()
    _, rest = split_root(s.x_train, s.y_train, cfg.fltrust_root, cfg.seed)
    return rest


def test_one_example_per_client_population() -> None:
    cfg = FLConfig(clients=1247, clients_per_round=50, min_examples=1, fltrust_root=100)
    sizes = [len(y) for _, y in federated_data(cfg).clients]
    assert sizes == [1] * 1247


def test_too_many_clients_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="needs"):
        federated_data(FLConfig(clients=100, clients_per_round=10, min_examples=20))
