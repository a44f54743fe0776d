"""End-to-end evaluation of the model-extraction defence on the digits model, through the real server code path.

The victim is the ASGI app of :mod:`edgeshield.server` (``create_app``), driven in-process over
``httpx.ASGITransport`` with a verified client identity injected the way the TLS layer does it, so every query
passes the same middleware, ``_extraction_gate`` (403 once the monitor blocked a client), inference and
``_watch_extraction`` (monitor + output hardening) as in production. The served model is the shipped digits MLP
with the owner's spread-spectrum watermark embedded and the served (DAWN) watermark answering 1 % of inputs with
the watermark label (what an owner would deploy).

Protocol (fixed; :func:`protocol_text` prints it with the results):

* Monitor: ``QueryMonitor([PradaDetector(delta=0.9, min_samples=30), OodRateSignal.fit(x_train, x_test[:225]),
  QueryBudget(300)], ResponsePolicy(default="block"))``: any alarm blocks the client, starting with the batch that
  tripped it. The budget (300 distinct inputs per client per day) is the operator's setting: the most distinct
  inputs an honest client of this protocol sends (225) plus a third. Output settings: full probabilities
  (``TopK(10)``, i.e. unhardened), top-3 probabilities (``TopK(3)``) and labels only (no output policy).
* Attacks, each one client identity, queries sent in requests of ``BATCH`` inputs:
  ``copycat`` (ART ``CopycatCNN``, labels), ``knockoff`` (ART ``KnockoffNets``, random sampling, soft labels where
  the answers carry probabilities) and ``knockoff_adaptive`` (``KnockoffNets`` adaptive sampling: a gradient bandit
  over the attacker's classes, reward "loss", one query per request) with natural queries drawn from x_train (the
  attacker's own data, with its own labels for the adaptive policy); ``jacobian``:
  Papernot et al.'s Jacobian-based dataset augmentation from 10 x_train seeds (one per class), step λ = 0.1,
  substitute retrained each round (torch gradients of the substitute). Budgets in queries.
* Detection point: the queries answered before the first 403 (a blocked batch is not answered). The stolen model
  "at detection" is trained on exactly those answered queries; "full budget" is the same attack run against the
  same app without a monitor (the undefended baseline) and trained on all answers. Substitute: a 64-128-64-10 MLP
  (the victim's architecture), Adam 1e-3, batch 32, ``EPOCHS`` epochs. Fidelity = agreement with the victim's
  labels on x_test; accuracy on y_test.
* Benign sessions (same defended app, one identity each): held-out digits x_test[225:] in random order (batches of
  10), bursty (batches of 100 back to back, the held-out set twice over), repetitive (the same 5 digits 40 times
  each, batches of 10).
* Output-hardening cost: top-1 accuracy of what an honest client receives for x_test under each policy.
* Watermark (edgeshield.watermark, fixed key): accuracy drop of embedding; false claims on independently trained
  MLPs; survival of fine-tuning, 30 % magnitude pruning, int8 dynamic quantisation, and the CopycatCNN-stolen model
  (its weights written into the victim's ONNX graph under the victim's initializer names, so ``verify`` can look).
* Served watermark (edgeshield.watermark.ServedWatermark, rate 1 %, same key): every undefended stolen copy is
  checked with ``verify_copy`` against the evidence the server kept for that attacker's identity (threshold
  p < 1e-6); false claims: the clean victim and the independently trained MLPs against the CopycatCNN evidence.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

import edgeshield  # noqa: F401  # before onnxruntime
from edgeshield._progress import ProgressCallback, report
from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    import httpx
    import torch
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
    from starlette.types import ASGIApp, Receive, Scope, Send

    from edgeshield.extraction import OutputPolicy, QueryMonitor
    from edgeshield.extraction._monitor import Signal
    from edgeshield.models import DigitsSplit
    from edgeshield.transport import Identity
    from edgeshield.watermark import CopyVerifyResult, EvidenceStore, ServedWatermark

__all__ = ["ATTACKS", "EvaluationConfig", "Gateway", "evaluate", "protocol_text"]

ATTACKS = ("copycat", "knockoff", "knockoff_adaptive", "jacobian")
OUTPUT_SETTINGS = ("full_probs", "top3", "label_only")
BATCH = 20
EPOCHS = 30
N_OOD_CAL = 225
WATERMARK_KEY = bytes(range(32))
PRADA_DELTA = 0.9
PRADA_MIN_SAMPLES = 30
JACOBIAN_STEP = 0.1
QUERY_BUDGET = 300  # distinct inputs per client per day: the most an honest client here sends (225) plus a third
SERVED_RATE = 0.01  # DAWN: fraction of inputs answered with the watermark label
CONVERGED_EPOCHS = 200  # a thief who trains its copy until it fits every answer
SERVED_RATES = (0.005, 0.01, 0.02, 0.05)
SERVED_REGIONS: int | None = None  # the deployed served watermark's unit kind (None: point units on the canonical key)
DAY = 86400.0
CLOCK_START = 1_796_083_200.0  # 2026-12-01T00:00:00Z: every simulated day starts at a UTC midnight
# the deployed monitor of issue 14 (the honest traffic model it assumes: a device sends at most
# DECAYING_BURST + DECAYING_PER_DAY * T distinct inputs in any T days; a fleet (one role) at most
# FLEET_PER_GROUP_DAY distinct inputs a day between all its identities)
DECAYING_BURST = QUERY_BUDGET
DECAYING_PER_DAY = 100.0
FLEET_PER_GROUP_DAY = 1000
BENIGN_TRANSFORMS = {"shifts": 1, "noise": 0.05, "contrast": [0.7, 1.0], "image_shape": [8, 8]}
# the four failures, as measured cases
SYBIL_IDENTITIES, SYBIL_INPUTS, SYBIL_REPEATS = 12, 250, 3
JITTER = (1e-6, 5e-5)  # one pixel of every copy moved by this much
SLOW_PER_DAY, SLOW_DAYS = 290, 4
NEAR_REPEAT_DIGITS, NEAR_REPEAT_SIGMA = 100, 0.01
COPY_LENGTHS = (10, 30, 100, 200)  # epochs of the copies whose served-watermark p is reported per length
USEFUL_FIDELITY = 0.9  # the targets are over sessions whose copy reaches this fidelity
TARGET_QUERIES = 500  # ... detected within this many queries, or its copy proven


@dataclass(frozen=True)
class EvaluationConfig:
    budgets: tuple[int, ...] = (100, 250, 500, 1000)
    attacks: tuple[str, ...] = ATTACKS
    outputs: tuple[str, ...] = OUTPUT_SETTINGS
    epochs: int = EPOCHS
    independent_models: int = 3
    finetune_epochs: int = 5
    benign: bool = True
    watermark: bool = True
    served_rates: tuple[float, ...] = SERVED_RATES  # must include SERVED_RATE, the deployed default
    seed: int = 0
    monitor: str = "deployed"  # "legacy": the monitor before issue 14 (PRADA, clean-only OOD, exact-byte budget)
    cases: bool = True  # the issue-14 cases: jitter-majority Sybil, slow attacker, copies per training length
    copy_lengths: tuple[int, ...] = COPY_LENGTHS
    sybil_identities: int = SYBIL_IDENTITIES
    sybil_inputs: int = SYBIL_INPUTS

    @classmethod
    def quick(cls) -> EvaluationConfig:
        return cls(budgets=(100, 500), outputs=("top3", "label_only"), epochs=20, independent_models=1,
                   finetune_epochs=3, served_rates=(SERVED_RATE, 0.05), copy_lengths=(10, 30, 100))


def protocol_text(cfg: EvaluationConfig) -> str:
    if cfg.monitor == "legacy":
        monitor = (f"monitor (legacy, before issue 14) = PRADA(delta 0.9, min 30) + OodRateSignal(PCA fit on x_train, "
                   f"threshold at the 0.99 quantile of x_test[:{N_OOD_CAL}], binomial test null 2 %, alpha 1e-6) + "
                   f"QueryBudget({QUERY_BUDGET} distinct/day, exact bytes)")
    else:
        monitor = (f"monitor (deployed, issue 14) = PRADA(delta 0.9, min 30, near-duplicates within a dup_distance "
                   f"calibrated on two sigma-{NEAR_REPEAT_SIGMA} retakes of x_test[:{N_OOD_CAL}] skipped) + "
                   f"OodRateSignal(PCA and 0.99 threshold on x_train / x_test[:{N_OOD_CAL}] plus benign transforms "
                   f"{BENIGN_TRANSFORMS}) + QueryBudget({QUERY_BUDGET} distinct canonical keys/day) + "
                   f"DecayingBudget(burst {DECAYING_BURST}, {DECAYING_PER_DAY:g}/day) [+ FleetBudget("
                   f"{FLEET_PER_GROUP_DAY}/role/day) in the Sybil and slow cases], canonical keys = LeaderKeys shared "
                   "with the served watermark")
    served = f"{SERVED_RATE:.0%}" + ("" if SERVED_REGIONS is None else f", {SERVED_REGIONS}-plane region units")
    text = (
        "victim = watermarked digits MLP served by edgeshield.server.create_app in-process (httpx ASGITransport, "
        f"injected verified identity, simulated clock), served watermark at {served}; {monitor}; any alarm -> block "
        "(403, from the tripping batch on); outputs "
        f"{', '.join(cfg.outputs)}; attacks {', '.join(cfg.attacks)} at budgets {list(cfg.budgets)} queries, "
        f"requests of {BATCH}; detection = queries answered before the first 403; stolen model = 64-128-64-10 MLP, "
        f"Adam 1e-3, batch 32, {cfg.epochs} epochs, 'at detection' on the answered prefix, 'full' on all answers "
        "from the same app without monitor; fidelity/accuracy on x_test; benign = x_test[225:] random order, "
        "bursty (batches of 100, twice over), repetitive (5 digits x 40), near-repeats (100 digits photographed "
        f"twice, sigma {NEAR_REPEAT_SIGMA}, retake at once / second pass), camera shifted one pixel (8 directions), "
        "single class, sensor noise sigma 0.05, faded ink x0.7."
    )
    if cfg.cases:
        text += (
            f" Cases: jitter-majority Sybil ({cfg.sybil_identities} identities of one role x {cfg.sybil_inputs} "
            f"distinct x_train inputs, each sent {SYBIL_REPEATS} times with one pixel moved "
            f"{JITTER[0]:g}..{JITTER[1]:g}, majority label kept; copy verified against the pooled evidence of all "
            "identities); slow attacker "
            f"({SLOW_PER_DAY} distinct x_train inputs a day for {SLOW_DAYS} simulated days, one identity); served-"
            f"watermark p per copy training length {list(cfg.copy_lengths)} epochs (CopycatCNN labels-only at "
            f"{max(cfg.budgets)} queries, and the Sybil)."
        )
    return text


# --- the victim: the real app, in-process ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Manifest:
    """Stands in for the served bundle's manifest: what /v1/model shows."""

    bundle_id: str = "e" * 32
    model_sha256: str = "ee" * 32
    model_version: int = 1
    created: str = "2026-11-25T00:00:00Z"
    metadata: dict[str, str] = field(default_factory=dict)


def _with_identity(app: ASGIApp, identity: Identity) -> ASGIApp:
    """What the TLS protocol layer does for a verified connection: the identity in the ASGI tls extension."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {"tls": {"edgeshield.identity": identity, "client_cert_error": None}}}
        await app(scope, receive, send)

    return wrapped


def _output_policy(name: str) -> OutputPolicy | None:
    from edgeshield.extraction import TopK

    return {"full_probs": TopK(10), "top3": TopK(3), "label_only": None}[name]


class ExactKeys:
    """Input keys before issue 14: the SHA-256 of the row's bytes, so only exact repeats share a key (``legacy``)."""

    name = "digest"

    def keys(self, x: np.ndarray) -> list[bytes]:
        from edgeshield.extraction import digest_keys

        return digest_keys(x)

    def describe(self) -> dict[str, Any]:
        return {"kind": "digest"}

    def export_state(self) -> bytes | None:
        return None

    def import_state(self, data: bytes) -> None:
        return None


class SimulatedClock:
    """A wall clock the evaluation moves: every detector and the app read it, so that days pass in a second."""

    def __init__(self, start: float = CLOCK_START) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += float(seconds)


def honest_retakes(x: np.ndarray, seed: int, *, sigma: float = NEAR_REPEAT_SIGMA) -> np.ndarray:
    """Each row of ``x`` photographed again: Gaussian sensor noise ``sigma``, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(x + sigma * rng.standard_normal(x.shape), 0.0, 1.0).astype(np.float32)


def build_monitor(x_train: np.ndarray, x_ood_cal: np.ndarray, *, kind: str = "deployed",
                  clock: SimulatedClock | None = None, x_honest: np.ndarray | None = None,
                  fleet: bool = True) -> QueryMonitor:
    """The monitor a deployment runs. ``legacy``: before issue 14 (PRADA on exact repeats, OOD calibrated on clean
    digits only, a one-day window budget of exact bytes). ``deployed``: PRADA skipping near-duplicates within a
    distance calibrated on honest retakes of ``x_honest`` (the calibration digits, never the benign test set), OOD
    calibrated with the declared benign transforms, the window budget on canonical keys, a decaying long-horizon
    budget and (``fleet``) a fleet budget per role (:func:`monitor_parts` says what an app ran)."""
    from edgeshield.extraction import (
        BenignTransforms,
        DecayingBudget,
        FleetBudget,
        OodRateSignal,
        PradaDetector,
        QueryBudget,
        QueryMonitor,
        ResponsePolicy,
        calibrate_dup_distance,
    )

    clock = clock or SimulatedClock()
    if kind == "legacy":
        return QueryMonitor([PradaDetector(delta=PRADA_DELTA, min_samples=PRADA_MIN_SAMPLES),
                             OodRateSignal.fit(x_train, x_ood_cal), QueryBudget(QUERY_BUDGET, clock=clock)],
                            response=ResponsePolicy(default="block"))
    if kind != "deployed":
        raise InvalidArgumentError(f"unknown monitor kind {kind!r}: deployed or legacy")
    dup = None
    if x_honest is not None:  # honest traffic: two photographs of each calibration digit (noise NEAR_REPEAT_SIGMA)
        dup = calibrate_dup_distance(honest_retakes(x_honest, 101), honest_retakes(x_honest, 102), x_honest)
    detectors: list[Any] = [
        PradaDetector(delta=PRADA_DELTA, min_samples=PRADA_MIN_SAMPLES, dup_distance=dup),
        OodRateSignal.fit(x_train, x_ood_cal, transforms=BenignTransforms.from_config(BENIGN_TRANSFORMS)),
        QueryBudget(QUERY_BUDGET, clock=clock),
        DecayingBudget(DECAYING_BURST, DECAYING_PER_DAY, clock=clock),
    ]
    if fleet:
        detectors.append(FleetBudget(FLEET_PER_GROUP_DAY, clock=clock))
    # the fleet budget alarms the whole group, honest members too: it flags (alerts the operator), never blocks
    return QueryMonitor(detectors, response=ResponsePolicy(default="block", on_alarm={"fleet_budget": "flag"}))


def monitor_parts(monitor: QueryMonitor | None, gateway: Gateway | None = None) -> dict[str, Any]:
    """Which pieces of the deployed defence an evaluated app ran (the report says so beside every figure)."""
    if monitor is None:
        return {}
    names = [d.name for d in monitor.detectors]
    prada = next((d for d in monitor.detectors if d.name == "prada"), None)
    ood = next((d for d in monitor.detectors if d.name == "ood_rate"), None)
    keys = getattr(gateway.state, "input_keys", None) if gateway is not None else None
    return {"detectors": names, "prada_dup_distance": getattr(prada, "dup_distance", None),
            "ood_transforms": getattr(ood, "transforms", None) is not None,
            "input_keys": None if keys is None else keys.describe().get("kind", type(keys).__name__)}


class Gateway:
    """One ASGI app (one ``ServerState``) and a synchronous way to send it batches as named clients."""

    def __init__(self, model_bytes: bytes, *, outputs: OutputPolicy | None = None, monitor: QueryMonitor | None = None,
                 served: ServedWatermark | None = None, evidence: EvidenceStore | None = None,
                 clock: SimulatedClock | None = None, canonical_keys: bool = True) -> None:
        """``canonical_keys``: the app's per-input decisions use the deployed canonical keys (LeaderKeys shared by
        the monitor and the served watermark) where this checkout has them; False: exact bytes (before issue 14).
        Every client has the role ``client``: one enrolment, the fleet budget's group."""
        from edgeshield.bundles._ort import onnxruntime as ort
        from edgeshield.extraction import LeaderKeys
        from edgeshield.models import digits_input_spec
        from edgeshield.server import Rbac, ServerState, create_app

        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        extra: dict[str, Any] = {"input_keys": LeaderKeys() if canonical_keys else ExactKeys()}
        if clock is not None:
            extra["clock"] = clock
        self.state = ServerState(session=session, manifest=_Manifest(), rbac=Rbac(), audit=None,
                                 spec=digits_input_spec(), outputs=outputs, monitor=monitor,
                                 served_watermark=served, served_evidence=evidence, **extra)
        self.app = create_app(self.state)
        self.loop = asyncio.new_event_loop()
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._serial = 0

    def _client(self, name: str) -> httpx.AsyncClient:
        import httpx

        from edgeshield.transport import Identity

        if name not in self._clients:
            self._serial += 1
            who = Identity(name=name, role="client", serial=self._serial, fingerprint_sha256="00" * 32)
            self._clients[name] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=_with_identity(self.app, who)), base_url="https://edge")
        return self._clients[name]

    def post(self, name: str, x: np.ndarray) -> tuple[int, dict[str, Any]]:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        r = self.loop.run_until_complete(self._client(name).post(
            "/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"}))
        return r.status_code, r.json()

    def keys(self, x: np.ndarray) -> list[bytes]:
        """The canonical key of each row as this app computes it (exact digests where it has no InputKeys)."""
        from edgeshield.extraction import digest_keys

        input_keys = getattr(self.state, "input_keys", None)
        return digest_keys(x) if input_keys is None else list(input_keys.keys(np.asarray(x, dtype=np.float32)))

    def evidence(self, client: str | None = None) -> tuple[np.ndarray, np.ndarray, list[bytes] | None]:
        """The served-watermark evidence kept for ``client`` (None: every client, pooled) and each row's unit."""
        store = self.state.served_evidence
        if store is None:
            return np.zeros((0, 64), np.float32), np.zeros(0, np.int64), None
        ev = store.evidence(client)
        x = ev.x.reshape(len(ev.labels), -1) if len(ev.labels) else np.zeros((0, 64), np.float32)
        return x, ev.labels, list(ev.units)

    def close(self) -> None:
        for c in self._clients.values():
            self.loop.run_until_complete(c.aclose())
        self.loop.close()
        if self.state.served_evidence is not None:
            self.state.served_evidence.close()


@dataclass
class Transcript:
    """What one client sent and got back; ``blocked_at`` = queries answered before the first 403."""

    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)  # per answered query: probabilities or one-hot labels
    blocked_at: int | None = None
    other_status: list[int] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return int(sum(len(a) for a in self.x))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.x:
            return np.empty((0, 64), np.float32), np.empty((0, 10), np.float32)
        return np.concatenate(self.x), np.concatenate(self.y)


def _answer(body: dict[str, Any], n: int) -> np.ndarray:
    if "probabilities" in body:
        return np.asarray(body["probabilities"], dtype=np.float32)
    labels = np.asarray(body.get("labels", body.get("predictions")), dtype=np.int64)
    return np.eye(10, dtype=np.float32)[labels].reshape(n, 10)


class Session:
    """One attacker or benign identity: sends batches through a gateway, stops being served after a 403."""

    def __init__(self, gateway: Gateway, name: str, batch: int = BATCH) -> None:
        self.gateway, self.name, self.batch = gateway, name, batch
        self.t = Transcript()

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answers for ``x`` (rows of zeros for what was not answered: the client was blocked)."""
        out = np.zeros((len(x), 10), dtype=np.float32)
        for start in range(0, len(x), self.batch):
            chunk = x[start : start + self.batch]
            if self.t.blocked_at is not None:
                break
            status, body = self.gateway.post(self.name, chunk)
            if status == 403:
                self.t.blocked_at = self.t.answered
                break
            if status != 200:
                self.t.other_status.append(status)
                continue
            ans = _answer(body, len(chunk))
            self.t.x.append(np.asarray(chunk, dtype=np.float32))
            self.t.y.append(ans)
            out[start : start + len(chunk)] = ans
        return out

    @property
    def blocked(self) -> bool:
        return self.t.blocked_at is not None


# --- substitutes ---------------------------------------------------------------------------------------------------
def build_mlp() -> torch.nn.Sequential:
    """Same layout as scripts/train_digits.py's build_mlp: 64 -> 128 -> 64 -> 10 (logits)."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def thieved_classifier(seed: int) -> PyTorchClassifier:
    """A fresh MLP as an ART PyTorchClassifier with an optimizer (so ART's extraction attacks can fit it)."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(seed)
    model = build_mlp()
    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(64,), nb_classes=10,
                             optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), clip_values=(0.0, 1.0),
                             device_type="cpu")


def fit_substitute(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> PyTorchClassifier | None:
    """Train a fresh thieved classifier on answered queries the way ART's extraction attacks do (batch 32)."""
    if len(x) == 0:
        return None
    clf = thieved_classifier(seed)
    np.random.seed(seed)
    clf.fit(x, y, batch_size=32, nb_epochs=epochs, verbose=False)
    return clf


def _labels(clf: PyTorchClassifier, x: np.ndarray) -> np.ndarray:
    return np.asarray(clf.predict(x.astype(np.float32))).argmax(axis=1)


# --- attacks -------------------------------------------------------------------------------------------------------
def _blackbox(session: Session) -> BlackBoxClassifier:
    from art.estimators.classification import BlackBoxClassifier

    return BlackBoxClassifier(session.query, input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0))


def run_art_attack(kind: str, session: Session, pool: np.ndarray, budget: int, *, epochs: int, seed: int,
                   soft: bool, pool_labels: np.ndarray | None = None) -> PyTorchClassifier:
    """CopycatCNN, KnockoffNets random or adaptive against ``session``; returns the thieved ART classifier.

    ``knockoff_adaptive`` is Orekondy et al.'s bandit over the attacker's own classes (``pool_labels``: the thief's
    annotation of its data), reward "loss" (classes where the copy still disagrees with the victim), one query per
    request as ART sends them. (ART 1.20's reward "all" divides by a zero variance on the first query and dies on
    NaN probabilities.)
    """
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    victim = _blackbox(session)
    if kind == "copycat":
        attack = CopycatCNN(victim, batch_size_fit=32, batch_size_query=session.batch, nb_epochs=epochs,
                            nb_stolen=budget, use_probability=False)
    else:
        adaptive = kind == "knockoff_adaptive"
        attack = KnockoffNets(victim, batch_size_fit=32, batch_size_query=session.batch, nb_epochs=epochs,
                              nb_stolen=budget, sampling_strategy="adaptive" if adaptive else "random",
                              reward="loss", verbose=False, use_probability=soft)
    np.random.seed(seed)  # ART picks the stolen subset with np.random: same queries in both runs of a session
    if kind == "knockoff_adaptive":
        return attack.extract(pool, pool_labels, thieved_classifier=thieved_classifier(seed))
    return attack.extract(pool, thieved_classifier=thieved_classifier(seed))


def run_jacobian_attack(session: Session, seeds: np.ndarray, budget: int, *, epochs: int, seed: int,
                        step: float = JACOBIAN_STEP) -> PyTorchClassifier | None:
    """Papernot et al. (2017): label seeds, train the substitute, augment x + λ·sign(∂F_y/∂x), repeat to budget."""
    import torch

    data = seeds[:budget].astype(np.float32)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    clf = None
    while data.size:
        answers = session.query(data)
        answered = session.t.answered - sum(len(a) for a in xs)
        xs.append(data[:answered])
        ys.append(answers[:answered])
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        clf = fit_substitute(x_all, y_all, epochs=epochs, seed=seed)
        if clf is None or session.blocked or len(x_all) >= budget:  # None: nothing was answered
            break
        model = clf.model  # ART wraps the module; gradients of the logit of the victim's label
        xt = torch.from_numpy(x_all).requires_grad_(True)
        logits = model(xt)
        (grad,) = torch.autograd.grad(logits.gather(1, torch.from_numpy(y_all.argmax(axis=1)).long()[:, None]).sum(),
                                      xt)
        new = np.clip(x_all + step * np.sign(grad.numpy()), 0.0, 1.0).astype(np.float32)
        data = new[: budget - len(x_all)]
    return clf


# --- benign clients ------------------------------------------------------------------------------------------------
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shift_name(dy: int, dx: int) -> str:
    return f"{'down' if dy > 0 else 'up' if dy < 0 else ''}{'right' if dx > 0 else 'left' if dx < 0 else ''}"


def benign_streams(x_held: np.ndarray, seed: int, y_held: np.ndarray | None = None,
                   *, enlarged: bool = True) -> list[tuple[str, np.ndarray, int]]:
    """The honest clients: (name, inputs in the order sent, batch). The first seven are the original set (random
    order, bursty, repetitive); ``enlarged`` adds issue 14's honest kinds: near-repeats (``NEAR_REPEAT_DIGITS``
    digits photographed twice with sensor noise sigma ``NEAR_REPEAT_SIGMA``, the retake sent at once or in a second
    pass), a camera shifted one pixel (each of the 8 directions), a single-class client (``y_held`` needed), sensor
    noise sigma 0.05 and faded ink (contrast 0.7)."""
    from edgeshield.extraction import BenignTransforms

    rng = np.random.default_rng(seed)
    streams = [(f"random_{i}", x_held[rng.permutation(len(x_held))], 10) for i in range(3)]
    streams += [(f"bursty_{i}", np.concatenate([x_held[rng.permutation(len(x_held))] for _ in range(2)]), 100)
                for i in range(2)]
    for i in range(2):
        few = x_held[rng.choice(len(x_held), 5, replace=False)]
        streams.append((f"repetitive_{i}", np.repeat(few, 40, axis=0)[rng.permutation(200)], 10))
    if not enlarged:
        return streams
    digits = x_held[rng.choice(len(x_held), NEAR_REPEAT_DIGITS, replace=False)]
    first, second = honest_retakes(digits, seed + 1), honest_retakes(digits, seed + 2)
    streams.append(("near_repeat_retry", np.stack([first, second], axis=1).reshape(-1, first.shape[1]), 10))
    streams.append(("near_repeat_second_pass", np.concatenate([first, second]), 10))
    shifter = BenignTransforms(image_shape=(8, 8))
    for dy, dx in SHIFTS:
        shifted = shifter.shift(x_held, dy, dx).astype(np.float32)
        streams.append((f"shifted_camera_{_shift_name(dy, dx)}", shifted[rng.permutation(len(shifted))], 10))
    if y_held is not None:
        top = int(np.bincount(y_held).argmax())
        one = x_held[y_held == top]
        streams.append(("single_class", np.concatenate([one, honest_retakes(one, seed + 3)]), 10))
    noisy = np.clip(x_held + 0.05 * rng.standard_normal(x_held.shape), 0, 1).astype(np.float32)
    streams.append(("sensor_noise_005", noisy[rng.permutation(len(noisy))], 10))
    streams.append(("faded_ink_07", (0.7 * x_held[rng.permutation(len(x_held))]).astype(np.float32), 10))
    return streams


# --- watermark -----------------------------------------------------------------------------------------------------
def _accuracy_onnx(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from edgeshield.bundles._ort import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return float((np.asarray(sess.run(None, {name: x})[0]).argmax(axis=1) == y).mean())


def _with_weights(model_bytes: bytes, weights: dict[str, np.ndarray]) -> bytes:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model_bytes)
    for t in proto.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(np.asarray(weights[t.name], dtype=np.float32), t.name))
    return proto.SerializeToString()


def mlp_as_onnx(base: bytes, module: torch.nn.Module) -> bytes:
    """A trained build_mlp() module's weights in the victim's ONNX graph (same names and shapes: inner.<k>.*)."""
    return _with_weights(base, {f"inner.{k}": v.detach().numpy() for k, v in module.state_dict().items()})


def _train(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> torch.nn.Module:
    import torch

    opt = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(module(xt[idx]), yt[idx]).backward()
            opt.step()
    module.eval()
    return module


def trained_weights(module: Any) -> dict[str, np.ndarray]:
    """An ``onnx_to_torch`` module's parameters under the ONNX initializer names they came from.

    ``module`` is that function's graph module (a class it defines on first use), read through its ``_slots``."""
    params = dict(module.named_parameters())
    return {name: params[slot].detach().numpy() for name, slot in module._slots.items() if slot in params}


def magnitude_pruned(model_bytes: bytes, fraction: float) -> bytes:
    """The model with the smallest ``fraction`` of each weight matrix (rank >= 2) by magnitude set to zero."""
    import onnx
    from onnx import numpy_helper

    pruned = {}
    for t in onnx.load_model_from_string(model_bytes).graph.initializer:
        w = numpy_helper.to_array(t).copy()
        if w.ndim >= 2:
            w[np.abs(w) < np.quantile(np.abs(w), fraction)] = 0.0
            pruned[t.name] = w
    return _with_weights(model_bytes, pruned)


def evaluate_watermark(base: bytes, marked: bytes, split: DigitsSplit, cfg: EvaluationConfig,
                       stolen: PyTorchClassifier | None) -> tuple[dict[str, Any], list[bytes]]:
    """The weight watermark against derived copies and the CopycatCNN copy; also returns the independent models."""
    import torch

    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.watermark import verify

    out: dict[str, Any] = {}
    acc_base = _accuracy_onnx(base, split.x_test, split.y_test)
    acc_marked = _accuracy_onnx(marked, split.x_test, split.y_test)
    out["watermark_accuracy_base"], out["watermark_accuracy_marked"] = acc_base, acc_marked
    out["watermark_accuracy_drop"] = acc_base - acc_marked
    out["watermark_z_marked"] = verify(marked, WATERMARK_KEY).statistic
    claims, zs = 0, []
    independent: list[bytes] = []
    for i in range(cfg.independent_models):
        torch.manual_seed(100 + i)
        model = mlp_as_onnx(base, _train(build_mlp(), split.x_train, split.y_train, 8, 100 + i))
        independent.append(model)
        r = verify(model, WATERMARK_KEY)
        claims += int(r.present)
        zs.append(r.statistic)
    out["watermark_independent_models"] = cfg.independent_models
    out["weight_watermark_false_claims"] = claims
    out["watermark_z_independent_max"] = max(zs) if zs else None
    # fine-tuned copy
    torch.manual_seed(0)
    module = onnx_to_torch(marked)
    _train(module, split.x_train, split.y_train, cfg.finetune_epochs, 0)
    tuned = _with_weights(marked, trained_weights(module))
    pruned = magnitude_pruned(marked, 0.3)
    # int8 dynamic quantisation
    # A submodule _ort does not re-export; importing edgeshield (above) has switched telemetry off already.
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: TID251

    with tempfile.TemporaryDirectory(prefix="edgeshield-wm-") as tmp:
        src, dst = Path(tmp) / "marked.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(marked)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        int8 = dst.read_bytes()
    copies = {"finetune": tuned, "prune30": pruned, "int8": int8}
    if stolen is not None:  # weights retrained from scratch: the served watermark is what follows those
        copies["copycat"] = mlp_as_onnx(base, stolen.model)
    for name, data in copies.items():
        r = verify(data, WATERMARK_KEY)
        prefix = "weight_watermark" if name == "copycat" else "watermark"
        out[f"{prefix}_survives_{name}"] = bool(r.present)
        out[f"{prefix}_z_{name}"] = float(r.statistic)
        out[f"watermark_accuracy_{name}"] = _accuracy_onnx(data, split.x_test, split.y_test)
    return out, independent


def evaluate_served_watermark(base: bytes, marked: bytes, split: DigitsSplit, cfg: EvaluationConfig,
                              controls: Sequence[bytes], progress: ProgressCallback | None = None) -> dict[str, Any]:
    """The served (DAWN) watermark at each of ``cfg.served_rates``: honest cost, and proof of CopycatCNN copies.

    Per rate: a labels-only app with the served watermark and an evidence store; an honest client's accuracy on
    x_test through it; ART CopycatCNN at the largest budget as one identity (its copy trained ``cfg.epochs`` epochs,
    as ART does) and a second copy trained on the same answers to convergence (``CONVERGED_EPOCHS``: a thief who
    fits every answer, since DAWN's marks are isolated points that a briefly trained copy smooths over); both checked
    with ``verify_copy`` against that identity's evidence. ``controls`` (the clean victim and independently trained
    models) are checked against the same evidence: any claim on them is a false claim.
    """
    import torch

    from edgeshield.extraction import LeaderKeys
    from edgeshield.watermark import EvidenceStore, verify_copy

    budget, out = max(cfg.budgets), dict[str, Any]()
    all_digits = np.concatenate([split.x_train, split.x_test])
    all_keys = (LeaderKeys() if cfg.monitor == "deployed" else ExactKeys()).keys(all_digits)  # as the app keys them

    false_claims, control_p = 0, []
    with tempfile.TemporaryDirectory(prefix="edgeshield-served-") as tmp:
        for i, rate in enumerate(cfg.served_rates):
            report(progress, "served watermark", i, len(cfg.served_rates), note=f"at {rate:.1%}")
            tag = f"served_watermark_{round(rate * 1000):03d}pm"  # per mille: 005pm = 0.5 %
            served = _served_watermark(rate)
            store = EvidenceStore(Path(tmp) / f"{tag}.db")
            gw = Gateway(marked, served=served, evidence=store, canonical_keys=cfg.monitor == "deployed")
            try:
                honest = Session(gw, "honest", batch=100).query(split.x_test).argmax(axis=1)
                thief = Session(gw, "thief")
                copy = run_art_attack("copycat", thief, split.x_train, budget, epochs=cfg.epochs, seed=7,
                                      soft=False)
                x_ev, y_ev, units = gw.evidence("thief")
                x_ans, y_ans = thief.t.arrays()
            finally:
                gw.close()
            torch.manual_seed(1)
            converged = _train(build_mlp(), x_ans, y_ans.argmax(axis=1), CONVERGED_EPOCHS, 1)
            owner = _victim_kw(marked)
            proof = verify_copy(copy.predict, x_ev, y_ev, classes=10, units=units, **owner)
            proof_conv = verify_copy(mlp_as_onnx(base, converged), x_ev, y_ev, classes=10, units=units, **owner)
            for model in controls:
                check = verify_copy(model, x_ev, y_ev, classes=10, units=units, **owner)
                false_claims += int(check.present)
                control_p.append(check.p_value)
            out.update({
                f"{tag}_rate": rate,
                f"{tag}_honest_accuracy_drop": _accuracy_onnx(marked, split.x_test, split.y_test)
                - _rate(honest, split.y_test),
                # the expected honest cost: the share of all 1,797 digits marked
                f"{tag}_marked_fraction_all_digits": float(served.marks(all_digits, keys=all_keys)[0].mean()),
                f"{tag}_evidence": proof.evidence,
                f"{tag}_copy_matches": proof.matches, f"{tag}_copy_p": proof.p_value,
                f"{tag}_copy_proven": proof.present,
                f"{tag}_converged_matches": proof_conv.matches, f"{tag}_converged_p": proof_conv.p_value,
                f"{tag}_converged_proven": proof_conv.present,
            })
        report(progress, "served watermark", len(cfg.served_rates), len(cfg.served_rates))
    default = f"served_watermark_{round(SERVED_RATE * 1000):03d}pm"
    out["served_watermark_false_claims"] = false_claims
    out["served_watermark_controls"] = len(controls) * len(cfg.served_rates)
    out["served_watermark_p_control_min"] = min(control_p) if control_p else None
    out["watermark_survives_copycat"] = out[f"{default}_copy_proven"]
    out["watermark_survives_copycat_converged"] = out[f"{default}_converged_proven"]
    return out


# --- the four failures of issue 14, as measured cases -------------------------------------------------------------
def jittered(x: np.ndarray, rng: np.random.Generator, size: tuple[float, float] = JITTER) -> np.ndarray:
    """A copy of ``x`` with one random pixel of each row moved by ``size`` (inwards, so it stays in [0, 1])."""
    out = np.array(x, dtype=np.float32)
    rows, cols = np.arange(len(out)), rng.integers(0, out.shape[1], len(out))
    step = rng.uniform(*size, len(out)).astype(np.float32)
    v = out[rows, cols]
    out[rows, cols] = np.where(v < 0.5, v + step, v - step)
    return out


def _majority(answers: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per input, the majority label over its answered copies (ties: the smallest label), and whether any was."""
    stacked = np.stack(answers)  # [copies, N, 10]; an unanswered copy is a row of zeros
    answered = stacked.sum(axis=2) > 0
    votes = np.zeros(stacked.shape[1:], dtype=np.int64)
    for copy, ok in zip(stacked, answered, strict=True):
        votes[ok, copy[ok].argmax(axis=1)] += 1
    return votes.argmax(axis=1), answered.any(axis=0)


def _onehot(labels: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels]


class _Snapshot:
    """A thieved classifier's weights at one point of its training, with ART's ``predict`` (scores per class)."""

    def __init__(self, clf: PyTorchClassifier) -> None:
        import copy

        self.model = copy.deepcopy(clf.model).eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.asarray(self.model(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy())


def _copies(x: np.ndarray, y: np.ndarray, lengths: Sequence[int], seed: int) -> dict[int, Any]:
    """Copies trained on (x, labels y) as ART trains them (Adam 1e-3, batch 32), one per training length: one
    training run to the longest length, its weights taken at each shorter one (a copy trained e epochs)."""
    out: dict[int, Any] = {}
    if len(x) == 0:
        return out
    clf, done = thieved_classifier(seed), 0
    np.random.seed(seed)
    for epochs in sorted(set(lengths)):
        clf.fit(x, _onehot(y), batch_size=32, nb_epochs=epochs - done, verbose=False)
        done = epochs
        out[epochs] = _Snapshot(clf)
    return out


def sybil_jitter_majority(gateway: Gateway, pool: np.ndarray, *, identities: int, inputs: int, seed: int,
                          repeats: int = SYBIL_REPEATS) -> dict[str, Any]:
    """Issue 14, failure 1: ``identities`` identities, each ``inputs`` distinct inputs of ``pool``, every input sent
    ``repeats`` times with a tiny jitter (requests of ``BATCH`` inputs, each request sent ``repeats`` times, jittered
    afresh); the thief keeps the majority label. Returns the thief's data and how the app saw it."""
    from edgeshield.extraction import QueryBudget

    rng = np.random.default_rng(seed)
    xs, ys, blocked, answered, first_block = [], [], 0, 0, None
    first_flag: int | None = None
    distinct: int | None = None
    monitor = gateway.state.monitor
    for i in range(identities):
        name = f"sybil-{i}"
        mine = pool[rng.choice(len(pool), inputs, replace=False)].astype(np.float32)
        session = Session(gateway, name)
        counter = QueryBudget(10**9)  # what the app's budget counts for this identity, uncapped
        for start in range(0, len(mine), BATCH):
            chunk = mine[start : start + BATCH]
            answers = []
            for _ in range(repeats):
                sent = jittered(chunk, rng)
                answers.append(session.query(sent))
                if first_flag is None and monitor is not None and monitor.action(name) != "allow":
                    first_flag = answered + session.t.answered
                if i == 0:
                    counter.observe(name, sent, keys=gateway.keys(sent))
            label, ok = _majority(answers)
            xs.append(chunk[ok])
            ys.append(label[ok])
        if i == 0:
            distinct = int(counter.state(name).stats["distinct"])
        answered += session.t.answered
        if session.blocked:
            blocked += 1
            first_block = first_block if first_block is not None else answered - session.t.answered + \
                (session.t.blocked_at or 0)
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "identities_blocked": blocked,
            "answered": answered, "queries_to_first_block": first_block, "queries_to_first_flag": first_flag,
            "budget_distinct": distinct}


def slow_attacker(gateway: Gateway, clock: SimulatedClock, pool: np.ndarray, *, per_day: int = SLOW_PER_DAY,
                  days: int = SLOW_DAYS, seed: int) -> Session:
    """Issue 14, failure 2: ``per_day`` fresh distinct inputs a day for ``days`` days from one identity, its
    requests spread evenly over each day (and a minute) on the app's simulated clock."""
    rng = np.random.default_rng(seed)
    order = pool[rng.permutation(len(pool))[: per_day * days]].astype(np.float32)
    session = Session(gateway, "slow")
    requests = -(-per_day // session.batch)
    for day in range(days):
        today = order[day * per_day : (day + 1) * per_day]
        for start in range(0, len(today), session.batch):  # spread evenly over a day and a minute
            session.query(today[start : start + session.batch])
            clock.advance((DAY + 60.0) / requests)
    return session


def evaluate_cases(marked: bytes, split: DigitsSplit, cfg: EvaluationConfig, victim_labels: np.ndarray,
                   copycat: dict[str, Any] | None, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """The jitter-majority Sybil, the slow attacker and the served watermark per copy training length.

    Each case runs against its own defended app (the deployed monitor, labels only, the served watermark at
    ``SERVED_RATE``), so the fleet of one case is not another's. ``copycat``: the labels-only CopycatCNN transcript
    at the largest budget (x, labels answered, evidence) from the main sessions, for the per-length p-values."""
    from edgeshield.watermark import EvidenceStore, verify_copy

    out: dict[str, Any] = {}
    converged = max(cfg.copy_lengths, default=CONVERGED_EPOCHS)  # the longest-trained copy: "to convergence"
    lengths = tuple(sorted({*cfg.copy_lengths, cfg.epochs, converged}))

    def fidelity(clf: Any) -> float:
        return _rate(_labels(clf, split.x_test), victim_labels)

    def proof(clf: Any, evidence: tuple[np.ndarray, np.ndarray, list[bytes] | None]) -> Any:
        x_ev, y_ev, units = evidence
        return verify_copy(clf.predict, x_ev, y_ev, classes=10, units=units, **_victim_kw(marked))

    with tempfile.TemporaryDirectory(prefix="edgeshield-cases-") as tmp:
        # 1. jitter-majority Sybil: twelve identities of one role (one enrolment: the fleet budget's group)
        report(progress, "issue-14 cases", 0, 3, note="jitter-majority Sybil")
        clock = SimulatedClock()
        monitor = build_monitor(split.x_train, split.x_test[:N_OOD_CAL], kind=cfg.monitor, clock=clock,
                                x_honest=split.x_test[:N_OOD_CAL])
        gw = Gateway(marked, monitor=monitor, clock=clock, canonical_keys=cfg.monitor == "deployed",
                     served=_served_watermark(SERVED_RATE), evidence=EvidenceStore(Path(tmp) / "sybil.db"))
        try:
            t0 = time.perf_counter()
            sybil = sybil_jitter_majority(gw, split.x_train, identities=cfg.sybil_identities,
                                          inputs=cfg.sybil_inputs, seed=cfg.seed + 14)
            evidence = gw.evidence()
            parts = monitor_parts(monitor, gw)
        finally:
            gw.close()
        query_s = time.perf_counter() - t0
        copies = _copies(sybil["x"], sybil["y"], lengths, seed=cfg.seed + 15)
        proofs = {e: proof(c, evidence) for e, c in copies.items()}
        p30 = proofs[cfg.epochs]
        out.update({
            "sybil_jitter_majority_identities": cfg.sybil_identities,
            "sybil_jitter_majority_inputs": len(sybil["x"]),
            "sybil_jitter_majority_answered": sybil["answered"],
            "sybil_jitter_majority_identities_blocked": sybil["identities_blocked"],
            "sybil_jitter_majority_queries_to_first_block": sybil["queries_to_first_block"],
            # the first alarm of any kind (the fleet budget flags, the others block): the operator is told
            "sybil_jitter_majority_queries_to_first_alarm": sybil["queries_to_first_flag"],
            "sybil_jitter_budget_distinct": sybil["budget_distinct"],  # should be the inputs, not the sends
            "sybil_jitter_inputs_per_identity": cfg.sybil_inputs, "sybil_jitter_sends_per_input": SYBIL_REPEATS,
            "sybil_jitter_majority_fidelity": fidelity(copies[cfg.epochs]),
            "sybil_jitter_majority_fidelity_converged": fidelity(copies[converged]),
            "sybil_jitter_majority_units": p30.units, "sybil_jitter_majority_evidence": p30.evidence,
            "sybil_jitter_majority_matches": p30.matches, "sybil_jitter_majority_p": p30.p_value,
            "sybil_jitter_majority_p_converged": proofs[converged].p_value, "sybil_converged_epochs": converged,
            "sybil_jitter_majority_proven": int(p30.present or proofs[converged].present),
            "sybil_jitter_majority_proven_copy30": int(p30.present),
            "sybil_jitter_majority_s": time.perf_counter() - t0, "sybil_jitter_majority_query_s": query_s,
            "cases_monitor": parts,
        })
        for e in cfg.copy_lengths:
            if e in proofs:
                out[f"sybil_copy_{e}ep_p"] = proofs[e].p_value
                out[f"sybil_copy_{e}ep_fidelity"] = fidelity(copies[e])

        # 2. the slow attacker: under the daily budget every day, for four days; against the defended app (when is
        # it detected, what copy at detection) and against the same app without monitor (the full copy, its proof)
        report(progress, "issue-14 cases", 1, 3, note="slow attacker")
        t0 = time.perf_counter()
        runs: dict[str, Session] = {}
        slow_signals: list[str] = []
        slow_evidence: tuple[np.ndarray, np.ndarray, list[bytes] | None] = (np.zeros((0, 64)), np.zeros(0), None)
        for defended in (True, False):
            clock = SimulatedClock()
            slow_monitor = build_monitor(split.x_train, split.x_test[:N_OOD_CAL], kind=cfg.monitor, clock=clock,
                                         x_honest=split.x_test[:N_OOD_CAL]) if defended else None
            gw = Gateway(marked, monitor=slow_monitor, clock=clock, canonical_keys=cfg.monitor == "deployed",
                         served=_served_watermark(SERVED_RATE),
                         evidence=EvidenceStore(Path(tmp) / f"slow-{defended}.db"))
            try:
                runs["defended" if defended else "open"] = slow_attacker(gw, clock, split.x_train,
                                                                          seed=cfg.seed + 16)
                if defended:
                    slow_signals = _alarming(gw, "slow")
                else:
                    slow_evidence = gw.evidence("slow")
            finally:
                gw.close()
        slow, slow_open = runs["defended"], runs["open"]
        at_det = fit_substitute(*slow.t.arrays(), epochs=cfg.epochs, seed=cfg.seed + 17) if slow.blocked else None
        full = fit_substitute(*slow_open.t.arrays(), epochs=cfg.epochs, seed=cfg.seed + 17)
        slow_proof = proof(full, slow_evidence) if full is not None else None
        slow_proven = bool(slow_proof is not None and slow_proof.present)
        q = slow.t.blocked_at
        out.update({
            "slow_attacker_queries": SLOW_PER_DAY * SLOW_DAYS, "slow_attacker_answered": slow.t.answered,
            "slow_attacker_detected": slow.blocked, "slow_attacker_queries_to_detect": q,
            "slow_attacker_day_detected": None if q is None else q // SLOW_PER_DAY + 1,
            "slow_attacker_signals": slow_signals,
            "slow_attacker_fidelity_at_detection": fidelity(at_det) if at_det is not None else None,
            "slow_attacker_fidelity_full": fidelity(full) if full is not None else None,
            "slow_attacker_fidelity": fidelity(full) if full is not None else None,
            "slow_attacker_p": slow_proof.p_value if slow_proof is not None else None,
            "slow_attacker_proven": slow_proven,
            "slow_attacker_detected_or_proven": int((q is not None and q <= TARGET_QUERIES) or slow_proven),
            "slow_attacker_s": time.perf_counter() - t0,
        })

        # 3. the served watermark per copy training length: CopycatCNN (labels only, largest budget) and the Sybil
        report(progress, "issue-14 cases", 2, 3, note="copies per training length")
        if copycat is not None:
            cc = _copies(copycat["x"], copycat["y"], cfg.copy_lengths, seed=cfg.seed + 18)
            for e, c in cc.items():
                out[f"copycat_copy_{e}ep_p"] = proof(c, copycat["evidence"]).p_value
                out[f"copycat_copy_{e}ep_fidelity"] = fidelity(c)
        report(progress, "issue-14 cases", 3, 3)
    out["copy_lengths"] = list(cfg.copy_lengths)
    return out


def _victim_kw(victim: bytes) -> dict[str, Any]:
    """``verify_copy``'s ``victim=``: the owner's model, so each unit's victim label is excluded from the
    suspect's vote."""
    return {"victim": victim}


def _served_watermark(rate: float) -> ServedWatermark:
    """The deployed served watermark at ``rate`` (``SERVED_REGIONS``: its unit kind)."""
    from edgeshield.watermark import ServedWatermark

    return ServedWatermark(WATERMARK_KEY, rate, classes=10, regions=SERVED_REGIONS)


# --- the whole evaluation ------------------------------------------------------------------------------------------
@runtime_checkable
class _Stateful(Protocol):
    """A monitor detector that can say where a client stands without a new batch (all of ours can)."""

    def state(self, client_id: str) -> Signal: ...


def _alarming(gateway: Gateway, client: str) -> list[str]:
    """Which detectors of the monitor alarm for ``client`` now (PRADA's state is over its sliding window)."""
    monitor = gateway.state.monitor
    if monitor is None:
        return []
    return [d.name for d in monitor.detectors if isinstance(d, _Stateful) and d.state(client).alarm]


def _rate(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def evaluate(cfg: EvaluationConfig | None = None, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run the evaluation; returns ``{"sessions", "benign", "outputs", "watermark", "flat", "protocol_text"}``.

    ``progress`` (see ``edgeshield._progress``) hears each attack session, the benign sessions and the watermark
    checks as they finish."""
    import torch

    from edgeshield.models import digits_model_path, load_digits_split
    from edgeshield.watermark import EvidenceStore, embed, verify_copy

    cfg = cfg or EvaluationConfig()
    torch.set_num_threads(1)  # small MLPs: one thread is as fast and does not fight the app's threads
    started = time.perf_counter()
    split = load_digits_split()
    base = digits_model_path().read_bytes()
    marked, _ = embed(base, WATERMARK_KEY)
    x_ood_cal, x_held = split.x_test[:N_OOD_CAL], split.x_test[N_OOD_CAL:]
    rng = np.random.default_rng(cfg.seed)
    pool = split.x_train
    jac_seeds = np.stack([split.x_train[np.flatnonzero(split.y_train == c)[0]] for c in range(10)])

    reference = Gateway(marked)
    victim_labels = np.asarray(reference.state.session.run(None, {"input": split.x_test})[0]).argmax(axis=1)
    reference.close()

    def score(clf: PyTorchClassifier | None) -> tuple[float | None, float | None]:
        if clf is None:
            return None, None
        pred = _labels(clf, split.x_test)
        return _rate(pred, victim_labels), _rate(pred, split.y_test)

    def dawn(gateway: Gateway, client: str, model: PyTorchClassifier | None) -> CopyVerifyResult | None:
        """Does the served watermark prove ``model`` was trained on ``client``'s answers from ``gateway``?"""
        if model is None or gateway.state.served_evidence is None:
            return None
        x_ev, y_ev, units = gateway.evidence(client)
        # evidence rows are float32 already
        return verify_copy(model.predict, x_ev, y_ev, classes=10, units=units, **_victim_kw(marked))

    served = _served_watermark(SERVED_RATE)
    copycat_transcript: dict[str, Any] | None = None
    parts: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="edgeshield-extraction-")
    sessions: list[dict[str, Any]] = []
    benign: list[dict[str, Any]] = []
    copycat_full: PyTorchClassifier | None = None
    n_attacks = len(cfg.outputs) * len(cfg.attacks) * len(cfg.budgets)
    y_held = split.y_test[N_OOD_CAL:]
    n_benign = len(cfg.outputs) * len(benign_streams(x_held, cfg.seed, y_held)) if cfg.benign else 0
    canonical_keys = cfg.monitor == "deployed"
    for out_name in cfg.outputs:
        clock = SimulatedClock()
        # the sessions here are unrelated identities (each its own enrolment): no fleet budget over them; the
        # Sybil case below is the fleet
        monitor = build_monitor(split.x_train, x_ood_cal, kind=cfg.monitor, clock=clock, x_honest=x_ood_cal,
                                fleet=False)
        defended = Gateway(marked, outputs=_output_policy(out_name), monitor=monitor, clock=clock,
                           canonical_keys=canonical_keys,
                           served=served, evidence=EvidenceStore(Path(tmp.name) / f"defended-{out_name}.db"))
        open_ = Gateway(marked, outputs=_output_policy(out_name), served=served, clock=clock,
                        canonical_keys=canonical_keys,
                        evidence=EvidenceStore(Path(tmp.name) / f"open-{out_name}.db"))
        parts = monitor_parts(monitor, defended)
        soft = out_name != "label_only"
        for kind in cfg.attacks:
            for budget in cfg.budgets:
                report(progress, "attack sessions", len(sessions), n_attacks,
                       note=f"{kind}, {budget} queries, {out_name}")
                seed = int(rng.integers(1 << 30))
                name = f"{kind}-{budget}-{out_name}"
                t0 = time.perf_counter()
                attacker, baseline = Session(defended, name), Session(open_, name)
                if kind == "jacobian":
                    run_jacobian_attack(attacker, jac_seeds, budget, epochs=cfg.epochs, seed=seed)
                    full = run_jacobian_attack(baseline, jac_seeds, budget, epochs=cfg.epochs, seed=seed)
                else:
                    run_art_attack(kind, attacker, pool, budget, epochs=cfg.epochs, seed=seed, soft=soft,
                                   pool_labels=split.y_train)
                    full = run_art_attack(kind, baseline, pool, budget, epochs=cfg.epochs, seed=seed, soft=soft,
                                          pool_labels=split.y_train)
                x_ans, y_ans = attacker.t.arrays()
                at_det = fit_substitute(x_ans, y_ans, epochs=cfg.epochs, seed=seed) if attacker.blocked else None
                fid_det, acc_det = score(at_det)
                fid_full, acc_full = score(full)
                proof = dawn(open_, name, full)
                if kind == "copycat" and out_name == "label_only" and budget == max(cfg.budgets):
                    copycat_full = full
                    x_base, y_base = baseline.t.arrays()
                    copycat_transcript = {"x": x_base, "y": y_base.argmax(axis=1), "evidence": open_.evidence(name)}
                sessions.append({
                    "attack": kind, "budget": budget, "outputs": out_name, "detected": attacker.blocked,
                    "queries_to_detect": attacker.t.blocked_at, "answered": attacker.t.answered,
                    "baseline_answered": baseline.t.answered,
                    "fidelity_at_detection": fid_det, "accuracy_at_detection": acc_det,
                    "fidelity_full": fid_full, "accuracy_full": acc_full,
                    "signals": _alarming(defended, name), "seconds": time.perf_counter() - t0,
                    # no proof without a copy (a session nothing was answered to)
                    "served_wm_evidence": proof.evidence if proof is not None else None,
                    "served_wm_matches": proof.matches if proof is not None else None,
                    "served_wm_p": proof.p_value if proof is not None else None,
                    "served_wm_proven": proof.present if proof is not None else False,
                })
        if cfg.benign:
            for bname, stream, batch in benign_streams(x_held, cfg.seed, y_held):
                s = Session(defended, f"benign-{bname}-{out_name}", batch=batch)
                s.query(stream)
                benign.append({"client": bname, "outputs": out_name, "queries": len(stream), "batch": batch,
                               "flagged": s.blocked or monitor.action(s.name) != "allow",
                               "blocked_at": s.t.blocked_at, "signals": _alarming(defended, s.name)})
                report(progress, "benign sessions", len(benign), n_benign)
        defended.close()
        open_.close()
    tmp.cleanup()

    report(progress, "attack sessions", len(sessions), n_attacks)
    report(progress, "output hardening cost", 0, 1)
    outputs = output_costs(marked, split)
    report(progress, "output hardening cost", 1, 1)
    cases = evaluate_cases(marked, split, cfg, victim_labels, copycat_transcript, progress) if cfg.cases else {}
    wm: dict[str, Any] = {}
    if cfg.watermark:
        report(progress, "weight watermark", 0, 1)
        wm, independent = evaluate_watermark(base, marked, split, cfg, copycat_full)
        report(progress, "weight watermark", 1, 1)
        wm.update(evaluate_served_watermark(base, marked, split, cfg, [base, *independent], progress))
        wm["watermark_false_claims"] = wm["weight_watermark_false_claims"] + wm["served_watermark_false_claims"]

    detected = [s for s in sessions if s["detected"]]
    flat: dict[str, Any] = {
        "attack_sessions": len(sessions),
        "attack_sessions_detected": len(detected),
        "max_queries_to_detect": max((s["queries_to_detect"] for s in detected), default=None),
        "fidelity_at_detection_max": max((s["fidelity_at_detection"] for s in detected), default=None),
        "benign_sessions": len(benign),
        "benign_sessions_flagged": sum(b["flagged"] for b in benign),
        "benign_false_positive_rate": (sum(b["flagged"] for b in benign) / len(benign)) if benign else None,
        "victim_accuracy": _rate(victim_labels, split.y_test),
        "budgets": list(cfg.budgets),
        "epochs": cfg.epochs,
    }
    for kind in cfg.attacks:
        mine = [s for s in sessions if s["attack"] == kind]
        det = [s for s in mine if s["detected"]]
        flat[f"{kind}_sessions"] = len(mine)
        flat[f"{kind}_detected"] = len(det)
        flat[f"{kind}_max_queries_to_detect"] = max((s["queries_to_detect"] for s in det), default=None)
        flat[f"{kind}_fidelity_at_detection_max"] = max((s["fidelity_at_detection"] for s in det), default=None)
        flat[f"{kind}_fidelity_full_max"] = max((s["fidelity_full"] for s in mine), default=None)
        top = [s for s in mine if s["budget"] == max(cfg.budgets)]
        flat[f"{kind}_full_budget_copies_proven"] = sum(s["served_wm_proven"] for s in top)
        flat[f"{kind}_full_budget_copies"] = len(top)
        flat[f"{kind}_full_budget_served_wm_p_max"] = max((s["served_wm_p"] for s in top), default=None)
    for b in benign:
        flat[f"benign_{b['client']}_{b['outputs']}_flagged"] = b["flagged"]
    kinds = {"near_repeat": "benign_near_repeat", "shifted_camera": "benign_shifted_camera"}
    for prefix, key in kinds.items():
        mine = [b for b in benign if b["client"].startswith(prefix)]
        flat[f"{key}_sessions"] = len(mine)
        flat[f"{key}_flagged"] = sum(b["flagged"] for b in mine)
        flat[f"{key}_blocked_at_min"] = min((b["blocked_at"] for b in mine if b["blocked_at"] is not None),
                                            default=None)
    flat["monitor"] = cfg.monitor
    flat["monitor_detectors"] = parts.get("detectors")
    flat["monitor_input_keys"] = parts.get("input_keys")
    flat["monitor_prada_dup_distance"] = parts.get("prada_dup_distance")
    flat["monitor_ood_transforms"] = parts.get("ood_transforms")
    flat["served_rate"] = SERVED_RATE
    flat["served_regions"] = SERVED_REGIONS
    flat.update({k: v for k, v in cases.items() if k != "cases_monitor"})
    flat.update(_copy30(sessions, cases, cfg))
    flat.update(_useful_target(sessions, cases))
    for name, o in outputs.items():
        flat[f"output_{name}_accuracy"] = o["accuracy"]
        flat[f"output_{name}_accuracy_drop"] = o["accuracy_drop"]
    flat.update(wm)
    flat["evaluation_s"] = time.perf_counter() - started
    return {"sessions": sessions, "benign": benign, "outputs": outputs, "watermark": wm, "flat": flat,
            "cases": cases, "protocol_text": protocol_text(cfg)}


def _useful_target(sessions: Sequence[dict[str, Any]], cases: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: every attack session whose (undefended) copy reaches USEFUL_FIDELITY is detected within
    TARGET_QUERIES queries or its copy proven (p < 1e-6). The Sybil counts as detected when its first identity is
    blocked within TARGET_QUERIES queries of the whole fleet."""
    rows = [(f"{s['attack']}/{s['outputs']}/{s['budget']}", s["fidelity_full"],
             s["detected"] and s["queries_to_detect"] <= TARGET_QUERIES, s["served_wm_proven"]) for s in sessions]
    if "sybil_jitter_majority_fidelity" in cases:
        first = cases["sybil_jitter_majority_queries_to_first_alarm"]
        rows.append(("sybil_jitter_majority", cases["sybil_jitter_majority_fidelity"],
                     first is not None and first <= TARGET_QUERIES, bool(cases["sybil_jitter_majority_proven"])))
    if "slow_attacker_detected" in cases:
        q = cases["slow_attacker_queries_to_detect"]
        rows.append(("slow_attacker", cases["slow_attacker_fidelity_full"], q is not None and q <= TARGET_QUERIES,
                     bool(cases["slow_attacker_proven"])))
    useful = [r for r in rows if r[1] is not None and r[1] >= USEFUL_FIDELITY]
    missed = [r[0] for r in useful if not (r[2] or r[3])]
    from edgeshield.watermark import provable_session
    budgets = {f"{s['attack']}/{s['outputs']}/{s['budget']}": s["baseline_answered"] for s in sessions}
    # what no served mark can prove: too few distinct queries to collect marks_needed marks at this rate
    bound = [m for m in missed if m in budgets and not provable_session(budgets[m], SERVED_RATE, 10)]
    return {"useful_attack_sessions": len(useful),
            "useful_attack_sessions_detected_or_proven": len(useful) - len(missed),
            "useful_attack_sessions_missed": missed,
            "useful_attack_sessions_missed_unprovable_at_rate": bound}


def _copy30(sessions: Sequence[dict[str, Any]], cases: dict[str, Any], cfg: EvaluationConfig) -> dict[str, Any]:
    """The served watermark's p over the copies trained ``cfg.epochs`` epochs (ART's 30 by default) from every
    attack case at the served rate: the full-budget undefended sessions, the Sybil and the slow attacker. The max
    over every copy, and over the copies that are useful (fidelity >= USEFUL_FIDELITY: the targets' population)."""
    top = [s for s in sessions if s["budget"] == max(cfg.budgets) and s["served_wm_p"] is not None]
    rows = [(f"{s['attack']}/{s['outputs']}", s["served_wm_p"], s["fidelity_full"]) for s in top]
    if "sybil_jitter_majority_p" in cases:
        rows.append(("sybil_jitter_majority", cases["sybil_jitter_majority_p"],
                     cases["sybil_jitter_majority_fidelity"]))
    if cases.get("slow_attacker_p") is not None:
        rows.append(("slow_attacker", cases["slow_attacker_p"], cases["slow_attacker_fidelity"]))
    useful = [r for r in rows if r[2] is not None and r[2] >= USEFUL_FIDELITY]
    worst = max(useful, key=lambda r: r[1], default=None)
    return {"copy30_served_wm_p_max": worst[1] if worst else None,
            "copy30_served_wm_p_max_case": worst[0] if worst else None,
            "copy30_served_wm_p_max_all": max((r[1] for r in rows), default=None),
            "copy30_copies": len(rows), "copy30_useful_copies": len(useful),
            "copy30_useful_copies_proven": sum(r[1] < 1e-6 for r in useful)}


def output_costs(model_bytes: bytes, split: DigitsSplit) -> dict[str, dict[str, Any]]:
    """Top-1 accuracy an honest client gets on x_test under each output policy (through the app)."""
    from edgeshield.extraction import LabelOnly, ReverseSigmoid, Rounding, TopK

    policies: dict[str, OutputPolicy] = {"none": TopK(10), "label_only": LabelOnly(), "top1": TopK(1), "top3": TopK(3),
                                "rounding1": Rounding(1), "reverse_sigmoid": ReverseSigmoid()}
    out: dict[str, dict[str, Any]] = {}
    raw_acc = None
    for name, policy in policies.items():
        gw = Gateway(model_bytes, outputs=policy)
        s = Session(gw, "honest", batch=100)
        answers = s.query(split.x_test)
        gw.close()
        acc = _rate(answers.argmax(axis=1), split.y_test)
        raw_acc = acc if raw_acc is None else raw_acc
        nll = float(-np.log(np.clip(answers[np.arange(len(answers)), split.y_test], 1e-12, None)).mean())
        out[name] = {"accuracy": acc, "accuracy_drop": raw_acc - acc,
                     "nll": None if name == "label_only" else nll}
    return out


def session_rows(sessions: Sequence[dict[str, Any]]) -> list[list[str]]:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    return [[s["attack"], s["outputs"], str(s["budget"]), "yes" if s["detected"] else "no", f(s["queries_to_detect"]),
             f(s["fidelity_at_detection"]), f(s["accuracy_at_detection"]), f(s["fidelity_full"]),
             f(s["accuracy_full"]), f"{s['seconds']:.1f}"] for s in sessions]
