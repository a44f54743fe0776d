"""The ASGI application: authenticated, authorised, validated and audited inference on one protected bundle.

Every request passes :class:`~edgeshield.server._middleware.SecurityMiddleware` first (identity from the verified
TLS client certificate, revocation, the monitor's blocks, routing, RBAC, limits, body). ``/v1/predict`` then runs
the request pipeline (``_pipeline``): parse and validate against the model's input spec, the extraction gate,
inference, the extraction watch, the served watermark, output hardening, and the prediction's record. Everything
security-relevant goes onto the server's event stream (``state.events``), to which the audit log (metadata only:
client, role, SHA-256 of the input bytes, decisions — never the raw input), the metrics and the monitor subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor import EventStream
from edgeshield.monitor._subscribers import AuditSubscriber, MetricsSubscriber
from edgeshield.server import _openapi
from edgeshield.server._limits import Limits, address_key
from edgeshield.server._middleware import SecurityMiddleware, emit
from edgeshield.server._pipeline import RequestContext, Stage, default_pipeline, run_pipeline

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec, RobustModel
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.compliance import SubjectKeys
    from edgeshield.extraction import MonitorStore, OutputPolicy, QueryMonitor, RateLimiter
    from edgeshield.extraction._keys import InputKeys
    from edgeshield.monitor import Monitor
    from edgeshield.server._model import ServedModel
    from edgeshield.server._rbac import Rbac
    from edgeshield.transport import Identity
    from edgeshield.watermark import EvidenceStore, ServedWatermark


_T = TypeVar("_T")
log = logging.getLogger("edgeshield.server")


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


class _ModelPart(Generic[_T]):
    """A model-bound attribute of :class:`ServerState` (``state.session`` …): reads the current ``state.model``,
    and a write replaces ``state.model`` with a copy holding the new part. Keeps ``ServerState(session=…,
    manifest=…)`` and ``state.session = …`` working while the model itself is one object swapped whole; code
    serving a request reads ``state.model`` once instead, so it never sees two models."""

    def __init__(self, *, required: bool = False) -> None:
        self.required, self.name = required, ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _T: ...
    @overload
    def __get__(self, obj: ServerState, owner: type | None = None) -> _T: ...

    def __get__(self, obj: ServerState | None, owner: type | None = None) -> _T:
        if obj is None:  # the dataclass asking for a default: a required part has none
            if self.required:
                raise AttributeError(self.name)
            return cast(_T, None)
        model = obj.__dict__.get("model")
        if model is None:  # during __init__, before the parts are assembled
            return cast(_T, obj.__dict__["_parts"][self.name])
        return cast(_T, getattr(model, self.name))

    def __set__(self, obj: ServerState, value: _T) -> None:
        model = obj.__dict__.get("model")
        if model is None:
            obj.__dict__.setdefault("_parts", {})[self.name] = value
        else:
            obj.__dict__["model"] = replace(model, **{self.name: value})


@dataclass(kw_only=True)
class ServerState:
    """What the app serves and how it decides; built once at start-up by ``serve``.

    The model-bound parts (session, manifest, spec, robust model, served watermark, licence) live in ``model``, one
    :class:`~edgeshield.server._model.ServedModel` that a reload replaces whole; ``state.session`` and the other
    parts read (and, before serving starts, write) the current one.
    """

    session: _ModelPart[onnxruntime.InferenceSession] = _ModelPart(required=True)
    manifest: _ModelPart[ModelSummary] = _ModelPart(required=True)  # the bundle's Manifest
    rbac: Rbac | None  # None only for the plain benchmark baseline
    audit: AuditSink | None
    spec: _ModelPart[InputSpec | None] = _ModelPart()  # None: derived from the model's declared input at start-up
    robust: _ModelPart[RobustModel | None] = _ModelPart()
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
    # canonical input keys for every per-input decision (budgets, the served watermark's units); None: derived from
    # the spec at create_app (``keys_for``: the grid's with a quantum, else a leader registry) when one is needed
    input_keys: InputKeys | None = None
    # where the monitor's state and the key registry persist (``serve --extraction-state``); flushed every
    # ``flush_every_s`` on the server's loop and at graceful shutdown
    extraction_store: MonitorStore | None = None
    flush_every_s: float = 30.0
    clock: Callable[[], float] = time.time  # the extraction defence's day-scale clock (tests simulate days)
    outputs: OutputPolicy | None = None  # for probabilities in answers; None: labels only
    # ownership proof for stolen copies; optional
    served_watermark: _ModelPart[ServedWatermark | None] = _ModelPart()
    served_evidence: EvidenceStore | None = None  # raw watermarked inputs live here, never in the audit log
    # operations: the security monitor (rules, responses; edgeshield.monitor) and data subjects
    security_monitor: Monitor | None = None
    subject_header: str | None = None  # the request header naming the data subject a request is about
    subjects: SubjectKeys | None = None  # per-subject pseudonym keys (erasure destroys one)
    compliance_summary: Callable[[], dict[str, Any]] | None = None  # for the status page
    # the request path (None: default_pipeline at create_app) and the event stream every part emits onto
    pipeline: list[Stage] | None = None
    events: EventStream = field(default_factory=EventStream)
    audit_events: AuditSubscriber | None = None  # the stream's audit subscriber (aggregates flushed at shutdown)
    started: float = field(default_factory=time.time)
    # reloading the model (``_reload.Reloader.reload``: SIGHUP and POST /v1/admin/reload); None: not offered
    reload: Callable[[str], dict[str, Any]] | None = None
    # called after every swap with (old, new, by): the file watcher re-baselines on the new model's files
    on_model_swap: list[Callable[[ServedModel, ServedModel, str], None]] = field(default_factory=list)
    model: ServedModel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from edgeshield.server._model import ServedModel

        self.model = ServedModel(**self.__dict__.pop("_parts"))
        if self.metrics is not None:  # None only in the plain benchmark baseline
            self.events.subscribe(MetricsSubscriber(self.metrics.registry))
        if self.audit is not None:
            self.audit_events = AuditSubscriber(self.audit)
            self.events.subscribe(self.audit_events)


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


def flush_extraction_state(state: ServerState) -> None:
    """Write the monitor's changed clients and the key registry to the extraction store (a no-op without one)."""
    store = state.extraction_store
    if store is None:
        return
    if state.monitor is not None and state.monitor.store is not None:
        state.monitor.flush()
    if state.input_keys is not None:
        store.save_keys(state.input_keys)


def _setup_input_keys(state: ServerState, spec: InputSpec) -> None:
    """The canonical keys the monitor and the served watermark share, with the registry the store kept (a
    malformed one stops the start-up: ExtractionStateError naming the row)."""
    if state.input_keys is None and (state.monitor is not None or state.served_watermark is not None):
        from edgeshield.extraction._keys import keys_for

        state.input_keys = keys_for(spec)
        if state.extraction_store is not None:
            state.extraction_store.load_keys(state.input_keys)
    if state.monitor is not None and state.monitor.input_keys is None:
        state.monitor.input_keys = state.input_keys


async def _flush_periodically(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.flush_every_s)
        try:
            await asyncio.to_thread(flush_extraction_state, state)
        except Exception:  # a failed flush is retried next time; the shutdown flush raises
            log.exception("extraction state: periodic flush failed")


def create_app(state: ServerState) -> SecurityMiddleware:
    """The FastAPI application for ``state`` (OpenAPI at /openapi.json), behind the security middleware."""
    spec = state.spec = input_spec_for(state.session, state.spec)
    _setup_input_keys(state, spec)
    pipeline = state.pipeline = state.pipeline if state.pipeline is not None else default_pipeline(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        flusher = asyncio.create_task(_flush_periodically(state)) if state.extraction_store is not None else None
        yield
        if flusher is not None:  # the last flush, before the shutdown hooks close the store
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await asyncio.to_thread(flush_extraction_state, state)
        # Graceful shutdown: flush pending records, note the shutdown, anchor every entry under a signed checkpoint.
        for hook in state.on_shutdown:
            await asyncio.to_thread(hook)
        if state.audit_events is not None:
            await asyncio.to_thread(state.audit_events.stop)  # aggregated counts written before the checkpoint
        if state.audit is not None:
            await emit(state, "server.shutdown", "server", {})
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
        licence = state.model.licence
        if licence is not None and licence.refusal() is not None:  # alive, but predictions answer 451
            return {"status": "licence-expired" if licence.expired is not None else "licence-unverified"}
        return {"status": "ok"}

    @app.get("/v1/model", summary="Manifest summary of the served bundle", response_model=_openapi.ModelInfo,
             responses=_openapi.COMMON)
    async def model() -> dict[str, Any]:
        served = state.model  # once: a reload between two reads must not mix two models' fields
        m = served.manifest
        return {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "model_version": m.model_version,
                "created": m.created, "metadata": m.metadata, "detector": served.robust is not None}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_openapi.METRICS)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", summary="Predict a batch (JSON {\"inputs\": [...]} or application/x-npy)",
              response_model=_openapi.Prediction, response_model_exclude_none=True, responses=_openapi.PREDICT,
              openapi_extra=_openapi.predict_request_body(spec, state.max_batch))
    async def predict(request: Request) -> Response:
        identity: Identity | None = request.scope.get("state", {}).get("identity")
        body = await request.body()
        client = request.scope.get("client")
        ctx = RequestContext(state, identity, address_key(client) if client else None,
                             {k.lower(): v for k, v in request.headers.items()}, body,
                             hashlib.sha256(body).hexdigest())
        return await run_pipeline(pipeline, ctx)

    from edgeshield.server._admin import add_admin_routes
    from edgeshield.server._status import add_status_routes

    add_admin_routes(app, state)
    add_status_routes(app, state)

    # Every route of this app is a starlette Route (FastAPI's APIRoute, the OpenAPI document): routed by path.
    return SecurityMiddleware(app, state, [r for r in app.routes if isinstance(r, Route)])
