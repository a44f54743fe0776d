"""Put the verified client certificate into the ASGI scope, where uvicorn does not.

uvicorn terminates TLS but never exposes the peer certificate to the application. Its HTTP protocol objects are
created per connection after asyncio has completed the TLS handshake (so the certificate has already been
verified against the CA, the CRL and TLS 1.3 only); these subclasses read it from the transport's SSL object and
publish it through the ASGI TLS extension (``scope["extensions"]["tls"]``, as the ASGI spec defines it) for every
request on that connection.
"""

from __future__ import annotations

import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def tls_extension(transport: Any) -> dict[str, Any] | None:
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
    return {
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_error": error if der else "no client certificate",
        "tls_version": ssl_object.version(),
        "cipher_suite": (ssl_object.cipher() or (None,))[0],
        "edgeshield.identity": identity,
    }


def _wrap(app: Any, tls: dict[str, Any] | None) -> Any:
    async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if tls is not None and scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": tls}}
        await app(scope, receive, send)

    return with_tls


class TlsHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _wrap(self.app, tls_extension(transport))


class TlsH11Protocol(H11Protocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _wrap(self.app, tls_extension(transport))
