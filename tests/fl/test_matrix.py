"""The combination matrix: {none, central, local, distributed DP} × {SecAgg off, on} × every aggregator.

Every one of the 64 cells is either refused by ``check_combination`` with its stated reason (the test asserts the
reason's text) or run for real: a 1-round simulation on Flower's engine, all accepted cells on ONE shared Simulation
Runtime (7 clients so that Bulyan's n ≥ 4f + 3 holds with f = 1). Accepted: no DP, local DP and central DP with
every aggregator (central DP: Poisson sampling for fedavg, norm_bound(fedavg) and FLTrust's count form, fixed-size
cohorts with each aggregator's replace-one sensitivity for the rest: ``_strategy``'s module doc), and under SecAgg+
fedavg with every DP mode (the server only ever sees the sum). Refused: distributed DP without SecAgg; any
per-update defence under SecAgg; and, outside the 64 cells, central DP with an aggregator that is not Poisson-sound
when sampling is explicitly "poisson", adaptive clipping with fixed-size cohorts, fixed-size cohorts under SecAgg.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from edgeshield.fl._config import (
    AGGREGATOR_NAMES,
    DP_MODES,
    DPConfig,
    FLConfig,
    UnsupportedCombinationError,
    check_combination,
)
from edgeshield.fl._sim import Simulator

CLIENTS = 7
PARAMS: dict[str, dict[str, Any]] = {
    "krum": {"f": 1}, "multi_krum": {"f": 1, "m": 3}, "bulyan": {"f": 1}, "norm_bound": {"max_norm": 1.0},
}
REASON_CENTRAL_POISSON = "noise scaled to the clip would not bound it"
POISSON_SOUND = ("fedavg", "norm_bound", "fltrust")
REASON_DISTRIBUTED = "needs secagg = true"
REASON_SECAGG = "secure aggregation hides individual updates"


def _privacy_ready() -> bool:
    import edgeshield.privacy as privacy

    return all(hasattr(privacy, n) for n in ("gaussian_noise", "discrete_gaussian_noise", "epsilon_for",
                                             "PrivacyLedger"))


def _cfg(mode: str, aggregator: str, secagg: bool) -> FLConfig:
    dp = DPConfig(mode=mode, noise_multiplier=1.0, clip=1.0) if mode != "none" else DPConfig()
    return FLConfig(clients=CLIENTS, clients_per_round=CLIENTS, rounds=1, dp=dp, aggregator=aggregator,
                    aggregator_params=PARAMS.get(aggregator, {}), secagg=secagg, batch_size=64, fltrust_root=50)


def expected_reason(mode: str, aggregator: str, secagg: bool) -> str | None:
    """The matrix's rule, written out independently of the implementation."""
    if secagg:
        return None if aggregator == "fedavg" else REASON_SECAGG
    if mode == "distributed":
        return REASON_DISTRIBUTED
    return None


CELLS = [(m, a, s) for m in DP_MODES for a in AGGREGATOR_NAMES for s in (False, True)]


@pytest.mark.parametrize(("mode", "aggregator", "secagg"), CELLS)
def test_every_cell_is_accepted_or_refused_with_its_reason(mode: str, aggregator: str, secagg: bool) -> None:
    cfg = _cfg(mode, aggregator, secagg)
    reason = expected_reason(mode, aggregator, secagg)
    if reason is None:
        check_combination(cfg)
    else:
        with pytest.raises(UnsupportedCombinationError, match=reason):
            check_combination(cfg)


def test_matrix_shape() -> None:
    accepted = [c for c in CELLS if expected_reason(*c) is None]
    assert len(CELLS) == 64
    # none: 8, central: 8, local: 8, distributed: 0; under SecAgg: fedavg × 4 modes
    assert len(accepted) == 8 + 8 + 8 + 4


@pytest.mark.parametrize("aggregator", AGGREGATOR_NAMES)
def test_central_dp_sampling_is_resolved_or_refused_with_its_reason(aggregator: str) -> None:
    cfg = _cfg("central", aggregator, False)
    sound = aggregator in POISSON_SOUND
    assert cfg.sampling_scheme == ("poisson" if sound else "fixed")
    explicit = cfg.with_(sampling="poisson")
    if sound:
        check_combination(explicit)
    else:
        with pytest.raises(UnsupportedCombinationError, match=REASON_CENTRAL_POISSON):
            check_combination(explicit)
    with pytest.raises(UnsupportedCombinationError, match=r"sampling .fixed.*Poisson"):
        check_combination(_cfg("central", "fedavg", True).with_(sampling="fixed"))


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(CLIENTS, num_cpus=2, client_cpus=1) as s:
        yield s


@pytest.mark.skipif(not _privacy_ready(), reason="edgeshield.privacy is not complete yet")
def test_every_accepted_cell_runs(sim: Simulator) -> None:
    """All 28 accepted cells, one round each, on the shared runtime; what each run reports fits its cell."""
    ran = []
    for mode, aggregator, secagg in CELLS:
        if expected_reason(mode, aggregator, secagg) is not None:
            continue
        res = sim.run(_cfg(mode, aggregator, secagg))
        assert len(res.history) == 1, (mode, aggregator, secagg)
        rec = res.history[0]
        assert np.isfinite(rec.accuracy) and len(rec.clients) == CLIENTS
        assert all(np.all(np.isfinite(p)) for p in res.params)
        if mode == "none":
            assert rec.epsilon_rdp is None
        else:
            assert rec.epsilon_rdp is not None and 0 < rec.epsilon_rdp < np.inf, (mode, aggregator, secagg)
        fixed = mode == "central" and not secagg and aggregator not in POISSON_SOUND
        assert res.metadata()["fl.sampling"] == ("fixed" if fixed else "poisson")
        assert (rec.epsilon_pld is None) == (mode == "none" or fixed), (mode, aggregator, secagg)
        if secagg:
            info = res.extra["secagg"]["rounds"][0]
            assert info.total is not None and info.received_distinct == 1  # the server was handed the sum only
            assert rec.scores == {} and rec.outliers == []  # nothing per client to score under SecAgg
        ran.append((mode, aggregator, secagg))
    assert len(ran) == 28
