"""Benchmark: every transport's overhead, side by side in one run on loopback.

    python benchmarks/transport.py [--quick] [--json PATH]

Protocol (fixed; every figure comes from this run, all traffic goes to 127.0.0.1):

0. Set-up (untimed): fresh owner/device keys, the shipped digits model protected into a bundle, a device CA
   (ECDSA P-256) with a server certificate for 127.0.0.1 and ``alice`` (client), plus, for the UDP negative matrix,
   a revoked client and a client of a foreign CA. Servers run as subprocesses (never sharing a GIL with the client):
   * plain: the same ``create_app`` without TLS, RBAC or audit under plain uvicorn (as in benchmarks/server.py);
   * tls13: that app under uvicorn with a TLS 1.3-only server context and no client certificate;
   * mtls: ``python -m edgeshield serve`` (mutual TLS 1.3, RBAC, validation, audit), per-address caps lifted;
   * dtls: a DTLS 1.2 echo server on pyOpenSSL with mutual authentication and a stateless cookie exchange
     (HelloVerifyRequest, what a DTLS server facing a network must do), certificates from the same CA;
   * h3: ``edgeshield serve --http3-port`` (ServeConfig.http3_port: the same app over QUIC with mutual TLS 1.3,
     edgeshield.server._h3), measured with aioquic's own client so that 1-RTT and 0-RTT can be timed apart;
   * ohttp: ``edgeshield serve --ohttp`` with ``edgeshield relay`` in front (mutual TLS on both hops), measured with
     ``edgeshield.transport.OhttpClient``. A row whose extra or server is missing says why; its keys are null.
1. Per transport, alternating per iteration: handshake (TCP connect + TLS handshake, or the UDP equivalents),
   first response (handshake + one ``GET /healthz``, or one echo for DTLS), and request latency on an established
   connection (keep-alive ``GET /healthz``; the DTLS row echoes 16 bytes). p50/p99 in ms and as a ratio to plain
   TCP (handshake ÷ TCP connect, first response ÷ TCP connect + GET, request ÷ plain keep-alive GET).
2. HTTP/3 through ``benchmarks/_udp_loss.py`` (a user-space UDP forwarder, seeded, dropping 1 % and 5 % of
   datagrams each way): request p50/p99 on a fresh connection per request batch. The kernel here has no ``netem``,
   so TCP under loss is not measured.
3. OHTTP replay (each captured encapsulated request sent again through the relay; accepted replays counted, target 0)
   and the UDP negative matrix (no client cert, foreign CA, revoked, 0-RTT POST, replayed 0-RTT, junk datagrams).

The threat model's quoted figures are printed beside the measured ones: TLS 1.3 "5–10 ms", mTLS "10–15 ms",
DTLS "3–7 ms", IPsec "15–25 ms" (IPsec is the operating system's and is not measured here).
``--quick`` uses fewer iterations, named in the ``scale`` key.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off
from server import HOST, UNCAPPED_FLAGS, ServerProc  # benchmarks/server.py, beside this script

from _machine import Background, hardware, open_report, write_report  # benchmarks/_machine.py, beside this script

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

HERE = Path(__file__).resolve().parent
QUOTED = {"tls13": "5–10 ms", "mtls": "10–15 ms", "mtls_resumed": "10–15 ms (no figure for resumption)",
          "dtls": "3–7 ms", "ipsec": "15–25 ms"}
SIZES = {"handshakes": (60, 600), "h3_handshakes": (30, 300), "requests": (200, 2000), "loss_requests": (40, 300),
         "ohttp": (60, 500)}
DTLS_VERSION = 0xFEFD  # DTLS 1.2 (pyOpenSSL has no constant for it)
IO_TIMEOUT_S = 5.0


def _size(name: str, quick: bool) -> int:
    return SIZES[name][0 if quick else 1]


# --- set-up ---------------------------------------------------------------------------------------------------------
def prepare(work: Path) -> dict[str, Any]:
    from edgeshield import audit, bundles, keys, transport
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.models import digits_input_spec, digits_model_path

    k = work / "keys"
    keys.init_keys(k)
    bundle = work / "digits.esb"
    bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")],
                    metadata={METADATA_KEY: digits_input_spec().to_json()})
    ca, foreign = work / "ca", work / "foreign-ca"
    transport.init_ca(ca)
    transport.init_ca(foreign, name="Foreign CA")
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=[HOST])
    alice = transport.issue(ca, name="alice", role="client")
    revoked = transport.issue(ca, name="mallory", role="client")
    transport.revoke(ca, name="mallory", reason="key-compromise")
    stranger = transport.issue(foreign, name="stranger", role="client")
    relay_tls = transport.issue(ca, name="relay-1-tls", role="relay", server=True, sans=[HOST])
    relay_client = transport.issue(ca, name="relay-1", role="relay")
    audit.generate_signing_key(work / "audit.key")
    return {"work": str(work), "bundle": str(bundle), "owner_pub": str(k / "owner.pub"),
            "device_key": str(k / "device.key"), "ca": str(ca), "ca_crt": str(ca / "ca.crt"),
            "server_crt": str(server.cert_path), "server_key": str(server.key_path),
            "alice": [str(alice.cert_path), str(alice.key_path)],
            "revoked": [str(revoked.cert_path), str(revoked.key_path)],
            "foreign": [str(stranger.cert_path), str(stranger.key_path)], "foreign_ca": str(foreign),
            "relay_tls": [str(relay_tls.cert_path), str(relay_tls.key_path)],
            "relay_client": [str(relay_client.cert_path), str(relay_client.key_path)],
            "audit_key": str(work / "audit.key")}


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _plain_state(p: dict[str, Any]) -> Any:
    from edgeshield import bundles, keys
    from edgeshield.server import ServerState
    from edgeshield.server._limits import Limits

    opened = bundles.open_bundle(p["bundle"], keys.load_owner_public_key(p["owner_pub"]),
                                 keys.load_device_private_key(p["device_key"]))
    return ServerState(session=opened.session, manifest=opened.manifest, rbac=None, audit=None, spec=None,
                       require_client_cert=False, max_body_bytes=65536,
                       limits=Limits(handshakes_per_second_per_address=1e6, handshake_burst_per_address=1_000_000,
                                     max_connections_per_address=512, max_in_flight=256,
                                     max_in_flight_per_identity=256, max_connections_per_identity=512))


def child_http(p: dict[str, Any], port: int, tls: bool) -> None:
    """The same ASGI app under plain uvicorn: no TLS, or TLS 1.3 with a server certificate and no client one."""
    import uvicorn

    from edgeshield.server import create_app
    from edgeshield.server._serve import log_config

    factory = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(p["server_crt"], p["server_key"])

        def factory(_cfg: Any, _default: Any) -> ssl.SSLContext:
            return ctx

    config = uvicorn.Config(create_app(_plain_state(p)), host=HOST, port=port, http="httptools",
                            timeout_keep_alive=30, limit_concurrency=256, log_config=log_config(),
                            server_header=False, date_header=False, ssl_context_factory=factory,
                            ssl_certfile=p["server_crt"] if tls else None)
    uvicorn.Server(config).run()


# --- DTLS 1.2 (pyOpenSSL), memory BIOs over a UDP socket --------------------------------------------------------
def dtls_context(p: dict[str, Any], who: str, *, server: bool, ca: str | None = None) -> Any:
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS_VERSION)
    ctx.set_max_proto_version(DTLS_VERSION)
    cert, key = (p["server_crt"], p["server_key"]) if server else p[who]
    ctx.use_certificate_file(cert)
    ctx.use_privatekey_file(key)
    ctx.load_verify_locations(ca or p["ca_crt"])
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda _c, _x, _e, _d, ok: bool(ok))
    if server:
        secret = os.urandom(32)

        def cookie(conn: Any) -> bytes:  # stateless: the HMAC of the peer's address under a per-run secret
            return hmac.new(secret, repr(conn.get_app_data()).encode(), hashlib.sha256).digest()[:16]

        ctx.set_cookie_generate_callback(cookie)
        ctx.set_cookie_verify_callback(lambda conn, c: hmac.compare_digest(c, cookie(conn)))
    return ctx


def _dtls_flush(conn: Any, sock: socket.socket, addr: tuple[str, int] | None = None) -> None:
    from OpenSSL import SSL

    while True:
        try:
            data = conn.bio_read(65536)
        except SSL.WantReadError:
            return
        if addr is None:
            sock.send(data)
        else:
            sock.sendto(data, addr)


def child_dtls(p: dict[str, Any], port: int) -> None:
    """A DTLS 1.2 echo server for one client at a time: cookie exchange, mutual handshake, echo until "bye"."""
    from OpenSSL import SSL

    ctx = dtls_context(p, "", server=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, port))
    sock.settimeout(IO_TIMEOUT_S)
    while True:
        try:
            data, addr = sock.recvfrom(65536)
        except TimeoutError:
            continue
        conn = SSL.Connection(ctx, None)
        conn.set_app_data(addr)
        conn.set_accept_state()
        try:
            while True:  # ClientHello -> HelloVerifyRequest until the cookie comes back
                conn.bio_write(data)
                try:
                    conn.DTLSv1_listen()
                    break
                except SSL.WantReadError:
                    _dtls_flush(conn, sock, addr)
                    data, addr = sock.recvfrom(65536)
            while True:
                try:
                    conn.do_handshake()
                    _dtls_flush(conn, sock, addr)
                    break
                except SSL.WantReadError:
                    _dtls_flush(conn, sock, addr)
                    data, addr = sock.recvfrom(65536)
                    conn.bio_write(data)
            while True:
                data, addr = sock.recvfrom(65536)
                conn.bio_write(data)
                try:
                    msg = conn.recv(65536)
                except SSL.WantReadError:
                    continue
                if msg == b"bye":
                    break
                conn.send(msg)
                _dtls_flush(conn, sock, addr)
        except (SSL.Error, OSError):
            continue  # a refused or abandoned handshake: next client


class DtlsClient:
    """One DTLS 1.2 connection to the echo server (connected UDP socket, memory BIOs)."""

    def __init__(self, ctx: Any, port: int) -> None:
        from OpenSSL import SSL

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((HOST, port))
        self.sock.settimeout(IO_TIMEOUT_S)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()

    def handshake(self) -> None:
        from OpenSSL import SSL

        while True:
            try:
                self.conn.do_handshake()
                _dtls_flush(self.conn, self.sock)
                return
            except SSL.WantReadError:
                _dtls_flush(self.conn, self.sock)
                self.conn.bio_write(self.sock.recv(65536))

    def echo(self, msg: bytes) -> bytes:
        from OpenSSL import SSL

        self.conn.send(msg)
        _dtls_flush(self.conn, self.sock)
        while True:
            self.conn.bio_write(self.sock.recv(65536))
            try:
                out: bytes = self.conn.recv(65536)
                return out
            except SSL.WantReadError:
                continue

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(b"bye")
            _dtls_flush(self.conn, self.sock)
        self.sock.close()


# --- TCP rows: raw sockets, HTTP/1.1 by hand so that no client library's cost differs between rows ---------------
def _connect(port: int) -> socket.socket:
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def _get(sock: Any, keep_alive: bool = True) -> None:
    """One ``GET /healthz`` and its whole answer (headers, then Content-Length bytes); expect a 200."""
    conn = "keep-alive" if keep_alive else "close"
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: {conn}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed mid-answer: {buf[:80]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"unexpected answer to GET /healthz: {head[:80]!r}")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk


def tls_client_context(p: dict[str, Any], who: str | None) -> ssl.SSLContext:
    if who is None:  # server authentication only
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(p["ca_crt"])
        return ctx
    from edgeshield import transport

    cert, key = p[who]
    return transport.client_context(p["ca_crt"], cert, key)


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(samples: list[float]) -> dict[str, float | None]:
    ms = [s * 1000 for s in samples]
    return {"p50": _pct(ms, 50), "p99": _pct(ms, 99), "mean": statistics.fmean(ms) if ms else None,
            "n": float(len(ms))}


def bench_tcp_rows(p: dict[str, Any], ports: dict[str, int], n: int, n_req: int) -> dict[str, Any]:
    """Handshake, first response and keep-alive request for plain TCP, TLS 1.3, mTLS full/resumed, and DTLS 1.2."""
    tls_ctx, mtls_ctx = tls_client_context(p, None), tls_client_context(p, "alice")
    dtls_ctx = dtls_context(p, "alice", server=False)
    lat: dict[str, list[float]] = {k: [] for k in (
        "tcp_hs", "tcp_first", "tls13_hs", "tls13_first", "mtls_hs", "mtls_first", "mtls_resumed_hs",
        "mtls_resumed_first", "dtls_hs", "dtls_first")}
    reused = attempts = 0

    def tls_trial(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None,
                  hs_key: str, first_key: str, keep: bool) -> tuple[ssl.SSLSession | None, bool]:
        t0 = time.perf_counter()
        s = ctx.wrap_socket(_connect(port), server_hostname=HOST, session=session)
        t1 = time.perf_counter()
        try:
            _get(s, keep_alive=False)
            t2 = time.perf_counter()
            was_reused = s.session_reused
            if keep and (session is None or was_reused):
                lat[hs_key].append(t1 - t0)
                lat[first_key].append(t2 - t0)
            return s.session, was_reused
        finally:
            s.close()

    session = tls_trial(mtls_ctx, ports["mtls"], None, "mtls_hs", "mtls_first", False)[0]
    warmup = 10
    for i in range(n + warmup):
        keep = i >= warmup
        t0 = time.perf_counter()
        raw = _connect(ports["plain"])
        t1 = time.perf_counter()
        _get(raw, keep_alive=False)
        t2 = time.perf_counter()
        raw.close()
        if keep:
            lat["tcp_hs"].append(t1 - t0)
            lat["tcp_first"].append(t2 - t0)
        tls_trial(tls_ctx, ports["tls13"], None, "tls13_hs", "tls13_first", keep)
        tls_trial(mtls_ctx, ports["mtls"], None, "mtls_hs", "mtls_first", keep)
        session, was = tls_trial(mtls_ctx, ports["mtls"], session, "mtls_resumed_hs", "mtls_resumed_first", keep)
        if keep:
            attempts += 1
            reused += bool(was)
        t0 = time.perf_counter()
        c = DtlsClient(dtls_ctx, ports["dtls"])
        try:
            c.handshake()
            t1 = time.perf_counter()
            c.echo(b"x" * 16)
            t2 = time.perf_counter()
        finally:
            c.close()
        if keep:
            lat["dtls_hs"].append(t1 - t0)
            lat["dtls_first"].append(t2 - t0)
    out: dict[str, Any] = {k: _ms(v) for k, v in lat.items()}
    out["mtls_resumption_fraction"] = reused / attempts if attempts else None
    # requests on one established connection per transport, in alternating blocks
    req: dict[str, list[float]] = {"tcp": [], "tls13": [], "mtls": [], "dtls": []}
    conns: dict[str, Any] = {"tcp": _connect(ports["plain"]),
                             "tls13": tls_ctx.wrap_socket(_connect(ports["tls13"]), server_hostname=HOST),
                             "mtls": mtls_ctx.wrap_socket(_connect(ports["mtls"]), server_hostname=HOST)}
    dtls = DtlsClient(dtls_ctx, ports["dtls"])
    dtls.handshake()
    try:
        blocks = 4
        for _ in range(blocks):
            for name in req:
                for _ in range(n_req // blocks):
                    t0 = time.perf_counter()
                    if name == "dtls":
                        dtls.echo(b"x" * 16)
                    else:
                        _get(conns[name])
                    req[name].append(time.perf_counter() - t0)
    finally:
        dtls.close()
        for c in conns.values():
            c.close()
    out.update({f"{k}_req": _ms(v) for k, v in req.items()})
    return out


# --- HTTP/3 and OHTTP rows: through the library's own clients where they exist ----------------------------------
def not_available(why: str) -> dict[str, Any]:
    return {"available": False, "why": why}


class H3Answer:
    """One HTTP/3 answer: status, body, and whether it came back on a connection whose early data was accepted."""

    def __init__(self, status: int | None, body: bytes, early_accepted: bool, resumed: bool) -> None:
        self.status, self.body, self.early_accepted, self.resumed = status, body, early_accepted, resumed


def _h3_protocol() -> Any:
    """An aioquic client protocol speaking HTTP/3: ``request`` sends one request and waits for its whole answer."""
    import asyncio

    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.h3.connection import H3Connection
    from aioquic.h3.events import DataReceived, HeadersReceived
    from aioquic.quic.events import ConnectionTerminated

    class H3Client(QuicConnectionProtocol):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.h3 = H3Connection(self._quic)
            self.answers: dict[int, list[Any]] = {}
            self.waiters: dict[int, asyncio.Future[tuple[int | None, bytes]]] = {}
            self.closed_reason: str | None = None

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, ConnectionTerminated):
                self.closed_reason = f"{event.error_code}: {event.reason_phrase}"
                for fut in self.waiters.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError(f"connection closed ({self.closed_reason})"))
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    status = next((int(v) for k, v in ev.headers if k == b":status"), None)
                    self.answers.setdefault(ev.stream_id, [None, b""])[0] = status
                elif isinstance(ev, DataReceived):
                    self.answers.setdefault(ev.stream_id, [None, b""])[1] += ev.data
                else:
                    continue
                fut = self.waiters.get(ev.stream_id)
                if ev.stream_ended and fut is not None and not fut.done():
                    status, body = self.answers.pop(ev.stream_id)
                    fut.set_result((status, body))

        async def request(self, method: str, path: str, body: bytes = b"",
                          content_type: str = "application/json") -> tuple[int | None, bytes]:
            sid = self._quic.get_next_available_stream_id()
            headers = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", HOST.encode()),
                       (b":path", path.encode())]
            if body:
                headers.append((b"content-type", content_type.encode()))
            self.h3.send_headers(sid, headers, end_stream=not body)
            if body:
                self.h3.send_data(sid, body, end_stream=True)
            fut: asyncio.Future[tuple[int | None, bytes]] = asyncio.get_running_loop().create_future()
            self.waiters[sid] = fut
            self.transmit()
            try:
                return await asyncio.wait_for(fut, IO_TIMEOUT_S)
            finally:
                self.waiters.pop(sid, None)

    return H3Client


def h3_configuration(p: dict[str, Any], who: str | None, *, ca: str | None = None, ticket: Any = None) -> Any:
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=HOST,
                            idle_timeout=IO_TIMEOUT_S)
    cfg.load_verify_locations(ca or p["ca_crt"])
    if who is not None:
        cert, key = p[who]
        cfg.load_cert_chain(cert, key)
    cfg.session_ticket = ticket
    return cfg


async def h3_trial(p: dict[str, Any], port: int, who: str | None = "alice", *, ticket: Any = None,
                   method: str = "GET", path: str = "/healthz", body: bytes = b"", early: bool = False,
                   ca: str | None = None) -> tuple[float, float, H3Answer, Any]:
    """One fresh HTTP/3 connection and one request: (handshake s, first response s, the answer, a new ticket).

    ``early``: send the request before the handshake completes (0-RTT with ``ticket``); the handshake time is
    then the time to the answer as well.
    """
    from aioquic.asyncio import connect

    tickets: list[Any] = []
    t0 = time.perf_counter()
    async with connect(HOST, port, configuration=h3_configuration(p, who, ca=ca, ticket=ticket),
                       create_protocol=_h3_protocol(), session_ticket_handler=tickets.append,
                       wait_connected=not early) as client:
        t1 = time.perf_counter()
        status, data = await client.request(method, path, body)  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        tls = client._quic.tls
        answer = H3Answer(status, data, bool(getattr(tls, "early_data_accepted", False)),
                          bool(getattr(tls, "session_resumed", False)))
        for _ in range(20):  # the server's NewSessionTicket follows the handshake
            if tickets:
                break
            import asyncio

            await asyncio.sleep(0.005)
    return t1 - t0, t2 - t0, answer, tickets[-1] if tickets else None


def _refused(coro: Any) -> tuple[bool, str]:
    """Run one trial: (refused, what happened) — refused unless it answered 200."""
    import asyncio

    try:
        _hs, _first, answer, _t = asyncio.run(coro)
    except Exception as exc:  # noqa: BLE001 - a refused handshake surfaces as whatever aioquic raises
        return True, f"{type(exc).__name__}: {str(exc)[:120] or 'connection refused or timed out'}"
    return answer.status != 200, f"HTTP {answer.status}"


async def _h3_rows(p: dict[str, Any], port: int, n: int, n_req: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"hs": [], "first": [], "early_first": [], "req": []}
    accepted = attempts = 0
    ticket = (await h3_trial(p, port))[3]
    for i in range(n + 5):
        hs, first, answer, new_ticket = await h3_trial(p, port)
        if answer.status != 200:
            raise RuntimeError(f"HTTP/3 GET /healthz answered {answer.status}")
        _, e_first, e_answer, e_ticket = await h3_trial(p, port, ticket=ticket or new_ticket, early=True)
        ticket = e_ticket or new_ticket  # tickets are single use where the server enforces it
        if i < 5:
            continue
        lat["hs"].append(hs)
        lat["first"].append(first)
        lat["early_first"].append(e_first)
        attempts += 1
        accepted += e_answer.early_accepted
    from aioquic.asyncio import connect

    async with connect(HOST, port, configuration=h3_configuration(p, "alice"),
                       create_protocol=_h3_protocol()) as client:
        for i in range(n_req + 10):
            t0 = time.perf_counter()
            status, _ = await client.request("GET", "/healthz")  # type: ignore[attr-defined]
            if status != 200:
                raise RuntimeError(f"HTTP/3 GET /healthz answered {status}")
            if i >= 10:
                lat["req"].append(time.perf_counter() - t0)
    out = {k: _ms(v) for k, v in lat.items()}
    return {"h3_mtls_handshake_p50_ms": out["hs"]["p50"], "h3_mtls_handshake_p99_ms": out["hs"]["p99"],
            "h3_first_response_p50_ms": out["first"]["p50"], "h3_first_response_p99_ms": out["first"]["p99"],
            "h3_0rtt_first_response_p50_ms": out["early_first"]["p50"],
            "h3_0rtt_first_response_p99_ms": out["early_first"]["p99"],
            "h3_0rtt_accepted_fraction": accepted / attempts if attempts else None,
            "h3_request_p50_ms": out["req"]["p50"], "h3_request_p99_ms": out["req"]["p99"]}


async def _lossy_requests(p: dict[str, Any], port: int, n: int) -> tuple[list[float], int]:
    """n sequential GETs through the lossy link, on one connection while it lives: (latencies, failures)."""
    from aioquic.asyncio import connect

    lat: list[float] = []
    failures = 0
    done = 0
    while done < n and failures < max(5, n // 5):
        try:
            async with connect(HOST, port, configuration=h3_configuration(p, "alice"),
                               create_protocol=_h3_protocol()) as client:
                while done < n:
                    t0 = time.perf_counter()
                    status, _ = await client.request("GET", "/healthz")  # type: ignore[attr-defined]
                    lat.append(time.perf_counter() - t0)
                    done += 1
                    if status != 200:
                        failures += 1
        except (ConnectionError, TimeoutError, OSError):
            failures += 1
            done += 1
    return lat, failures


def bench_h3_loss(p: dict[str, Any], port: int, n: int, work: Path) -> dict[str, Any]:
    import asyncio

    out: dict[str, Any] = {}
    for loss in (0.01, 0.05):
        tag = f"loss{round(loss * 100)}"
        fwd = subprocess.Popen([sys.executable, str(HERE / "_udp_loss.py"), "--upstream", f"{HOST}:{port}",
                                "--loss", str(loss), "--seed", "1"], stdout=subprocess.PIPE, text=True)
        try:
            first = fwd.stdout.readline().split() if fwd.stdout is not None else []
            if len(first) != 3 or first[0] != "listening":
                raise RuntimeError(f"the lossy forwarder did not start: {first}")
            lat, failures = asyncio.run(_lossy_requests(p, int(first[2]), n))
        finally:
            fwd.send_signal(signal.SIGTERM)
            try:
                tail, _ = fwd.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                fwd.kill()
                tail, _ = fwd.communicate(timeout=5)
        stats = json.loads(tail.strip().splitlines()[-1]) if tail.strip() else {}
        m = _ms(lat)
        out.update({f"h3_request_p50_ms_{tag}": m["p50"], f"h3_request_p99_ms_{tag}": m["p99"],
                    f"h3_request_failures_{tag}": failures, f"h3_{tag}_dropped_share": stats.get("dropped_share")})
    return out


def bench_udp_negative(p: dict[str, Any], port: int) -> dict[str, Any]:
    """The negative matrix over UDP; each case is refused or not (a 200 is not refused)."""
    import asyncio
    import random

    body = json.dumps({"inputs": [[0.0] * 64]}).encode()
    cases: dict[str, tuple[bool, str]] = {}
    cases["no_client_certificate"] = _refused(h3_trial(p, port, None))
    cases["foreign_ca_certificate"] = _refused(h3_trial(p, port, "foreign"))
    cases["revoked_certificate"] = _refused(h3_trial(p, port, "revoked"))
    ticket = asyncio.run(h3_trial(p, port))[3]
    if ticket is None:
        cases["0rtt_post"] = (True, "the server issues no session ticket: no 0-RTT at all")
        cases["0rtt_replayed_ticket"] = (True, "the server issues no session ticket: no 0-RTT at all")
    else:
        _, _, post, _ = asyncio.run(h3_trial(p, port, ticket=ticket, early=True, method="POST", path="/v1/predict",
                                             body=body))
        cases["0rtt_post"] = (post.status == 425 or not post.early_accepted,
                              f"HTTP {post.status}, early data {'accepted' if post.early_accepted else 'rejected'}")
        # the same ticket with early data again: what a replayed ClientHello + 0-RTT presents to the server
        _, _, again, _ = asyncio.run(h3_trial(p, port, ticket=ticket, early=True))
        cases["0rtt_replayed_ticket"] = (not again.early_accepted or again.status == 425,
                                         (f"HTTP {again.status}, early data "
                                         f"{'accepted' if again.early_accepted else 'rejected'}"))
    rng = random.Random(16)  # noqa: S311 - junk, not crypto
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for i in range(2000):
            size = rng.choice((1, 20, 1200, 1500, 9000, 65000)) if i % 10 else 1200
            first = bytes([rng.choice((0xC0, 0x40, 0x00, 0xFF))])  # long/short header bits, and nonsense
            with contextlib.suppress(OSError):
                junk.sendto(first + rng.randbytes(size - 1), (HOST, port))
    alive = not _refused(h3_trial(p, port))[0]
    cases["junk_datagrams"] = (alive, "2,000 junk datagrams (1 B to 65,000 B) from one address; the server "
                               + ("still answers" if alive else "no longer answers"))
    return {"udp_negative_cases": len(cases), "udp_negative_refused": sum(ok for ok, _ in cases.values()),
            "udp_negative_matrix": {k: {"refused": ok, "outcome": why} for k, (ok, why) in cases.items()},
            "udp_tls12_only": "not a case over QUIC: QUIC carries TLS 1.3 only (RFC 9001 §4.2)"}


def child_h3(p: dict[str, Any], tcp_port: int, udp_port: int) -> None:
    """``edgeshield serve --http3-port``: the TCP server and, beside it, HTTP/3 (QUIC, mutual TLS 1.3) on UDP."""
    import dataclasses

    from edgeshield.server import build_state, make_server

    cfg = dataclasses.replace(_gateway_config(p, tcp_port), ohttp=False, ohttp_key=None, http3_port=udp_port,
                              audit_db=Path(p["work"]) / "audit-h3.db")
    server, _watcher = make_server(cfg, build_state(cfg))
    server.run()


def bench_h3(p: dict[str, Any], work: Path, quick: bool) -> dict[str, Any]:
    try:
        import aioquic  # noqa: F401

        from edgeshield.server import ServeConfig, _h3  # noqa: F401
    except ImportError as exc:
        return not_available(f"the h3 extra or edgeshield's HTTP/3 server is missing ({exc})")
    if "http3_port" not in ServeConfig.__dataclass_fields__:
        return not_available("this edgeshield's ServeConfig has no http3_port (serve --http3-port)")
    import asyncio

    port = _free_port(socket.SOCK_DGRAM)
    me = [sys.executable, str(Path(__file__).resolve()), "--prepared", str(work / "prepared.json")]
    tcp_port = _free_port()
    srv = ServerProc("h3", [*me, "--_child", "h3", "--port", str(tcp_port), "--udp-port", str(port)], tcp_port,
                     work / "h3.log")
    try:
        try:
            srv.wait_ready(lambda: asyncio.run(h3_trial(p, port))[2].status == 200)
        except RuntimeError as exc:
            return not_available(f"edgeshield's HTTP/3 server did not start: {str(exc)[-300:]}")
        out = asyncio.run(_h3_rows(p, port, _size("h3_handshakes", quick), _size("requests", quick)))
        out.update(bench_h3_loss(p, port, _size("loss_requests", quick), work))
        out.update(bench_udp_negative(p, port))
    finally:
        srv.stop()
    return out


def _gateway_config(p: dict[str, Any], port: int) -> Any:
    from edgeshield.server import ServeConfig
    from edgeshield.server._limits import Limits

    work = Path(p["work"])
    return ServeConfig(bundle=Path(p["bundle"]), owner_key=Path(p["owner_pub"]), device_key=Path(p["device_key"]),
                       ca=Path(p["ca"]), cert=Path(p["server_crt"]), key=Path(p["server_key"]),
                       audit_db=work / "audit-ohttp.db", audit_key=Path(p["audit_key"]), host=HOST, port=port,
                       max_body_bytes=65536, ohttp=True, ohttp_key=work / "ohttp.key", monitor=False,
                       limits=Limits(handshakes_per_second_per_address=1e6, handshake_burst_per_address=1_000_000,
                                     max_connections_per_address=512, max_in_flight=256))


def child_gateway(p: dict[str, Any], port: int) -> None:
    """``edgeshield serve --ohttp``'s server: the same ServeConfig with the OHTTP gateway on."""
    from edgeshield.server import build_state, make_server

    cfg = _gateway_config(p, port)
    server, _watcher = make_server(cfg, build_state(cfg))
    server.run()


def child_relay(p: dict[str, Any], port: int, gateway_port: int) -> None:
    """``edgeshield relay``: mutual TLS from clients, mutual TLS (relay role) to the gateway."""
    from edgeshield.transport._relay import RelayConfig, serve_relay

    serve_relay(RelayConfig(gateway_url=f"https://{HOST}:{gateway_port}", ca=Path(p["ca"]),
                            cert=Path(p["relay_tls"][0]), key=Path(p["relay_tls"][1]),
                            client_cert=Path(p["relay_client"][0]), client_key=Path(p["relay_client"][1]),
                            host=HOST, port=port))


def bench_ohttp(p: dict[str, Any], work: Path, quick: bool) -> dict[str, Any]:
    """One digit per request: POST /v1/predict over direct mTLS (keep-alive httpx) to the OHTTP-enabled server vs
    the same through the relay with OHTTP (encapsulate + sign, relay hop, decapsulate + verify, and back); then
    each captured encapsulation replayed through the relay."""
    try:
        import pyhpke  # noqa: F401

        from edgeshield.transport._ohttp import BhttpResponse
        from edgeshield.transport._ohttp_client import OhttpClient, OhttpRefusedError
    except ImportError as exc:
        return not_available(f"the ohttp extra or edgeshield's OHTTP client is missing ({exc})")
    import httpx

    from edgeshield.models import load_digits_split

    n = _size("ohttp", quick)
    ports = {"gateway": _free_port(), "relay": _free_port()}
    me = [sys.executable, str(Path(__file__).resolve()), "--prepared", str(work / "prepared.json")]
    gw = ServerProc("ohttp-gateway", [*me, "--_child", "gateway", "--port", str(ports["gateway"])],
                    ports["gateway"], work / "gateway.log")
    relay = ServerProc("relay", [*me, "--_child", "relay", "--port", str(ports["relay"]), "--gateway-port",
                                 str(ports["gateway"])], ports["relay"], work / "relay.log")
    cert, key = p["alice"]
    x = load_digits_split().x_test
    bodies = [json.dumps({"inputs": x[i % len(x)][None].tolist()}).encode() for i in range(n)]
    try:
        direct = httpx.Client(base_url=f"https://{HOST}:{ports['gateway']}",
                              verify=tls_client_context(p, "alice"), timeout=10)
        client = OhttpClient(f"https://{HOST}:{ports['relay']}", ca=p["ca"], cert=cert, key=key,
                             gateway_name="edge-1")
        try:
            gw.wait_ready(lambda: direct.get("/healthz").status_code == 200)
            relay.wait_ready(lambda: client.key_config() is not None)
        except RuntimeError as exc:
            return not_available(f"the OHTTP gateway or relay did not start: {str(exc)[-300:]}")
        lat: dict[str, list[float]] = {"direct": [], "ohttp": []}
        captured: list[bytes] = []
        statuses: dict[str, list[int]] = {"direct": [], "ohttp": []}
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = direct.post("/v1/predict", content=bodies[i % n], headers={"content-type": "application/json"})
            t1 = time.perf_counter()
            data, sender = client.encapsulate("POST", "/v1/predict", bodies[i % n])
            answer = BhttpResponse.parse(sender.open_response(client.send(data)))
            t2 = time.perf_counter()
            if i < 5:
                continue  # warm-up
            statuses["direct"].append(r.status_code)
            statuses["ohttp"].append(answer.status)
            lat["direct"].append(t1 - t0)
            lat["ohttp"].append(t2 - t1)
            captured.append(data)
        accepted = 0
        refused_with: dict[int, int] = {}
        for data in captured:
            try:
                client.send(data)
                accepted += 1
            except OhttpRefusedError as exc:
                refused_with[exc.status] = refused_with.get(exc.status, 0) + 1
        client.close()
        direct.close()
    finally:
        relay.stop()
        gw.stop()
    d, o = _ms(lat["direct"]), _ms(lat["ohttp"])
    return {"ohttp_request_p50_ms": o["p50"], "ohttp_request_p99_ms": o["p99"],
            "ohttp_direct_request_p50_ms": d["p50"], "ohttp_direct_request_p99_ms": d["p99"],
            "ohttp_vs_direct_latency_ratio": _ratio(o["p50"], d["p50"]), "ohttp_replays_sent": len(captured),
            "ohttp_replays_accepted": accepted, "ohttp_replay_refusals": {str(k): v for k, v in refused_with.items()},
            "ohttp_direct_non_200": sum(s != 200 for s in statuses["direct"]),
            "ohttp_non_200": sum(s != 200 for s in statuses["ohttp"])}


# --- report -------------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def machine_info() -> dict[str, str]:
    import cryptography
    import OpenSSL
    import uvicorn

    versions = [f"Python {platform.python_version()}", ssl.OPENSSL_VERSION, f"uvicorn {uvicorn.__version__}",
                (f"pyOpenSSL {OpenSSL.__version__} "
                f"({OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()})"),
                f"cryptography {cryptography.__version__}"]
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("aioquic", "hypercorn", "pyhpke"):
        try:
            versions.append(f"{mod} {version(mod)}")
        except PackageNotFoundError:
            versions.append(f"{mod} absent")
    hw = hardware()
    return {"hardware": hw, "versions": ", ".join(versions), "machine": f"{hw}; {', '.join(versions)}"}


def flatten(tcp: dict[str, Any], h3: dict[str, Any], oh: dict[str, Any]) -> dict[str, Any]:
    """The figures contract: flat keys, ms, ratios to plain TCP."""
    r: dict[str, Any] = {}
    base_hs, base_first, base_req = tcp["tcp_hs"]["p50"], tcp["tcp_first"]["p50"], tcp["tcp_req"]["p50"]
    for row in ("tcp", "tls13", "mtls", "mtls_resumed", "dtls"):
        hs, first = tcp[f"{row}_hs"], tcp[f"{row}_first"]
        name = "dtls12" if row == "dtls" else row
        r[f"{name}_handshake_p50_ms"], r[f"{name}_handshake_p99_ms"] = hs["p50"], hs["p99"]
        r[f"{name}_first_response_p50_ms"], r[f"{name}_first_response_p99_ms"] = first["p50"], first["p99"]
        r[f"{name}_handshake_vs_tcp_connect"] = _ratio(hs["p50"], base_hs)
        r[f"{name}_first_response_vs_tcp"] = _ratio(first["p50"], base_first)
    for row in ("tcp", "tls13", "mtls", "dtls"):
        q = tcp[f"{row}_req"]
        name = "dtls12" if row == "dtls" else row
        r[f"{name}_request_p50_ms"], r[f"{name}_request_p99_ms"] = q["p50"], q["p99"]
        r[f"{name}_request_vs_tcp"] = _ratio(q["p50"], base_req)
    r["mtls_resumption_fraction"] = tcp["mtls_resumption_fraction"]
    h3_keys = ("h3_mtls_handshake_p50_ms", "h3_mtls_handshake_p99_ms", "h3_first_response_p50_ms",
               "h3_first_response_p99_ms", "h3_0rtt_first_response_p50_ms", "h3_0rtt_first_response_p99_ms",
               "h3_0rtt_accepted_fraction", "h3_request_p50_ms", "h3_request_p99_ms", "h3_request_p50_ms_loss1",
               "h3_request_p99_ms_loss1", "h3_request_p50_ms_loss5", "h3_request_p99_ms_loss5",
               "h3_loss1_dropped_share", "h3_loss5_dropped_share", "h3_request_failures_loss1",
               "h3_request_failures_loss5", "udp_negative_cases", "udp_negative_refused", "udp_negative_matrix",
               "udp_tls12_only")
    for k in h3_keys:
        r[k] = h3.get(k)
    if r["h3_mtls_handshake_p50_ms"] is not None:
        r["h3_mtls_handshake_vs_tcp_connect"] = _ratio(r["h3_mtls_handshake_p50_ms"], base_hs)
        r["h3_request_vs_tcp"] = _ratio(r["h3_request_p50_ms"], base_req)
        r["h3_first_response_vs_tcp"] = _ratio(r["h3_first_response_p50_ms"], base_first)
        r["h3_0rtt_first_response_vs_tcp"] = _ratio(r["h3_0rtt_first_response_p50_ms"], base_first)
    else:
        r["h3_mtls_handshake_vs_tcp_connect"] = r["h3_request_vs_tcp"] = None
        r["h3_first_response_vs_tcp"] = r["h3_0rtt_first_response_vs_tcp"] = None
    r["h3_available"] = h3.get("available", True)
    r["h3_not_available_why"] = h3.get("why")
    for k in ("ohttp_request_p50_ms", "ohttp_request_p99_ms", "ohttp_direct_request_p50_ms",
              "ohttp_direct_request_p99_ms", "ohttp_vs_direct_latency_ratio", "ohttp_replays_sent",
              "ohttp_replays_accepted", "ohttp_replay_refusals", "ohttp_direct_non_200", "ohttp_non_200"):
        r[k] = oh.get(k)
    r["ohttp_available"] = oh.get("available", True)
    r["ohttp_not_available_why"] = oh.get("why")
    r["tls13_handshake_p50_ms"] = r["tls13_handshake_p50_ms"]
    r["tcp_under_loss"] = "not measured: this kernel has no netem, and a user-space TCP proxy would hide the loss"
    r["ipsec"] = "not measured: IPsec is the operating system's (see `edgeshield probe --address`)"
    return r


def print_report(console: Any, r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="Transport overhead on loopback (p50 / p99 ms; × = ratio of p50 to plain TCP)")
    for col in ("transport", "handshake", "× TCP connect", "first response", "× TCP", "request (established)",
                "× TCP", "threat model quotes"):
        t.add_column(col)

    def row(label: str, key: str, quoted: str = "", req: str | None = None) -> None:
        req = req if req is not None else key
        t.add_row(label, f"{_fmt(r.get(f'{key}_handshake_p50_ms'))} / {_fmt(r.get(f'{key}_handshake_p99_ms'))}",
                  _fmt(r.get(f"{key}_handshake_vs_tcp_connect"), 1),
                  f"{_fmt(r.get(f'{key}_first_response_p50_ms'))} / {_fmt(r.get(f'{key}_first_response_p99_ms'))}",
                  _fmt(r.get(f"{key}_first_response_vs_tcp"), 1),
                  f"{_fmt(r.get(f'{req}_request_p50_ms'))} / {_fmt(r.get(f'{req}_request_p99_ms'))}",
                  _fmt(r.get(f"{req}_request_vs_tcp"), 1), quoted)

    row("plain TCP (connect; GET /healthz)", "tcp")
    row("TLS 1.3 (server auth)", "tls13", QUOTED["tls13"])
    row("mutual TLS 1.3, full (edgeshield serve)", "mtls", QUOTED["mtls"])
    row("mutual TLS 1.3, resumed (ticket)", "mtls_resumed", QUOTED["mtls_resumed"], req="mtls")
    row("DTLS 1.2 mutual + cookie (pyOpenSSL; request = 16-byte echo, no HTTP)", "dtls12", QUOTED["dtls"])
    if r["h3_available"]:
        t.add_row("HTTP/3 mutual TLS 1.3, 1-RTT",
                  f"{_fmt(r['h3_mtls_handshake_p50_ms'])} / {_fmt(r['h3_mtls_handshake_p99_ms'])}",
                  _fmt(r["h3_mtls_handshake_vs_tcp_connect"], 1),
                  f"{_fmt(r['h3_first_response_p50_ms'])} / {_fmt(r['h3_first_response_p99_ms'])}",
                  _fmt(r["h3_first_response_vs_tcp"], 1),
                  f"{_fmt(r['h3_request_p50_ms'])} / {_fmt(r['h3_request_p99_ms'])}", _fmt(r["h3_request_vs_tcp"], 1),
                  QUOTED["dtls"] + " (the DTLS figure: UDP)")
        t.add_row(f"HTTP/3 0-RTT GET (resumed; early data accepted "
                  f"{_fmt(100 * (r['h3_0rtt_accepted_fraction'] or 0), 0)} %)", "-", "",
                  f"{_fmt(r['h3_0rtt_first_response_p50_ms'])} / {_fmt(r['h3_0rtt_first_response_p99_ms'])}",
                  _fmt(r["h3_0rtt_first_response_vs_tcp"], 1), "", "", "")
    else:
        t.add_row("HTTP/3", f"not available: {r['h3_not_available_why']}", *[""] * 6)
    if r["ohttp_available"]:
        t.add_row("OHTTP via relay (predict)", "-", "", "", "",
                  f"{_fmt(r['ohttp_request_p50_ms'])} / {_fmt(r['ohttp_request_p99_ms'])}",
                  f"{_fmt(r['ohttp_vs_direct_latency_ratio'], 2)} × direct mTLS", "")
    else:
        t.add_row("OHTTP via relay", f"not available: {r['ohttp_not_available_why']}", *[""] * 6)
    t.add_row("IPsec", "not measured (the OS's)", "", "", "", "", "", QUOTED["ipsec"])
    console.print(t)
    if r["h3_available"]:
        console.print(f"HTTP/3 under datagram loss (each way): 1 % -> {_fmt(r['h3_request_p50_ms_loss1'])} / "
                      f"{_fmt(r['h3_request_p99_ms_loss1'])} ms, 5 % -> {_fmt(r['h3_request_p50_ms_loss5'])} / "
                      f"{_fmt(r['h3_request_p99_ms_loss5'])} ms (p50 / p99). TCP under loss: {r['tcp_under_loss']}.")
        console.print(f"UDP negative matrix: {r['udp_negative_refused']} of {r['udp_negative_cases']} refused: "
                      + "; ".join(f"{k} -> {v['outcome']}" for k, v in (r["udp_negative_matrix"] or {}).items()))
    if r["ohttp_available"]:
        console.print(f"OHTTP replays through the relay accepted: {r['ohttp_replays_accepted']} of "
                      f"{r['ohttp_replays_sent']} (target 0).")
    console.print(f"mTLS resumption: {_fmt(100 * (r['mtls_resumption_fraction'] or 0), 0)} % of attempts resumed. "
                  "The quoted figures are the threat model's; every handshake here includes the TCP connect (or "
                  "the DTLS cookie round trip) and runs on loopback, so network round trips are absent.")


@contextlib.contextmanager
def servers(p: dict[str, Any], work: Path) -> Iterator[dict[str, int]]:
    ports = {"plain": _free_port(), "tls13": _free_port(), "mtls": _free_port(),
             "dtls": _free_port(socket.SOCK_DGRAM)}
    me = [sys.executable, str(Path(__file__).resolve()), "--prepared", str(work / "prepared.json")]
    argv = {
        "plain": [*me, "--_child", "plain", "--port", str(ports["plain"])],
        "tls13": [*me, "--_child", "tls13", "--port", str(ports["tls13"])],
        "mtls": [sys.executable, "-m", "edgeshield", "serve", p["bundle"], "--owner-key", p["owner_pub"],
                 "--device-key", p["device_key"], "--ca", p["ca"], "--cert", p["server_crt"], "--key",
                 p["server_key"], "--audit-db", str(work / "audit.db"), "--audit-key", p["audit_key"], "--host", HOST,
                 "--port", str(ports["mtls"]), "--no-monitor", *UNCAPPED_FLAGS],
        "dtls": [*me, "--_child", "dtls", "--port", str(ports["dtls"])],
    }
    procs = {name: ServerProc(name, a, ports[name], work / f"{name}.log") for name, a in argv.items()}
    try:
        tls_ctx, mtls_ctx = tls_client_context(p, None), tls_client_context(p, "alice")

        def http_probe(port: int, ctx: ssl.SSLContext | None) -> bool:
            s = _connect(port)
            if ctx is not None:
                s = ctx.wrap_socket(s, server_hostname=HOST)
            try:
                _get(s, keep_alive=False)
            finally:
                s.close()
            return True

        def dtls_probe() -> bool:
            c = DtlsClient(dtls_context(p, "alice", server=False), ports["dtls"])
            c.sock.settimeout(0.5)
            try:
                c.handshake()
                return c.echo(b"ping") == b"ping"
            finally:
                c.close()

        procs["plain"].wait_ready(lambda: http_probe(ports["plain"], None))
        procs["tls13"].wait_ready(lambda: http_probe(ports["tls13"], tls_ctx))
        procs["mtls"].wait_ready(lambda: http_probe(ports["mtls"], mtls_ctx))
        procs["dtls"].wait_ready(dtls_probe)
        yield ports
    finally:
        for proc in procs.values():
            proc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (< 1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    ap.add_argument("--_child", choices=["plain", "tls13", "dtls", "gateway", "relay", "h3"], help=argparse.SUPPRESS)
    ap.add_argument("--gateway-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--udp-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        prepared = json.loads(Path(args.prepared).read_text())
        if args._child == "dtls":
            child_dtls(prepared, args.port)
        elif args._child == "gateway":
            child_gateway(prepared, args.port)
        elif args._child == "relay":
            child_relay(prepared, args.port, args.gateway_port)
        elif args._child == "h3":
            child_h3(prepared, args.port, args.udp_port)
        else:
            child_http(prepared, args.port, tls=args._child == "tls13")
        return 0

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(150, info)
    background = Background()
    work = Path(tempfile.mkdtemp(prefix="edgeshield-transportbench-"))
    try:
        p = prepare(work)
        (work / "prepared.json").write_text(json.dumps(p))
        n_hs, n_req = _size("handshakes", quick), _size("requests", quick)
        with servers(p, work) as ports:
            console.print(f"handshakes: {n_hs} of each kind, alternating; requests: {n_req} per transport")
            tcp = bench_tcp_rows(p, ports, n_hs, n_req)
        h3 = bench_h3(p, work, quick)
        oh = bench_ohttp(p, work, quick)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    results = flatten(tcp, h3, oh)
    results.update(background.stop())
    results.update(
        machine=info["machine"], python=platform.python_version(), openssl=ssl.OPENSSL_VERSION,
        quick=quick, wall_s=time.perf_counter() - started, generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        quoted_figures=QUOTED,
        scale=(f"{'quick' if quick else 'full'}: {n_hs} handshakes of each TCP/DTLS kind (after 10 warm-up) and "
               f"{_size('h3_handshakes', quick)} HTTP/3 1-RTT + 0-RTT pairs (after 5), {n_req} requests "
               f"per transport on one connection, {_size('loss_requests', quick)} HTTP/3 requests per loss level, "
               f"{_size('ohttp', quick)} OHTTP requests; loopback only, one client, servers as subprocesses"),
    )
    print_report(console, results)
    console.print(Background.note(results))
    console.print(f"wall time {results['wall_s']:.1f} s")
    write_report(console, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
