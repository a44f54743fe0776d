"""The admin API over the security monitor: what it sees and holds, lift a response, reload the rules.

``GET /v1/admin/monitor`` (the snapshot; ``{"enabled": false}`` when the server runs without a monitor),
``POST /v1/admin/monitor/lift`` (``{"action", "target"}`` → ``{"lifted": bool}``) and
``POST /v1/admin/monitor/reload``. Access is RBAC's: the default policy gives only ``admin`` these paths. Bodies are
validated here (a 422 with ``{error, field}`` for a bad action or target, never a 5xx on client input); the monitor
itself audits what an admin did (``monitor.lifted``, ``monitor.reload``), naming the admin's certificate. Its calls
write SQLite and the audit log, so they run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeshield.errors import EdgeShieldError, InputError
from edgeshield.server import _openapi

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState

MAX_BODY = 4096


class LiftRequest(BaseModel):
    """Lift one response: ``target`` is ``identity:NAME``, ``address:IP`` (an IPv6 /64), ``serial:HEX`` or
    ``file:ROLE`` (bundle, detector)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["block", "throttle", "deny_cert", "quarantine"]
    target: str = Field(min_length=3, max_length=300)


class Lifted(BaseModel):
    lifted: bool


class Reloaded(BaseModel):
    rules: int
    rules_sha256: str
    by: str
    path: str | None


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
    until: float | None
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
    address: str | None
    summary: str


class MonitorStatus(BaseModel):
    """The monitor's snapshot; only ``enabled`` when the server runs without one."""

    enabled: bool
    alerts: list[AlertItem] | None = None
    responses: list[ResponseItem] | None = None
    pending_revocations: list[RevocationItem] | None = None
    rules: list[RuleItem] | None = None
    recent_events: list[EventItem] | None = None
    counters: dict[str, int] | None = None


ADMIN: dict[int | str, dict[str, Any]] = {
    **_openapi.COMMON,
    409: {"model": _openapi.ErrorBody, "description": "No monitor runs, or the rule file (or policy) failed to load; "
                                                      "the old rules stay in force"},
    422: {"model": _openapi.ErrorBody, "description": "The body is not JSON of the documented shape; `field` names "
                                                      "what is wrong"},
}
_LIFT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": LiftRequest.model_json_schema()}}}}


def _error(status: int, error: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "field": field}, status_code=status)


def _by(request: Request) -> str:
    identity = request.scope.get("state", {}).get("identity")
    return str(identity.name) if identity is not None else "anonymous"


def add_admin_routes(app: FastAPI, state: ServerState) -> None:
    """Add the monitor's admin endpoints to ``app`` (before the security middleware collects the routes)."""

    @app.get("/v1/admin/monitor", summary="The security monitor: alerts, responses in force, pending revocations",
             response_model=MonitorStatus, response_model_exclude_none=True, responses=_openapi.COMMON)
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
            req = LiftRequest.model_validate(parsed)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or None
            return _error(422, f"{loc or 'body'}: {first.get('msg', 'invalid')}", loc)
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
