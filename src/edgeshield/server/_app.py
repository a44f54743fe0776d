"""The ASGI application: authenticated, authorised, validated and audited inference on one protected bundle.

Every request passes the security middleware first: the client identity comes only from the TLS client
certificate the server verified (``scope["extensions"]["tls"]``), the RBAC policy decides per role, path and
method, bodies are size-limited, and every refusal is written to the audit log before the answer goes out.
Predictions are audited as metadata (client, role, SHA-256 of the input bytes, decisions), never the raw input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edgeshield.errors import EdgeShieldError, InputValidationError

log = logging.getLogger("edgeshield.server")
_BLOCKED = "client blocked: its queries look like model extraction"


class AuditSink(Protocol):
    def append(self, kind: str, actor: str, data: dict[str, Any]) -> Any: ...


@dataclass
class ServerState:
    """What the app serves and how it decides; built once at start-up by ``serve``."""

    session: Any
    manifest: Any
    rbac: Any | None  # edgeshield.server._rbac.Rbac; None only for the plain benchmark baseline
    audit: AuditSink | None
    spec: Any | None = None  # InputSpec
    robust: Any | None = None  # RobustModel
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch: int = 1024
    inference_timeout_s: float = 10.0
    require_client_cert: bool = True
    metrics: Any = field(default=None)
    on_shutdown: list[Any] = field(default_factory=list)  # callables run at graceful shutdown, before the checkpoint
    # model-extraction defence (edgeshield.extraction); all optional
    rate_limiter: Any | None = None  # RateLimiter: per-client token buckets, per role; cost = batch size
    monitor: Any | None = None  # QueryMonitor: per-client signals → flag / throttle / degrade / block
    outputs: Any | None = None  # OutputPolicy for probabilities in answers; None: labels only
    # ownership proof for stolen copies (edgeshield.watermark.ServedWatermark + EvidenceStore); optional
    served_watermark: Any | None = None
    served_evidence: Any | None = None  # raw watermarked inputs live here, never in the audit log


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("edgeshield_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.decisions = Counter("edgeshield_decisions", "Robust-inference decisions", ["decision"],
                                 registry=self.registry)
        self.latency = Histogram("edgeshield_request_seconds", "Request latency", ["path"], registry=self.registry)


def _identity(scope: dict[str, Any]) -> tuple[Any | None, str]:
    """(verified identity, reason when there is none) from the TLS extension the server put in the scope."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None, "not a TLS connection"
    return tls.get("edgeshield.identity"), tls.get("client_cert_error") or "no client certificate"


async def _audit(state: ServerState, kind: str, actor: str, data: dict[str, Any]) -> None:
    """Commit an audit entry before the response is sent (SQLite FULL sync runs in a worker thread)."""
    if state.audit is not None:
        await asyncio.to_thread(state.audit.append, kind, actor, data)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class SecurityMiddleware:
    """Authentication (verified client certificate), RBAC, body-size limit, metrics — before any handler runs."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, path, method = self.state, scope["path"], scope["method"]
        started = time.perf_counter()
        status_box = {"status": 500}

        async def send_tracking(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            identity, reason = _identity(scope)
            if state.require_client_cert:
                if identity is None:  # e.g. a session resumed after its certificate was revoked
                    await _audit(state, "auth.failure", "anonymous", {"path": path, "reason": reason})
                    await _send_json(send_tracking, 401, {"error": f"not authenticated: {reason}"})
                    return
                if state.rbac is not None and not state.rbac.allowed(identity.role, path, method):
                    await _audit(state, "auth.forbidden", identity.name,
                                 {"role": identity.role, "path": path, "method": method, "serial": identity.serial})
                    await _send_json(send_tracking, 403, {"error": f"role {identity.role!r} may not {method} {path}"})
                    return
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
                await _send_json(send_tracking, 413, {"error": f"request body over {state.max_body_bytes} bytes"})
                return
            scope = {**scope, "state": {**(scope.get("state") or {}), "identity": identity}}
            await self.app(scope, _limited(receive, state.max_body_bytes), send_tracking)
        finally:
            if state.metrics is not None:
                state.metrics.requests.labels(path, str(status_box["status"])).inc()
                state.metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyTooLarge(Exception):
    pass


def _limited(receive: Any, limit: int) -> Any:
    seen = {"n": 0}

    async def wrapped() -> dict[str, Any]:
        message = await receive()
        if message["type"] == "http.request":
            seen["n"] += len(message.get("body", b""))
            if seen["n"] > limit:
                raise BodyTooLarge
        return message

    return wrapped


def _parse_inputs(body: bytes, content_type: str, spec: Any) -> np.ndarray:
    if content_type.startswith("application/x-npy"):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"body is not a .npy array: {exc}") from None
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise ValueError('JSON body must be an object with "inputs"')
    dtype = spec.dtype if spec is not None else "float32"
    try:
        return np.asarray(doc["inputs"], dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"inputs are not a numeric array: {exc}") from None


def create_app(state: ServerState) -> Any:
    """The FastAPI application for ``state`` (OpenAPI at /openapi.json)."""
    if state.metrics is None:
        state.metrics = _Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        # Graceful shutdown: flush pending records, note the shutdown, anchor every entry under a signed checkpoint.
        for hook in state.on_shutdown:
            await asyncio.to_thread(hook)
        if state.audit is not None:
            await _audit(state, "server.shutdown", "server", {})
            checkpoint = getattr(state.audit, "checkpoint", None)
            if checkpoint is not None:
                await asyncio.to_thread(checkpoint)

    app = FastAPI(title="EdgeShield inference server", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="Manifest summary of the served bundle")
    async def model() -> dict[str, Any]:
        m = state.manifest
        return {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "model_version": m.model_version,
                "created": m.created, "metadata": m.metadata, "detector": state.robust is not None}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", summary="Predict a batch (JSON {\"inputs\": [...]} or application/x-npy)")
    async def predict(request: Request) -> JSONResponse:
        identity = request.scope.get("state", {}).get("identity")
        actor = identity.name if identity is not None else "anonymous"
        try:
            body = await request.body()
        except BodyTooLarge:
            return JSONResponse({"error": f"request body over {state.max_body_bytes} bytes"}, status_code=413)
        digest = hashlib.sha256(body).hexdigest()
        try:
            x = _parse_inputs(body, request.headers.get("content-type", ""), state.spec)
            if state.spec is not None:
                state.spec.validate(x)
            if x.ndim == 0 or len(x) > state.max_batch:
                raise ValueError(f"batch must have between 1 and {state.max_batch} inputs")
        except (ValueError, InputValidationError) as exc:
            field_name = getattr(exc, "field", None)
            await _audit(state, "input.rejected", actor, {"input_sha256": digest, "reason": str(exc)[:200],
                                                         "field": field_name})
            return JSONResponse({"error": str(exc), "field": field_name}, status_code=422)
        refusal = await _extraction_gate(state, identity, actor, len(x), digest)
        if refusal is not None:
            return refusal
        try:
            result = await asyncio.wait_for(asyncio.to_thread(_infer, state, x), state.inference_timeout_s)
        except TimeoutError:
            await _audit(state, "inference.timeout", actor, {"input_sha256": digest})
            return JSONResponse({"error": "inference timed out"}, status_code=504)
        except EdgeShieldError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        refusal = await _watch_extraction(state, identity, actor, x, result, digest)
        if refusal is not None:
            return refusal
        counts = result.get("counts")
        await _audit(state, "inference.predict", actor, {"role": getattr(identity, "role", None), "input_sha256": digest,
                                               "batch": int(len(x)), "decisions": counts})
        if counts and (counts.get("reject") or counts.get("flag")):
            await _audit(state, "input.flagged", actor, {"input_sha256": digest, "decisions": counts})
        return JSONResponse(result)

    return SecurityMiddleware(app, state)


async def _extraction_gate(state: ServerState, identity: Any, actor: str, batch: int, digest: str) -> Any:
    """Refuse before inference: a client the monitor blocked (403) or one over its rate (429 + Retry-After)."""
    if identity is None:
        return None
    action = state.monitor.action(identity.name) if state.monitor is not None else "allow"
    if action == "block":
        await _audit(state, "extraction.blocked", actor, {"input_sha256": digest})
        return JSONResponse({"error": _BLOCKED}, status_code=403)
    role = "throttled" if action == "throttle" else identity.role
    limiter = state.rate_limiter
    if limiter is not None and role in limiter.roles and not limiter.allow(identity.name, role, cost=batch):
        retry = limiter.retry_after(identity.name, role, cost=batch)
        await _audit(state, "ratelimit.exceeded", actor, {"role": role, "batch": batch})
        headers = {"retry-after": str(max(1, int(np.ceil(retry))))} if np.isfinite(retry) else {}
        return JSONResponse({"error": "rate limit exceeded"}, status_code=429, headers=headers)
    return None


async def _watch_extraction(state: ServerState, identity: Any, actor: str, x: np.ndarray,
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
            await _audit(state, "extraction.alert", actor,
                         {"action": verdict.action, "reasons": list(verdict.reasons)})
        if verdict.action == "block":
            await _audit(state, "extraction.blocked", actor, {"input_sha256": digest})
            return JSONResponse({"error": _BLOCKED}, status_code=403)
        policy = state.monitor.response.output_for(verdict.action) or state.outputs
    else:
        policy = state.outputs
    if state.served_watermark is not None:
        probs = await _serve_watermark(state, actor, x, result, probs)
    if probs is not None and policy is not None:
        out = policy.apply(probs)
        result.update({k: np.asarray(v).tolist() for k, v in out.items()} if isinstance(out, dict)
                      else {"probabilities": np.asarray(out).tolist()})
    return None


async def _serve_watermark(state: ServerState, actor: str, x: np.ndarray, result: dict[str, Any],
                           probs: np.ndarray | None) -> np.ndarray | None:
    """Answer the keyed fraction of inputs with the watermark label (DAWN); keep the evidence, audit its digests."""
    from edgeshield.watermark import row_digests

    wm = state.served_watermark
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
    await _audit(state, "watermark.served", actor, {"inputs_sha256": row_digests(rows),
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
