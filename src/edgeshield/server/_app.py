"""The ASGI application: authenticated, authorised, validated and audited inference on one protected bundle.

Every request passes :class:`~edgeshield.server._middleware.SecurityMiddleware` first (identity from the verified
TLS client certificate, revocation, routing, RBAC, limits, body). ``/v1/predict`` then parses the body against
the model's input spec with every limit checked before allocation (``_parse``), validates it, runs the extraction
gate, inference, the extraction watch, output hardening and the served watermark, and audits the prediction as
metadata (client, role, SHA-256 of the input bytes, decisions), never the raw input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from edgeshield.errors import EdgeShieldError, InputValidationError, InvalidArgumentError
from edgeshield.server import _openapi
from edgeshield.server._limits import Limits
from edgeshield.server._middleware import SecurityMiddleware, audit
from edgeshield.server._parse import BodyRejected, parse_inputs

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec, RobustModel
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.extraction import OutputPolicy, QueryMonitor, RateLimiter
    from edgeshield.server._rbac import Rbac
    from edgeshield.transport import Identity
    from edgeshield.watermark import EvidenceStore, ServedWatermark

_BLOCKED = "client blocked: its queries look like model extraction"


class AuditSink(Protocol):
    """Where the server's audit entries go (``edgeshield.audit.AuditLog``, which also checkpoints at shutdown)."""

    def append(self, kind: str, actor: str, data: dict[str, Any]) -> object: ...


class ModelSummary(Protocol):
    """What ``/v1/model`` shows of the served bundle: the fields of its ``bundles.Manifest``."""

    @property
    def bundle_id(self) -> str: ...
    @property
    def model_sha256(self) -> str: ...
    @property
    def model_version(self) -> int: ...
    @property
    def created(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("edgeshield_requests", "HTTP requests by route and status", ["path", "status"],
                                registry=self.registry)
        self.decisions = Counter("edgeshield_decisions", "Robust-inference decisions", ["decision"],
                                 registry=self.registry)
        self.latency = Histogram("edgeshield_request_seconds", "Request latency", ["path"], registry=self.registry)
        self.connections_refused = Counter("edgeshield_connections_refused", "Connections refused before or "
                                           "during the TLS handshake, by reason", ["reason"], registry=self.registry)
        self.connections_open = Gauge("edgeshield_connections_open", "Open connections, handshakes included",
                                      registry=self.registry)
        self.busiest_address = Gauge("edgeshield_connections_busiest_address", "Open connections of the client "
                                     "address holding the most", registry=self.registry)
        self.crl_seconds_left = Gauge("edgeshield_crl_seconds_to_next_update", "Seconds until the loaded CRL's "
                                      "nextUpdate (negative: expired)", registry=self.registry)


@dataclass
class ServerState:
    """What the app serves and how it decides; built once at start-up by ``serve``."""

    session: onnxruntime.InferenceSession
    manifest: ModelSummary  # the bundle's Manifest
    rbac: Rbac | None  # None only for the plain benchmark baseline
    audit: AuditSink | None
    spec: InputSpec | None = None  # None: derived from the model's declared input at start-up
    robust: RobustModel | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch: int = 1024
    inference_timeout_s: float = 10.0
    require_client_cert: bool = True
    limits: Limits = field(default_factory=Limits)
    # Why a verified identity must be refused *now* (its certificate revoked since the handshake, or the CRL
    # expired while failing closed), or None; set by ``make_server`` from the live TLS context.
    revocation: Callable[[Identity], str | None] | None = None
    metrics: _Metrics = field(default_factory=_Metrics)
    # callables run at graceful shutdown, before the checkpoint, and after it
    on_shutdown: list[Callable[[], object]] = field(default_factory=list)
    after_shutdown: list[Callable[[], object]] = field(default_factory=list)
    # model-extraction defence (edgeshield.extraction); all optional
    rate_limiter: RateLimiter | None = None  # per-client token buckets, per role; cost = batch size
    monitor: QueryMonitor | None = None  # per-client signals → flag / throttle / degrade / block
    outputs: OutputPolicy | None = None  # for probabilities in answers; None: labels only
    # ownership proof for stolen copies; optional
    served_watermark: ServedWatermark | None = None
    served_evidence: EvidenceStore | None = None  # raw watermarked inputs live here, never in the audit log


class _App(FastAPI):
    """FastAPI whose OpenAPI document also states the mutual-TLS security scheme (built once, then cached)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = _openapi.security(super().openapi())
        return self.openapi_schema


def input_spec_for(session: onnxruntime.InferenceSession, spec: InputSpec | None) -> InputSpec:
    """The spec requests are checked against: the given one, which must fit the model, else the model's own."""
    from edgeshield.adversarial import InputSpec

    model = InputSpec.from_session(session)  # single-input models only, with a supported dtype
    if spec is None:
        return model
    if len(spec.shape) != len(model.shape) or spec.dtype != model.dtype:
        raise InvalidArgumentError(f"the input spec ({spec.dtype} rank {len(spec.shape)}) does not fit the model's "
                                   f"input ({model.dtype} rank {len(model.shape)})")
    for axis, (want, have) in enumerate(zip(spec.shape, model.shape, strict=True)):  # equal ranks: checked
        if have is not None and want != have:
            raise InvalidArgumentError(f"the input spec's axis {axis} is {want}, the model's is fixed at {have}")
    return spec


def create_app(state: ServerState) -> SecurityMiddleware:
    """The FastAPI application for ``state`` (OpenAPI at /openapi.json), behind the security middleware."""
    spec = state.spec = input_spec_for(state.session, state.spec)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # Graceful shutdown: flush pending records, note the shutdown, anchor every entry under a signed checkpoint.
        for hook in state.on_shutdown:
            await asyncio.to_thread(hook)
        if state.audit is not None:
            await audit(state, "server.shutdown", "server", {})
            checkpoint = getattr(state.audit, "checkpoint", None)
            if checkpoint is not None:
                await asyncio.to_thread(checkpoint)
        for hook in state.after_shutdown:  # e.g. publish the shutdown checkpoint to the witness
            await asyncio.to_thread(hook)

    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal server error"}, status_code=500)  # the middleware logs and audits

    app = _App(title="EdgeShield inference server", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  exception_handlers={Exception: internal_error})

    @app.get("/healthz", summary="Liveness", response_model=_openapi.Health, responses=_openapi.COMMON)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="Manifest summary of the served bundle", response_model=_openapi.ModelInfo,
             responses=_openapi.COMMON)
    async def model() -> dict[str, Any]:
        m = state.manifest
        return {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "model_version": m.model_version,
                "created": m.created, "metadata": m.metadata, "detector": state.robust is not None}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_openapi.METRICS)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", summary="Predict a batch (JSON {\"inputs\": [...]} or application/x-npy)",
              response_model=_openapi.Prediction, response_model_exclude_none=True, responses=_openapi.PREDICT,
              openapi_extra=_openapi.predict_request_body(spec, state.max_batch))
    async def predict(request: Request) -> Response:
        identity: Identity | None = request.scope.get("state", {}).get("identity")
        actor = identity.name if identity is not None else "anonymous"
        body = await request.body()
        digest = hashlib.sha256(body).hexdigest()
        try:
            x = parse_inputs(body, request.headers.get("content-type", ""), spec, max_batch=state.max_batch)
            spec.validate(x)
        except (BodyRejected, InputValidationError) as exc:
            status = exc.status if isinstance(exc, BodyRejected) else 422
            field_name = getattr(exc, "field", None)
            await audit(state, "input.rejected", actor, {"input_sha256": digest, "reason": str(exc)[:200],
                                                         "field": field_name, "status": status})
            return JSONResponse({"error": str(exc), "field": field_name}, status_code=status)
        refusal = await _extraction_gate(state, identity, actor, len(x), digest)
        if refusal is not None:
            return refusal
        try:
            result = await asyncio.wait_for(asyncio.to_thread(_infer, state, x), state.inference_timeout_s)
        except TimeoutError:
            await audit(state, "inference.timeout", actor, {"input_sha256": digest,
                                                            "timeout_s": state.inference_timeout_s})
            return JSONResponse({"error": "inference timed out"}, status_code=504)
        except Exception as exc:
            if not isinstance(exc, EdgeShieldError) and not _from_onnxruntime(exc):
                raise
            await audit(state, "input.rejected", actor, {"input_sha256": digest, "reason": str(exc)[:200],
                                                         "field": None, "status": 422})
            return JSONResponse({"error": str(exc), "field": None}, status_code=422)
        refusal = await _watch_extraction(state, identity, actor, x, result, digest)
        if refusal is not None:
            return refusal
        counts = result.get("counts")
        await audit(state, "inference.predict", actor, {"role": getattr(identity, "role", None),
                                                         "input_sha256": digest, "batch": len(x), "decisions": counts})
        if counts and (counts.get("reject") or counts.get("flag")):
            await audit(state, "input.flagged", actor, {"input_sha256": digest, "decisions": counts})
        return JSONResponse(result)

    # Every route of this app is a starlette Route (FastAPI's APIRoute, the OpenAPI document): routed by path.
    return SecurityMiddleware(app, state, [r for r in app.routes if isinstance(r, Route)])


def _from_onnxruntime(exc: Exception) -> bool:
    """ONNX Runtime refused an input that passed the spec (InvalidArgument and kin): the client's input, not a bug."""
    return type(exc).__module__.startswith("onnxruntime")


async def _extraction_gate(state: ServerState, identity: Identity | None, actor: str, batch: int,
                           digest: str) -> JSONResponse | None:
    """Refuse before inference: a client the monitor blocked (403) or one over its rate (429 + Retry-After)."""
    if identity is None:
        return None
    action = state.monitor.action(identity.name) if state.monitor is not None else "allow"
    if action == "block":
        await audit(state, "extraction.blocked", actor, {"input_sha256": digest})
        return JSONResponse({"error": _BLOCKED}, status_code=403)
    role = "throttled" if action == "throttle" else identity.role
    limiter = state.rate_limiter
    if limiter is not None and role in limiter.roles and not limiter.allow(identity.name, role, cost=batch):
        retry = limiter.retry_after(identity.name, role, cost=batch)
        await audit(state, "ratelimit.exceeded", actor, {"role": role, "batch": batch})
        headers = {"retry-after": str(max(1, int(np.ceil(retry))))} if np.isfinite(retry) else {}
        return JSONResponse({"error": "rate limit exceeded"}, status_code=429, headers=headers)
    return None


async def _watch_extraction(state: ServerState, identity: Identity | None, actor: str, x: np.ndarray,
                            result: dict[str, Any], digest: str) -> JSONResponse | None:
    """Feed the monitor, audit its alerts, and harden the answer for the client's current action.

    A batch whose verdict is ``block`` is refused (403) rather than answered: the queries that tripped the alarm
    are exactly the ones an extraction attack wants answered.
    """
    probs = result.pop("_probabilities", None)
    if state.monitor is not None and identity is not None:
        labels = np.array([-1 if p is None else p for p in result.get("predictions", [])]
                          or [-1 if d["prediction"] is None else d["prediction"] for d in result.get("decisions", [])])
        verdict = await asyncio.to_thread(state.monitor.observe, identity.name, x, labels)
        if verdict.action != "allow":
            await audit(state, "extraction.alert", actor,
                         {"action": verdict.action, "reasons": list(verdict.reasons)})
        if verdict.action == "block":
            await audit(state, "extraction.blocked", actor, {"input_sha256": digest})
            return JSONResponse({"error": _BLOCKED}, status_code=403)
        policy = state.monitor.response.output_for(verdict.action) or state.outputs
    else:
        policy = state.outputs
    if state.served_watermark is not None:
        probs = await _serve_watermark(state, state.served_watermark, actor, x, result, probs)
    if probs is not None and policy is not None:
        out = policy.apply(probs)
        result.update({k: np.asarray(v).tolist() for k, v in out.items()} if isinstance(out, dict)
                      else {"probabilities": np.asarray(out).tolist()})
    return None


async def _serve_watermark(state: ServerState, wm: ServedWatermark, actor: str, x: np.ndarray,
                           result: dict[str, Any], probs: np.ndarray | None) -> np.ndarray | None:
    """Answer the keyed fraction of inputs with the watermark label (DAWN); keep the evidence, audit its digests."""
    from edgeshield.watermark import row_digests

    decisions = result.get("decisions")
    raw = result["predictions"] if decisions is None else [d["prediction"] for d in decisions]
    if probs is not None:  # one keyed pass: a marked row's new top-1 is its watermark label
        probs, marked = wm.apply(x, probs)
        labels = probs.argmax(axis=1)
    else:
        labels, marked = wm.relabel(x, np.array([0 if p is None else p for p in raw], dtype=np.int64))
        marked &= np.array([p is not None for p in raw], dtype=bool)  # a rejected input gets no label to mark
    if not marked.any():
        return probs
    for i in np.flatnonzero(marked):
        if decisions is None:
            result["predictions"][i] = int(labels[i])
        else:
            decisions[i]["prediction"] = int(labels[i])
    rows, served = x[marked], labels[marked]
    if state.served_evidence is not None:
        await asyncio.to_thread(state.served_evidence.add, actor, rows, served)
    await audit(state, "watermark.served", actor, {"inputs_sha256": row_digests(rows),
                                                    "labels": served.tolist()})
    return probs


def _infer(state: ServerState, x: np.ndarray) -> dict[str, Any]:
    if state.robust is not None:
        batch = state.robust.decide(x)
        decisions = batch.decisions()
        counts = {k: sum(d.decision == k for d in decisions) for k in ("accept", "flag", "reject")}
        for k, v in counts.items():
            if v:
                state.metrics.decisions.labels(k).inc(v)
        return {"decisions": [d.to_dict() for d in decisions], "counts": counts}
    name = state.session.get_inputs()[0].name
    out = np.asarray(state.session.run(None, {name: x})[0])
    result: dict[str, Any] = {"predictions": out.argmax(axis=-1).tolist() if out.ndim >= 2 else out.tolist()}
    if state.outputs is not None and out.ndim == 2:  # probabilities only when an output policy says how
        from edgeshield.adversarial._detectors import looks_like_probabilities, softmax

        result["_probabilities"] = out if looks_like_probabilities(out) else softmax(out.astype(np.float64))
    return result
