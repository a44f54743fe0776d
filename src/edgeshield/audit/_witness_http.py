"""The witness over HTTPS: the C2SP tlog-witness endpoints on the standard library's threaded HTTP server.

- ``POST /add-checkpoint`` (submission prefix ``/``) and ``GET /<hex SHA-256 of origin>/checkpoint`` (the spec's
  monitor retrieval, monitoring prefix ``/``); everything else is 404, other methods 405.
- TLS 1.3 only, the handshake done in the connection's own thread under the same timeout as every read, so a peer
  that never finishes it holds one thread for ``timeout`` seconds and no more; optionally client certificates
  (e.g. from the device PKI in ``edgeshield.transport``).
- Bodies need a ``Content-Length`` of at most 16 KiB; at most ``max_connections`` connections at once (more are
  closed at accept). A request that fails a check gets a 4xx with a one-line reason; the only 5xx is 503 when the
  store is busy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgeshield._io import check_readable_file
from edgeshield.audit._witness import MAX_REQUEST_BYTES, NOTE_CONTENT_TYPE, Witness, WitnessResponse
from edgeshield.errors import KeyFileError

log = logging.getLogger("edgeshield.audit.witness")
# What socketserver hands a server: a connected socket for TCP (all this server ever gets), (data, socket) for UDP.
_Request = socket.socket | tuple[bytes, socket.socket]
_CHECKPOINT_PATH = re.compile(r"^/([0-9a-f]{64})/checkpoint$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeshield-witness"
    sys_version = ""
    server: WitnessServer

    def setup(self) -> None:
        # typeshed declares StreamRequestHandler.timeout a ClassVar; socketserver reads it from the instance, and
        # each server has its own timeout.
        self.timeout = self.server.timeout_s  # type: ignore[misc]
        super().setup()

    def _send(self, resp: WitnessResponse) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)
        self._log(resp.status, resp.reason)

    def _log(self, status: int, reason: str) -> None:
        log.info(json.dumps({"event": "witness.request", "method": self.command,
                             "path": (getattr(self, "path", None) or "")[:100],
                             "status": status, "client": self.client_address[0], "reason": reason[:200]}))

    def do_POST(self) -> None:
        if self.path != "/add-checkpoint":
            self._send(WitnessResponse.refuse(404, "no such endpoint"))
            return
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length_text is None:
            self.close_connection = True
            self._send(WitnessResponse.refuse(411, "a Content-Length is required"))
            return
        if not length_text.isdigit() or int(length_text) > MAX_REQUEST_BYTES:
            self.close_connection = True
            self._send(WitnessResponse.refuse(413, f"the body must be at most {MAX_REQUEST_BYTES} bytes"))
            return
        body = self.rfile.read(int(length_text))
        if len(body) != int(length_text):
            self.close_connection = True
            return
        self._send(self.server.witness.add_checkpoint(body))

    def do_GET(self) -> None:
        match = _CHECKPOINT_PATH.match(self.path)
        note = self.server.witness.checkpoint_by_hash(match.group(1)) if match else None
        if note is None:
            reason = "no checkpoint cosigned for that log" if match else "no such endpoint"
            self._send(WitnessResponse.refuse(404, reason))
            return
        self._send(WitnessResponse(200, note.encode(), NOTE_CONTENT_TYPE, "checkpoint"))

    def do_HEAD(self) -> None:
        self.do_GET()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server answers unknown methods with 501 and odd HTTP versions with 505, as HTML, and a request line
        # it cannot parse as HTTP/0.9 (no status line): for a client's mistake, a 4xx with a one-line reason.
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed"
        elif code >= 500:
            code = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        self.request_version = self.protocol_version
        self._send(WitnessResponse.refuse(code, (message or HTTPStatus(code).phrase).replace("\n", " ")[:200]))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        pass  # requests are logged as JSON by _log; http.server's own lines would break the one-object-a-line log


class WitnessServer(ThreadingHTTPServer):
    """Serves ``witness`` on ``address`` with ``ssl_context`` (a TLS 1.3 server context)."""

    daemon_threads = True
    block_on_close = False
    server_address: tuple[str, int]  # an AF_INET server: (host, port)

    def __init__(self, witness: Witness, address: tuple[str, int], ssl_context: ssl.SSLContext, *,
                 timeout: float = 10.0, max_connections: int = 64) -> None:
        if ssl_context.minimum_version < ssl.TLSVersion.TLSv1_3:
            raise ValueError("the witness speaks TLS 1.3 only")
        self.witness, self.ssl_context, self.timeout_s = witness, ssl_context, timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host}:{port}"

    def process_request(self, request: _Request, client_address: tuple[str, int]) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once rather than queue
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket,  # type: ignore[override]  # TCP: always a socket (see _Request)
                       client_address: tuple[str, int]) -> None:
        request.settimeout(self.timeout_s)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info(json.dumps({"event": "witness.tls_failure", "client": client_address[0],
                                 "reason": type(exc).__name__}))
            return
        try:
            _Handler(tls, client_address, self)
        except (OSError, ssl.SSLError):
            pass  # the peer went away or timed out
        finally:
            tls.close()

    def handle_error(self, request: _Request, client_address: tuple[str, int]) -> None:
        # socketserver calls this from inside its except clause, so the exception being handled is logged with it.
        log.exception(json.dumps({"event": "witness.error", "client": client_address[0]}))  # noqa: LOG004


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str], *,
                   client_ca: str | os.PathLike[str] | None = None, passphrase: bytes | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only server context for the witness. With ``client_ca`` clients must present a certificate: a CA
    directory of ``edgeshield pki`` gives the device PKI's mutual TLS (CRL checked, as the inference server does),
    a CA certificate file trusts that CA alone."""
    if client_ca is not None and Path(client_ca).is_dir():
        from edgeshield import transport

        return transport.server_context(client_ca, cert, key, passphrase=passphrase)
    check_readable_file(cert, what="witness TLS certificate")
    check_readable_file(key, what="witness TLS key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key), password=passphrase)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=str(check_readable_file(client_ca, what="client CA certificate")))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise KeyFileError(f"cannot load the witness's TLS certificate or key: {exc.reason or exc}") from exc
    return ctx


def serve_in_thread(server: WitnessServer) -> threading.Thread:
    """Start ``server`` on a daemon thread (tests, embedding); stop it with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="edgeshield-witness")
    thread.start()
    return thread

