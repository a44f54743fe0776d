"""The security middleware every request passes before any handler runs.

In order: the verified client identity (401 without one), its revocation status *now* (401 and the connection
closed once its certificate is revoked, even on a connection opened before), the per-identity connection cap
(503), routing (404 unknown path, 405 wrong method), the security monitor's responses (a blocked or throttled
client, a denied certificate), RBAC (403), the in-flight limits (503), then the body: 413 over the size limit, 408
when it does not arrive in time. Every refusal is an event on the server's stream, and its audit entry is written
before the answer goes out. An exception no handler expected is logged with its traceback, audited as
``server.error`` and answered with a JSON 500; it never escapes to uvicorn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeshield._asgi import BodyTimeout, BodyTooLarge, ClientGone, read_body, send_json
from edgeshield.monitor import SecurityEvent
from edgeshield.server._limits import address_key

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState
    from edgeshield.transport import Identity

log = logging.getLogger("edgeshield.server")

RETRY_AFTER_BUSY_S = 1
# An admin blocked or throttled by a rule can still reach the monitor's admin API and the status page to lift it
# (a denied certificate is refused everywhere: it is treated like a revoked one).
_ADMIN_PATHS = ("/v1/admin/", "/status")


def identity_of(scope: Scope) -> tuple[Identity | None, str]:
    """(verified identity, reason when there is none) from the TLS extension the server put in the scope."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None, "not a TLS connection"
    return tls.get("edgeshield.identity"), tls.get("client_cert_error") or "no client certificate"


async def emit(state: ServerState, kind: str, actor: str, data: dict[str, Any], *, address: str | None = None,
               serial: int | None = None) -> None:
    """Emit a security event; returns once its audit entry is committed (the fsync runs in a worker thread)."""
    await state.events.emit(SecurityEvent(kind, actor, data, address=address, serial=serial))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server's own receive does

    return replayed


class SecurityMiddleware:
    """Authentication, revocation, routing, RBAC, limits, body reading, error containment, metrics."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: Sequence[Route]) -> None:
        from edgeshield.server._limits import InFlight

        self.app, self.state, self.routes = app, state, routes
        self.in_flight = InFlight(state.limits.max_in_flight, state.limits.max_in_flight_per_identity)

    def _route(self, scope: Scope) -> tuple[str | None, set[str]]:
        """(route path when a route takes this method, methods the path takes when only the method is wrong)."""
        allowed: set[str] = set()
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path, allowed
            if match == Match.PARTIAL:
                allowed |= set(getattr(route, "methods", ()) or ())
        return None, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, method = self.state, scope["method"]
        started = time.perf_counter()
        status = {"code": 0}
        label = "unmatched"  # metrics are labelled by route, never by the raw path a client chose

        async def tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        identity, reason = identity_of(scope)
        actor = identity.name if identity is not None else "anonymous"
        client = scope.get("client")
        address = address_key(client) if client else None
        serial = identity.serial if identity is not None else None

        async def refuse(code: int, kind: str, data: dict[str, Any], error: str, *, field: str | None = None,
                         headers: dict[str, str] | None = None) -> None:
            await emit(state, kind, actor, {"status": code, **data}, address=address, serial=serial)
            body: dict[str, Any] = {"error": error}
            if field is not None:
                body["field"] = field
            await send_json(tracking, code, body, headers)

        close = {"connection": "close"}
        busy = {"retry-after": str(RETRY_AFTER_BUSY_S)}
        path = scope["path"]
        slot: str | None = None
        try:
            if state.require_client_cert:
                if identity is None:  # e.g. a session resumed after its certificate was revoked
                    await refuse(401, "auth.failure", {"path": path[:200], "reason": reason},
                                 f"not authenticated: {reason}")
                    return
                problem = state.revocation(identity) if state.revocation is not None else None
                if problem is not None:
                    await refuse(401, "auth.failure", {"path": path[:200], "reason": problem,
                                                       "serial": identity.serial}, f"not authenticated: {problem}",
                                 headers=close)
                    return
                tls = (scope.get("extensions") or {}).get("tls") or {}
                if tls.get("edgeshield.over_cap"):
                    await refuse(503, "server.busy", {"reason": "connections per identity",
                                                      "limit": state.limits.max_connections_per_identity},
                                 "too many connections for this identity", headers={**busy, **close})
                    return
            route, allowed = self._route(scope)
            if route is None:
                if allowed:
                    await refuse(405, "request.method_not_allowed", {"path": path[:200], "method": method[:16]},
                                 f"{method} is not allowed here", headers={"allow": ", ".join(sorted(allowed))})
                else:
                    await refuse(404, "request.not_found", {"path": path[:200], "method": method[:16]},
                                 "no such endpoint")
                return
            label = route
            monitor = state.security_monitor
            answer = monitor.refusal(identity.name if identity is not None else None, serial, address) \
                if monitor is not None else None
            if answer is not None and not (answer.action in ("block", "throttle") and identity is not None
                                           and identity.role == "admin" and route.startswith(_ADMIN_PATHS)):
                await refuse(answer.status, "monitor.refused", {"action": answer.action, "rule": answer.rule,
                                                                "path": route},
                             answer.error, headers={**answer.headers, **(close if answer.close else {})})
                return
            if (state.require_client_cert and identity is not None and state.rbac is not None
                    and not state.rbac.allowed(identity.role, route, method)):
                await refuse(403, "auth.forbidden", {"role": identity.role, "path": route, "method": method,
                                                     "serial": identity.serial},
                             f"role {identity.role!r} may not {method} {route}")
                return
            key = actor  # the identity's name ("anonymous" only where no certificate is required)
            if not self.in_flight.acquire(key):
                await refuse(503, "server.busy", {"reason": "requests in flight", "path": route,
                                                  "in_flight": self.in_flight.count}, "server busy: retry later",
                             headers=busy)
                return
            slot = key
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
                await refuse(413, "request.too_large", {"path": route, "declared": int(declared)},
                             f"request body over {state.max_body_bytes} bytes", headers=close)
                return
            try:
                body = await read_body(receive, state.max_body_bytes, state.limits.body_timeout_s)
            except BodyTooLarge:
                await refuse(413, "request.too_large", {"path": route}, f"request body over {state.max_body_bytes} "
                             "bytes", headers=close)
                return
            except BodyTimeout:
                await refuse(408, "request.timeout", {"path": route, "timeout_s": state.limits.body_timeout_s},
                             "request body too slow", headers=close)
                return
            except ClientGone:
                return
            scope = {**scope, "state": {**(scope.get("state") or {}), "identity": identity}}
            await self.app(scope, _replay(body, receive), tracking)
        except Exception as exc:  # a bug: contain it, leave evidence, answer cleanly
            log.exception("unhandled error on %s %s", method, label)
            try:
                await emit(state, "server.error", actor, {"path": label, "method": method[:16],
                                                         "error": type(exc).__name__}, address=address, serial=serial)
            except Exception:
                log.exception("the server.error audit entry could not be written")
            if not status["code"]:
                await send_json(tracking, 500, {"error": "internal server error"})
        finally:
            if slot is not None:
                self.in_flight.release(slot)
            if state.metrics is not None:
                state.metrics.requests.labels(label, str(status["code"] or 500)).inc()
                state.metrics.latency.labels(label).observe(time.perf_counter() - started)
