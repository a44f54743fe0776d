"""The admin API over the security monitor and the served model: what the monitor sees and holds, lift a response,
reload the rules, reload the model.

``GET /v1/admin/monitor`` (the snapshot; ``{"enabled": false}`` when the server runs without a monitor),
``POST /v1/admin/monitor/lift`` (``{"action", "target"}`` → ``{"lifted": bool}``), ``POST /v1/admin/monitor/reload``
and ``POST /v1/admin/reload`` (the served model, ``_reload``: 409 with the reason when refused). Access is RBAC's:
the default policy gives only ``admin`` these paths. Bodies are validated here (a 422 with ``{error, field}`` for a
bad action or target, never a 5xx on client input); the monitor and the reloader audit what an admin did
(``monitor.lifted``, ``monitor.reload``, ``model.reload``), naming the admin's certificate. Their calls write SQLite
and the audit log, so they run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeshield.errors import EdgeShieldError, InputError
from edgeshield.server import _openapi

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState

MAX_BODY = 4096
MAX_TARGET = 300  # what the monitor's check_target accepts

# The target patterns say exactly what the server accepts, so a schema-driven client's valid bodies are the ones it
# takes (each then goes through the monitor's own check_target as well). Plain syntax only: the same pattern is
# read by pydantic-core (Rust regex), by JSON Schema validators (ECMA 262) and by Python's re.
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}(/(3[0-2]|[12]?[0-9]))?"
_H = "[0-9a-fA-F]{1,4}"
_IPV6 = "(" + "|".join((
    f"({_H}:){{7}}{_H}", f"({_H}:){{1,7}}:", f"({_H}:){{1,6}}:{_H}", f"({_H}:){{1,5}}(:{_H}){{1,2}}",
    f"({_H}:){{1,4}}(:{_H}){{1,3}}", f"({_H}:){{1,3}}(:{_H}){{1,4}}", f"({_H}:){{1,2}}(:{_H}){{1,5}}",
    f"{_H}:(:{_H}){{1,6}}", f":((:{_H}){{1,7}}|:)",
)) + ")(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
CLIENT_TARGET = rf"^(identity:[\s\S]+|address:({_IPV4}|{_IPV6}))$"
SERIAL_TARGET = "^serial:(0[xX])?[0-9a-fA-F]{1,64}$"
FILE_TARGET = "^file:(bundle|detector|policy|config|rules)$"
_TARGETS = {"block": "identity:NAME or address:IP (an IPv4 address or IPv6 /64, optionally with a prefix)",
            "throttle": "identity:NAME or address:IP (an IPv4 address or IPv6 /64, optionally with a prefix)",
            "deny_cert": "serial:HEX (the certificate serial in hexadecimal)",
            "quarantine": "file:ROLE (bundle, detector, policy, config or rules)"}


class _Lift(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LiftClient(_Lift):
    """Lift a block or throttle of a client identity or address."""

    action: Literal["block", "throttle"]
    target: str = Field(pattern=CLIENT_TARGET, max_length=MAX_TARGET, description=_TARGETS["block"])


class LiftDenial(_Lift):
    """Lift a certificate denial (and withdraw its pending revocation request)."""

    action: Literal["deny_cert"]
    target: str = Field(pattern=SERIAL_TARGET, max_length=MAX_TARGET, description=_TARGETS["deny_cert"])


class LiftQuarantine(_Lift):
    """Release a quarantined bundle or detector."""

    action: Literal["quarantine"]
    target: str = Field(pattern=FILE_TARGET, max_length=MAX_TARGET, description=_TARGETS["quarantine"])


LiftRequest: TypeAdapter[LiftClient | LiftDenial | LiftQuarantine] = TypeAdapter(
    Annotated[LiftClient | LiftDenial | LiftQuarantine, Field(discriminator="action")])


class Lifted(BaseModel):
    lifted: bool


class ModelState(BaseModel):
    bundle_id: str
    model_sha256: str
    model_version: int
    slot: str | None  # the update slot served (``--update-dir``), else None


class ModelReloaded(BaseModel):
    by: str
    old: ModelState
    new: ModelState


class Reloaded(BaseModel):
    rules: int
    rules_sha256: str
    by: str
    path: str | None


# The snapshot's items, field for field as Monitor.snapshot() builds them (None where it can be None).
class AlertItem(BaseModel):
    ts: float
    rule: str
    severity: str
    key: str
    count: int
    output: str
    tags: list[str]


class ResponseItem(BaseModel):
    action: str
    target: str
    rule: str
    since: float
    until: float | None  # None: until an admin lifts it
    reason: str


class RevocationItem(BaseModel):
    serial: str
    identity: str
    rule: str
    since: float


class RuleItem(BaseModel):
    name: str
    severity: str
    enabled: bool
    responses: list[str]


class EventItem(BaseModel):
    ts: float
    kind: str
    actor: str
    address: str | None  # None for the server's own and the watchers' events
    summary: str


class MonitorStatus(BaseModel):
    """The monitor's snapshot; only ``enabled`` (false) when the server runs without one."""

    enabled: bool
    alerts: list[AlertItem] = Field(default_factory=list)
    responses: list[ResponseItem] = Field(default_factory=list)
    pending_revocations: list[RevocationItem] = Field(default_factory=list)
    rules: list[RuleItem] = Field(default_factory=list)
    recent_events: list[EventItem] = Field(default_factory=list)
    counters: dict[str, int] = Field(default_factory=dict)


RELOAD: dict[int | str, dict[str, Any]] = {
    **_openapi.COMMON,
    409: {"model": _openapi.ErrorBody, "description": "The model was not reloaded (not verified, below the floor, "
                                                      "an older version, no current slot, or reload not offered); "
                                                      "`field` is the reason and the old model keeps serving"},
}
ADMIN: dict[int | str, dict[str, Any]] = {
    **_openapi.COMMON,
    409: {"model": _openapi.ErrorBody, "description": "No monitor runs, or the rule file (or policy) failed to load; "
                                                      "the old rules stay in force"},
    422: {"model": _openapi.ErrorBody, "description": "The body is not JSON of the documented shape; `field` names "
                                                      "what is wrong"},
}
# Inline (no $ref into a $defs the OpenAPI document does not have): one object per action, told apart by `action`.
_LIFT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "title": "LiftRequest", "oneOf": [m.model_json_schema() for m in (LiftClient, LiftDenial, LiftQuarantine)]}}}}}


def _error(status: int, error: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "field": field}, status_code=status)


def _invalid(exc: ValidationError, parsed: Any) -> JSONResponse:
    """A 422 naming the field at fault, in words rather than the pattern."""
    first = exc.errors()[0]
    kind, loc = first["type"], [str(p) for p in first.get("loc", ())]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _error(422, f"action must be one of {', '.join(_TARGETS)}", "action")
    if kind == "model_type" or (kind == "model_attributes_type" and not loc):
        return _error(422, "the body must be a JSON object: {\"action\": ..., \"target\": ...}")
    field = loc[-1] if loc else None  # loc is (tag, field) in a tagged union
    if field == "target" and kind in ("string_pattern_mismatch", "string_too_long"):
        action = parsed.get("action") if isinstance(parsed, dict) else None
        return _error(422, f"a {action} target is {_TARGETS.get(str(action), 'KIND:VALUE')}"
                           f"{f' of at most {MAX_TARGET} characters' if kind == 'string_too_long' else ''}", field)
    return _error(422, f"{field or 'body'}: {first.get('msg', 'invalid')}", field)


def _by(request: Request) -> str:
    identity = request.scope.get("state", {}).get("identity")
    return str(identity.name) if identity is not None else "anonymous"


def add_admin_routes(app: FastAPI, state: ServerState) -> None:
    """Add the monitor's admin endpoints to ``app`` (before the security middleware collects the routes)."""

    @app.get("/v1/admin/monitor", summary="The security monitor: alerts, responses in force, pending revocations",
             response_model=MonitorStatus, response_model_exclude_unset=True, responses=_openapi.COMMON)
    async def monitor_status() -> dict[str, Any]:
        mon = state.security_monitor
        if mon is None:
            return {"enabled": False}
        return {"enabled": True, **await asyncio.to_thread(mon.snapshot)}

    @app.post("/v1/admin/monitor/lift", summary="Lift a block, throttle, certificate denial or quarantine",
              response_model=Lifted, responses=ADMIN, openapi_extra=_LIFT_BODY)
    async def monitor_lift(request: Request) -> Any:
        mon = state.security_monitor
        if mon is None:
            return _error(409, "the security monitor is not enabled on this server")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(422, f"body over {MAX_BODY} bytes")
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return _error(422, "the body must be JSON: {\"action\": ..., \"target\": ...}")
        try:
            req = LiftRequest.validate_python(parsed)
        except ValidationError as exc:
            return _invalid(exc, parsed)
        try:
            lifted = await asyncio.to_thread(mon.lift, req.action, req.target, _by(request))
        except InputError as exc:
            return _error(422, str(exc), "target")
        return {"lifted": lifted}

    @app.post("/v1/admin/monitor/reload", summary="Re-read the rule file (validated first) and the RBAC policy",
              response_model=Reloaded, responses=ADMIN)
    async def monitor_reload(request: Request) -> Any:
        mon = state.security_monitor
        if mon is None:
            return _error(409, "the security monitor is not enabled on this server")
        try:
            return await asyncio.to_thread(mon.reload, _by(request))
        except EdgeShieldError as exc:  # a bad rule file or policy: the old ones stay in force
            return _error(409, " ".join(str(exc).split())[:500])

    @app.post("/v1/admin/reload", summary="Reload the served model: verified and opened first, then swapped whole",
              response_model=ModelReloaded, responses=RELOAD)
    async def model_reload(request: Request) -> Any:
        reload = state.reload
        if reload is None:
            return _error(409, "this server does not reload its model", "not-offered")
        from edgeshield.server._reload import reason_of

        try:
            return await asyncio.to_thread(reload, _by(request))
        except EdgeShieldError as exc:  # audited as model.reload_failed; the old model keeps serving
            return _error(409, " ".join(str(exc).split())[:500], reason_of(exc))
