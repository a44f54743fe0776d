"""The predict request path as a list of small stages behind one protocol; the handler only runs the list.

Each stage reads and extends one :class:`RequestContext` and either passes (returns None) or answers the request
itself (a refusal). What a stage sees that matters for security it emits as a typed event on the server's event
stream (``edgeshield.monitor``); the audit log, the metrics and the monitor subscribe there, so no stage writes to
any of them directly, and ``await ctx.emit(...)`` returns only once the audit entry is durable.

:func:`default_pipeline` builds the list from the server's configuration — a stage that is not configured is not in
it — and ``ServerState.pipeline`` may be any other list: adding a stage never means editing the handler.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from fastapi.responses import JSONResponse, Response

from edgeshield.errors import EdgeShieldError, InputValidationError
from edgeshield.monitor import SecurityEvent
from edgeshield.server._parse import BodyRejected, parse_inputs

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec
    from edgeshield.extraction import OutputPolicy
    from edgeshield.server._app import ServerState
    from edgeshield.server._model import ServedModel
    from edgeshield.transport import Identity
    from edgeshield.watermark import ServedWatermark

BLOCKED = "client blocked: its queries look like model extraction"
MAX_SUBJECT_CHARS = 128


@dataclass
class RequestContext:
    """One predict request as it moves through the stages."""

    state: ServerState
    identity: Identity | None
    address: str | None
    headers: dict[str, str]  # lower-cased names
    body: bytes
    digest: str  # SHA-256 of the body: what the audit log records of an input
    x: np.ndarray | None = None  # the parsed, validated batch (snapped to the spec's grid when it has one)
    keys: list[bytes] | None = None  # the batch's canonical input keys (when a monitor or served watermark needs them)
    result: dict[str, Any] = field(default_factory=dict)  # the answer being built
    probabilities: np.ndarray | None = None  # only when an output policy will publish them
    output_policy: OutputPolicy | None = None
    subject_id: str | None = None  # the data subject the request is about (a configured header), if any
    subject: str | None = None  # its pseudonym: what audit entries may hold
    # the model this request is served by, taken once when it starts: a reload swapping ``state.model`` meanwhile
    # never makes one request mix two models (its spec, session, detectors and watermark all come from here)
    model: ServedModel = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.state.model

    @property
    def actor(self) -> str:
        return self.identity.name if self.identity is not None else "anonymous"

    @property
    def batch(self) -> np.ndarray:
        if self.x is None:
            raise RuntimeError("no input parsed yet: a stage runs before the parse stage")
        return self.x

    async def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Emit a security event about this request; returns once its audit entry (if any) is durable."""
        await self.state.events.emit(SecurityEvent(kind, self.actor, data, address=self.address,
                                                   serial=getattr(self.identity, "serial", None)))

    async def refuse(self, status: int, kind: str, data: dict[str, Any], body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> Response:
        await self.emit(kind, data)
        return JSONResponse(body, status_code=status, headers=headers)


class Stage(Protocol):
    """One step of the predict path: pass (None) or answer the request (a refusal)."""

    name: str

    async def run(self, ctx: RequestContext) -> Response | None: ...


class Quarantine:
    """Refuse to serve (503) while the monitor holds the served bundle or detector in quarantine."""

    name = "quarantine"

    async def run(self, ctx: RequestContext) -> Response | None:
        monitor = ctx.state.security_monitor
        reason = monitor.quarantined() if monitor is not None else None
        if reason is None:
            return None
        return await ctx.refuse(503, "monitor.refused", {"action": "quarantine", "status": 503, "reason": reason,
                                                         "target": "file"},
                                {"error": f"model quarantined: {reason}"}, {"retry-after": "60"})


class Licence:
    """Refuse to serve (451) once the licence of the released key this model was opened with has expired."""

    name = "licence"

    async def run(self, ctx: RequestContext) -> Response | None:
        licence = ctx.model.licence
        reason = licence.refusal() if licence is not None else None
        if licence is None or reason is None:
            return None
        from edgeshield.server._licence import expiry_event

        if licence.claim_report():  # audited once, by whoever sees the expiry first
            await ctx.state.events.emit(expiry_event(licence))
        return await ctx.refuse(451, "licence.refused", {"input_sha256": ctx.digest, "bundle_id": licence.bundle_id,
                                                         "status": 451},
                                {"error": reason, "licence": licence.bundle_id})


class Subject:
    """Read the data-subject id from the configured header and keep only its pseudonym for the audit log."""

    name = "subject"

    def __init__(self, header: str) -> None:
        self.header = header.lower()

    async def run(self, ctx: RequestContext) -> Response | None:
        value = ctx.headers.get(self.header)
        if value is None:
            return None
        if not value or len(value) > MAX_SUBJECT_CHARS or not value.isprintable():
            return await ctx.refuse(422, "input.rejected", {"input_sha256": ctx.digest, "reason": "bad subject id",
                                                            "field": "subject", "status": 422},
                                    {"error": f"the {self.header} header must be 1 to {MAX_SUBJECT_CHARS} "
                                              "printable characters", "field": "subject"})
        ctx.subject_id = value
        subjects = ctx.state.subjects
        if subjects is not None:
            ctx.subject = await asyncio.to_thread(subjects.pseudonym, value)
        return None


class Parse:
    """Parse the body against the input spec (every limit before allocation) and validate it: the served model's
    spec, or the one given (a pipeline pinned to one spec). A spec with a quantum refuses values off its grid (beyond
    a strict tolerance) and the batch is snapped to it: the model, the monitor and the watermark see exact grid
    values, one per grid point however a client wrote it."""

    name = "parse"

    def __init__(self, spec: InputSpec | None, max_batch: int) -> None:
        self.spec, self.max_batch = spec, max_batch

    async def run(self, ctx: RequestContext) -> Response | None:
        spec = self.spec or ctx.model.spec
        if spec is None:
            raise RuntimeError("the served model has no input spec: create_app sets it")
        try:
            x = parse_inputs(ctx.body, ctx.headers.get("content-type", ""), spec, max_batch=self.max_batch)
            spec.validate(x)
        except (BodyRejected, InputValidationError) as exc:
            status = exc.status if isinstance(exc, BodyRejected) else 422
            field_name = getattr(exc, "field", None)
            return await ctx.refuse(status, "input.rejected", {"input_sha256": ctx.digest, "reason": str(exc)[:200],
                                                               "field": field_name, "status": status},
                                    {"error": str(exc), "field": field_name})
        ctx.x = spec.snap(x) if spec.quantum is not None else x
        return None


class CanonicalKeys:
    """Compute the batch's canonical input keys once (``state.input_keys``: the grid's, or the leader registry's),
    for every per-input decision after it: the extraction monitor's budgets and the served watermark's units."""

    name = "canonical-keys"

    async def run(self, ctx: RequestContext) -> Response | None:
        keys = ctx.state.input_keys
        if keys is None:
            return None
        try:
            ctx.keys = await asyncio.to_thread(keys.keys, ctx.batch)
        except EdgeShieldError as exc:  # e.g. a non-finite value a spec allowing NaN let through
            return await ctx.refuse(422, "input.rejected", {"input_sha256": ctx.digest, "reason": str(exc)[:200],
                                                            "field": None, "status": 422},
                                    {"error": str(exc), "field": None})
        return None


class ExtractionGate:
    """Before inference: a client the extraction monitor blocked (403), or one over its rate (429)."""

    name = "extraction-gate"

    async def run(self, ctx: RequestContext) -> Response | None:
        state, identity = ctx.state, ctx.identity
        if identity is None:
            return None
        monitor, action = state.monitor, "allow"
        if monitor is not None:  # from memory on the loop; a client not in memory is read from the store off it
            cached = monitor.cached_action(identity.name)
            action = cached if cached is not None else await asyncio.to_thread(monitor.action, identity.name)
        if action == "block":
            return await ctx.refuse(403, "extraction.blocked", {"input_sha256": ctx.digest}, {"error": BLOCKED})
        role = "throttled" if action == "throttle" else identity.role
        limiter, cost = state.rate_limiter, len(ctx.batch)
        if limiter is not None and role in limiter.roles and not limiter.allow(identity.name, role, cost=cost):
            retry = limiter.retry_after(identity.name, role, cost=cost)
            headers = {"retry-after": str(max(1, int(np.ceil(retry))))} if np.isfinite(retry) else {}
            return await ctx.refuse(429, "ratelimit.exceeded", {"role": role, "batch": cost},
                                    {"error": "rate limit exceeded"}, headers)
        return None


class Inference:
    """Run the model (or the robust model with its detectors) in a worker thread, under the inference deadline."""

    name = "inference"

    async def run(self, ctx: RequestContext) -> Response | None:
        state = ctx.state
        try:
            result = await asyncio.wait_for(asyncio.to_thread(infer, state, ctx.batch, ctx.model),
                                            state.inference_timeout_s)
        except TimeoutError:
            await ctx.emit("inference.timeout", {"input_sha256": ctx.digest, "timeout_s": state.inference_timeout_s})
            return JSONResponse({"error": "inference timed out"}, status_code=504)
        except Exception as exc:
            if not isinstance(exc, EdgeShieldError) and not _from_onnxruntime(exc):
                raise
            return await ctx.refuse(422, "input.rejected", {"input_sha256": ctx.digest, "reason": str(exc)[:200],
                                                            "field": None, "status": 422},
                                    {"error": str(exc), "field": None})
        ctx.probabilities = result.pop("_probabilities", None)
        ctx.result = result
        ctx.output_policy = state.outputs
        return None


class ExtractionWatch:
    """Feed the extraction monitor; refuse a batch whose verdict is ``block`` (the queries that tripped the alarm
    are exactly the ones an extraction attack wants answered); pick the output policy for the client's action."""

    name = "extraction-watch"

    async def run(self, ctx: RequestContext) -> Response | None:
        state, identity = ctx.state, ctx.identity
        if state.monitor is None or identity is None:
            return None
        result = ctx.result
        labels = np.array([-1 if p is None else p for p in result.get("predictions", [])]
                          or [-1 if d["prediction"] is None else d["prediction"] for d in result.get("decisions", [])])
        verdict = await asyncio.to_thread(state.monitor.observe, identity.name, ctx.batch, labels, keys=ctx.keys,
                                          group=identity.role or "default")
        if verdict.action != "allow":
            await ctx.emit("extraction.alert", {"action": verdict.action, "reasons": list(verdict.reasons)})
        if verdict.action == "block":
            return await ctx.refuse(403, "extraction.blocked", {"input_sha256": ctx.digest}, {"error": BLOCKED})
        ctx.output_policy = state.monitor.response.output_for(verdict.action) or state.outputs
        return None


class ServedMark:
    """Answer the inputs of a keyed fraction of units with the watermark label (DAWN); keep the evidence with each
    row's unit, emit its digests. Units come from the canonical keys (jittered copies share one decision). The
    watermark is the served model's (its class count), or the one given."""

    name = "served-watermark"

    def __init__(self, watermark: ServedWatermark | None = None) -> None:
        self.watermark = watermark

    async def run(self, ctx: RequestContext) -> Response | None:
        from edgeshield.watermark import row_digests

        wm = self.watermark or ctx.model.served_watermark
        if wm is None:
            return None
        x, result, probs = ctx.batch, ctx.result, ctx.probabilities
        decisions = result.get("decisions")
        raw = result["predictions"] if decisions is None else [d["prediction"] for d in decisions]
        if probs is not None:  # one keyed pass: a marked row's new top-1 is its watermark label
            marks = wm.mark(x, np.asarray(probs).argmax(axis=1), keys=ctx.keys)
            probs = wm.swap_top(probs, marks)
            labels, marked = marks.labels, marks.marked
            ctx.probabilities = probs
        else:
            marks = wm.mark(x, np.array([0 if p is None else p for p in raw], dtype=np.int64), keys=ctx.keys)
            labels = marks.labels
            marked = marks.marked & np.array([p is not None for p in raw], dtype=bool)  # rejected: no label to mark
        if not marked.any():
            return None
        for i in np.flatnonzero(marked):
            if decisions is None:
                result["predictions"][i] = int(labels[i])
            else:
                decisions[i]["prediction"] = int(labels[i])
        rows, served = x[marked], labels[marked]
        evidence = ctx.state.served_evidence
        if evidence is not None:
            units = [marks.units[i] for i in np.flatnonzero(marked)]
            await asyncio.to_thread(evidence.add, ctx.actor, rows, served, subject=ctx.subject_id, units=units)
        data: dict[str, Any] = {"inputs_sha256": row_digests(rows), "labels": served.tolist()}
        if ctx.subject is not None:
            data["subject"] = ctx.subject
        await ctx.emit("watermark.served", data)
        return None


class HardenOutputs:
    """Publish probabilities only as the output policy says (top-k, rounding, noise); labels only without one."""

    name = "harden-outputs"

    async def run(self, ctx: RequestContext) -> Response | None:
        probs, policy = ctx.probabilities, ctx.output_policy
        if probs is not None and policy is not None:
            out = policy.apply(probs)
            ctx.result.update({k: np.asarray(v).tolist() for k, v in out.items()} if isinstance(out, dict)
                              else {"probabilities": np.asarray(out).tolist()})
        return None


class Record:
    """The prediction's audit event (metadata: role, input digest, batch, decisions), and flagged inputs."""

    name = "record"

    async def run(self, ctx: RequestContext) -> Response | None:
        counts = ctx.result.get("counts")
        data: dict[str, Any] = {"role": getattr(ctx.identity, "role", None), "input_sha256": ctx.digest,
                                "batch": len(ctx.batch), "decisions": counts}
        if ctx.subject is not None:
            data["subject"] = ctx.subject
        await ctx.emit("inference.predict", data)
        if counts and (counts.get("reject") or counts.get("flag")):
            await ctx.emit("input.flagged", {"input_sha256": ctx.digest, "decisions": counts})
        return None


def default_pipeline(state: ServerState, spec: InputSpec | None = None) -> list[Stage]:
    """The stages the configuration calls for, in order. Model-bound stages read the request's model (``ctx.model``)
    so a reload needs no new list; a ``spec`` given pins the parse stage to it instead."""
    stages: list[Stage] = []
    if state.security_monitor is not None:
        stages.append(Quarantine())
    stages.append(Licence())  # a no-op for a model without a licence (a reload may bring one)
    if state.subject_header is not None:
        stages.append(Subject(state.subject_header))
    stages += [Parse(spec, state.max_batch)]
    if state.monitor is not None or state.rate_limiter is not None:
        stages.append(ExtractionGate())
    if state.monitor is not None or state.served_watermark is not None:
        stages.append(CanonicalKeys())
    stages.append(Inference())
    if state.monitor is not None:
        stages.append(ExtractionWatch())
    if state.served_watermark is not None:
        stages.append(ServedMark())
    stages += [HardenOutputs(), Record()]
    return stages


MODEL_HEADERS = ("edgeshield-bundle-id", "edgeshield-model-version")  # which model answered a prediction


async def run_pipeline(stages: list[Stage], ctx: RequestContext) -> Response:
    for stage in stages:
        answer = await stage.run(ctx)
        if answer is not None:
            return answer
    m = ctx.model.manifest
    return JSONResponse(ctx.result, headers=dict(zip(MODEL_HEADERS, (m.bundle_id, str(m.model_version)),
                                                     strict=True)))


def _from_onnxruntime(exc: Exception) -> bool:
    """ONNX Runtime refused an input that passed the spec (InvalidArgument and kin): the client's input, not a bug."""
    return type(exc).__module__.startswith("onnxruntime")


def infer(state: ServerState, x: np.ndarray, model: ServedModel | None = None) -> dict[str, Any]:
    """Run the model (the request's; default the current one) on a validated batch: predictions, or the robust
    model's decisions and their counts."""
    served = model if model is not None else state.model
    if served.robust is not None:
        batch = served.robust.decide(x)
        decisions = batch.decisions()
        counts = {k: sum(d.decision == k for d in decisions) for k in ("accept", "flag", "reject")}
        for k, v in counts.items():
            if v:
                state.metrics.decisions.labels(k).inc(v)
        return {"decisions": [d.to_dict() for d in decisions], "counts": counts}
    name = served.session.get_inputs()[0].name
    out = np.asarray(served.session.run(None, {name: x})[0])
    result: dict[str, Any] = {"predictions": out.argmax(axis=-1).tolist() if out.ndim >= 2 else out.tolist()}
    if state.outputs is not None and out.ndim == 2:  # probabilities only when an output policy says how
        from edgeshield.adversarial._detectors import looks_like_probabilities, softmax

        result["_probabilities"] = out if looks_like_probabilities(out) else softmax(out.astype(np.float64))
    return result
