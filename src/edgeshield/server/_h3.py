"""HTTP/3 (TLS 1.3 over QUIC) beside the TCP server: the same ASGI app, client certificates required.

Neither hypercorn nor aioquic's server can require a client certificate: aioquic's TLS stack only sends a
CertificateRequest behind a private test switch and never verifies what the client sends back; hypercorn never
exposes the peer certificate to the scope. So this is a thin server on aioquic's ``QuicConnection`` and
``H3Connection``:

- :class:`_MutualTls` turns the switch on and verifies the client's chain against the device CA *inside* the
  handshake (no certificate: ``certificate_required``; another CA's: ``unknown_ca``/``bad_certificate``; a serial
  the server's current CRL revokes: ``certificate_revoked``), so a refused client never gets 1-RTT keys;
- session tickets are the server's own, single use (RFC 8446 §8.1) and remember the verified identity, so a
  resumed connection keeps its identity, is re-checked against the current CRL, and a replayed ClientHello
  with early data finds no ticket (its 0-RTT is discarded);
- 0-RTT: a request any of whose stream frames arrived as early data is served only if it is GET or HEAD; anything
  else is answered 425 Too Early (RFC 8470) and never reaches the app;
- each connection gets the same ASGI TLS extension dict as over TCP (``_tls_scope.tls_extension``'s keys), so the
  middleware's authentication, revocation, RBAC, limits and audit are the TCP server's;
- before aioquic parses anything, :class:`_Dispatcher` drops oversized datagrams, junk, and datagrams over a
  per-address rate (a token bucket), counting each by reason in ``H3Server.dropped`` and putting at most one
  ``connection.rejected`` event per address and reason per second on the event stream; new connections go through
  a :class:`ConnectionGate` of their own (per-address and total caps, handshake rate, the monitor's address blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.h3.exceptions import H3Error
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicReceiveContext
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, ProtocolNegotiated, QuicEvent
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edgeshield.server._limits import address_key
from edgeshield.server._tls_scope import scope_extension

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message

    from edgeshield.server._crl import CrlGuard
    from edgeshield.server._listener import ConnectionEvents, ConnectionGate
    from edgeshield.transport import Identity

log = logging.getLogger("edgeshield.server")
IDEMPOTENT = frozenset({"GET", "HEAD"})
MAX_DATAGRAM = 1500  # a QUIC datagram over this is not one a client of ours sends (RFC 9000 §14: >= 1200)
MIN_INITIAL = 1200  # a client's Initial must be padded to this (anti-amplification)
_MAX_TICKETS = 10_000
_MAX_BUCKETS = 4096
_DER = Encoding.DER
_H3_EXCESSIVE_LOAD = 0x107  # RFC 9114 §8.1


class _AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class _AlertUnknownCa(tls.Alert):
    description = tls.AlertDescription.unknown_ca


class _AlertCertificateRevoked(tls.Alert):
    description = tls.AlertDescription.certificate_revoked


@dataclass
class _Peer:
    """What one connection knows about its client once the handshake has said it."""

    der: bytes | None = None  # the leaf certificate, from this handshake or from the ticket it resumed
    error: str | None = None


class ClientVerifier:
    """Verifies a client's chain against the device CA and its serial against the server's *current* CRL (the TCP
    context's, reloaded by the CRL watcher), as ``server_context`` + ``peer_identity`` do for TCP."""

    def __init__(self, ca_cert: Path, guard: CrlGuard) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        self.guard = guard

    def check(self, leaf: x509.Certificate, chain: list[x509.Certificate]) -> None:
        """Raise the TLS alert the client should get, or return."""
        from OpenSSL import crypto

        from edgeshield.errors import EdgeShieldError
        from edgeshield.transport import identity_from_der

        # OpenSSL's own chain check with the flags the TCP context uses (X509_STRICT); the CRL is checked below
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(self.ca))
        store.set_flags(crypto.X509StoreFlags.X509_STRICT)
        try:
            crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                    [crypto.X509.from_cryptography(c) for c in chain]).verify_certificate()
        except crypto.X509StoreContextError as exc:
            text = str(exc)
            raise (_AlertUnknownCa if "issuer" in text else tls.AlertBadCertificate)(text[:200]) from None
        der = leaf.public_bytes(_DER)
        try:
            identity = identity_from_der(der)
        except EdgeShieldError as exc:
            raise tls.AlertBadCertificate(str(exc)[:200]) from None
        refusal = self.guard.refusal(identity)
        if refusal is not None:
            raise _AlertCertificateRevoked(refusal)




class _MutualTls(tls.Context):
    """aioquic's TLS 1.3 server with the client certificate required and verified during the handshake."""

    verifier: ClientVerifier
    peer: _Peer

    def _server_handle_hello(self, input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer) -> None:
        super()._server_handle_hello(input_buf, initial_buf, handshake_buf)
        # aioquic's test switch expects a Certificate even after a PSK handshake, where none is requested: the
        # identity of a resumed session is the one its ticket remembers
        if self._session_resumed and self.state == tls.State.SERVER_EXPECT_CERTIFICATE:
            self._server_expect_finished()

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        start = input_buf.tell()
        certificate = tls.pull_certificate(input_buf)
        if not certificate.certificates:
            raise _AlertCertificateRequired("no client certificate")
        input_buf.seek(start)
        super()._server_handle_certificate(input_buf)

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate_verify(input_buf)  # the signature over the transcript
        leaf = self._peer_certificate
        if leaf is None:
            raise _AlertCertificateRequired("no client certificate")
        self.verifier.check(leaf, self._peer_certificate_chain)
        self.peer.der = leaf.public_bytes(_DER)


class _MutualQuic(QuicConnection):
    """A server connection whose TLS is :class:`_MutualTls` and which remembers the streams that carried 0-RTT."""

    def __init__(self, *, verifier: ClientVerifier, **kw: Any) -> None:
        super().__init__(**kw)
        self.verifier, self.peer = verifier, _Peer()
        self.early_streams: set[int] = set()

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls.__class__ = _MutualTls  # only behaviour is added; its __init__ has run
        context = cast(_MutualTls, self.tls)
        context._request_client_certificate = True
        context.verifier, context.peer = self.verifier, self.peer

    def _handle_stream_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        if context.epoch == tls.Epoch.ZERO_RTT:
            start = buf.tell()
            self.early_streams.add(buf.pull_uint_var())
            buf.seek(start)
        super()._handle_stream_frame(context, frame_type, buf)


class TicketStore:
    """Single-use session tickets, each remembering the certificate its full handshake verified (bounded LRU)."""

    def __init__(self, max_tickets: int = _MAX_TICKETS) -> None:
        self.max = max_tickets
        self._tickets: OrderedDict[bytes, tuple[tls.SessionTicket, bytes | None]] = OrderedDict()

    def add(self, ticket: tls.SessionTicket, der: bytes | None) -> None:
        self._tickets[ticket.ticket] = (ticket, der)
        while len(self._tickets) > self.max:
            self._tickets.popitem(last=False)

    def take(self, label: bytes) -> tuple[tls.SessionTicket, bytes | None] | None:
        return self._tickets.pop(label, None)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


@dataclass
class H3Limits:
    """What one address may send before aioquic sees it."""

    datagrams_per_second_per_address: float = 2000.0
    datagram_burst_per_address: int = 4000
    max_datagram_bytes: int = MAX_DATAGRAM
    event_every_s: float = 1.0  # at most one event per address and reason this often
    dropped: dict[str, int] = field(default_factory=dict)


class H3Server:
    """The HTTP/3 listener: ``await start()`` on the loop that runs the ASGI app, ``close()`` to stop."""

    def __init__(self, app: ASGIApp, *, host: str, port: int, ca_cert: Path, cert: Path, key: Path,
                 guard: CrlGuard, gate: ConnectionGate, events: ConnectionEvents, passphrase: bytes | None = None,
                 max_body_bytes: int = 4 * 1024 * 1024, limits: H3Limits | None = None) -> None:
        self.app, self.host, self.port = app, host, port
        self.gate, self.events = gate, events
        self.limits = limits or H3Limits()
        self.dropped = self.limits.dropped  # reason -> datagrams dropped before aioquic
        self.max_body_bytes = max_body_bytes
        self.verifier = ClientVerifier(ca_cert, guard)
        self.tickets = TicketStore()
        self.configuration = QuicConfiguration(
            is_client=False, alpn_protocols=H3_ALPN, idle_timeout=max(5.0, gate.limits.keep_alive_s),
            max_datagram_frame_size=None)
        self.configuration.load_cert_chain(cert, key, password=passphrase)
        self.served_early = 0  # requests served from 0-RTT (GET/HEAD)
        self.refused_early = 0  # non-idempotent requests refused 425
        self._transport: asyncio.DatagramTransport | None = None
        self._dispatcher: _Dispatcher | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.gate.loop = loop
        transport, dispatcher = await loop.create_datagram_endpoint(lambda: _Dispatcher(self),
                                                                    local_addr=(self.host, self.port))
        self._transport, self._dispatcher = transport, dispatcher
        self.port = transport.get_extra_info("sockname")[1]
        log.info("serving HTTP/3 on udp://%s:%d (mutual TLS 1.3 over QUIC)", self.host, self.port)

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close_all()
        if self._transport is not None:
            self._transport.close()

    def close_revoked(self, serials: frozenset[int]) -> int:
        """Close live connections whose certificate is now revoked (from the CRL watcher, on the loop)."""
        return self._dispatcher.close_revoked(serials) if self._dispatcher is not None else 0

    def close_revoked_threadsafe(self, serials: frozenset[int]) -> None:
        loop = self.gate.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.close_revoked, frozenset(serials))


class _Dispatcher(asyncio.DatagramProtocol):
    """Routes datagrams to connections by connection ID after the cheap checks; creates connections for Initials."""

    def __init__(self, server: H3Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.protocols: dict[bytes, _H3Protocol] = {}
        self._buckets: dict[str, _Bucket] = {}
        self.by_identity: dict[str, set[_H3Protocol]] = {}  # identity name -> its connections (the identity cap)
        self._last_event: dict[tuple[str, str], float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _drop(self, reason: str, address: str) -> None:
        dropped = self.server.dropped
        dropped[reason] = dropped.get(reason, 0) + 1
        now = time.monotonic()
        key = (address, reason)
        if now - self._last_event.get(key, -1e9) >= self.server.limits.event_every_s:
            if len(self._last_event) >= _MAX_BUCKETS:
                self._last_event.clear()
            self._last_event[key] = now
            self.server.events.refused(f"udp: {reason}", address)

    def _within_rate(self, address: str) -> bool:
        lim, now = self.server.limits, time.monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()
            bucket = self._buckets[address] = _Bucket(lim.datagram_burst_per_address, now)
        bucket.tokens = min(lim.datagram_burst_per_address,
                            bucket.tokens + (now - bucket.stamp) * lim.datagrams_per_second_per_address)
        bucket.stamp = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        address = address_key(addr)
        if len(data) > self.server.limits.max_datagram_bytes:
            self._drop("oversized datagram", address)
            return
        if not self._within_rate(address):
            self._drop("per-address datagram rate", address)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.server.configuration.connection_id_length)
        except ValueError:
            self._drop("not a QUIC packet", address)
            return
        protocol = self.protocols.get(header.destination_cid)
        if protocol is None:
            if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
                self._drop("unexpected version negotiation", address)
                return
            if header.version is not None and header.version not in self.server.configuration.supported_versions:
                if self.transport is not None and len(data) >= MIN_INITIAL:  # never amplify a small spoofed one
                    self.transport.sendto(encode_quic_version_negotiation(
                        source_cid=header.destination_cid, destination_cid=header.source_cid,
                        supported_versions=self.server.configuration.supported_versions), addr)
                else:
                    self._drop("unknown QUIC version", address)
                return
            if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL:
                self._drop("no such connection", address)
                return
            refusal = self.server.gate.admit(address)
            if refusal is not None:
                self.server.events.refused(refusal, address)
                return
            protocol = self._new_connection(header.destination_cid, address)
        protocol.datagram_received(data, addr)

    def _new_connection(self, original_cid: bytes, address: str) -> _H3Protocol:
        server = self.server

        def fetch(label: bytes) -> tls.SessionTicket | None:
            found = server.tickets.take(label)  # single use: a replayed ClientHello finds nothing
            if found is None:
                return None
            ticket, der = found
            if connection.peer.der is None:
                connection.peer.der = der
            return ticket

        def store(ticket: tls.SessionTicket) -> None:
            server.tickets.add(ticket, connection.peer.der)

        connection = _MutualQuic(configuration=server.configuration, verifier=server.verifier,
                                 original_destination_connection_id=original_cid,
                                 session_ticket_fetcher=fetch, session_ticket_handler=store)
        protocol = _H3Protocol(connection, server=server, address=address)
        protocol.connection_made(self.transport)  # type: ignore[arg-type]
        protocol._connection_id_issued_handler = lambda cid: self.protocols.__setitem__(cid, protocol)
        protocol._connection_id_retired_handler = self._retire
        protocol._connection_terminated_handler = lambda: self._terminated(protocol)
        self.protocols[original_cid] = protocol
        self.protocols[connection.host_cid] = protocol
        return protocol

    def _retire(self, cid: bytes) -> None:
        self.protocols.pop(cid, None)

    def _terminated(self, protocol: _H3Protocol) -> None:
        for cid in [c for c, p in self.protocols.items() if p is protocol]:
            del self.protocols[cid]
        protocol.release()

    def close_all(self) -> None:
        for protocol in set(self.protocols.values()):
            with contextlib.suppress(Exception):
                protocol.close()
            protocol.release()
        self.protocols.clear()

    def close_revoked(self, serials: frozenset[int]) -> int:
        closed = 0
        for protocol in set(self.protocols.values()):
            identity = protocol.identity
            if identity is not None and identity.serial in serials:
                protocol.close(error_code=0x100 + tls.AlertDescription.certificate_revoked,
                               reason_phrase="certificate revoked")
                closed += 1
        for _ in range(closed):
            self.server.events.refused("certificate revoked: live connection closed")
        return closed


class _H3Protocol(QuicConnectionProtocol):
    """One QUIC connection: the handshake deadline, its identity, and HTTP/3 requests run through the ASGI app."""

    def __init__(self, quic: _MutualQuic, *, server: H3Server, address: str) -> None:
        super().__init__(quic)
        self.server, self.address, self.mquic = server, address, quic
        self.h3: H3Connection | None = None
        self.identity: Identity | None = None
        self.tls_scope: dict[str, Any] | None = None
        self._handshake_done = False
        self._released = False
        self._bound: str | None = None
        self._requests: dict[int, _Request] = {}
        self._deadline = self._loop.call_later(server.gate.limits.handshake_timeout_s, self._handshake_timeout)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._deadline.cancel()
            self.server.gate.release(self.address)
            dispatcher = self.server._dispatcher
            if self._bound is not None and dispatcher is not None:
                held = dispatcher.by_identity.get(self._bound, set())
                held.discard(self)
                if not held:
                    dispatcher.by_identity.pop(self._bound, None)
            for request in self._requests.values():
                request.gone()

    def _handshake_timeout(self) -> None:
        if not self._handshake_done:
            self.server.events.refused("QUIC handshake timeout", self.address)
            self.close()

    def _scope(self) -> dict[str, Any]:
        """The ASGI TLS extension, with the same keys as over TCP (``_tls_scope.tls_extension``)."""
        if self.tls_scope is not None:
            return self.tls_scope
        from edgeshield.errors import EdgeShieldError
        from edgeshield.transport import identity_from_der

        der, error, identity = self.mquic.peer.der, None, None
        if der:
            try:
                identity = identity_from_der(der)
                problem = self.server.verifier.guard.refusal(identity)  # resumed sessions skip the handshake check
                if problem is not None:
                    error, identity = problem, None
            except EdgeShieldError as exc:
                error = str(exc)
        suite = self.mquic.tls.key_schedule.cipher_suite if self.mquic.tls.key_schedule is not None else None
        self.identity = identity
        over_cap = identity is not None and not self._bind(identity.name)
        self.tls_scope = scope_extension(der, identity, error, "TLSv1.3",
                                         _SUITE_NAMES.get(suite, str(suite)) if suite is not None else None)
        self.tls_scope["edgeshield.transport"] = "h3"
        if over_cap:  # every request on it answered 503 by the middleware, as over TCP
            self.tls_scope["edgeshield.over_cap"] = True
        return self.tls_scope

    def _bind(self, name: str) -> bool:
        dispatcher = self.server._dispatcher
        if dispatcher is None:
            return True
        held = dispatcher.by_identity.setdefault(name, set())
        if len(held) >= self.server.gate.limits.max_connections_per_identity:
            if not held:
                del dispatcher.by_identity[name]
            return False
        held.add(self)
        self._bound = name
        return True

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        elif isinstance(event, HandshakeCompleted):
            self._handshake_done = True
            self._deadline.cancel()
        elif isinstance(event, ConnectionTerminated):
            if not self._handshake_done and 0x100 <= event.error_code <= 0x1FF:
                self.server.events.handshake_failed(event.reason_phrase or f"alert {event.error_code - 0x100}",
                                                    self.address)
            self.release()
        if self.h3 is None:
            return
        try:
            h3_events = self.h3.handle_event(event)
        except H3Error as exc:  # aioquic closes the connection with the H3 error; count it like malformed HTTP
            self.server.events.refused(f"malformed HTTP/3: {type(exc).__name__}", self.address)
            return
        for h3_event in h3_events:
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            if event.stream_id in self._requests:
                return  # trailers: ignored
            request = _Request(self, event)
            self._requests[event.stream_id] = request
            request.task = asyncio.ensure_future(request.run())
            request.task.add_done_callback(lambda _t: self._requests.pop(request.stream_id, None))
            if event.stream_ended:
                request.body_done()
        elif isinstance(event, DataReceived):
            found = self._requests.get(event.stream_id)
            if found is not None:
                found.data(event.data, event.stream_ended)


_SUITE_NAMES = {tls.CipherSuite.AES_128_GCM_SHA256: "TLS_AES_128_GCM_SHA256",
                tls.CipherSuite.AES_256_GCM_SHA384: "TLS_AES_256_GCM_SHA384",
                tls.CipherSuite.CHACHA20_POLY1305_SHA256: "TLS_CHACHA20_POLY1305_SHA256"}


class _Request:
    """One request stream: its body queued for the app (bounded), the app's answer sent as HTTP/3 frames."""

    def __init__(self, protocol: _H3Protocol, event: HeadersReceived) -> None:
        self.protocol, self.stream_id = protocol, event.stream_id
        self.headers = event.headers
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.received = 0
        self.too_large = False
        self.task: asyncio.Future[None] | None = None
        self.early = event.stream_id in protocol.mquic.early_streams

    def data(self, chunk: bytes, ended: bool) -> None:
        self.received += len(chunk)
        if self.too_large:
            return
        if self.received > self.protocol.server.max_body_bytes:  # the middleware answers 413 from what it got
            self.too_large = True
            self.queue.put_nowait({"type": "http.request", "body": chunk, "more_body": False})
            with contextlib.suppress(Exception):  # STOP_SENDING: the client stops uploading the rest
                self.protocol._quic.stop_stream(self.stream_id, _H3_EXCESSIVE_LOAD)
                self.protocol.transmit()
            return
        self.early = self.early or self.stream_id in self.protocol.mquic.early_streams
        self.queue.put_nowait({"type": "http.request", "body": chunk, "more_body": not ended})

    def body_done(self) -> None:
        self.queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    def gone(self) -> None:
        self.queue.put_nowait({"type": "http.disconnect"})

    async def run(self) -> None:
        protocol, server = self.protocol, self.protocol.server
        pseudo = {k: v for k, v in self.headers if k.startswith(b":")}
        method = pseudo.get(b":method", b"").decode("latin-1")
        raw_path = pseudo.get(b":path", b"/")
        path, _, query = raw_path.partition(b"?")
        headers = [(k, v) for k, v in self.headers if not k.startswith(b":")]
        authority = pseudo.get(b":authority")
        if authority is not None:
            headers.append((b"host", authority))
        if self.early and method not in IDEMPOTENT:
            server.refused_early += 1
            server.events.refused("0-RTT non-idempotent request refused 425", protocol.address)
            self._send_plain(425, b'{"error": "too early: repeat this request after the handshake (RFC 8470)"}')
            return
        if self.early:
            server.served_early += 1
        host, port = protocol.address, 0
        with contextlib.suppress(Exception):
            peer = protocol._quic._network_paths[0].addr
            host, port = peer[0], peer[1]
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "3",
            "method": method, "scheme": "https", "path": path.decode("utf-8", "replace"), "raw_path": path,
            "query_string": query, "root_path": "", "headers": headers, "client": (host, port),
            "server": (server.host, server.port), "extensions": {"tls": protocol._scope()},
            "state": {},
        }
        try:
            await server.app(scope, self.queue.get, self._send)
        except Exception:  # the middleware contains the app's errors; this is the server's own
            log.exception("HTTP/3 request failed")

    def _send_plain(self, status: int, body: bytes) -> None:
        h3 = self.protocol.h3
        if h3 is None:
            return
        with contextlib.suppress(Exception):
            h3.send_headers(self.stream_id, [(b":status", str(status).encode()),
                                             (b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())])
            h3.send_data(self.stream_id, body, end_stream=True)
            self.protocol.transmit()

    async def _send(self, message: Message) -> None:
        h3 = self.protocol.h3
        if h3 is None:
            return
        try:
            if message["type"] == "http.response.start":
                headers = [(b":status", str(message["status"]).encode())]
                headers += [(k.lower(), v) for k, v in message.get("headers", [])
                            if k.lower() not in (b"connection", b"transfer-encoding", b"keep-alive")]
                h3.send_headers(self.stream_id, headers)
            elif message["type"] == "http.response.body":
                h3.send_data(self.stream_id, message.get("body", b""), end_stream=not message.get("more_body"))
        except Exception:  # noqa: BLE001  # the stream or the connection is gone: nothing to answer on
            return
        self.protocol.transmit()


def h3_server_for(app: ASGIApp, cfg: Any, *, guard: CrlGuard, gate: ConnectionGate,
                  events: ConnectionEvents) -> H3Server:
    """The HTTP/3 listener for a ``ServeConfig`` (``cfg.http3_port``), sharing the TCP server's app and CRL."""
    from edgeshield.transport._tls import _resolve_ca

    ca_cert, _ = _resolve_ca(cfg.ca, cfg.crl)
    return H3Server(app, host=cfg.host, port=cfg.http3_port, ca_cert=ca_cert, cert=Path(cfg.cert),
                    key=Path(cfg.key), guard=guard, gate=gate, events=events, passphrase=cfg.passphrase,
                    max_body_bytes=cfg.max_body_bytes)

