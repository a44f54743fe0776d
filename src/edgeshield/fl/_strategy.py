"""EdgeShield's Flower strategy: validation, robust aggregation and DP as wrappers, composed from the config.

The Flower :class:`EdgeShieldStrategy` is the message boundary (sampling, messages in and out, validation at the
door); what happens to the validated updates is an :class:`UpdateAggregation` object, built by composition:

- :class:`RobustAggregation` runs one of ``_robust``'s aggregators on the flat updates and reports per-client
  anomaly scores, the clients it left out and the outliers;
- :class:`CentralDP` wraps it: clip each update to C (Flower's ``clip_inputs_inplace``), aggregate the clipped
  updates with uniform weights, turn the mean back into the sum, add N(0, (z·C)²) from
  :func:`edgeshield.privacy.gaussian_noise` (never Flower's ``np.random.normal``) and divide by the EXPECTED number
  of clients q·N (McMahan et al. 2018), so the denominator does not depend on who took part. With ``adaptive`` the
  clip follows Andrew et al. (2021): the noisy fraction of unclipped updates drives C ← C·exp(−η(b̄ − target)), and
  z is split between the updates and the count (Flower's ``compute_adaptive_noise_params``).
- Local DP needs no server wrapper: each client's release is already private, so any aggregator is post-processing.

Sensitivity under central DP. Adding or removing one client changes the sum of clipped updates by at most C (L2),
so sum + N(0, (zC)²) is the Gaussian mechanism with noise multiplier z, and dividing by the fixed q·N is
post-processing. This holds for ``fedavg`` (uniform weights: example counts would let a client claim more weight)
and for ``norm_bound`` with a fedavg inner (a second, per-client clip keeps each contribution ≤ C). It does NOT hold
for the coordinate-wise median or trimmed mean (one client can shift every coordinate's order statistic by up to
2C, an L2 change up to 2C·√d), for Krum/Bulyan (one client can switch the selected set), or for FLTrust (the
average is renormalised by the sum of every client's trust): those combinations are refused
(``_config.check_combination``) rather than run with noise that would not bound them.

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


class CentralDP:
    """Central user-level DP around an aggregation whose sensitivity on clipped updates is C (see module doc)."""

    def __init__(
        self, inner: RobustAggregation, *, clip: float, noise_multiplier: float, expected_clients: float,
        adaptive: AdaptiveClip | None = None,
    ) -> None:
        self.inner = inner
        self.clip = clip
        self.noise_multiplier = noise_multiplier  # the effective z the accountant is told
        self.expected_clients = expected_clients
        self.adaptive = adaptive
        self.update_noise_multiplier = noise_multiplier
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

    def aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], dim: int, *, root_update: np.ndarray | None
    ) -> RoundOutcome:
        from edgeshield.privacy import GaussianMechanism

        clip = self.current_clip()
        clipped: list[ClientUpdate] = []
        cut: list[str] = []
        for u in updates:
            vec, was_cut = clip_vector(u.vector, clip)
            clipped.append(ClientUpdate(u.client, vec, 1.0))
            if was_cut:
                cut.append(u.client)
        out = self.inner.aggregate(server_round, clipped, dim, root_update=root_update)
        total = out.update * len(out.accepted)  # uniform weights: the mean back to the sum of accepted updates
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
    from edgeshield.fl._robust import make_aggregator

    robust = RobustAggregation(
        make_aggregator(cfg.aggregator, **dict(cfg.aggregator_params)), uniform_weights=cfg.dp.enabled
    )
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
        robust, clip=cfg.dp.clip, noise_multiplier=noise_multiplier, expected_clients=expected, adaptive=adaptive
    )


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
            # Poisson sampling: each client independently with probability q (what the accountant assumes)
            q = cfg.sampling_rate
            chosen = [cid for cid in range(cfg.clients) if q >= 1.0 or rng.random() < q]  # not privacy noise (see
            # make_strategy's caller: under DP the sampler is the operating system's CSPRNG)
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
