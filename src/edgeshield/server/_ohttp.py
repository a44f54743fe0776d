"""The Oblivious HTTP gateway (RFC 9458) in front of the server's own app.

``GET /.well-known/ohttp-gateway`` (RFC 9540's name) answers the key configurations (``application/ohttp-keys``)
with ``edgeshield-ohttp-keys-signature`` (base64: the server's TLS key over them, domain-separated) and
``edgeshield-ohttp-gateway-cert`` (base64 DER: the certificate to check it with, issued by the CA clients pin).
``POST /.well-known/ohttp-gateway``, or ``POST /v1/predict`` with ``content-type: message/ohttp-req``, is the
gateway: it decapsulates, checks the client assertion inside (certificate from our CA, live CRL, signature bound
to this encapsulation, time window, replay), then runs the inner request through the same app (security
middleware, routes, pipeline, audit) under the *inner* identity, and encapsulates the inner answer.

Who may reach it at all is decided on the outer TLS identity by RBAC, as the path ``/.well-known/ohttp-gateway``
(the default policy lets ``relay``, ``client`` and ``operator`` roles do so). What the gateway itself refuses
(malformed, unknown key, suite, tag, identity, replay, size) is answered in the clear with a 4xx and an event
of the server's kind for that status (``auth.failure``, ``request.too_large``, ``input.rejected`` ...) whose data
says ``transport: "ohttp"``; what the inner app answers (422, 403, 429, ...) travels encapsulated.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeshield._asgi import BodyTimeout, BodyTooLarge, ClientGone, read_body, send_json
from edgeshield.server._limits import address_key
from edgeshield.server._middleware import emit, identity_of

if TYPE_CHECKING:
    from cryptography import x509

    from edgeshield.server._app import ServerState
    from edgeshield.transport._ohttp import KeyPair, ReplayGuard

log = logging.getLogger("edgeshield.server")
GATEWAY_PATH = "/.well-known/ohttp-gateway"
_PREDICT = "/v1/predict"
_STRIP = (b"content-length", b"host", b"transfer-encoding", b"connection")

# The gateway's refusals use the server's existing event kinds, by status, with ``transport: "ohttp"`` in their data
# (and the encapsulated body's SHA-256 as ``input_sha256``: it matches the relay's record of the same bytes).
_KIND_BY_STATUS = {401: "auth.failure", 403: "auth.forbidden", 408: "request.timeout", 413: "request.too_large"}


class OhttpGateway:
    """ASGI wrapper: OHTTP requests are opened here and handed to ``app``; everything else goes straight on."""

    def __init__(self, app: ASGIApp, state: ServerState, keys: list[KeyPair], cas: list[x509.Certificate],
                 signing_key: Any, cert_der: bytes, guard: ReplayGuard, *, max_bytes: int | None = None) -> None:
        from edgeshield.transport._ohttp import encode_key_configs, sign_key_configs

        self.app, self.state, self.keys, self.cas, self.guard = app, state, keys, cas, guard
        self.max_bytes = max_bytes if max_bytes is not None else state.max_body_bytes + 64 * 1024
        self.key_configs = encode_key_configs(k.config for k in keys)
        self.key_headers = {
            "cache-control": "max-age=300",
            "edgeshield-ohttp-keys-signature": base64.b64encode(sign_key_configs(self.key_configs, signing_key))
            .decode(), "edgeshield-ohttp-gateway-cert": base64.b64encode(cert_der).decode()}
        self.accepted = 0  # inner requests handed to the app (tests count replays with it)

    def _is_ohttp(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        path = scope["path"]
        if path == GATEWAY_PATH:
            return True
        if path == _PREDICT and scope["method"] == "POST":
            ctype: bytes = dict(scope.get("headers") or []).get(b"content-type", b"")
            return ctype.split(b";")[0].strip().lower() == b"message/ohttp-req"
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._is_ohttp(scope):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 0}

        async def tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, tracking)
        except Exception as exc:  # a bug: contain it like the middleware does
            log.exception("unhandled error in the OHTTP gateway")
            try:
                await emit(self.state, "server.error", "ohttp-gateway", {"path": GATEWAY_PATH,
                                                                         "error": type(exc).__name__})
            except Exception:
                log.exception("the server.error audit entry could not be written")
            if not status["code"]:
                await send_json(tracking, 500, {"error": "internal server error"})
        finally:
            metrics = self.state.metrics
            if metrics is not None:
                metrics.requests.labels(GATEWAY_PATH, str(status["code"] or 500)).inc()
                metrics.latency.labels(GATEWAY_PATH).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        from edgeshield.errors import EdgeShieldError
        from edgeshield.transport import _ohttp as o

        state, method = self.state, scope["method"]
        outer, reason = identity_of(scope)
        actor = outer.name if outer is not None else "anonymous"
        client = scope.get("client")
        address = address_key(client) if client else None

        async def refuse(code: int, why: str, error: str, *, kind: str | None = None, who: Any = outer,
                         **data: Any) -> None:
            """Audit and answer a refusal. ``who``: the identity it is charged to (its name and serial feed the
            monitor's per-actor and per-certificate rules): the relay for what the relay itself sent or did, never
            for a client's bad assertion (one client must not get its relay's certificate denied)."""
            await emit(state, kind or _KIND_BY_STATUS.get(code, "input.rejected"),
                       who.name if who is not None else "anonymous",
                       {"status": code, "reason": why, "path": GATEWAY_PATH, "method": method[:16],
                        "transport": "ohttp", "relay": actor, **data},
                       address=address, serial=who.serial if who is not None else None)
            await send_json(send, code, {"error": error})

        if state.require_client_cert:
            if outer is None:
                await refuse(401, "not authenticated", f"not authenticated: {reason}")
                return
            problem = state.revocation(outer) if state.revocation is not None else None
            if problem is not None:
                await refuse(401, "revoked", f"not authenticated: {problem}")
                return
            if state.rbac is not None and not state.rbac.allowed(outer.role, GATEWAY_PATH, method):
                await refuse(403, "forbidden", f"role {outer.role!r} may not {method} {GATEWAY_PATH}")
                return
        if method == "GET" and scope["path"] == GATEWAY_PATH:
            headers = [(b"content-type", o.KEYS_TYPE.encode()),
                       (b"content-length", str(len(self.key_configs)).encode())]
            headers += [(k.encode(), v.encode()) for k, v in self.key_headers.items()]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.key_configs})
            return
        if method != "POST":
            await send_json(send, 405, {"error": f"{method} is not allowed here"}, {"allow": "GET, POST"})
            return
        raw_headers = dict(scope.get("headers") or [])
        if raw_headers.get(b"content-type", b"").split(b";")[0].strip().lower() != o.REQUEST_TYPE.encode():
            await refuse(415, "content type", f"the gateway takes {o.REQUEST_TYPE}")
            return
        declared = raw_headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await refuse(413, "too large", f"encapsulated request over {self.max_bytes} bytes", declared=int(declared))
            return
        try:
            body = await read_body(receive, self.max_bytes, state.limits.body_timeout_s)
        except BodyTooLarge:
            await refuse(413, "too large", f"encapsulated request over {self.max_bytes} bytes")
            return
        except BodyTimeout:
            await refuse(408, "timeout", "request body too slow")
            return
        except ClientGone:
            return
        try:
            plain, receiver = o.decapsulate_request(self.keys, body, max_bytes=self.max_bytes)
            inner = o.BhttpRequest.parse(plain, o.BhttpLimits(max_content_bytes=state.max_body_bytes))
            identity, ts = o.verify_assertion(inner, receiver.enc, self.cas)
            problem = state.revocation(identity) if state.revocation is not None else None
            if problem is not None:  # a verified signature by a revoked certificate: charged to that certificate
                await refuse(401, f"inner client: {problem}", f"not authenticated: {problem}", kind="auth.failure",
                             who=identity, input_sha256=hashlib.sha256(body).hexdigest())
                return
            if inner.path.split(b"?")[0] == GATEWAY_PATH.encode() or \
                    (inner.header(b"content-type") or b"").startswith(o.REQUEST_TYPE.encode()):
                raise o.OhttpMalformedError("an encapsulated request inside an encapsulated request")
            self.guard.check(receiver.enc, ts)
        except o.OhttpIdentityError as exc:  # a client's assertion (forged, stale, foreign): not the relay's failure
            await refuse(exc.status, f"{type(exc).__name__}: {exc}", str(exc), kind="input.rejected",
                         bytes=len(body), input_sha256=hashlib.sha256(body).hexdigest())
            return
        except o.OhttpError as exc:
            await refuse(exc.status, f"{type(exc).__name__}: {exc}", str(exc), bytes=len(body),
                         input_sha256=hashlib.sha256(body).hexdigest())
            return
        except EdgeShieldError as exc:  # e.g. the ohttp extra missing: a refusal, named
            await refuse(400, type(exc).__name__, str(exc))
            return
        self.accepted += 1
        response = await self._inner(scope, inner, identity, outer, receive)
        sealed = receiver.seal_response(response.encode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", o.RESPONSE_TYPE.encode()),
                                (b"content-length", str(len(sealed)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": sealed})

    async def _inner(self, scope: Scope, inner: Any, identity: Any, outer: Any, receive: Receive) -> Any:
        """Run the decapsulated request through the app with the inner identity; collect its answer."""
        from edgeshield.transport import _ohttp as o

        path, _, query = inner.path.partition(b"?")
        skip = (*_STRIP, o.CERT_HEADER, o.TIME_HEADER, o.SIGNATURE_HEADER)
        headers = [(n, v) for n, v in inner.headers if n not in skip]
        headers.append((b"content-length", str(len(inner.content)).encode()))
        outer_tls = (scope.get("extensions") or {}).get("tls") or {}
        tls = {"client_cert_chain": [], "client_cert_error": None, "tls_version": outer_tls.get("tls_version"),
               "cipher_suite": outer_tls.get("cipher_suite"), "edgeshield.identity": identity,
               "edgeshield.ohttp": {"relay": outer.name if outer is not None else None}}
        inner_scope = {**scope, "method": inner.method.decode(), "path": path.decode("ascii"), "raw_path": path,
                       "query_string": query, "headers": headers, "extensions": {**(scope.get("extensions") or {}),
                                                                               "tls": tls}}
        sent = False

        async def inner_receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": inner.content, "more_body": False}
            return await receive()

        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def inner_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner_scope, inner_receive, inner_send)
        fields = tuple((bytes(n).lower(), bytes(v)) for n, v in start.get("headers", ())
                       if bytes(n).lower() not in (b"content-length", b"connection"))
        return o.BhttpResponse(int(start.get("status", 500)), fields, b"".join(chunks))


def gateway_for(app: ASGIApp, state: ServerState, *, ca: Any, cert: Any, key: Any, passphrase: bytes | None,
                key_path: Any, window_s: float = 30.0) -> OhttpGateway:
    """The gateway for ``serve --ohttp``: its key pair loaded from ``key_path`` (created 0600 if missing), signed
    with the server's TLS key, its replay window anchored at the server's start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from edgeshield.transport._ohttp import KeyPair, ReplayGuard, _hpke, load_cas, load_signing_key

    _hpke()  # the extra is there, or the start-up stops here naming it
    pair = KeyPair.load_or_create(key_path)
    cert_der = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(serialization.Encoding.DER)
    return OhttpGateway(app, state, [pair], load_cas(ca), load_signing_key(key, passphrase), cert_der,
                        ReplayGuard(window_s=window_s, started=state.started))
