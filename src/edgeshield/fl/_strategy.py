"""EdgeShield's Flower strategy: validation, robust aggregation and DP as wrappers, composed from the config.

The Flower :class:`EdgeShieldStrategy` is the message boundary (sampling, messages in and out, validation at the
door); what happens to the validated updates is an :class:`UpdateAggregation` object, built by composition:

- :class:`RobustAggregation` runs one of ``_robust``'s aggregators on the flat updates and reports per-client
  anomaly scores, the clients it left out and the outliers;
- :class:`CentralDP` wraps it, in one of two sampling schemes (``FLConfig.sampling_scheme``):

  * ``poisson`` (each client independently with probability q; add/remove-one neighbours): clip each update to C
    (Flower's ``clip_inputs_inplace``), aggregate the clipped updates with uniform weights, turn the result back into
    the sum of per-client terms, release sum + N(0, (z·C)²) through OpenDP's Gaussian mechanism
    (:class:`edgeshield.privacy.GaussianMechanism`, never ``np.random``) and divide by the EXPECTED number of clients
    q·N (McMahan et al. 2018), so the denominator does not depend on who took part. With ``adaptive`` the clip
    follows Andrew et al. (2021): the noisy fraction of unclipped updates drives C ← C·exp(−η(b̄ − target)), and z
    is split between the updates and the count (Flower's ``compute_adaptive_noise_params``).
  * ``fixed`` (exactly m = clients_per_round clients drawn without replacement by the OS CSPRNG; replace-one
    neighbours): the cohort is always m vectors (a sampled client that did not answer, or whose update was rejected
    at the door, counts as the zero vector), the aggregator runs on the m clipped updates with uniform weights, its
    output is projected onto the C-ball, and released with N(0, (z·Δ)²), Δ the aggregator's replace-one sensitivity.
- Local DP needs no server wrapper: each client's release is already private, so any aggregator is post-processing.

Sensitivity under central DP. Poisson: adding or removing one client changes the sum of per-client terms by at most
C (L2) when each term depends on that client's update alone and has norm <= C: fedavg (uniform weights: example
counts would let a client claim more weight), ``norm_bound`` with a fedavg inner (a second, per-client clip), and
FLTrust's count form (term ReLU(cos(u, g0))·‖g0‖·u/‖u‖ with the root update g0 clipped to C). So sum + N(0, (zC)²) is
the Gaussian mechanism with noise multiplier z, and dividing by the fixed q·N is post-processing. The other
aggregators are not sums of such terms (an order statistic or Krum's selection depends on everyone), so Poisson
sampling with them is refused (``_config.check_combination``). Fixed: each aggregator states its replace-one
sensitivity Δ on m inputs of norm <= C (``_robust``, proof in each docstring): fedavg and FLTrust's count form 2C/m,
the trimmed mean 2C/(m − 2k), the median, Krum, multi-Krum and Bulyan 2C (the diameter of the C-ball their output is
projected onto), ``norm_bound(inner)`` the inner's with C' = min(C, max_norm). Noise z·Δ with noise multiplier z is
then the Gaussian mechanism under replace-one, accounted as sampling without replacement (Wang, Balle &
Kasiviswanathan 2019). The price is plain: Δ = 2C is m times fedavg's 2C/m, so at the same ε the median, Krum,
multi-Krum and Bulyan carry m times the noise of fedavg.

Secure aggregation slots in at :meth:`EdgeShieldStrategy.aggregate_train`: a SecAgg+ workflow hands over only the
sum, so it pairs with an aggregation object that takes a sum instead of per-client updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeshield.errors import InvalidArgumentError
from edgeshield.fl._client import client_id, clip_vector
from edgeshield.fl._robust import is_poisson_sound, project_l2_ball, sensitivity_of

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid

    from edgeshield.fl._config import FLConfig
    from edgeshield.fl._robust import Aggregator
    from edgeshield.monitor import SecurityEvent

__all__ = [
    "AdaptiveClip",
    "CentralDP",
    "ClientUpdate",
    "EdgeShieldStrategy",
    "RobustAggregation",
    "RoundOutcome",
    "UpdateAggregation",
    "build_aggregation",
    "draw_cohort",
]


@dataclass
class ClientUpdate:
    """One validated update: who sent it (as the server knows the node), the flat vector and its weight."""

    client: str
    vector: np.ndarray
    weight: float


@dataclass
class RoundOutcome:
    """What one round's aggregation produced and what it thought of each client."""

    update: np.ndarray
    accepted: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    outliers: list[str] = field(default_factory=list)
    clip: float | None = None
    clipped: list[str] = field(default_factory=list)
    noise_std: float = 0.0


class UpdateAggregation(Protocol):
    """Turns one round's validated updates into the global model's update."""

    def aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], dim: int, *, root_update: np.ndarray | None
    ) -> RoundOutcome: ...


class RobustAggregation:
    """One of ``_robust``'s aggregators over the flat updates, with anomaly scores and outliers reported."""

    def __init__(self, aggregator: Aggregator, *, uniform_weights: bool) -> None:
        self.aggregator = aggregator
        self.uniform_weights = uniform_weights

    def aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], dim: int, *, root_update: np.ndarray | None
    ) -> RoundOutcome:
        from edgeshield.fl._robust import TooFewClientsError, outliers

        if not updates:
            return RoundOutcome(np.zeros(dim), [])
        names = [u.client for u in updates]
        weights = [1.0 if self.uniform_weights else u.weight for u in updates]
        try:
            res = self.aggregator.aggregate([u.vector for u in updates], weights, root_update=root_update)
        except TooFewClientsError as exc:  # the round keeps the model; the reason is reported for every client
            return RoundOutcome(np.zeros(dim), [], rejected=dict.fromkeys(names, f"round skipped: {exc}"))
        scores = {n: float(s) for n, s in zip(names, np.asarray(res.scores, dtype=np.float64), strict=True)}
        rejected = {names[i]: res.reasons.get(i, "left out by the aggregator") for i in res.rejected}
        flagged = [names[i] for i in outliers(list(scores.values()))] if len(scores) >= 3 else []
        accepted = [n for n in names if n not in rejected]
        return RoundOutcome(
            np.asarray(res.vector, dtype=np.float64), accepted, rejected, scores, flagged,
            clipped=[names[i] for i in res.clipped],
        )


@dataclass
class AdaptiveClip:
    """Andrew et al. (2021) quantile-tracking clip state: C ← C·exp(−η(b̄ − target)), b̄ the noisy unclipped fraction."""

    clip: float
    target_quantile: float
    lr: float
    count_stddev: float

    def update(self, unclipped: int, expected_clients: float) -> None:
        from edgeshield.privacy import GaussianMechanism

        # the count of unclipped updates has sensitivity 1; OpenDP adds the noise exactly (no float addition here)
        noisy = (float(GaussianMechanism(1.0, self.count_stddev).release(float(unclipped)))
                 if self.count_stddev > 0 else unclipped)
        fraction = noisy / expected_clients
        self.clip = float(self.clip * math.exp(-self.lr * (fraction - self.target_quantile)))


#: the names the fixed scheme gives the zero vectors standing in for missing updates (no client is called this)
_ABSENT = "(absent-"


class CentralDP:
    """Central user-level DP around an aggregation, in the Poisson or the fixed-size scheme (see the module doc).

    ``expected_clients``: q·N under Poisson (the fixed denominator), m (an integer) under ``sampling="fixed"``.
    """

    def __init__(
        self, inner: RobustAggregation, *, clip: float, noise_multiplier: float, expected_clients: float,
        adaptive: AdaptiveClip | None = None, sampling: str = "poisson",
    ) -> None:
        self.inner = inner
        self.clip = clip
        self.noise_multiplier = noise_multiplier  # the effective z the accountant is told
        self.expected_clients = expected_clients
        self.adaptive = adaptive
        self.update_noise_multiplier = noise_multiplier
        if sampling not in ("poisson", "fixed"):
            raise InvalidArgumentError(f"central DP: sampling must be 'poisson' or 'fixed', not {sampling!r}")
        self.sampling = sampling
        self.cohort_size = 0
        self.sensitivity = clip  # of the released quantity: the sum (poisson) or the projected aggregate (fixed)
        if sampling == "fixed":
            if adaptive is not None:
                raise InvalidArgumentError("central DP: adaptive clipping needs sampling 'poisson'")
            if float(expected_clients) != int(expected_clients) or int(expected_clients) < 1:
                raise InvalidArgumentError(f"central DP with sampling 'fixed' needs an integer cohort size m, "
                                           f"not {expected_clients!r}")
            self.cohort_size = int(expected_clients)
            self.sensitivity = sensitivity_of(inner.aggregator, self.cohort_size, clip)
        elif not is_poisson_sound(inner.aggregator):
            raise InvalidArgumentError(
                f"central DP: {inner.aggregator.name} is not Poisson-sound (its aggregate is not a sum of per-client "
                "terms of norm <= C); run it with sampling 'fixed'"
            )
        if adaptive is not None:
            from flwr.supercore.differential_privacy import compute_adaptive_noise_params

            if noise_multiplier >= 2 * adaptive.count_stddev:
                raise InvalidArgumentError(
                    f"fl config: dp.count_stddev: adaptive clipping splits z = {noise_multiplier:.4g} between the "
                    f"updates and the clipped count, which needs count_stddev > z / 2 (it is "
                    f"{adaptive.count_stddev:.4g}: expected clients / 20 by default); set dp.count_stddev or sample "
                    "more clients per round"
                )
            # z split between the updates and the count: z_Δ = (z⁻² − (2·count_stddev)⁻²)^(−1/2), as in the paper
            _, self.update_noise_multiplier = compute_adaptive_noise_params(
                noise_multiplier, expected_clients, adaptive.count_stddev
            )

    def current_clip(self) -> float:
        return self.adaptive.clip if self.adaptive is not None else self.clip

    def _clip_all(self, updates: Sequence[ClientUpdate], root_update: np.ndarray | None, clip: float
                  ) -> tuple[list[ClientUpdate], list[str], np.ndarray | None]:
        clipped: list[ClientUpdate] = []
        cut: list[str] = []
        for u in updates:
            vec, was_cut = clip_vector(u.vector, clip)
            clipped.append(ClientUpdate(u.client, vec, 1.0))
            if was_cut:
                cut.append(u.client)
        # FLTrust's terms are scaled to the root update's norm: clipped to C like every update (s = min(‖g0‖, C))
        root = None if root_update is None else project_l2_ball(np.asarray(root_update, dtype=np.float64), clip)
        return clipped, cut, root

    def fixed_aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], dim: int, *, root_update: np.ndarray | None
    ) -> tuple[np.ndarray, RoundOutcome]:
        """The fixed scheme before the noise: m vectors (zeros for the missing), aggregated, projected onto the
        C-ball. Its output moves by at most :attr:`sensitivity` when one client's data is replaced."""
        m, clip = self.cohort_size, self.current_clip()
        if len(updates) > m or len({u.client for u in updates}) != len(updates):
            raise InvalidArgumentError(f"central DP: {len(updates)} updates for a cohort of {m} distinct clients")
        clipped, cut, root = self._clip_all(updates, root_update, clip)
        pads = [ClientUpdate(f"{_ABSENT}{k})", np.zeros(dim), 1.0) for k in range(m - len(updates))]
        out = self.inner.aggregate(server_round, clipped + pads, dim, root_update=root)
        real = {u.client for u in updates}
        out.accepted = [c for c in out.accepted if c in real]
        out.rejected = {c: r for c, r in out.rejected.items() if c in real}
        out.scores = {c: v for c, v in out.scores.items() if c in real}
        out.outliers = [c for c in out.outliers if c in real]
        out.clipped = sorted((set(out.clipped) & real) | set(cut))
        out.clip = clip
        return project_l2_ball(out.update, clip), out

    def aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], dim: int, *, root_update: np.ndarray | None
    ) -> RoundOutcome:
        from edgeshield.privacy import GaussianMechanism

        if self.sampling == "fixed":
            vector, out = self.fixed_aggregate(server_round, updates, dim, root_update=root_update)
            std = self.noise_multiplier * self.sensitivity
            # replace-one sensitivity Δ of the projected aggregate; OpenDP releases it + N(0, (zΔ)²) exactly
            out.update = np.asarray(GaussianMechanism(self.sensitivity, std).release(vector))
            out.noise_std = std
            return out
        clip = self.current_clip()
        clipped, cut, root = self._clip_all(updates, root_update, clip)
        out = self.inner.aggregate(server_round, clipped, dim, root_update=root)
        # uniform weights and a count denominator: the aggregate times the number of updates is the sum of the
        # per-client terms (fedavg: the clipped updates; FLTrust's count form: the trust-weighted rescaled ones)
        total = out.update * len(clipped)
        std = self.update_noise_multiplier * clip
        # The sum of clipped updates has L2 sensitivity C; OpenDP's mechanism releases sum + N(0, std²) exactly on
        # its grid (Mironov-safe), instead of a float addition of separately drawn noise.
        noised = np.asarray(GaussianMechanism(clip, std).release(total)) / self.expected_clients if std > 0 \
            else total / self.expected_clients
        if self.adaptive is not None:
            self.adaptive.update(len(updates) - len(cut), self.expected_clients)
        out.update = noised
        out.clip = clip
        out.clipped = sorted(set(out.clipped) | set(cut))
        out.noise_std = std / self.expected_clients
        return out


def build_aggregation(cfg: FLConfig, noise_multiplier: float | None) -> RobustAggregation | CentralDP:
    """The aggregation the config asks for (the combination already checked by ``check_combination``)."""
    from edgeshield.fl._config import aggregator_for

    robust = RobustAggregation(aggregator_for(cfg), uniform_weights=cfg.dp.enabled)
    if cfg.dp.mode != "central":
        return robust
    if noise_multiplier is None:
        raise InvalidArgumentError("central DP needs a noise multiplier")
    expected = float(cfg.clients_per_round)
    adaptive = None
    if cfg.dp.adaptive:
        stddev = cfg.dp.count_stddev if cfg.dp.count_stddev is not None else expected / 20
        adaptive = AdaptiveClip(cfg.dp.clip, cfg.dp.target_quantile, cfg.dp.clip_lr, stddev)
    return CentralDP(
        robust, clip=cfg.dp.clip, noise_multiplier=noise_multiplier, expected_clients=expected, adaptive=adaptive,
        sampling=cfg.sampling_scheme,
    )


def draw_cohort(rng: Any, clients: int, per_round: int, scheme: str) -> list[int]:
    """This round's clients: exactly ``per_round`` without replacement (``fixed``) or each with probability
    per_round / clients (``poisson``). ``rng`` has ``sample(population, k)`` (``secrets.SystemRandom``: under DP the
    draws must be secret) or is a numpy Generator (a reproducible run without DP)."""
    if scheme == "fixed":
        sample = getattr(rng, "sample", None)
        picked = sample(range(clients), per_round) if sample is not None else \
            rng.choice(clients, size=per_round, replace=False).tolist()
        return sorted(int(c) for c in picked)
    q = per_round / clients
    return [cid for cid in range(clients) if q >= 1.0 or rng.random() < q]


def _strategy_base() -> type:
    from flwr.serverapp.strategy import Strategy

    return Strategy


class EdgeShieldStrategy:
    """A Flower :class:`~flwr.serverapp.strategy.Strategy` (built by :func:`make_strategy`) over an aggregation."""


def make_strategy(
    cfg: FLConfig,
    aggregation: UpdateAggregation,
    *,
    template: list[tuple[tuple[int, ...], str]],
    nodes: Sequence[int],
    job_json: str,
    noise_multiplier: float | None,
    attacks: dict[int, str],
    ledger_dir: str,
    root_update: Callable[[list[np.ndarray]], np.ndarray] | None,
    events: Callable[[SecurityEvent], None] | None,
    rng: np.random.Generator,
    custom_data: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> Any:
    """The Flower strategy for one run (a subclass of Flower's ``Strategy``, defined lazily: Flower is an extra)."""
    base = _strategy_base()

    class _Strategy(base, EdgeShieldStrategy):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__()
            self.node_of = {cid: nodes[cid] for cid in range(cfg.clients)}
            self.cid_of = {node: cid for cid, node in self.node_of.items()}
            self.current: list[np.ndarray] = []
            self.last: RoundOutcome | None = None
            self.sampled: list[str] = []
            self.refused: dict[str, str] = {}
            self.held_back: dict[str, int] = {}  # examples each client's data check held back this round

        def summary(self) -> None:
            return None

        def clip(self) -> float | None:
            if isinstance(aggregation, CentralDP):
                return aggregation.current_clip()
            return cfg.dp.clip if cfg.dp.enabled else None

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

            self.current = arrays.to_numpy_ndarrays()
            # the run's scheme, as the accountant is told (under DP the sampler is the operating system's CSPRNG:
            # see make_strategy's caller)
            chosen = draw_cohort(rng, cfg.clients, cfg.clients_per_round, cfg.sampling_scheme)
            self.sampled = [client_id(c) for c in chosen]
            clip = self.clip()
            messages = []
            for cid in chosen:
                cfg_record = ConfigRecord(
                    {
                        "server-round": server_round, "cid": cid, "job": job_json,
                        "attack": attacks.get(cid, ""), "clip": float(clip or 0.0),
                        "noise-multiplier": float(noise_multiplier or 0.0), "ledger-dir": ledger_dir,
                    }
                )
                content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {"arrays": arrays, "config": cfg_record}
                if custom_data is not None:
                    content["data"] = ArrayRecord(list(custom_data[cid]))
                messages.append(
                    Message(content=RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=self.node_of[cid])
                )
            return messages

        def _reject(self, server_round: int, client: str, reason: str, rejected: dict[str, str]) -> None:
            rejected[client] = reason
            if events is not None:
                from edgeshield.monitor import SecurityEvent

                events(SecurityEvent("fl.update_rejected", client,
                                     {"round": server_round, "client": client, "reason": reason}, source="fl"))

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            from flwr.app import ArrayRecord, MetricRecord

            from edgeshield.fl._updates import UpdateRejected, flatten, unflatten, validate_update

            rejected: dict[str, str] = {}
            self.refused, self.held_back = {}, {}
            valid: list[ClientUpdate] = []
            answered: set[str] = set()
            for reply in replies:
                # the sender is the node the grid says it is, never the id a client writes into its reply
                cid = self.cid_of.get(int(reply.metadata.src_node_id))
                if cid is None:
                    continue
                client = client_id(cid)
                if client not in self.sampled:  # the cohort (and so the sensitivity) is who the server sampled
                    self._reject(server_round, client, "not sampled this round", rejected)
                    continue
                if client in answered:
                    self._reject(server_round, client, "duplicate reply", rejected)
                    continue
                answered.add(client)
                if reply.has_error():
                    self._reject(server_round, client, f"client error: {reply.error.reason}", rejected)
                    continue
                content = reply.content
                reported = content.metric_records.get("metrics")
                held = reported.get("held-back", 0) if reported is not None else 0
                if isinstance(held, int) and not isinstance(held, bool) and held > 0:
                    self.held_back[client] = held
                meta = content.config_records.get("meta")
                if meta is not None and meta.get("status") == "refused":
                    self.refused[client] = str(meta.get("reason", ""))
                    continue
                try:
                    if meta is None or "arrays" not in content.array_records:
                        raise UpdateRejected("type", "reply carries no update or no round number")
                    arrays = content.array_records["arrays"].to_numpy_ndarrays()
                    sent_round = meta.get("round")
                    if isinstance(sent_round, bool) or not isinstance(sent_round, int):
                        raise UpdateRejected("round", f"round number is not an integer: {sent_round!r}")
                    vector = validate_update(
                        arrays, template, round=sent_round, expected_round=server_round,
                        max_norm=cfg.max_update_norm,
                    )
                except UpdateRejected as exc:
                    self._reject(server_round, client, f"{exc.reason}: {exc.detail}", rejected)
                    continue
                metrics = content.metric_records.get("metrics")
                weight = metrics.get("num-examples", 1) if metrics is not None else 1
                w = float(weight) if isinstance(weight, int | float) and not isinstance(weight, bool) else 1.0
                valid.append(ClientUpdate(client, vector, w if math.isfinite(w) and w > 0 else 1.0))
            root = root_update(self.current) if root_update is not None else None
            dim = int(flatten(self.current).size)
            outcome = aggregation.aggregate(server_round, valid, dim, root_update=root)
            for client, reason in outcome.rejected.items():
                self._reject(server_round, client, reason, rejected)
            for client in outcome.outliers:
                if client not in rejected:
                    score = outcome.scores.get(client, float("nan"))
                    self._reject(server_round, client, f"outlier: anomaly score {score:.3g}", {})
            outcome.rejected = rejected
            self.last = outcome
            new = flatten(self.current) + outcome.update
            params = unflatten(new, template)
            return ArrayRecord([np.asarray(p) for p in params]), MetricRecord(
                {"accepted": len(outcome.accepted), "rejected": len(rejected)}
            )

        def configure_evaluate(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            return []  # the server evaluates centrally on the test split

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            return None

    return _Strategy()
