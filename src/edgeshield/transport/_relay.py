"""``edgeshield relay``: a small Oblivious HTTP relay (RFC 9458 §6.2) between clients and the gateway.

It accepts mutual-TLS 1.3 connections from clients (certificates from the CA required, CRL checked), forwards
``POST /.well-known/ohttp-gateway`` (``message/ohttp-req``; ``/v1/predict`` with that type too) and the
``GET`` of the key configuration to the gateway over its own mutual TLS (a certificate with the ``relay`` role),
and returns the answer. Everything else is refused; bodies are bounded and every wait has a timeout. What it
forwarded can be recorded (``record``: JSON lines of direction, path, status, size, SHA-256 and a hex prefix; and
``Relay.seen``, the bytes themselves, in memory, for tests and the demo) — it only ever has ciphertext to record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshield._asgi import BodyTimeout, BodyTooLarge, ClientGone, read_body, send_json
from edgeshield.errors import EdgeShieldError

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

PathLike = str | os.PathLike[str]
GATEWAY_PATH = "/.well-known/ohttp-gateway"
_FORWARD_HEADERS = ("content-type", "cache-control", "edgeshield-ohttp-keys-signature", "edgeshield-ohttp-gateway-cert",
                    "retry-after")


@dataclass(frozen=True)
class Seen:
    """One body the relay forwarded: ``direction`` is "request" or "response"."""

    direction: str
    path: str
    status: int | None
    data: bytes


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    gateway_url: str  # e.g. https://127.0.0.1:8443
    ca: Path  # CA directory (ca.crt + crl.pem): clients' certificates and the gateway's are checked against it
    cert: Path  # the relay's serverAuth certificate (clients connect to it) and its key
    key: Path
    client_cert: Path  # the relay's clientAuth certificate with the relay role (to the gateway) and its key
    client_key: Path
    host: str = "127.0.0.1"
    port: int = 8444
    passphrase: bytes | None = None
    record: Path | None = None
    max_body_bytes: int = 5 * 1024 * 1024
    timeout_s: float = 10.0


class Relay:
    """The ASGI app of the relay."""

    def __init__(self, gateway_url: str, client_context: Any, *, max_body_bytes: int = 5 * 1024 * 1024,
                 timeout_s: float = 10.0, record: PathLike | None = None, keep: int = 1000) -> None:
        self.gateway_url, self.ctx = gateway_url.rstrip("/"), client_context
        self.max_body_bytes, self.timeout_s = max_body_bytes, timeout_s
        self.record = Path(record) if record is not None else None
        self.seen: deque[Seen] = deque(maxlen=keep)
        self.forwarded = 0  # bodies noted, ever (``seen`` keeps the last ``keep``)
        self._lock = threading.Lock()
        self._http: Any = None

    def _note(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)
            self.forwarded += 1
            if self.record is not None:
                line = {"time": time.time(), "direction": seen.direction, "path": seen.path, "status": seen.status,
                        "bytes": len(seen.data), "sha256": hashlib.sha256(seen.data).hexdigest(),
                        "prefix_hex": seen.data[:32].hex()}
                with open(self.record, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line) + "\n")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if path not in (GATEWAY_PATH, "/v1/predict"):
            await _json(send, 404, "the relay forwards only Oblivious HTTP")
            return
        if method == "GET" and path == GATEWAY_PATH:
            await self._forward(send, "GET", b"", None)
            return
        if method != "POST":
            await _json(send, 405, f"{method} is not allowed here")
            return
        if ctype != b"message/ohttp-req":
            await _json(send, 415, "the relay forwards message/ohttp-req only")
            return
        body = await _read(receive, self.max_body_bytes, self.timeout_s)
        if body is None:
            await _json(send, 413, f"request body over {self.max_body_bytes} bytes or too slow")
            return
        self._note(Seen("request", path, None, body))
        await self._forward(send, "POST", body, "message/ohttp-req")

    async def _forward(self, send: Send, method: str, body: bytes, ctype: str | None) -> None:
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(verify=self.ctx, timeout=self.timeout_s)
        try:
            r = await self._http.request(method, self.gateway_url + GATEWAY_PATH, content=body or None,
                                         headers={"content-type": ctype} if ctype else {})
        except httpx.HTTPError as exc:
            await _json(send, 502, f"the gateway cannot be reached: {type(exc).__name__}")
            return
        data = r.content[:self.max_body_bytes]
        if method == "POST":
            self._note(Seen("response", GATEWAY_PATH, r.status_code, data))
        out = [(k.encode(), r.headers[k].encode()) for k in _FORWARD_HEADERS if k in r.headers]
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": r.status_code, "headers": out})
        await send({"type": "http.response.body", "body": data})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._http is not None:
                    await self._http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read(receive: Receive, limit: int, timeout_s: float) -> bytes | None:
    """The whole body, at most ``limit`` bytes, all within ``timeout_s``; None when over, too slow or gone."""
    try:
        return await read_body(receive, limit, timeout_s)
    except (BodyTooLarge, BodyTimeout, ClientGone):
        return None


async def _json(send: Send, status: int, error: str) -> None:
    await send_json(send, status, {"error": error})


def make_relay(cfg: RelayConfig) -> tuple[Any, Relay]:
    """A configured ``uvicorn.Server`` (not started) serving the relay on TLS 1.3 with client certificates."""
    import uvicorn

    from edgeshield.transport._tls import client_context, server_context

    relay = Relay(cfg.gateway_url, client_context(cfg.ca, cfg.client_cert, cfg.client_key, passphrase=cfg.passphrase),
                  max_body_bytes=cfg.max_body_bytes, timeout_s=cfg.timeout_s, record=cfg.record)
    config = uvicorn.Config(relay, host=cfg.host, port=cfg.port, log_level="warning", server_header=False,
                            date_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=5)
    config.load()
    config.ssl = server_context(cfg.ca, cfg.cert, cfg.key, passphrase=cfg.passphrase)  # mutual TLS 1.3, CRL
    return uvicorn.Server(config), relay


@contextlib.contextmanager
def running_relay(cfg: RelayConfig, *, start_timeout_s: float = 15.0) -> Iterator[tuple[Relay, int]]:
    """The relay serving on a background thread: yields (relay, port) once it listens; stops when the block ends."""
    server, relay = make_relay(cfg)
    thread = threading.Thread(target=server.run, name="edgeshield-relay", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EdgeShieldError(f"the relay did not start within {start_timeout_s:g} s")
            time.sleep(0.02)
        yield relay, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve_relay(cfg: RelayConfig) -> None:
    """Serve until SIGINT/SIGTERM."""
    server, _ = make_relay(cfg)
    server.run()


def predict_through(relay: Relay, relay_url: str, inputs: Any, *, ca: PathLike, cert: PathLike, key: PathLike,
                    passphrase: bytes | None = None, gateway_name: str | None = None) -> tuple[dict[str, Any],
                                                                                              list[Seen]]:
    """One full OHTTP prediction through a running ``relay`` (at ``relay_url``): (the decoded answer, what the relay
    forwarded for it — ciphertext in, ciphertext out). For the demo and the benchmark."""
    from edgeshield.transport._ohttp_client import ohttp_predict

    before = relay.forwarded
    answer = ohttp_predict(relay_url, inputs, ca=ca, cert=cert, key=key, passphrase=passphrase,
                           gateway_name=gateway_name)
    new = min(relay.forwarded - before, len(relay.seen))
    return answer, list(relay.seen)[len(relay.seen) - new:]
