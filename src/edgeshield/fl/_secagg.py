"""Secure aggregation on Flower's SecAgg+ (Bell et al. 2020), alone or with DP, distributed DP among them.

Under ``secagg = true`` each round runs Flower's legacy ``SecAggPlusWorkflow`` (setup → share keys → collect masked
vectors → unmask) inside the same Simulation Runtime as every other run: the ServerApp job builds a ``LegacyContext``
around :func:`_legacy_strategy` and drives it with ``DefaultWorkflow(fit_workflow= SecAggPlusWorkflow(...))``; the
client side is Flower's ``secaggplus_mod`` wrapped around :func:`_masked_train` (dispatched by the ClientApp when a
message carries SecAgg+ configs). The server's strategy gets only the sum.

**Distributed DP** (``dp.mode = "distributed"``; Kairouz, Liu & Steinke, ICML 2021, "The Distributed Discrete Gaussian
Mechanism"). Each client clips its update u to L2 norm C, scales it to the grid of step gamma = C / k (k grid steps
per clip), rounds it by randomized rounding conditioned on ‖x̃‖₂ ≤ Δ₂ with Δ₂² = min(k² + d/4 + √(2 ln 1/beta)(k +
√d/2), (k + √d)²), beta = e^{-1/2} (the paper's bound; the second term holds for every rounding, so the resampling
always ends), and adds its share of discrete Gaussian noise N_Z(0, sigma_c²), sigma_c = z·Δ₂ / √n with n =
``clients_per_round`` (the expected cohort) from :func:`edgeshield.privacy.discrete_gaussian_noise`. The sum of n
shares carries sigma_total = z·Δ₂ in grid units, so the server's estimate gamma·S / n has the noise of central DP at
multiplier z on sensitivity Δ₂·gamma ≈ C. Local DP under SecAgg adds each client's N(0, (zC)²) in floats before the
rounding (rounding is post-processing); central DP under SecAgg adds N(0, (zC)²) to the decoded sum on the server;
``none`` only clips and rounds.

**Lossless SecAgg+ quantisation.** Flower's client mod multiplies the parameters by q/T (q = round(T·w/max_weight), w
= ``num_examples``), maps x ↦ (clip(x, −R, R) + R)·T/(2R) with stochastic rounding, and the server dequantises the
modular sum back to a weighted mean. We send w = 1 with ``max_weight = 1`` (so q = T and the factor is exactly 1),
``quantization_range`` T = 2R (so T/(2R) = 1) and integer-valued float64 inputs in [−R, R] with integer R: the
quantiser computes x + R exactly and its stochastic rounding never fires (its ``np.random`` draw is not privacy noise
and changes nothing here). With ``modulus_range`` M = 2^32 and R = ⌊(M − 1) / (2·N)⌋ (N = every client that could be
sampled), the modular sum of at most N values in [0, 2R], and the weight sum N·T, stay below M: no wrap-around, and
the server's mean S/n is decoded back to the integer sum S by n·mean (exact for |S| < 2^51). T < 2^31 keeps Flower's
int32 cast exact.

**The norm bound is the protocol's bounded input range.** The grid is chosen so an honest client's values stay inside
[−R, R] except with probability < 1e-40 per coordinate (k·(1 + 14·s) + 2 ≤ R, s the client noise in clips); Flower's
quantiser clamps each coordinate to that range, so whatever a client's update was, it moves the sum by at most R·gamma
per coordinate (≈ C(1 + 14s): an L∞ bound, which is what the range enforces, not the L2 clip C). This holds against
clients running the mod; SecAgg+ has no range proofs, so a client that rewrites its own masking code can add any
residue mod M. Per-update defences (median, trimmed mean, Krum, Bulyan, FLTrust, anomaly scores, a server-side norm
bound) need individual updates and are refused under SecAgg (:func:`check_secagg_combination`).

**ε.** Reported with :func:`edgeshield.privacy.epsilon_for` on the effective multiplier z_eff = sigma_c·√n_r / Δ₂ of
each round (n_r the clients whose masked vectors were summed; the smallest over the run is used, so dropouts, which
remove their noise shares, raise ε), with sampling rate q as in central DP. This treats the sum of discrete Gaussians
as the continuous Gaussian mechanism with the same sigma_total: Kairouz et al. (Thm. 1) bound the sum of n discrete
Gaussians of variance sigma_c² by ½ε²-concentrated DP with ε = min(√(Δ₂²/(nsigma_c²) + ½taud), Δ₂/(√n sigma_c) +
tau√d), tau = 10·Σ_{k=1}^{n−1} e^{−2π²sigma_c²·k/(k+1)}; on our fine grids (sigma_c ≫ 1) tau underflows to 0 and that
bound equals the continuous Gaussian's rho = 1/(2z²). The Poisson-subsampled accounting (RDP/PLD of the continuous
subsampled Gaussian) is the approximation; we also report the paper's rigorous bound without amplification by sampling
(``epsilon_zcdp_bound``: rho summed over rounds, ε = rho + 2√(rho ln 1/δ)). Both assume the clients that add noise are
honest (a colluding client can withhold its share) and an honest-but-curious server.

Limits of Flower's SecAgg+ 1.42 (stated, not fixed here): its mask PRG seeds numpy's MT19937 with the 32-bit XOR of
the seed's words, far below the protocol's 128-bit assumption; there is no authentication of the server's relay beyond
the transport, and no range proofs (above).

Test-only hooks: with ``EDGESHIELD_TEST_SECAGG_HOOKS`` set to a directory in the environment of the process that
starts the runtime, each client writes its pre-mask integer vectors there (``r<round>-c<cid>.npz``), and the clients a
``drop.json`` there names (``{"round": r, "cids": [...]}``) drop out after sharing their keys (before their masked
vectors). Never set it in deployment.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import IntegrityError, InvalidArgumentError
from edgeshield.fl._config import CENTRAL_DP_AGGREGATORS, FLConfig, UnsupportedCombinationError

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from edgeshield.fl._sim import FLResult

__all__ = [
    "MODULUS",
    "SecAggPlan",
    "SecAggRoundInfo",
    "check_secagg_combination",
    "conditional_round",
    "handles",
    "is_secagg_message",
    "plan_secagg",
    "run_secagg_job",
    "secagg_client_reply",
    "zcdp_epsilon",
]

MODULUS = 2**32  # Flower's modulus_range (documented maximum): masks and sums live mod 2^32
TAIL = 14.0  # honest values stay within the range unless a noise draw exceeds 14 sigma (probability < 1e-40)
BETA = math.exp(-0.5)  # Kairouz et al.'s conditional-rounding parameter
MIN_GRID_STEPS = 1000  # k below this makes the rounding a visible part of the noise: refused
RECONSTRUCTION_FRACTION = 2 / 3  # shares needed to unmask, as a fraction of each client's neighbours (all sampled)
HOOKS_ENV = "EDGESHIELD_TEST_SECAGG_HOOKS"
_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------------------------------- configuration


def check_secagg_combination(cfg: FLConfig) -> None:
    """Refuse, with its reason, a combination involving secure aggregation or distributed DP that cannot run."""
    mode, agg = cfg.dp.mode, cfg.aggregator
    if mode == "distributed" and not cfg.secagg:
        raise UnsupportedCombinationError(
            "dp.mode 'distributed' needs secagg = true: each client adds only 1/√n of the noise, which protects "
            "the sum, not an update the server can see on its own"
        )
    if not cfg.secagg:
        return
    if agg != "fedavg":
        raise UnsupportedCombinationError(
            f"secagg with {agg!r}: secure aggregation hides individual updates, so a per-update defence (median, "
            "trimmed mean, Krum, Bulyan, FLTrust, anomaly scores, a server-side norm bound) cannot run; under "
            "secagg the defence is the client-side clip (dp.clip) with the norm enforced by the protocol's bounded "
            "input range: use aggregator 'fedavg'"
        )
    if cfg.clients < 2:
        raise UnsupportedCombinationError("secagg needs at least 2 clients (SecAgg+ sums 2 or more masked vectors)")
    if cfg.dp.adaptive:
        raise UnsupportedCombinationError(
            "dp.adaptive with secagg: adaptive clipping counts clipped updates per client, which the server "
            "cannot see under secure aggregation"
        )
    if mode == "central" and agg not in CENTRAL_DP_AGGREGATORS:  # pragma: no cover - fedavg only, above
        raise UnsupportedCombinationError(f"central DP with {agg!r} is not sensitivity-bounded")


def handles(cfg: FLConfig) -> bool:
    """Whether this module runs ``cfg`` (secure aggregation on)."""
    return bool(cfg.secagg)


@dataclass(frozen=True)
class SecAggPlan:
    """The grid, range and noise of one run: every number the clients and the server must agree on."""

    mode: str
    dim: int
    clip: float
    noise_multiplier: float | None
    expected_clients: float
    max_clients: int
    grid_steps: float  # k = C / gamma
    gamma: float
    bound: float  # Δ₂, the L2 bound of a rounded update in grid units
    clip_range: int  # R: every value a client adds lies in [-R, R]
    sigma_client: float  # distributed: each client's discrete-noise scale (grid units); else 0
    local_sigma: float  # local: each client's float noise std (model units); else 0

    @property
    def quantization_range(self) -> int:
        return 2 * self.clip_range

    @property
    def sigma_total(self) -> float:
        return self.sigma_client * math.sqrt(self.expected_clients)

    def z_effective(self, contributors: int) -> float | None:
        """The noise multiplier the accountant is told for a round whose sum had ``contributors`` noise shares."""
        if self.mode != "distributed":
            return self.noise_multiplier
        return self.sigma_client * math.sqrt(max(contributors, 0)) / self.bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "dim": self.dim, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
            "expected_clients": self.expected_clients, "max_clients": self.max_clients,
            "grid_steps": self.grid_steps, "gamma": self.gamma, "bound": self.bound, "clip_range": self.clip_range,
            "quantization_range": self.quantization_range, "modulus_range": MODULUS,
            "sigma_client": self.sigma_client, "sigma_total": self.sigma_total, "local_sigma": self.local_sigma,
        }


def _bound(k: float, d: int) -> float:
    """Kairouz et al.'s conditional-rounding norm bound Δ₂ for an input of norm ≤ k in d dimensions."""
    soft = k * k + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (k + math.sqrt(d) / 2)
    return math.sqrt(min(soft, (k + math.sqrt(d)) ** 2))


def plan_secagg(cfg: FLConfig, dim: int, noise_multiplier: float | None) -> SecAggPlan:
    """Grid step, range and noise shares for ``cfg`` on a model of ``dim`` parameters (see the module doc)."""
    if dim < 1:
        raise InvalidArgumentError("secagg: the model has no parameters")
    mode = cfg.dp.mode
    z = noise_multiplier if mode != "none" else None
    if mode != "none" and (z is None or not z > 0):
        raise InvalidArgumentError(f"secagg: dp mode {mode!r} needs a positive noise multiplier")
    n_max = cfg.clients
    n_exp = float(cfg.clients_per_round)
    clip_range = (MODULUS - 1) // (2 * n_max)
    # client noise in units of the clip: distributed shares z/√n, local z, none/central 0 (server adds central noise)
    s = (z or 0.0) / math.sqrt(n_exp) if mode == "distributed" else (z or 0.0) if mode == "local" else 0.0
    k = math.floor(0.98 * (clip_range - 2) / (1 + TAIL * s))
    if k < MIN_GRID_STEPS:
        raise UnsupportedCombinationError(
            f"secagg: {n_max} clients with noise {s:.3g}·C per client leave {k} grid steps per clip in a 32-bit "
            f"modulus (need ≥ {MIN_GRID_STEPS}); use fewer clients or less noise per client"
        )
    bound = _bound(float(k), dim)
    sigma_client = (z or 0.0) * bound / math.sqrt(n_exp) if mode == "distributed" else 0.0
    if bound + 1 + TAIL * max(sigma_client, s * k) > clip_range:  # pragma: no cover - the 2 % margin covers it
        raise IntegrityError("secagg: the grid does not fit the range")
    return SecAggPlan(
        mode=mode, dim=dim, clip=cfg.dp.clip, noise_multiplier=z, expected_clients=n_exp, max_clients=n_max,
        grid_steps=float(k), gamma=cfg.dp.clip / k, bound=bound, clip_range=clip_range, sigma_client=sigma_client,
        local_sigma=(z or 0.0) * cfg.dp.clip if mode == "local" else 0.0,
    )


def zcdp_epsilon(plan: SecAggPlan, contributors: list[int], delta: float) -> tuple[float, float]:
    """Kairouz et al.'s Thm. 1 bound composed over rounds without sampling amplification: (ε at δ, max tau)."""
    rho = 0.0
    tau_max = 0.0
    d = plan.dim
    for n in contributors:
        if n <= 0:
            continue
        s2 = plan.sigma_client**2
        tau = 10 * sum(math.exp(-2 * math.pi**2 * s2 * j / (j + 1)) for j in range(1, n))
        tau_max = max(tau_max, tau)
        eps_cdp = min(math.sqrt(plan.bound**2 / (n * s2) + 0.5 * tau * d),
                      plan.bound / (math.sqrt(n) * plan.sigma_client) + tau * math.sqrt(d))
        rho += eps_cdp**2 / 2
    if rho == 0.0:
        return 0.0, tau_max
    return rho + 2 * math.sqrt(rho * math.log(1 / delta)), tau_max


# ------------------------------------------------------------------------------------------------- client side


def _uniform(n: int) -> np.ndarray:
    """n uniforms in [0, 1) from the OS CSPRNG (53-bit mantissas)."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) if n else np.zeros(0, dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def conditional_round(x: np.ndarray, bound: float, *, max_tries: int = 10_000) -> np.ndarray:
    """Unbiased randomized rounding of ``x`` to integers, redrawn until the L2 norm is ≤ ``bound`` (Kairouz et al.)."""
    base = np.floor(x)
    frac = x - base
    for _ in range(max_tries):
        out = base + (_uniform(x.size).reshape(x.shape) < frac)
        if float(np.linalg.norm(out)) <= bound:
            return np.asarray(out, dtype=np.int64)
    raise IntegrityError(f"secagg: no rounding within the norm bound {bound:.6g} after {max_tries} draws")


def is_secagg_message(msg: Message) -> bool:
    """Whether a train message belongs to the SecAgg+ protocol (the ClientApp dispatches it here)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def _hooks_dir() -> Path | None:
    value = os.environ.get(HOOKS_ENV)
    return Path(value) if value else None


class SecAggDropout(RuntimeError):
    """Test-only fault injection: this client leaves the protocol here."""


def secagg_client_reply(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage on the client: Flower's ``secaggplus_mod`` around :func:`_masked_train`."""
    from flwr.client.mod import secaggplus_mod

    reply: Message = secaggplus_mod(msg, context, _masked_train)
    return reply


def _num(config: dict[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"secagg fit config: {key!r} is not a number")
    return float(value)


def client_vector(update: np.ndarray, plan: dict[str, Any], *, z: float, ledger: Callable[[], str | None] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The integer vector a client feeds SecAgg+ for its flat ``update``: (before noise, as sent)."""
    from edgeshield.fl._client import clip_vector

    mode = str(plan["mode"])
    clip = float(plan["clip"])
    gamma = float(plan["gamma"])
    r = int(plan["clip_range"])
    clipped, _ = clip_vector(update, clip)
    if mode == "local":
        if ledger is not None:
            refusal = ledger()
            if refusal is not None:
                raise SecAggDropout(f"local privacy budget refuses the release: {refusal}")
        from edgeshield.privacy import GaussianMechanism

        clipped = np.asarray(GaussianMechanism(clip, z * clip).release(clipped))  # exact, Mironov-safe release
        rounded = conditional_round(clipped / gamma, math.inf)
        return rounded, rounded
    rounded = conditional_round(clipped / gamma, float(plan["bound"]))
    if mode != "distributed":
        return rounded, np.clip(rounded, -r, r)
    from edgeshield.privacy import discrete_gaussian_noise

    noised = rounded + discrete_gaussian_noise(rounded.shape, float(plan["sigma_client"]))
    return rounded, np.clip(noised, -r, r)  # the range Flower enforces anyway (never reached by honest noise)


def _masked_train(msg: Message, context: Context) -> Message:
    """The train step under SecAgg+: local SGD, clip, noise share, grid; returns a FitRes of integers."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from edgeshield.fl._attacks import parse_attack
    from edgeshield.fl._client import _local_dp, job_config
    from edgeshield.fl._data import federated_data
    from edgeshield.fl._model import local_update
    from edgeshield.fl._updates import flatten

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    cfg = job_config(config)
    plan = json.loads(str(config["plan"]))
    cid, server_round = int(_num(config, "cid")), int(_num(config, "server-round"))
    hooks = _hooks_dir()
    if hooks is not None and (hooks / "drop.json").is_file():  # test-only fault injection (see the module doc)
        drop = json.loads((hooks / "drop.json").read_text(encoding="utf-8"))
        if server_round == drop.get("round") and cid in drop.get("cids", []):
            raise SecAggDropout(f"test hook: client {cid} drops out after sharing its keys (round {server_round})")
    attack_spec = str(config.get("attack", ""))
    attack = parse_attack(attack_spec) if attack_spec else None
    if "data" in config:
        raw = config["data"]
        if not isinstance(raw, bytes):
            raise InvalidArgumentError("secagg fit config: 'data' is not bytes")
        with np.load(io.BytesIO(raw)) as shard:
            x, y = shard["x"], shard["y"]
    else:
        x, y = federated_data(cfg).clients[cid]
    if attack is not None and attack.poisons_data:
        x, y = attack.poison_data(x, y, seed=cfg.seed + cid)
    params = parameters_to_ndarrays(fitins.parameters)
    update, _ = local_update(
        cfg.model, params, x, y, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        seed=cfg.seed * 100_003 + server_round * 1_009 + cid,
    )
    z = float(plan["noise_multiplier"] or 0.0)
    if attack is not None and not attack.poisons_data:
        update = attack.poison_update(update)  # a deviating client: only the protocol's range bounds it now
    ledger: Callable[[], str | None] | None = None
    if cfg.dp.mode == "local":
        ledger_dir = str(config["ledger-dir"])

        def ledger() -> str | None:  # check and spend this client's own budget before anything is sent
            released = _local_dp([np.zeros(1)], cfg, cid, server_round, z, cfg.dp.clip, ledger_dir)
            return released if isinstance(released, str) else None

    flat = flatten(update)
    clean, sent = client_vector(flat, plan, z=z, ledger=ledger)
    if hooks is not None:
        np.savez(hooks / f"r{server_round}-c{cid}.npz", clean=clean, sent=sent)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([sent.astype(np.float64)]), 1, {})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


# ------------------------------------------------------------------------------------------------- server side


@dataclass
class SecAggRoundInfo:
    """What the server learnt in one round: who was asked, whose masked vectors were summed, the integer sum."""

    round: int
    sampled: list[str]
    contributors: list[str]
    dropped: list[str]
    total: np.ndarray | None
    received_distinct: int  # distinct parameter sets the strategy was handed (1: only the aggregate)
    seconds: float = 0.0


def _workflow(cfg: FLConfig, plan: SecAggPlan) -> Any:
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_FRACTION, max_weight=1.0,
        clipping_range=float(plan.clip_range), quantization_range=plan.quantization_range, modulus_range=MODULUS,
        timeout=_TIMEOUT_S,
    )


def run_secagg_job(grid: Any, job: Any) -> FLResult:
    """One run of ``job.cfg`` under SecAgg+ on ``grid`` (the ServerApp body when ``cfg.secagg``)."""
    import shutil
    import tempfile

    from flwr.app import Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow

    from edgeshield.fl._model import initial_params, local_update
    from edgeshield.fl._sim import FLResult, _wait_for_nodes, effective_noise_multiplier
    from edgeshield.fl._updates import flatten, template_of

    t_start = time.perf_counter()
    cfg: FLConfig = job.cfg
    check_secagg_combination(cfg)
    z = effective_noise_multiplier(cfg)
    nodes = _wait_for_nodes(grid, cfg.clients)
    params = initial_params(cfg.model, cfg.seed)
    if cfg.pretrain_on_root:
        x_root, y_root = job.data.root
        delta, _ = local_update(cfg.model, params, x_root, y_root, epochs=cfg.pretrain_epochs,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        params = [p + d for p, d in zip(params, delta, strict=True)]
    template = template_of(params)
    plan = plan_secagg(cfg, int(flatten(params).size), z)
    ledger_dir = tempfile.mkdtemp(prefix="esfl-ledgers-")
    os.chmod(ledger_dir, 0o700)
    strategy = _legacy_strategy(cfg, job, plan, params, template, nodes, ledger_dir)
    context = LegacyContext(
        Context(run_id=int(grid.run.run_id), node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy,
    )
    try:
        DefaultWorkflow(fit_workflow=_workflow(cfg, plan))(grid, context)
    finally:
        shutil.rmtree(ledger_dir, ignore_errors=True)
    contributors = [len(i.contributors) for i in strategy.info if i.total is not None]
    eps_bound, tau = zcdp_epsilon(plan, contributors, cfg.dp.delta) if cfg.dp.mode == "distributed" else (None, 0.0)
    extra = {"secagg": {
        "plan": plan.to_dict(), "rounds": strategy.info, "epsilon_zcdp_bound": eps_bound, "tau": tau,
        "z_effective_min": strategy.z_min,
    }}
    return FLResult(cfg, strategy.history, strategy.params, z, strategy.stop, time.perf_counter() - t_start, extra)


def _legacy_strategy(cfg: FLConfig, job: Any, plan: SecAggPlan, params: list[np.ndarray],
                     template: list[tuple[tuple[int, ...], str]], nodes: list[int], ledger_dir: str) -> Any:
    """The legacy Flower ``Strategy`` the SecAgg+ workflow drives (defined lazily: Flower is an extra)."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    from edgeshield.fl._attacks import parse_attack
    from edgeshield.fl._client import client_id
    from edgeshield.fl._model import accuracy_and_loss
    from edgeshield.fl._sim import RoundRecord, _backdoor
    from edgeshield.fl._updates import flatten, unflatten

    rng = np.random.default_rng([cfg.seed, 4])  # client sampling (not privacy noise), as in the plain strategy
    node_of = {cid: nodes[cid] for cid in range(cfg.clients)}
    cid_of = {node: cid for cid, node in node_of.items()}
    plan_json = json.dumps(plan.to_dict())
    job_json = json.dumps(cfg.to_dict())
    backdoor = any(parse_attack(a).kind == "backdoor" for a in job.malicious.values())
    population = [client_id(c) for c in range(cfg.clients)]
    shards: dict[int, bytes] = {}
    if job.custom:
        for cid, (x, y) in enumerate(job.data.clients):
            buf = io.BytesIO()
            np.savez(buf, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
            shards[cid] = buf.getvalue()

    class _SecAggStrategy(Strategy):
        def __init__(self) -> None:
            super().__init__()
            self.params = [np.array(p, copy=True) for p in params]
            self.history: list[RoundRecord] = []
            self.info: list[SecAggRoundInfo] = []
            self.stop: str | None = None
            self.z_min: float | None = None
            self.participations: dict[str, int] = {}
            self._sampled: dict[int, list[str]] = {}
            self._t0 = time.perf_counter()

        def initialize_parameters(self, client_manager: Any) -> Any:
            return ndarrays_to_parameters(self.params)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            self._t0 = time.perf_counter()
            if self.stop is not None:
                return []
            if job.ledger is not None and cfg.dp.mode in ("central", "distributed"):
                from edgeshield.privacy import BudgetExceededError

                try:
                    for client in population:
                        job.ledger.check(client, plan.noise_multiplier, cfg.sampling_rate)
                except BudgetExceededError as exc:
                    self.stop = f"privacy budget exhausted before round {server_round}: {exc}"
                    return []
            proxies = {int(p.node_id): p for p in client_manager.all().values()}
            q = cfg.sampling_rate
            chosen = [cid for cid in range(cfg.clients) if q >= 1.0 or rng.random() < q]
            self._sampled[server_round] = [client_id(c) for c in chosen]
            out = []
            for cid in chosen:
                config: dict[str, Any] = {
                    "server-round": server_round, "cid": cid, "job": job_json, "plan": plan_json,
                    "attack": job.malicious.get(cid, ""), "ledger-dir": ledger_dir,
                }
                if cid in shards:
                    config["data"] = shards[cid]
                out.append((proxies[node_of[cid]], FitIns(parameters, config)))
            return out

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
                          ) -> tuple[Any, dict[str, Any]]:
            from edgeshield.privacy import GaussianMechanism

            contributors = [client_id(cid_of[int(p.node_id)]) for p, _ in results if int(p.node_id) in cid_of]
            sampled = self._sampled.get(server_round, [])
            distinct = {tuple(r.parameters.tensors) for _, r in results}
            info = SecAggRoundInfo(server_round, sampled, contributors,
                                   [c for c in sampled if c not in contributors], None, len(distinct))
            self.info.append(info)
            if not results:
                return None, {}
            n = len(results)
            mean = flatten(parameters_to_ndarrays(results[0][1].parameters))
            total = np.rint(mean * n)
            if float(np.max(np.abs(mean * n - total), initial=0.0)) > 1e-3:
                raise IntegrityError("secagg: the SecAgg+ sum is not on the integer grid (lossy quantisation)")
            if float(np.max(np.abs(total), initial=0.0)) > n * plan.clip_range:
                raise IntegrityError("secagg: the SecAgg+ sum left the input range (modular wrap-around)")
            info.total = total.astype(np.int64)
            summed = total * plan.gamma
            if cfg.dp.mode == "central":
                std = float(plan.noise_multiplier or 0.0) * plan.clip
                if std > 0:
                    summed = np.asarray(GaussianMechanism(plan.clip, std).release(summed))
            denominator = plan.expected_clients if cfg.dp.mode in ("central", "distributed") else float(n)
            update = summed / denominator
            self.params = unflatten(flatten(self.params) + update, template)
            for c in contributors:
                self.participations[c] = self.participations.get(c, 0) + 1
            if job.ledger is not None and cfg.dp.mode in ("central", "distributed"):
                for client in population:
                    job.ledger.spend(client, server_round, plan.noise_multiplier, cfg.sampling_rate)
            z_round = plan.z_effective(n)
            if z_round is not None and cfg.dp.mode == "distributed":
                self.z_min = z_round if self.z_min is None else min(self.z_min, z_round)
            return ndarrays_to_parameters([np.asarray(p) for p in self.params]), {"contributors": n}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                               ) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict[str, Any]] | None:
            if server_round == 0:
                return None
            x_test, y_test = job.data.test
            acc, loss = accuracy_and_loss(cfg.model, self.params, x_test, y_test)
            eps_rdp, eps_pld = self._epsilon(server_round)
            info = next((i for i in self.info if i.round == server_round), None)
            if info is not None:
                info.seconds = time.perf_counter() - self._t0
            dropped = info.dropped if info is not None else []
            rejected = dict.fromkeys(dropped, "dropped out of SecAgg+ (its masks removed, its update not summed)")
            if info is None and self.stop is None:
                rejected = dict.fromkeys(self._sampled.get(server_round, []),
                                         "round skipped: SecAgg+ did not complete")
            record = RoundRecord(
                round=server_round, accuracy=acc, loss=loss, epsilon_rdp=eps_rdp, epsilon_pld=eps_pld,
                clients=list(self._sampled.get(server_round, [])), rejected=rejected, refused={},
                clip=cfg.dp.clip, scores={}, outliers=[],
                backdoor_success=_backdoor(cfg.model, self.params, x_test, y_test) if backdoor else None,
                seconds=time.perf_counter() - self._t0,
            )
            if self.stop is None or info is not None:
                self.history.append(record)
                if job.progress is not None:
                    job.progress(record)
            return loss, {"accuracy": acc}

        def _epsilon(self, server_round: int) -> tuple[float | None, float | None]:
            from edgeshield.privacy import epsilon_for

            done = sum(1 for i in self.info if i.total is not None)
            if cfg.dp.mode == "none" or plan.noise_multiplier is None:
                return None, None
            if cfg.dp.mode == "local":
                most = max(self.participations.values(), default=0)
                if most == 0:
                    return 0.0, 0.0
                rep = epsilon_for(plan.noise_multiplier, 1.0, most, cfg.dp.delta)
            else:
                if done == 0:
                    return 0.0, 0.0
                z_acc = self.z_min if cfg.dp.mode == "distributed" else plan.noise_multiplier
                if z_acc is None or z_acc <= 0:
                    return math.inf, math.inf
                rep = epsilon_for(z_acc, cfg.sampling_rate, done, cfg.dp.delta)
            return float(rep.rdp), float(rep.pld)

    return _SecAggStrategy()
