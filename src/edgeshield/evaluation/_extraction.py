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
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

import edgeshield  # noqa: F401  # before onnxruntime
from edgeshield._progress import ProgressCallback, report

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

    @classmethod
    def quick(cls) -> EvaluationConfig:
        return cls(budgets=(100, 500), outputs=("top3", "label_only"), epochs=20, independent_models=1,
                   finetune_epochs=3, served_rates=(SERVED_RATE, 0.05))


def protocol_text(cfg: EvaluationConfig) -> str:
    return (
        "victim = watermarked digits MLP served by edgeshield.server.create_app in-process (httpx ASGITransport, "
        f"injected verified identity), served watermark at {SERVED_RATE:.0%}; monitor = PRADA(delta 0.9, min 30) + "
        f"OodRateSignal(PCA fit on x_train, threshold at the 0.99 quantile of x_test[:{N_OOD_CAL}], binomial test "
        f"null 2 %, alpha 1e-6) + QueryBudget({QUERY_BUDGET} distinct/day), any alarm -> block (403, from the "
        "tripping batch on); outputs "
        f"{', '.join(cfg.outputs)}; attacks {', '.join(cfg.attacks)} at budgets {list(cfg.budgets)} queries, "
        f"requests of {BATCH}; detection = queries answered before the first 403; stolen model = 64-128-64-10 MLP, "
        f"Adam 1e-3, batch 32, {cfg.epochs} epochs, 'at detection' on the answered prefix, 'full' on all answers "
        "from the same app without monitor; fidelity/accuracy on x_test; benign = x_test[225:] random order, "
        "bursty (batches of 100, twice over), repetitive (5 digits x 40)."
    )


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


def build_monitor(x_train: np.ndarray, x_ood_cal: np.ndarray) -> QueryMonitor:
    from edgeshield.extraction import OodRateSignal, PradaDetector, QueryBudget, QueryMonitor, ResponsePolicy

    return QueryMonitor([PradaDetector(delta=PRADA_DELTA, min_samples=PRADA_MIN_SAMPLES),
                         OodRateSignal.fit(x_train, x_ood_cal), QueryBudget(QUERY_BUDGET)],
                        response=ResponsePolicy(default="block"))


class Gateway:
    """One ASGI app (one ``ServerState``) and a synchronous way to send it batches as named clients."""

    def __init__(self, model_bytes: bytes, *, outputs: OutputPolicy | None = None, monitor: QueryMonitor | None = None,
                 served: ServedWatermark | None = None, evidence: EvidenceStore | None = None) -> None:
        from edgeshield.bundles._ort import onnxruntime as ort
        from edgeshield.models import digits_input_spec
        from edgeshield.server import Rbac, ServerState, create_app

        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self.state = ServerState(session=session, manifest=_Manifest(), rbac=Rbac(), audit=None,
                                 spec=digits_input_spec(), outputs=outputs, monitor=monitor,
                                 served_watermark=served, served_evidence=evidence)
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
def benign_streams(x_held: np.ndarray, seed: int) -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    streams = [(f"random_{i}", x_held[rng.permutation(len(x_held))], 10) for i in range(3)]
    streams += [(f"bursty_{i}", np.concatenate([x_held[rng.permutation(len(x_held))] for _ in range(2)]), 100)
                for i in range(2)]
    for i in range(2):
        few = x_held[rng.choice(len(x_held), 5, replace=False)]
        streams.append((f"repetitive_{i}", np.repeat(few, 40, axis=0)[rng.permutation(200)], 10))
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

    from edgeshield.watermark import EvidenceStore, ServedWatermark, verify_copy

    budget, out = max(cfg.budgets), dict[str, Any]()
    all_digits = np.concatenate([split.x_train, split.x_test])

    false_claims, control_p = 0, []
    with tempfile.TemporaryDirectory(prefix="edgeshield-served-") as tmp:
        for i, rate in enumerate(cfg.served_rates):
            report(progress, "served watermark", i, len(cfg.served_rates), note=f"at {rate:.1%}")
            tag = f"served_watermark_{round(rate * 1000):03d}pm"  # per mille: 005pm = 0.5 %
            served = ServedWatermark(WATERMARK_KEY, rate, classes=10)
            store = EvidenceStore(Path(tmp) / f"{tag}.db")
            gw = Gateway(marked, served=served, evidence=store)
            try:
                honest = Session(gw, "honest", batch=100).query(split.x_test).argmax(axis=1)
                thief = Session(gw, "thief")
                copy = run_art_attack("copycat", thief, split.x_train, budget, epochs=cfg.epochs, seed=7,
                                      soft=False)
                evidence = store.load("thief")[:2]
                x_ans, y_ans = thief.t.arrays()
            finally:
                gw.close()
            torch.manual_seed(1)
            converged = _train(build_mlp(), x_ans, y_ans.argmax(axis=1), CONVERGED_EPOCHS, 1)
            proof = verify_copy(copy.predict, *evidence, classes=10)
            proof_conv = verify_copy(mlp_as_onnx(base, converged), *evidence, classes=10)
            for model in controls:
                check = verify_copy(model, *evidence, classes=10)
                false_claims += int(check.present)
                control_p.append(check.p_value)
            out.update({
                f"{tag}_rate": rate,
                f"{tag}_honest_accuracy_drop": _accuracy_onnx(marked, split.x_test, split.y_test)
                - _rate(honest, split.y_test),
                # the expected honest cost: the share of all 1,797 digits marked
                f"{tag}_marked_fraction_all_digits": float(served.marks(all_digits)[0].mean()),
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
    from edgeshield.watermark import EvidenceStore, ServedWatermark, embed, verify_copy

    cfg = cfg or EvaluationConfig()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
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
        store = gateway.state.served_evidence
        if model is None or store is None:
            return None
        x_ev, y_ev, _, _ = store.load(client)
        return verify_copy(model.predict, x_ev, y_ev, classes=10)  # evidence rows are float32 already

    served = ServedWatermark(WATERMARK_KEY, SERVED_RATE, classes=10)
    tmp = tempfile.TemporaryDirectory(prefix="edgeshield-extraction-")
    sessions: list[dict[str, Any]] = []
    benign: list[dict[str, Any]] = []
    copycat_full: PyTorchClassifier | None = None
    n_attacks = len(cfg.outputs) * len(cfg.attacks) * len(cfg.budgets)
    n_benign = len(cfg.outputs) * len(benign_streams(x_held, cfg.seed)) if cfg.benign else 0
    for out_name in cfg.outputs:
        monitor = build_monitor(split.x_train, x_ood_cal)
        defended = Gateway(marked, outputs=_output_policy(out_name), monitor=monitor,
                           served=served, evidence=EvidenceStore(Path(tmp.name) / f"defended-{out_name}.db"))
        open_ = Gateway(marked, outputs=_output_policy(out_name), served=served,
                        evidence=EvidenceStore(Path(tmp.name) / f"open-{out_name}.db"))
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
            for bname, stream, batch in benign_streams(x_held, cfg.seed):
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
    for name, o in outputs.items():
        flat[f"output_{name}_accuracy"] = o["accuracy"]
        flat[f"output_{name}_accuracy_drop"] = o["accuracy_drop"]
    flat.update(wm)
    flat["evaluation_s"] = time.perf_counter() - started
    return {"sessions": sessions, "benign": benign, "outputs": outputs, "watermark": wm, "flat": flat,
            "protocol_text": protocol_text(cfg)}


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
