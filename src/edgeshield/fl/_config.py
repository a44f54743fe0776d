"""Federated-learning configuration: frozen dataclasses validated once, where they enter (TOML or keyword arguments).

A malformed value is one line, an :class:`~edgeshield.errors.InvalidArgumentError` (the CLI exits 2). Which
combinations of DP mode, secure aggregation, sampling scheme and aggregator can run together is decided in
:func:`check_combination` (the reasons are the sensitivity arguments in ``_strategy`` and ``_robust``).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.fl._robust import Aggregator

__all__ = [
    "AGGREGATOR_NAMES",
    "DP_MODES",
    "MODELS",
    "SAMPLINGS",
    "DPConfig",
    "FLConfig",
    "UnsupportedCombinationError",
    "aggregator_for",
    "aggregator_params_for",
    "check_combination",
]

DP_MODES = ("none", "central", "local", "distributed")
MODELS = ("linear", "mlp")
AGGREGATOR_NAMES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "fltrust", "norm_bound")
#: client sampling per round: "poisson" (each client with probability q, add/remove-one accounting), "fixed" (exactly
#: clients_per_round without replacement, replace-one accounting), "auto" (fixed for central DP with an aggregator
#: that is not Poisson-sound, else poisson)
SAMPLINGS = ("auto", "poisson", "fixed")
#: aggregators whose sum, on updates clipped to C, changes by at most C when one client's update is added or removed
#: (with uniform weights and the fixed denominator the DP wrapper imposes), as named in a config: fedavg,
#: norm_bound with a fedavg inner, fltrust in its count form. The rule itself is ``_robust.is_poisson_sound``.
CENTRAL_DP_AGGREGATORS = ("fedavg", "norm_bound")


class UnsupportedCombinationError(InvalidArgumentError):
    """A configuration whose parts cannot run together; the message states the reason."""


def _fail(key: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"fl config: {key}: {message}")


def _int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"must be an integer, not {value!r}")
    if value < minimum:
        raise _fail(key, f"must be at least {minimum}, not {value}")
    return value


def _float(key: str, value: object, *, low: float, high: float = math.inf, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(key, f"must be a finite number, not {value!r}")
    v = float(value)
    if (v <= low if open_low else v < low) or v > high:
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise _fail(key, f"must lie in {bound}, not {value}")
    return v


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"must be true or false, not {value!r}")
    return value


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
    return value


@dataclass(frozen=True)
class DPConfig:
    """User-level (client-level) differential privacy for DP-FedAvg.

    ``mode``: ``none``; ``central`` (the server clips each update to ``clip``, sums, adds N(0, (z·clip)²) and divides
    by the expected number of clients); ``local`` (each client clips and adds its own N(0, (z·clip)²) before it sends,
    and its own ledger refuses a release over ``client_budget``); ``distributed`` (SecAgg+ with discrete noise, see
    ``_secagg``). Give ``noise_multiplier`` (z) or ``target_epsilon`` (z then calibrated by the accountant for the
    run's rounds and sampling rate), not both. ``adaptive``: Andrew et al. (2021) clipping, the clip following the
    ``target_quantile`` of update norms with learning rate ``clip_lr``; the clipped-count noise has standard deviation
    ``count_stddev`` (default expected clients ÷ 20, as in the paper).
    """

    mode: str = "none"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None
    client_budget: float | None = None

    def __post_init__(self) -> None:
        _choice("dp.mode", self.mode, DP_MODES)
        _float("dp.clip", self.clip, low=0.0)
        if self.noise_multiplier is not None:
            _float("dp.noise_multiplier", self.noise_multiplier, low=0.0, open_low=False)
        if self.target_epsilon is not None:
            _float("dp.target_epsilon", self.target_epsilon, low=0.0)
        _float("dp.delta", self.delta, low=0.0, high=0.1)
        _bool("dp.adaptive", self.adaptive)
        _float("dp.target_quantile", self.target_quantile, low=0.0, high=1.0)
        _float("dp.clip_lr", self.clip_lr, low=0.0)
        if self.count_stddev is not None:
            _float("dp.count_stddev", self.count_stddev, low=0.0)
        if self.client_budget is not None:
            _float("dp.client_budget", self.client_budget, low=0.0)
        if self.mode != "none":
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise _fail("dp", f"mode {self.mode!r} needs exactly one of noise_multiplier and target_epsilon")
            if self.noise_multiplier == 0.0:
                raise _fail("dp.noise_multiplier", f"must be positive in mode {self.mode!r} (0 means no privacy)")
        elif self.adaptive:
            raise _fail("dp.adaptive", "adaptive clipping needs a DP mode (it clips for the noise)")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class FLConfig:
    """One federated training run on the digits data: population, rounds, local training, DP and aggregation.

    ``clients`` devices hold Dirichlet(``alpha``) label-skewed shards of at least ``min_examples`` each (``seed``
    fixes the split and the sampling). Each round, with ``sampling`` "poisson", every client takes part independently
    with probability ``clients_per_round / clients``; with "fixed", exactly ``clients_per_round`` clients are drawn
    without replacement; "auto" (the default) is fixed for central DP with an aggregator that is not Poisson-sound
    (see :attr:`sampling_scheme`), else poisson. The accountant is told which. Each client trains ``local_epochs`` of
    SGD (``batch_size``, ``lr``) from the global model. The server holds ``fltrust_root`` training examples apart
    (never given to a client) as its root set: FLTrust's reference, and with ``pretrain_on_root`` a public
    pretraining set for ``pretrain_epochs``. ``max_update_norm`` is the absurd-norm bound at the server's door.
    """

    clients: int = 10
    clients_per_round: int = 10
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    alpha: float = 1.0
    min_examples: int = 1
    model: str = "linear"
    seed: int = 0
    dp: DPConfig = field(default_factory=DPConfig)
    aggregator: str = "fedavg"
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    secagg: bool = False
    fltrust_root: int = 100
    pretrain_on_root: bool = False
    pretrain_epochs: int = 20
    max_update_norm: float = 1000.0
    validate_data: bool = True  # honest clients check their local data before training (fl._validate)
    sampling: str = "auto"

    def __post_init__(self) -> None:
        _int("clients", self.clients, 1)
        _int("clients_per_round", self.clients_per_round, 1)
        if self.clients_per_round > self.clients:
            raise _fail("clients_per_round", f"{self.clients_per_round} exceeds clients ({self.clients})")
        _int("rounds", self.rounds, 1)
        _int("local_epochs", self.local_epochs, 1)
        _int("batch_size", self.batch_size, 1)
        _float("lr", self.lr, low=0.0, high=100.0)
        _float("alpha", self.alpha, low=0.0)
        _int("min_examples", self.min_examples, 1)
        _choice("model", self.model, MODELS)
        _int("seed", self.seed, 0)
        if not isinstance(self.dp, DPConfig):
            raise _fail("dp", f"must be a DPConfig, not {type(self.dp).__name__}")
        _choice("aggregator", self.aggregator, AGGREGATOR_NAMES)
        if not isinstance(self.aggregator_params, Mapping) or not all(
            isinstance(k, str) for k in self.aggregator_params
        ):
            raise _fail("aggregator_params", "must be a table of named parameters")
        _bool("secagg", self.secagg)
        _int("fltrust_root", self.fltrust_root, 0)
        _bool("pretrain_on_root", self.pretrain_on_root)
        _int("pretrain_epochs", self.pretrain_epochs, 1)
        _float("max_update_norm", self.max_update_norm, low=0.0)
        _bool("validate_data", self.validate_data)
        _choice("sampling", self.sampling, SAMPLINGS)
        if self.aggregator == "fltrust" and self.fltrust_root == 0:
            raise _fail("fltrust_root", "fltrust needs a root set (fltrust_root > 0)")
        if self.pretrain_on_root and self.fltrust_root == 0:
            raise _fail("pretrain_on_root", "needs a root set (fltrust_root > 0)")
        # the aggregator's own parameters are checked by the aggregator factory (typed errors, one line)
        from edgeshield.fl._robust import make_aggregator

        make_aggregator(self.aggregator, **dict(self.aggregator_params))
        if self.aggregator_params != aggregator_params_for(self):
            make_aggregator(self.aggregator, **aggregator_params_for(self))

    @property
    def sampling_rate(self) -> float:
        """q = clients per round ÷ clients: each client's chance of taking part in a round."""
        return self.clients_per_round / self.clients

    @property
    def sampling_scheme(self) -> str:
        """The run's sampling, resolved: "poisson" or "fixed" (see the class doc; secure aggregation and distributed
        DP sample by Poisson)."""
        if self.sampling != "auto":
            return self.sampling
        if self.dp.mode == "central" and not self.secagg:
            from edgeshield.fl._robust import is_poisson_sound

            return "poisson" if is_poisson_sound(aggregator_for(self)) else "fixed"
        return "poisson"

    def with_(self, **changes: Any) -> FLConfig:
        """A copy with ``changes`` (``dp`` may be a mapping of DPConfig fields to change)."""
        dp = changes.get("dp")
        if isinstance(dp, Mapping):
            changes["dp"] = replace(self.dp, **dp)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aggregator_params"] = dict(self.aggregator_params)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FLConfig:
        """From a mapping (a TOML table): unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise _fail("(top)", "must be a table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _fail(unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
        values = dict(data)
        dp = values.get("dp", {})
        if isinstance(dp, DPConfig):
            pass
        elif isinstance(dp, Mapping):
            dp_known = {f.name for f in fields(DPConfig)}
            dp_unknown = sorted(set(dp) - dp_known)
            if dp_unknown:
                raise _fail(f"dp.{dp_unknown[0]}", f"unknown key (known: {', '.join(sorted(dp_known))})")
            values["dp"] = DPConfig(**dp)
        else:
            raise _fail("dp", "must be a table")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> FLConfig:
        """Read a TOML file whose top level (or ``[fl]`` table) holds the fields, with ``[dp]`` and
        ``[aggregator_params]`` sub-tables."""
        return cls.from_dict(read_config_table(path))


def read_config_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The FL config table of a TOML file: its top level, or its ``[fl]`` table when that is all it holds."""
    from edgeshield._io import check_readable_file

    p = check_readable_file(path, what="fl config")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"fl config: {p}: not valid TOML: {exc}") from None
    if set(data) == {"fl"} and isinstance(data["fl"], Mapping):
        data = dict(data["fl"])
    return dict(data)


def aggregator_params_for(cfg: FLConfig) -> dict[str, Any]:
    """The aggregator's parameters as the run uses them: under central DP FLTrust (also as norm_bound's inner) takes
    its DP form, ``normalise="count"``, unless the config names a form."""
    params = dict(cfg.aggregator_params)
    if cfg.dp.mode != "central":
        return params
    if cfg.aggregator == "fltrust":
        params.setdefault("normalise", "count")
    elif cfg.aggregator == "norm_bound" and params.get("inner", "fedavg") == "fltrust":
        inner = dict(params.get("inner_params") or {})
        inner.setdefault("normalise", "count")
        params["inner_params"] = inner
    return params


def aggregator_for(cfg: FLConfig) -> Aggregator:
    """The aggregator object the run uses (``aggregator_params_for``'s parameters)."""
    from edgeshield.fl._robust import make_aggregator

    return make_aggregator(cfg.aggregator, **aggregator_params_for(cfg))


def check_combination(cfg: FLConfig) -> None:
    """Refuse, with the reason, a DP mode × secure aggregation × sampling × aggregator combination that cannot run
    soundly."""
    mode = cfg.dp.mode
    if mode == "distributed" or cfg.secagg:  # secure aggregation and distributed DP: their rules live in _secagg
        from edgeshield.fl._secagg import check_secagg_combination

        check_secagg_combination(cfg)
        if cfg.sampling == "fixed":
            raise UnsupportedCombinationError(
                "sampling 'fixed' with secure aggregation: SecAgg+ rounds sample clients by Poisson, which the "
                "distributed-DP accounting assumes; use sampling 'auto' or 'poisson'"
            )
        return
    if mode == "central":
        from edgeshield.fl._robust import is_poisson_sound

        agg = aggregator_for(cfg)
        scheme = cfg.sampling_scheme
        if scheme == "poisson" and not is_poisson_sound(agg):
            raise UnsupportedCombinationError(
                f"central DP with {agg.name!r} under sampling 'poisson': adding or removing one client moves a "
                f"{agg.name} aggregate by more than one per-client term of norm <= C (order statistics and Krum's "
                "selection depend on every client, FLTrust's trust form renormalises by everyone's trust), so noise "
                "scaled to the clip would not bound it; use sampling 'fixed' (or 'auto'), where its replace-one "
                "sensitivity is noised, or fedavg, norm_bound(fedavg) or fltrust(normalise='count')"
            )
        if scheme == "fixed":
            if cfg.dp.adaptive:
                raise UnsupportedCombinationError(
                    f"dp.adaptive with sampling 'fixed' (central DP with {agg.name!r} runs fixed-size cohorts): "
                    "adaptive clipping's noisy count and its split of z were derived for Poisson sampling's "
                    "add/remove-one neighbours; use a fixed dp.clip, or a Poisson-sound aggregator (fedavg, "
                    "norm_bound(fedavg), fltrust) with sampling 'poisson'"
                )
            needed = getattr(agg, "min_clients", lambda: 1)()
            if cfg.clients_per_round < needed:
                raise UnsupportedCombinationError(
                    f"central DP with {agg.name!r} and sampling 'fixed': every round has exactly clients_per_round "
                    f"= {cfg.clients_per_round} updates, and {agg.name} needs at least {needed}; raise "
                    "clients_per_round"
                )
    if cfg.dp.adaptive and mode != "central":
        raise UnsupportedCombinationError(
            "dp.adaptive: adaptive clipping needs the server to count clipped updates (central mode); a local-DP "
            "release is final when it leaves the client"
        )
