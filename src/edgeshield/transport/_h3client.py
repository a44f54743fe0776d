"""An HTTP/3 client (aioquic) with a client certificate: mutual TLS 1.3 over QUIC to ``serve --http3-port``.

Every wait has a timeout. A connection keeps the newest session ticket the server sent; give it to the next
connection (``ticket=``) to resume without a certificate exchange, and with ``early=True`` to send a GET/HEAD as
0-RTT early data (the server refuses anything else in 0-RTT with 425). Sync use: :func:`h3_request` for one
request, :class:`H3Session` for many on one connection (its own event-loop thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edgeshield.errors import (
    CertificateRefusedError,
    ConnectionFailedError,
    InvalidArgumentError,
    MissingDependencyError,
)

PathLike = str | os.PathLike[str]
T = TypeVar("T")
_CERT_ALERTS = {42, 44, 45, 48, 116}  # bad_certificate, revoked, expired, unknown_ca, certificate_required


@dataclass
class H3Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    early: bool = False  # the request was sent as 0-RTT early data (and the server accepted early data)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class HandshakeTiming:
    seconds: float
    resumed: bool
    early_data_accepted: bool
    ticket: Any = field(default=None, repr=False)


def _aioquic() -> Any:
    try:
        import aioquic
    except ImportError:
        raise MissingDependencyError("HTTP/3 needs aioquic: pip install 'edgeshield[h3]'") from None
    return aioquic


def client_configuration(ca: PathLike, cert: PathLike, key: PathLike, *, server_name: str,
                         passphrase: bytes | None = None, ticket: Any = None, timeout_s: float = 10.0) -> Any:
    """A QUIC client configuration: h3, our CA only, our certificate, an optional ticket to resume with."""
    _aioquic()
    from pathlib import Path

    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    from edgeshield.transport._pki import CA_CERT

    ca_path = Path(ca) / CA_CERT if Path(ca).is_dir() else Path(ca)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name,
                               verify_mode=ssl.CERT_REQUIRED, idle_timeout=max(timeout_s, 5.0))
    config.load_verify_locations(cafile=str(ca_path))
    config.load_cert_chain(str(cert), str(key), password=passphrase)
    config.session_ticket = ticket
    return config


class AsyncH3Connection:
    """One QUIC connection and its HTTP/3 requests (async). ``connect()`` first, ``close()`` at the end."""

    def __init__(self, host: str, port: int, *, ca: PathLike, cert: PathLike, key: PathLike,
                 passphrase: bytes | None = None, ticket: Any = None, timeout_s: float = 10.0,
                 server_name: str | None = None) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.config = client_configuration(ca, cert, key, server_name=server_name or host, passphrase=passphrase,
                                           ticket=ticket, timeout_s=timeout_s)
        self.ticket: Any = None  # the newest ticket the server sent on this connection
        self._protocol: Any = None
        self._transport: Any = None
        self.handshake_s: float | None = None

    def _on_ticket(self, ticket: Any) -> None:
        self.ticket = ticket

    async def connect(self, *, wait_handshake: bool = True) -> None:
        """Open the connection; with ``wait_handshake=False`` return at once (0-RTT requests may follow)."""
        from aioquic.quic.connection import QuicConnection

        loop = asyncio.get_running_loop()
        quic = QuicConnection(configuration=self.config, session_ticket_handler=self._on_ticket)
        started = time.perf_counter()
        try:
            addr = (await loop.getaddrinfo(self.host, self.port, type=2))[0][4]  # SOCK_DGRAM
        except OSError as exc:
            raise ConnectionFailedError(f"cannot resolve {self.host}: {exc}") from None
        local = ("::", 0) if ":" in str(addr[0]) else ("0.0.0.0", 0)  # noqa: S104  # an ephemeral client socket
        self._transport, self._protocol = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(quic), local_addr=local)
        self._protocol.connect(addr)
        if wait_handshake:
            await self.wait_connected()
            self.handshake_s = time.perf_counter() - started

    async def wait_connected(self) -> None:
        protocol = self._protocol
        try:
            await asyncio.wait_for(asyncio.shield(protocol.connected), self.timeout_s)
        except TimeoutError:
            self.close()
            raise ConnectionFailedError(f"no QUIC handshake with {self.host}:{self.port} within "
                                        f"{self.timeout_s:g} s") from None
        protocol.raise_if_closed()

    @property
    def resumed(self) -> bool:
        return bool(self._protocol and self._protocol._quic.tls.session_resumed)

    @property
    def early_data_accepted(self) -> bool:
        return bool(self._protocol and self._protocol._quic.tls.early_data_accepted)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> H3Response:
        protocol = self._protocol
        if protocol is None:
            raise InvalidArgumentError("connect() first")
        early = not protocol.connected.done()
        authority = f"{self.host}:{self.port}"
        hdrs = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
                (b":path", path.encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        waiter = protocol.send_request(hdrs, body)
        try:
            status, rheaders, rbody = await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
        except TimeoutError:
            protocol.raise_if_closed()
            raise ConnectionFailedError(f"no HTTP/3 answer from {self.host}:{self.port} within "
                                        f"{self.timeout_s:g} s") from None
        if status == 0:
            protocol.raise_if_closed()
            raise ConnectionFailedError(f"the HTTP/3 stream to {self.host}:{self.port} ended without an answer")
        return H3Response(status, rheaders, rbody, early=early and self.early_data_accepted)

    def close(self) -> None:
        if self._protocol is not None:
            with contextlib.suppress(Exception):
                self._protocol.close()
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)


class _ClientProtocol(asyncio.DatagramProtocol):
    """aioquic's client connection driven on a datagram endpoint, with H3 on top."""

    def __init__(self, quic: Any) -> None:
        from aioquic.asyncio.protocol import QuicConnectionProtocol

        self._base = QuicConnectionProtocol  # for the docstring only
        self._quic = quic
        self._loop = asyncio.get_running_loop()
        self._transport: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self.connected: asyncio.Future[None] = self._loop.create_future()
        self._h3: Any = None
        self._streams: dict[int, tuple[asyncio.Future[Any], list[tuple[str, str]], list[bytes], list[int]]] = {}
        self.terminated: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def connect(self, addr: Any) -> None:
        from aioquic.h3.connection import H3Connection

        self._quic.connect(addr, now=self._loop.time())
        self._h3 = H3Connection(self._quic)
        self.transmit()

    def close(self) -> None:
        self._quic.close()
        self.transmit()

    def raise_if_closed(self) -> None:
        event = self.terminated
        if event is None:
            return
        code = event.error_code
        if 0x100 <= code <= 0x1FF:
            alert = code - 0x100
            cls = CertificateRefusedError if alert in _CERT_ALERTS else ConnectionFailedError
            raise cls(f"the server refused the QUIC/TLS handshake (TLS alert {alert}): {event.reason_phrase}")
        raise ConnectionFailedError(f"the QUIC connection closed (error 0x{code:x}): {event.reason_phrase}")

    def send_request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> asyncio.Future[Any]:
        stream_id = self._quic.get_next_available_stream_id()
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._streams[stream_id] = (waiter, [], [], [0])
        self._h3.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._h3.send_data(stream_id, body, end_stream=True)
        self.transmit()
        if self.terminated is not None:
            self._fail_all()
        return waiter

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        self._process()
        self.transmit()

    def _process(self) -> None:
        from aioquic.h3.events import DataReceived, HeadersReceived
        from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

        event = self._quic.next_event()
        while event is not None:
            if isinstance(event, HandshakeCompleted) and not self.connected.done():
                self.connected.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event
                if not self.connected.done():
                    self.connected.set_result(None)
                self._fail_all()
            for h3_event in self._h3.handle_event(event) if self._h3 is not None else ():
                slot = self._streams.get(h3_event.stream_id)
                if slot is None:
                    continue
                waiter, rheaders, chunks, status = slot
                if isinstance(h3_event, HeadersReceived):
                    for k, v in h3_event.headers:
                        if k == b":status":
                            status[0] = int(v)
                        else:
                            rheaders.append((k.decode("latin-1"), v.decode("latin-1")))
                elif isinstance(h3_event, DataReceived):
                    chunks.append(h3_event.data)
                if getattr(h3_event, "stream_ended", False) and not waiter.done():
                    waiter.set_result((status[0], rheaders, b"".join(chunks)))
                    del self._streams[h3_event.stream_id]
            event = self._quic.next_event()

    def _fail_all(self) -> None:
        for waiter, *_ in self._streams.values():
            if not waiter.done():
                waiter.set_result((0, [], b""))
        self._streams.clear()

    def transmit(self) -> None:
        if self._transport is None:
            return
        for data, addr in self._quic.datagrams_to_send(now=self._loop.time()):
            with contextlib.suppress(OSError):
                self._transport.sendto(data, addr)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self._quic.get_timer()
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._quic.handle_timer(now=self._loop.time())
        self._process()
        self.transmit()

    def error_received(self, exc: Exception) -> None:
        pass


def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "h3") or not parts.hostname:
        raise InvalidArgumentError(f"an HTTP/3 URL is https://HOST:PORT/PATH, not {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 443, path


class H3Session:
    """Many requests on one HTTP/3 connection, from synchronous code (its own event loop on a thread).

    ``H3Session(url, ca=..., cert=..., key=..., ticket=None, early=False)``: with ``ticket`` (a previous session's
    ``.ticket``) the handshake resumes; with ``early=True`` too, the first ``request`` is sent as 0-RTT.
    ``handshake_s`` is the handshake's duration (None with ``early``, which does not wait for it)."""

    def __init__(self, url: str, *, ca: PathLike, cert: PathLike, key: PathLike, passphrase: bytes | None = None,
                 ticket: Any = None, early: bool = False, timeout_s: float = 10.0) -> None:
        host, port, _ = _split(url)
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgeshield-h3", daemon=True)
        self._thread.start()
        self.conn = AsyncH3Connection(host, port, ca=ca, cert=cert, key=key, passphrase=passphrase, ticket=ticket,
                                      timeout_s=timeout_s)
        self._pending_early = early  # with early data the first request goes out with the ClientHello
        if not early:
            try:
                self._run(self.conn.connect())
            except BaseException:
                self.close()
                raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s + 5)
        except TimeoutError:
            future.cancel()
            raise ConnectionFailedError(f"HTTP/3 call did not finish within {self.timeout_s + 5:g} s") from None

    @property
    def handshake_s(self) -> float | None:
        return self.conn.handshake_s

    @property
    def ticket(self) -> Any:
        return self.conn.ticket

    @property
    def resumed(self) -> bool:
        return self.conn.resumed

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> H3Response:
        if self._pending_early:
            self._pending_early = False
            return self._run(self._connect_and_request(method, path, body, headers))
        return self._run(self.conn.request(method, path, body, headers))

    async def _connect_and_request(self, method: str, path: str, body: bytes,
                                   headers: dict[str, str] | None) -> H3Response:
        await self.conn.connect(wait_handshake=False)
        return await self.conn.request(method, path, body, headers)

    def wait_connected(self) -> None:
        self._run(self.conn.wait_connected())

    def close(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._run(self.conn.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> H3Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def h3_request(url: str, method: str = "GET", body: bytes = b"", *, ca: PathLike, cert: PathLike, key: PathLike,
               passphrase: bytes | None = None, headers: dict[str, str] | None = None, ticket: Any = None,
               early: bool = False, timeout_s: float = 10.0) -> H3Response:
    """One request over a fresh HTTP/3 connection (closed after); ``url`` is https://HOST:PORT/PATH."""
    _, _, path = _split(url)
    with H3Session(url, ca=ca, cert=cert, key=key, passphrase=passphrase, ticket=ticket, early=early,
                   timeout_s=timeout_s) as session:
        return session.request(method, path, body, headers)


def time_handshake(url: str, *, ca: PathLike, cert: PathLike, key: PathLike, ticket: Any = None,
                   timeout_s: float = 10.0) -> HandshakeTiming:
    """One QUIC + TLS 1.3 mutual handshake to ``url``, timed (resumed when ``ticket`` is given)."""
    with H3Session(url, ca=ca, cert=cert, key=key, ticket=ticket, timeout_s=timeout_s) as session:
        session.request("GET", "/healthz")  # the server's ticket comes after its handshake; wait for it this way
        return HandshakeTiming(session.handshake_s or 0.0, session.resumed, session.conn.early_data_accepted,
                               session.ticket)
