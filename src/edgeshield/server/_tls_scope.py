"""uvicorn's HTTP protocol, once per TLS connection: the verified client certificate in the ASGI scope, and the
limits that only make sense after the handshake.

uvicorn terminates HTTP but never exposes the peer certificate to the application. The protocol object is created
per connection after the listener (``_listener``) has completed the TLS handshake, so the certificate has already
been verified against the CA, the CRL and TLS 1.3 only; this subclass reads it from the transport's SSL object and
publishes it through the ASGI TLS extension (``scope["extensions"]["tls"]``, as the ASGI spec defines it) for every
request on that connection. It also

- counts the connection against its identity; over ``max_connections_per_identity`` the connection is marked and
  every request on it answered 503 by the middleware;
- closes a connection that has not delivered a complete request head within ``request_head_timeout_s`` of
  becoming idle (just opened, or its last response sent): slowloris clients and connections that never send a
  request cannot hold a slot for longer than that;
- gives its slot back to the gate when it closes.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send
    from uvicorn.config import Config
    from uvicorn.server import ServerState as UvicornServerState

    from edgeshield.server._listener import ConnectionGate
    from edgeshield.transport import Identity


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, plus EdgeShield's verified identity (or why there is none).

    ``peer_identity`` re-checks the serial against the server's current CRL: a TLS 1.3 session resumed from a
    ticket issued before a revocation skips certificate verification, and this is what refuses it.
    """
    from edgeshield.errors import EdgeShieldError
    from edgeshield.transport import peer_identity

    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    identity, error = None, None
    if der:
        try:
            identity = peer_identity(ssl_object)
        except EdgeShieldError as exc:
            error = str(exc)
    return scope_extension(der, identity, error, ssl_object.version(), (ssl_object.cipher() or (None,))[0])


def scope_extension(der: bytes | None, identity: Identity | None, error: str | None, tls_version: str | None,
                    cipher_suite: str | None) -> dict[str, Any]:
    """The ASGI TLS extension the middleware reads, the same keys whatever the transport (TCP, HTTP/3, the inner
    request of OHTTP): the peer's certificate (``der``), its verified identity or why there is none."""
    return {
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_error": error if der else "no client certificate",
        "tls_version": tls_version,
        "cipher_suite": cipher_suite,
        "edgeshield.identity": identity,
    }


def _wrap(app: ASGIApp, tls: dict[str, Any] | None) -> ASGIApp:
    async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        if tls is not None and scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": tls}}
        await app(scope, receive, send)

    return with_tls


class TlsHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: UvicornServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, gate: ConnectionGate | None = None,
                 address: str | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.gate, self.address = gate, address
        self.identity: Identity | None = None  # set once counted against the gate
        self._head_timer: asyncio.TimerHandle | None = None

    # asyncio declares BaseTransport; an HTTP protocol always gets a full Transport (uvicorn narrows it alike).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport)
        identity = tls.get("edgeshield.identity") if tls else None
        if self.gate is not None and identity is not None and tls is not None:
            if self.gate.bind(identity.name, self):
                self.identity = identity
            else:
                tls["edgeshield.over_cap"] = True
        self.app = _wrap(self.app, tls)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self.gate is None:
            return
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.gate.limits.request_head_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            if self.gate is not None:
                self.gate.events.refused("request head timeout", self.address)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """httptools refused the request's framing (bad request line, headers or lengths): count it for the audit
        log like the other protocol-level refusals, then answer uvicorn's 400 and close."""
        if self.gate is not None:
            self.gate.events.refused("malformed HTTP request", self.address)
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle again (not closing, nothing pipelined)
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.gate is not None:
            if self.identity is not None:
                self.gate.unbind(self.identity.name, self)
                self.identity = None
            if self.address is not None:
                self.gate.release(self.address)
                self.address = None
        super().connection_lost(exc)
