"""Secure aggregation on Flower's SecAgg+ (Bell et al. 2020), alone or with DP, distributed DP among them.

Under ``secagg = true`` each round runs Flower's legacy ``SecAggPlusWorkflow`` (setup → share keys → collect masked
vectors → unmask) inside the same Simulation Runtime as every other run: the ServerApp job builds a ``LegacyContext``
around :func:`_legacy_strategy` and drives it with ``DefaultWorkflow(fit_workflow= SecAggPlusWorkflow(...))``; the
client side is Flower's ``secaggplus_mod`` wrapped around :func:`_masked_train` (dispatched by the ClientApp when a
message carries SecAgg+ configs). The server's strategy gets only the sum. Clients are Poisson-sampled (each with
probability q, from the OS CSPRNG under DP), always: the accounting below is for that scheme.

**Distributed DP** (``dp.mode = "distributed"``; Kairouz, Liu & Steinke, ICML 2021, "The Distributed Discrete Gaussian
Mechanism"). Each client clips its update u to L2 norm C, scales it to the grid of step gamma = C / k (k grid steps
per clip), rounds it by randomized rounding conditioned on ‖x̃‖₂ ≤ Δ₂ with Δ₂² = min(k² + d/4 + √(2 ln 1/beta)(k +
√d/2), (k + √d)²), beta = e^{-1/2} (the paper's bound; the second term holds for every rounding, so the resampling
always ends), and adds its share of discrete Gaussian noise N_Z(0, sigma_c²) from
:func:`edgeshield.privacy.discrete_gaussian_noise`, with sigma_c = z·Δ₂ / √n_r and n_r the clients the server sampled
*this round* (the realised cohort, not the expected q·N): the sum of the n_r shares carries sigma_total = z·Δ₂ in grid
units whatever n_r is, so the server's estimate gamma·S / (q·N) has the noise of central DP at multiplier z on
sensitivity Δ₂·gamma ≈ C. The server sends each sampled client n_r and its share in the round's config (``cohort``,
``noise-share``); the client recomputes the share from the run's plan and refuses (:class:`NoiseShareError`, so it
drops out of the round) a missing value, a cohort outside [``MIN_COHORT``, N], a share that is not z·Δ₂/√n_r, or a
cohort that differs from the sample count SecAgg+'s own setup stage announced (:func:`client_share`). A server that
lies consistently in both places is not caught: the client cannot count a cohort whose keys the server relays.
Local DP under SecAgg adds each client's N(0, (zC)²) in floats before the rounding (rounding is post-processing);
central DP under SecAgg adds N(0, (zC)²) to the decoded sum on the server; ``none`` only clips and rounds.

**Minimum cohort, and the grid planned for it.** SecAgg+ sums at least two masked vectors (Flower halts a round with
fewer), so a round whose Poisson draw gives fewer than ``MIN_COHORT`` = 2 clients is skipped before anything is sent:
a decision made from the draw alone, never from anyone's data. The largest share any round can then ask for is
sigma_c(2) = z·Δ₂/√2, and the grid (k, R, the modulus fit and the TAIL margin) is planned for it. Measured with
this module's arithmetic on the linear model (d = 650), z from ``noise_multiplier_for`` for ε = 1 over 20 rounds at
δ = 1e-5: the benchmark's 1,247 clients, 25 per round expected (z ≈ 1.154), give k = 98,346 planned for n_r = 1,
135,804 for n_r = 2, 398,778 for the expected 25; 20 clients all sampled every round (z ≈ 18.09) give 413,820 /
584,278 / 1,825,730. All are far above ``MIN_GRID_STEPS``
and the rounding's share of the sensitivity (Δ₂/k − 1) stays below 1e-5, so grid steps decide nothing here. What the
smaller plan costs is the range: R·gamma ≈ C(1 + 14·z/√2)/0.98, the most a client that bypasses its clip can move a
coordinate, is about 2.9 times the expected-cohort plan's for the benchmark (4.1 times if planned for n_r = 1, a
cohort that never runs; hence 2, not 1).

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
[−R, R] except with probability < 1e-40 per coordinate (k·(1 + 14·s) + 2 ≤ R, s the largest client noise in clips:
z/√``MIN_COHORT`` under distributed DP); Flower's quantiser clamps each coordinate to that range, so whatever a
client's update was, it moves the sum by at most R·gamma per coordinate (≈ C(1 + 14s): an L∞ bound, which is what the
range enforces, not the L2 clip C). This holds against clients running the mod; SecAgg+ has no range proofs, so a
client that rewrites its own masking code can add any residue mod M. Per-update defences (median, trimmed mean, Krum,
Bulyan, FLTrust, anomaly scores, a server-side norm bound) need individual updates and are refused under SecAgg
(:func:`check_secagg_combination`).

**ε.** Every round in which a cohort was drawn is charged, with :func:`edgeshield.privacy.history_epsilon` over the
rounds so far at sampling rate q, as in central DP: a summed round at its effective multiplier z_eff = sigma_c·√m /
Δ₂ = z·√(m/n_r) (m the clients whose masked vectors were summed: a client that drops out after its share was fixed
takes that share with it, and ε rises), a round that released nothing (skipped or halted) at z, as the
Poisson-subsampled Gaussian the accountant models would have. A run with no dropouts therefore reports exactly the
ε that z was calibrated for. The skip is the one departure from that model: the run's output differs from it only if
some round draws fewer than 2 clients, which has probability at most T·p with p = P(Binomial(N − 1, q) < 2) for
either neighbouring population, so the run is (ε, δ + (1 + e^ε)·T·p)-DP; that extra term is reported as
``skip_delta`` (0 when q = 1). The server's ledger is charged the same per-round multipliers. This treats the sum of
discrete Gaussians as the continuous Gaussian mechanism with the same sigma_total: Kairouz et al. (Thm. 1) bound the
sum of m discrete Gaussians of variance sigma_c² by ½ε²-concentrated DP with ε = min(√(Δ₂²/(m·sigma_c²) + ½τd),
Δ₂/(√m·sigma_c) + τ√d), τ = 10·Σ_{k=1}^{m−1} e^{−2π²sigma_c²·k/(k+1)}; on our fine grids (sigma_c ≫ 1) τ underflows to
0 and that bound equals the continuous Gaussian's rho = 1/(2·z_eff²). The subsampled
accounting (RDP/PLD of the continuous subsampled Gaussian) is the approximation, and amplification by sampling holds
only against parties who do not know the sample (the server draws it, so against the server itself a round costs
the unamplified Gaussian); we also report the paper's rigorous bound without amplification (``epsilon_zcdp_bound``:
rho summed over summed rounds, ε = rho + 2√(rho ln 1/δ)). Both assume the clients that add noise are honest (a
colluding client can withhold its share) and an honest-but-curious server.

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
from collections.abc import Callable, Mapping
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
    "MIN_COHORT",
    "MODULUS",
    "NoiseShareError",
    "SecAggPlan",
    "SecAggRoundInfo",
    "check_secagg_combination",
    "client_share",
    "conditional_round",
    "handles",
    "is_secagg_message",
    "plan_secagg",
    "run_secagg_job",
    "secagg_client_reply",
    "skip_probability",
    "zcdp_epsilon",
]

MODULUS = 2**32  # Flower's modulus_range (documented maximum): masks and sums live mod 2^32
TAIL = 14.0  # honest values stay within the range unless a noise draw exceeds 14 sigma (probability < 1e-40)
BETA = math.exp(-0.5)  # Kairouz et al.'s conditional-rounding parameter
MIN_GRID_STEPS = 1000  # k below this makes the rounding a visible part of the noise: refused
MIN_COHORT = 2  # SecAgg+ sums at least two masked vectors: smaller draws are skipped, and the grid is planned for 2
RECONSTRUCTION_FRACTION = 2 / 3  # shares needed to unmask, as a fraction of each client's neighbours (all sampled)
HOOKS_ENV = "EDGESHIELD_TEST_SECAGG_HOOKS"
_TIMEOUT_S = 600.0
_SHARE_RTOL = 1e-12  # the client recomputes the share with the same floats: anything past rounding is a tamper


class NoiseShareError(IntegrityError):
    """A distributed-DP round's noise share (or cohort) in the config is missing or not the one the plan implies."""


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
    if cfg.clients < MIN_COHORT:
        raise UnsupportedCombinationError(
            f"secagg needs at least {MIN_COHORT} clients (SecAgg+ sums {MIN_COHORT} or more masked vectors)")
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
    """The grid, range and noise of one run: every number the clients and the server must agree on.

    Under distributed DP a round's per-client share depends on its realised cohort (:meth:`share_sigma`); the grid is
    planned for the largest one, at ``min_cohort`` clients (``sigma_max``)."""

    mode: str
    dim: int
    clip: float
    noise_multiplier: float | None
    expected_clients: float  # q·N: the fixed denominator of the server's estimate
    max_clients: int  # N: every client that could be sampled (the modulus fit)
    min_cohort: int  # the smallest cohort a round sums (smaller draws are skipped); the grid is planned for it
    grid_steps: float  # k = C / gamma
    gamma: float
    bound: float  # Δ₂, the L2 bound of a rounded update in grid units
    clip_range: int  # R: every value a client adds lies in [-R, R]
    sigma_max: float  # distributed: the largest per-client discrete-noise scale (grid units), at min_cohort; else 0
    local_sigma: float  # local: each client's float noise std (model units); else 0

    @property
    def quantization_range(self) -> int:
        return 2 * self.clip_range

    @property
    def sigma_total(self) -> float:
        """The std (grid units) of the summed noise when every sampled client's share is in the sum: z·Δ₂."""
        return (self.noise_multiplier or 0.0) * self.bound if self.mode == "distributed" else 0.0

    def share_sigma(self, cohort: int) -> float:
        """Each client's discrete-noise scale in a round of ``cohort`` sampled clients: z·Δ₂/√cohort (0 unless
        distributed). Raises :class:`NoiseShareError` for a cohort outside [``min_cohort``, ``max_clients``]."""
        if self.mode != "distributed":
            return 0.0
        if isinstance(cohort, bool) or not isinstance(cohort, int) or not \
                self.min_cohort <= cohort <= self.max_clients:
            raise NoiseShareError(f"secagg: a cohort of {cohort!r} is outside [{self.min_cohort}, "
                                  f"{self.max_clients}], the cohorts this run's grid was planned for")
        return self.sigma_total / math.sqrt(cohort)

    def z_effective(self, contributors: int, cohort: int) -> float | None:
        """The noise multiplier of a round whose sum had ``contributors`` of the ``cohort`` shares it was planned for
        (z when nobody dropped out; None without DP)."""
        if self.mode != "distributed":
            return self.noise_multiplier
        return self.share_sigma(cohort) * math.sqrt(max(contributors, 0)) / self.bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "dim": self.dim, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
            "expected_clients": self.expected_clients, "max_clients": self.max_clients,
            "min_cohort": self.min_cohort, "grid_steps": self.grid_steps, "gamma": self.gamma, "bound": self.bound,
            "clip_range": self.clip_range, "quantization_range": self.quantization_range, "modulus_range": MODULUS,
            "sigma_max": self.sigma_max, "sigma_total": self.sigma_total, "local_sigma": self.local_sigma,
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
    if n_max < MIN_COHORT:
        raise UnsupportedCombinationError(f"secagg needs at least {MIN_COHORT} clients")
    clip_range = (MODULUS - 1) // (2 * n_max)
    # the largest client noise in units of the clip: distributed the share of the smallest cohort that runs, local z,
    # none/central 0 (the server adds central noise)
    s = (z or 0.0) / math.sqrt(MIN_COHORT) if mode == "distributed" else (z or 0.0) if mode == "local" else 0.0
    k = math.floor(0.98 * (clip_range - 2) / (1 + TAIL * s))
    if k < MIN_GRID_STEPS:
        raise UnsupportedCombinationError(
            f"secagg: {n_max} clients with noise up to {s:.3g}·C per client leave {k} grid steps per clip in a "
            f"32-bit modulus (need ≥ {MIN_GRID_STEPS}); use fewer clients or less noise per client"
        )
    bound = _bound(float(k), dim)
    sigma_max = (z or 0.0) * bound / math.sqrt(MIN_COHORT) if mode == "distributed" else 0.0
    if bound + 1 + TAIL * max(sigma_max, s * k) > clip_range:  # pragma: no cover - the 2 % margin covers it
        raise IntegrityError("secagg: the grid does not fit the range")
    return SecAggPlan(
        mode=mode, dim=dim, clip=cfg.dp.clip, noise_multiplier=z, expected_clients=float(cfg.clients_per_round),
        max_clients=n_max, min_cohort=MIN_COHORT, grid_steps=float(k), gamma=cfg.dp.clip / k, bound=bound,
        clip_range=clip_range, sigma_max=sigma_max, local_sigma=(z or 0.0) * cfg.dp.clip if mode == "local" else 0.0,
    )


def skip_probability(clients: int, sampling_rate: float, min_cohort: int = MIN_COHORT) -> float:
    """P(Binomial(clients − 1, q) < min_cohort): the most likely a round is skipped for either neighbouring population
    (add/remove one of ``clients``); 0 when every client is sampled."""
    if sampling_rate >= 1.0:
        return 0.0 if clients - 1 >= min_cohort else 1.0
    n, q = clients - 1, sampling_rate
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(min(min_cohort, n + 1))))


def zcdp_epsilon(plan: SecAggPlan, rounds: list[tuple[int, int]], delta: float) -> tuple[float, float]:
    """Kairouz et al.'s Thm. 1 bound composed over the summed ``rounds`` ((contributors, cohort) pairs) without
    sampling amplification: (ε at δ, max tau)."""
    rho = 0.0
    tau_max = 0.0
    d = plan.dim
    for m, cohort in rounds:
        if m <= 0:
            continue
        sigma = plan.share_sigma(cohort)
        s2 = sigma**2
        tau = 10 * sum(math.exp(-2 * math.pi**2 * s2 * j / (j + 1)) for j in range(1, m))
        tau_max = max(tau_max, tau)
        eps_cdp = min(math.sqrt(plan.bound**2 / (m * s2) + 0.5 * tau * d),
                      plan.bound / (math.sqrt(m) * sigma) + tau * math.sqrt(d))
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


def client_share(plan: Mapping[str, Any], config: Mapping[str, Any], *, sample_num: int | None = None) -> float:
    """The discrete-noise scale (grid units) this client adds in a distributed-DP round, from the round's ``config``
    (``cohort``, ``noise-share``), checked against the run's ``plan`` and, when given, the sample count SecAgg+'s setup
    stage announced: a missing or non-numeric value, a cohort outside [min_cohort, max_clients], a share that is not
    z·Δ₂/√cohort, or a cohort other than ``sample_num`` raises :class:`NoiseShareError` (never guessed)."""
    if plan.get("mode") != "distributed":
        return 0.0
    cohort, share = config.get("cohort"), config.get("noise-share")
    if isinstance(cohort, bool) or not isinstance(cohort, int):
        raise NoiseShareError(f"secagg fit config: 'cohort' is missing or not a whole number ({cohort!r})")
    if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share):
        raise NoiseShareError(f"secagg fit config: 'noise-share' is missing or not a finite number ({share!r})")
    lo, hi = int(plan["min_cohort"]), int(plan["max_clients"])
    if not lo <= cohort <= hi:
        raise NoiseShareError(f"secagg fit config: a cohort of {cohort} is outside [{lo}, {hi}], the cohorts this "
                              "run's grid was planned for")
    if sample_num is not None and cohort != sample_num:
        raise NoiseShareError(f"secagg fit config: a cohort of {cohort} but SecAgg+'s setup announced {sample_num} "
                              "sampled clients")
    z, bound = float(plan["noise_multiplier"]), float(plan["bound"])
    expected = z * bound / math.sqrt(cohort)
    if not math.isclose(float(share), expected, rel_tol=_SHARE_RTOL, abs_tol=0.0):
        raise NoiseShareError(f"secagg fit config: a noise share of {float(share)!r} for a cohort of {cohort}, where "
                              f"the plan gives z·Δ₂/√{cohort} = {expected!r}")
    return expected


def _setup_sample_num(context: Context) -> int | None:
    """How many clients SecAgg+'s setup stage said were sampled this round (None outside the protocol's state)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = context.state.config_records.get(RECORD_KEY_STATE)
    value = state.get("sample_num") if state is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def client_vector(update: np.ndarray, plan: Mapping[str, Any], *, z: float, share: float = 0.0,
                  ledger: Callable[[], str | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """The integer vector a client feeds SecAgg+ for its flat ``update``: (before noise, as sent). ``share``: the
    distributed-DP noise scale from :func:`client_share`."""
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

    if not 0.0 < share <= float(plan["sigma_max"]) * (1 + _SHARE_RTOL):
        raise NoiseShareError(f"secagg: a noise share of {share!r} is outside (0, {plan['sigma_max']!r}], the shares "
                              "this run's grid holds")
    noised = rounded + discrete_gaussian_noise(rounded.shape, share)
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
    share = client_share(plan, config, sample_num=_setup_sample_num(context))  # refused before any work
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
    clean, sent = client_vector(flat, plan, z=z, share=share, ledger=ledger)
    if hooks is not None:
        np.savez(hooks / f"r{server_round}-c{cid}.npz", clean=clean, sent=sent)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([sent.astype(np.float64)]), 1, {})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


# ------------------------------------------------------------------------------------------------- server side


@dataclass
class SecAggRoundInfo:
    """One round as the server saw it: who was sampled (the cohort the noise shares were fixed for), whose masked
    vectors were summed, the integer sum, and the noise multiplier charged for it.

    ``status``: ``summed``; ``skipped`` (fewer than ``MIN_COHORT`` sampled: nothing sent); ``halted`` (SecAgg+ did
    not complete: nothing released); ``refused`` (the server's ledger refused the charge: the sum was discarded)."""

    round: int
    sampled: list[str]
    contributors: list[str]
    dropped: list[str]
    total: np.ndarray | None
    received_distinct: int  # distinct parameter sets the strategy was handed (1: only the aggregate)
    seconds: float = 0.0
    cohort: int = 0  # n_r: the clients sampled this round, whose shares sum to z·Δ₂
    share_sigma: float = 0.0  # the per-client noise share sent for this cohort (grid units; 0 unless distributed)
    z_effective: float | None = None  # summed rounds: z·√(contributors / cohort) under distributed DP
    z_charged: float | None = None  # what the accountant and the ledger were charged (None: nothing, or no DP)
    status: str = "pending"


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
    distributed = cfg.dp.mode == "distributed"
    summed = [(len(i.contributors), i.cohort) for i in strategy.info if i.status == "summed"]
    eps_bound, tau = zcdp_epsilon(plan, summed, cfg.dp.delta) if distributed else (None, 0.0)
    skip_delta: float | None = None
    if cfg.dp.mode in ("central", "distributed") and strategy.history and \
            strategy.history[-1].epsilon_rdp is not None:
        attempted = sum(1 for i in strategy.info if i.z_charged is not None)
        p_skip = skip_probability(cfg.clients, cfg.sampling_rate)
        eps = strategy.history[-1].epsilon_rdp
        skip_delta = math.inf if eps == math.inf else min(1.0, (1 + math.exp(min(eps, 700.0))) * attempted * p_skip)
    extra: dict[str, Any] = {"secagg": {
        "plan": plan.to_dict(), "rounds": strategy.info, "epsilon_zcdp_bound": eps_bound, "tau": tau,
        "z_effective_min": strategy.z_min, "skip_delta": skip_delta,
        "rounds_skipped": sum(1 for i in strategy.info if i.status == "skipped"),
    }}
    # the scalars again at the top level, where a benchmark's summary of a result picks them up
    extra.update({f"secagg_{k}": extra["secagg"][k] for k in ("epsilon_zcdp_bound", "z_effective_min", "skip_delta",
                                                               "rounds_skipped")})
    return FLResult(cfg, strategy.history, strategy.params, z, strategy.stop, time.perf_counter() - t_start, extra)


def _legacy_strategy(cfg: FLConfig, job: Any, plan: SecAggPlan, params: list[np.ndarray],
                     template: list[tuple[tuple[int, ...], str]], nodes: list[int], ledger_dir: str) -> Any:
    """The legacy Flower ``Strategy`` the SecAgg+ workflow drives (defined lazily: Flower is an extra)."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    from edgeshield.fl._attacks import parse_attack
    from edgeshield.fl._client import client_id
    from edgeshield.fl._model import accuracy_and_loss
    from edgeshield.fl._sim import RoundRecord, _backdoor, _sampler
    from edgeshield.fl._updates import flatten, unflatten

    # Poisson sampling (the scheme the accounting assumes): the OS CSPRNG under DP, reproducible only without DP
    rng: Any = _sampler(cfg)
    node_of = {cid: nodes[cid] for cid in range(cfg.clients)}
    cid_of = {node: cid for cid, node in node_of.items()}
    plan_json = json.dumps(plan.to_dict())
    job_json = json.dumps(cfg.to_dict())
    backdoor = any(parse_attack(a).kind == "backdoor" for a in job.malicious.values())
    population = [client_id(c) for c in range(cfg.clients)]
    charged_mode = cfg.dp.mode in ("central", "distributed")  # the server's accountant and ledger charge rounds
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
            self._t0 = time.perf_counter()

        def initialize_parameters(self, client_manager: Any) -> Any:
            return ndarrays_to_parameters(self.params)

        def _info(self, server_round: int) -> SecAggRoundInfo | None:
            return next((i for i in self.info if i.round == server_round), None)

        def _charge(self, info: SecAggRoundInfo, z_round: float | None) -> bool:
            """Charge the round to the ledger (every client, as central DP does) at ``z_round``; False if refused."""
            if not charged_mode or z_round is None:
                return True
            if job.ledger is not None:
                from edgeshield.privacy import BudgetExceededError

                try:
                    for client in population:
                        job.ledger.spend(client, info.round, z_round, cfg.sampling_rate)
                except BudgetExceededError as exc:
                    self.stop = f"privacy budget exhausted in round {info.round}: {exc}"
                    return False
            info.z_charged = z_round
            return True

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            self._t0 = time.perf_counter()
            if self.stop is not None:
                return []
            if job.ledger is not None and charged_mode:
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
            cohort = len(chosen)
            info = SecAggRoundInfo(server_round, [client_id(c) for c in chosen], [], [], None, 0, cohort=cohort)
            self.info.append(info)
            if cohort < plan.min_cohort:  # decided from the draw alone: SecAgg+ cannot sum fewer than two vectors
                info.status = "skipped"
                self._charge(info, plan.noise_multiplier)  # as the modelled mechanism would have released
                return []
            info.share_sigma = plan.share_sigma(cohort)
            out = []
            for cid in chosen:
                config: dict[str, Any] = {
                    "server-round": server_round, "cid": cid, "job": job_json, "plan": plan_json,
                    "attack": job.malicious.get(cid, ""), "ledger-dir": ledger_dir,
                    "cohort": cohort, "noise-share": info.share_sigma,
                }
                if cid in shards:
                    config["data"] = shards[cid]
                out.append((proxies[node_of[cid]], FitIns(parameters, config)))
            return out

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
                          ) -> tuple[Any, dict[str, Any]]:
            from edgeshield.privacy import GaussianMechanism

            contributors = [client_id(cid_of[int(p.node_id)]) for p, _ in results if int(p.node_id) in cid_of]
            info = self._info(server_round)
            if info is None:  # pragma: no cover - the workflow only aggregates a round configure_fit started
                raise IntegrityError(f"secagg: round {server_round} was aggregated but never configured")
            info.contributors = contributors
            info.dropped = [c for c in info.sampled if c not in contributors]
            info.received_distinct = len({tuple(r.parameters.tensors) for _, r in results})
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
            z_round = plan.z_effective(n, info.cohort)
            info.z_effective = z_round
            if not self._charge(info, z_round):  # charged before the release it pays for
                info.status = "refused"
                return None, {}
            info.status = "summed"
            summed = total * plan.gamma
            if cfg.dp.mode == "central":
                std = float(plan.noise_multiplier or 0.0) * plan.clip
                if std > 0:
                    summed = np.asarray(GaussianMechanism(plan.clip, std).release(summed))
            denominator = plan.expected_clients if charged_mode else float(n)
            update = summed / denominator
            self.params = unflatten(flatten(self.params) + update, template)
            for c in contributors:
                self.participations[c] = self.participations.get(c, 0) + 1
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
            info = self._info(server_round)
            if info is not None and info.status == "pending":  # SecAgg+ halted: nothing released, charged at z
                info.status = "halted"
                self._charge(info, plan.noise_multiplier)
            x_test, y_test = job.data.test
            acc, loss = accuracy_and_loss(cfg.model, self.params, x_test, y_test)
            eps_rdp, eps_pld = self._epsilon()
            if info is not None:
                info.seconds = time.perf_counter() - self._t0
            rejected: dict[str, str] = {}
            if info is not None and info.status == "skipped":
                rejected = dict.fromkeys(info.sampled, f"round skipped: a cohort of {info.cohort} (SecAgg+ sums "
                                                      f"{plan.min_cohort} or more)")
            elif info is not None and info.status == "halted":
                rejected = dict.fromkeys(info.sampled, "round skipped: SecAgg+ did not complete")
            elif info is not None and info.status == "refused":
                rejected = dict.fromkeys(info.contributors, "round discarded: the privacy ledger refused its charge")
            elif info is not None:
                rejected = dict.fromkeys(info.dropped,
                                         "dropped out of SecAgg+ (its masks removed, its update not summed)")
            record = RoundRecord(
                round=server_round, accuracy=acc, loss=loss, epsilon_rdp=eps_rdp, epsilon_pld=eps_pld,
                clients=list(info.sampled) if info is not None else [], rejected=rejected, refused={},
                clip=cfg.dp.clip, scores={}, outliers=[],
                backdoor_success=_backdoor(cfg.model, self.params, x_test, y_test) if backdoor else None,
                seconds=time.perf_counter() - self._t0,
            )
            if info is not None:
                self.history.append(record)
                if job.progress is not None:
                    job.progress(record)
            return loss, {"accuracy": acc}

        def _epsilon(self) -> tuple[float | None, float | None]:
            from edgeshield.privacy import epsilon_for
            from edgeshield.privacy._accounting import history_epsilon

            if cfg.dp.mode == "none" or plan.noise_multiplier is None:
                return None, None
            if cfg.dp.mode == "local":
                most = max(self.participations.values(), default=0)
                if most == 0:
                    return 0.0, 0.0
                rep = epsilon_for(plan.noise_multiplier, 1.0, most, cfg.dp.delta)
                return float(rep.rdp), float(rep.pld)
            charges = [i.z_charged for i in self.info if i.z_charged is not None]
            if not charges:
                return 0.0, 0.0
            if min(charges) <= 0:
                return math.inf, math.inf
            counts: dict[float, int] = {}
            for z_r in charges:
                counts[z_r] = counts.get(z_r, 0) + 1
            rounds = [(z_r, cfg.sampling_rate, c) for z_r, c in counts.items()]
            return (float(history_epsilon(rounds, cfg.dp.delta, "rdp")),
                    float(history_epsilon(rounds, cfg.dp.delta, "pld")))

    return _SecAggStrategy()
