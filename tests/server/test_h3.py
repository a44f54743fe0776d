"""HTTP/3 (mutual TLS 1.3 over QUIC) beside the TCP server: same answers, identity, RBAC, revocation and audit; the
negative matrix over UDP; 0-RTT only for GET/HEAD (POST answered 425, never run), replayed 0-RTT; datagram floods."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aioquic")

from edgeshield import audit, transport
from edgeshield.errors import CertificateRefusedError, ConnectionFailedError
from edgeshield.server import ServeConfig
from edgeshield.server._limits import Limits
from edgeshield.transport._h3client import H3Session, h3_request

from _serving import mtls_client, protected_digits, serving

X = {"inputs": [[0.5] * 64]}
BODY = json.dumps(X).encode()
JSON = {"content-type": "application/json"}
LIMITS = Limits(handshake_timeout_s=2.0, keep_alive_s=5.0, max_connections_per_identity=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("h3")
    bundle, k = protected_digits(root)
    ca, other = root / "ca", root / "other-ca"
    transport.init_ca(ca)
    transport.init_ca(other)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role=r) for n, r in
             (("alice", "client"), ("audrey", "auditor"), ("mallory", "client"), ("carol", "client"))}
    certs["eve"] = transport.issue(other, name="eve", role="client")
    transport.revoke(ca, name="mallory")
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, http3_port=0, crl_poll_s=0.1, limits=LIMITS,
                      log_level="warning")
    with serving(cfg) as (srv, _watcher, port):
        h3 = srv.h3
        yield {"root": root, "ca": ca, "certs": certs, "port": port, "url": f"https://127.0.0.1:{port}",
               "h3": h3, "h3url": f"https://127.0.0.1:{h3.port}", "server": srv}


def _kw(world: dict[str, Any], name: str) -> dict[str, Any]:
    cert = world["certs"][name]
    return {"ca": world["ca"], "cert": cert.cert_path, "key": cert.key_path, "timeout_s": 5.0}


def _entries(world: dict[str, Any]) -> list[Any]:
    return list(audit.AuditLog(world["root"] / "audit.db", readonly=True).entries())


def _predictions(world: dict[str, Any], actor: str) -> int:
    return sum(1 for e in _entries(world) if e.kind == "inference.predict" and e.actor == actor)


def test_predict_over_h3_equals_tcp_and_is_audited_with_the_identity(world: dict[str, Any]) -> None:
    with mtls_client(world, "alice") as c:
        tcp = c.post("/v1/predict", json=X)
    before = _predictions(world, "alice")
    r = h3_request(world["h3url"] + "/v1/predict", "POST", BODY, headers={"content-type": "application/json"},
                   **_kw(world, "alice"))
    assert r.status == 200 == tcp.status_code
    assert r.json() == tcp.json()
    deadline = time.monotonic() + 5
    while _predictions(world, "alice") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _predictions(world, "alice") == before + 1


def test_rbac_is_the_same_over_h3(world: dict[str, Any]) -> None:
    r = h3_request(world["h3url"] + "/v1/predict", "POST", BODY, **_kw(world, "audrey"))
    assert r.status == 403
    assert h3_request(world["h3url"] + "/v1/model", **_kw(world, "audrey")).status == 200


def test_many_requests_on_one_connection_and_body_limit(world: dict[str, Any]) -> None:
    with H3Session(world["h3url"], **_kw(world, "alice")) as s:
        assert [s.request("GET", "/healthz").status for _ in range(3)] == [200] * 3
        big = b"[" + b"0," * (3 * 1024 * 1024) + b"0]"
        assert s.request("POST", "/v1/predict", big).status == 413


@pytest.mark.parametrize(("who", "alert"), [("eve", 48), ("mallory", 44)])
def test_foreign_ca_and_revoked_are_refused_in_the_handshake(world: dict[str, Any], who: str, alert: int) -> None:
    with pytest.raises(CertificateRefusedError, match=f"alert {alert}"):
        h3_request(world["h3url"] + "/healthz", **_kw(world, who))


def test_no_client_certificate_is_refused(world: dict[str, Any]) -> None:
    import asyncio

    from aioquic.asyncio import connect
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="127.0.0.1")
    config.load_verify_locations(cafile=str(world["ca"] / "ca.crt"))

    async def attempt() -> int:
        async with connect("127.0.0.1", world["h3"].port, configuration=config, wait_connected=True) as client:
            await asyncio.wait_for(client.wait_closed(), 5)
            return int(client._quic._close_event.error_code)

    assert asyncio.run(attempt()) == 0x100 + 116  # certificate_required


def test_a_client_hello_without_tls13_is_refused_protocol_version(world: dict[str, Any]) -> None:
    """aioquic's client cannot offer TLS 1.2 (QUIC is TLS 1.3 only, RFC 9001 §4.2); a ClientHello whose
    supported_versions lists only TLS 1.2 gets protocol_version (70) from the server."""
    import asyncio

    from aioquic.asyncio.client import connect
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    class Tls12Only(QuicConnection):
        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls._supported_versions = [0x0303]

    cert = world["certs"]["alice"]
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="127.0.0.1")
    config.load_verify_locations(cafile=str(world["ca"] / "ca.crt"))
    config.load_cert_chain(cert.cert_path, cert.key_path)

    async def attempt() -> int:
        conn = Tls12Only(configuration=config)
        loop = asyncio.get_running_loop()
        from aioquic.asyncio.protocol import QuicConnectionProtocol

        transport, protocol = await loop.create_datagram_endpoint(lambda: QuicConnectionProtocol(conn),
                                                                  local_addr=("127.0.0.1", 0))
        try:
            protocol.connect(("127.0.0.1", world["h3"].port))
            await asyncio.wait_for(protocol.wait_closed(), 5)
            return int(conn._close_event.error_code)
        finally:
            transport.close()

    del connect
    assert asyncio.run(attempt()) == 0x100 + 70


def test_zero_rtt_get_is_served_and_zero_rtt_post_is_425_never_run(world: dict[str, Any]) -> None:
    h3 = world["h3"]
    with H3Session(world["h3url"], **_kw(world, "alice")) as first:
        assert first.request("GET", "/healthz").status == 200
        ticket = first.ticket
    assert ticket is not None and ticket.max_early_data_size
    served = h3.served_early
    with H3Session(world["h3url"], ticket=ticket, early=True, **_kw(world, "alice")) as s:
        r = s.request("GET", "/v1/model")
        assert r.status == 200 and r.early and s.resumed
        assert s.request("GET", "/healthz").status == 200  # after the handshake: the fresh ticket came before it
        ticket = s.ticket
    assert ticket is not None, "a resumed connection gets a fresh single-use ticket"
    assert h3.served_early == served + 1
    before, refused = _predictions(world, "alice"), h3.refused_early
    with H3Session(world["h3url"], ticket=ticket, early=True, **_kw(world, "alice")) as s:
        r = s.request("POST", "/v1/predict", BODY, JSON)
        assert r.status == 425 and r.early
        assert s.request("POST", "/v1/predict", BODY, JSON).status == 200  # after the handshake: served
    assert h3.refused_early == refused + 1
    time.sleep(0.3)
    assert _predictions(world, "alice") == before + 1  # only the one after the handshake


def test_a_replayed_zero_rtt_flight_is_not_run(world: dict[str, Any]) -> None:
    """Capture a client's first flight (ClientHello + 0-RTT GET) through a UDP forwarder and send it again from
    another socket: the ticket is single use, so the replay resumes nothing and its early data is discarded."""
    import threading

    h3 = world["h3"]
    with H3Session(world["h3url"], **_kw(world, "alice")) as first:
        first.request("GET", "/healthz")
        ticket = first.ticket
    fwd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fwd.bind(("127.0.0.1", 0))
    fwd.settimeout(0.2)
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind(("127.0.0.1", 0))
    up.settimeout(0.2)
    captured: list[bytes] = []
    stop = threading.Event()

    def forward() -> None:
        client = None
        while not stop.is_set():
            try:
                data, client = fwd.recvfrom(65536)
                if len(captured) < 2:
                    captured.append(data)
                up.sendto(data, ("127.0.0.1", h3.port))
            except TimeoutError:
                pass
            try:
                data, _ = up.recvfrom(65536)
                if client is not None:
                    fwd.sendto(data, client)
            except TimeoutError:
                pass

    t = threading.Thread(target=forward, daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{fwd.getsockname()[1]}"
        served = h3.served_early
        with H3Session(url, ticket=ticket, early=True, **_kw(world, "alice")) as s:
            assert s.request("GET", "/v1/model").status == 200
        assert h3.served_early == served + 1
    finally:
        stop.set()
        t.join(timeout=5)
        fwd.close()
        up.close()
    assert captured
    replay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replay.bind(("127.0.0.1", 0))
    replay.settimeout(0.5)
    try:
        for data in captured:
            replay.sendto(data, ("127.0.0.1", h3.port))
        time.sleep(0.5)
    finally:
        replay.close()
    assert h3.served_early == served + 1  # the replayed early GET was not run


def test_a_junk_and_oversized_flood_is_dropped_counted_and_a_good_client_is_served(world: dict[str, Any]) -> None:
    h3 = world["h3"]
    before = dict(h3.dropped)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(3000):
            flood.sendto(b"\x40" + os.urandom(1299) if i % 3 == 0 else (b"\x00" * 9000 if i % 3 == 1 else b"\x40junk"),
                         ("127.0.0.1", h3.port))
            if i % 50 == 0:
                time.sleep(0.002)  # the kernel drops what the socket buffer cannot hold; count what arrives
        # malformed frames inside a "short header" packet for no connection, and a truncated Initial
        flood.sendto(b"\xc0\x00\x00\x00\x01\x08" + b"\x01" * 20, ("127.0.0.1", h3.port))
    finally:
        flood.close()
    time.sleep(0.3)
    dropped = sum(h3.dropped.values()) - sum(before.values())
    assert dropped >= 300, h3.dropped
    for reason in ("oversized datagram", "not a QUIC packet", "no such connection"):
        assert h3.dropped.get(reason, 0) > before.get(reason, 0), h3.dropped
    r = h3_request(world["h3url"] + "/healthz", **_kw(world, "alice"))
    assert r.status == 200


def test_the_tls_scope_has_the_tcp_keys(world: dict[str, Any]) -> None:
    from edgeshield.server._h3 import _H3Protocol

    protocols = set(world["h3"]._dispatcher.protocols.values())
    with H3Session(world["h3url"], **_kw(world, "alice")) as s:
        s.request("GET", "/healthz")
        protocols = set(world["h3"]._dispatcher.protocols.values()) - protocols
        scopes = [p.tls_scope for p in protocols if isinstance(p, _H3Protocol) and p.tls_scope]
    assert scopes
    scope = scopes[0]
    keys = {"client_cert_chain", "client_cert_error", "tls_version", "cipher_suite", "edgeshield.identity"}
    assert keys <= set(scope)
    assert scope["tls_version"] == "TLSv1.3" and scope["edgeshield.identity"].name == "alice"


def test_client_predict_http3_cli_equals_tcp(world: dict[str, Any], tmp_path: Path) -> None:
    import numpy as np
    from typer.testing import CliRunner

    from edgeshield.cli import app

    np.save(tmp_path / "x.npy", np.full((2, 64), 0.5, dtype=np.float32))
    alice = world["certs"]["alice"]
    common = ["--cert", str(alice.cert_path), "--key", str(alice.key_path), "--ca", str(world["ca"] / "ca.crt"),
              "--input", str(tmp_path / "x.npy"), "--json"]
    over_h3 = CliRunner().invoke(app, ["client", "predict", "--http3", "--url", world["h3url"], *common])
    over_tcp = CliRunner().invoke(app, ["client", "predict", "--url", world["url"], *common])
    assert over_h3.exit_code == 0 and over_tcp.exit_code == 0, (over_h3.output, over_tcp.output)
    assert json.loads(over_h3.stdout) == json.loads(over_tcp.stdout)


def test_revoked_after_its_ticket_a_resumed_session_is_refused_and_its_live_connection_closed(
        world: dict[str, Any]) -> None:
    """carol holds a connection and a ticket; once her certificate is revoked (CRL reloaded live), the open
    connection is closed and a session resumed from her ticket (no certificate exchange) is answered 401."""
    with H3Session(world["h3url"], **_kw(world, "carol")) as first:
        assert first.request("GET", "/healthz").status == 200
        ticket = first.ticket
    live = H3Session(world["h3url"], **_kw(world, "carol"))
    try:
        assert live.request("GET", "/healthz").status == 200
        transport.revoke(world["ca"], name="carol")
        deadline, closed = time.monotonic() + 5, False
        while time.monotonic() < deadline and not closed:
            time.sleep(0.1)
            try:
                closed = live.request("GET", "/healthz").status == 401
            except ConnectionFailedError:
                closed = True
        assert closed
    finally:
        live.close()
    with H3Session(world["h3url"], ticket=ticket, **_kw(world, "carol")) as resumed:
        r = resumed.request("GET", "/healthz")
        assert resumed.resumed and r.status == 401


def test_malformed_http3_frames_close_that_connection_only(world: dict[str, Any]) -> None:
    """Garbage frames on a request stream and on a new unidirectional stream of an authenticated connection: the
    server closes that connection with an HTTP/3 error (never a crash) and keeps serving."""
    for garbage, uni in ((b"\x00\x3f\xff\xff\xff\xff", False), (b"\x00\x00\x07junk", True), (b"\x21\x40", False)):
        with H3Session(world["h3url"], **_kw(world, "alice")) as s:
            assert s.request("GET", "/healthz").status == 200
            protocol = s.conn._protocol

            def send(protocol: Any = protocol, garbage: bytes = garbage, uni: bool = uni) -> None:
                quic = protocol._quic
                sid = quic.get_next_available_stream_id(is_unidirectional=uni)
                quic.send_stream_data(sid, garbage, end_stream=True)
                protocol.transmit()

            s._loop.call_soon_threadsafe(send)
            deadline = time.monotonic() + 3
            while protocol.terminated is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert protocol.terminated is not None and protocol.terminated.error_code >= 0x100, garbage
    r = h3_request(world["h3url"] + "/healthz", **_kw(world, "alice"))
    assert r.status == 200


def test_a_datagram_rate_flood_from_one_address_is_cut_at_the_bucket(world: dict[str, Any]) -> None:
    h3 = world["h3"]
    lim = h3.limits
    saved = (lim.datagrams_per_second_per_address, lim.datagram_burst_per_address)
    before = h3.dropped.get("per-address datagram rate", 0)
    try:
        lim.datagrams_per_second_per_address, lim.datagram_burst_per_address = 10.0, 20
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind(("127.0.0.9", 0))
        try:
            for i in range(300):
                flood.sendto(b"\x40junk", ("127.0.0.1", h3.port))
                if i % 50 == 0:
                    time.sleep(0.002)
        finally:
            flood.close()
        time.sleep(0.3)
    finally:
        lim.datagrams_per_second_per_address, lim.datagram_burst_per_address = saved
    assert h3.dropped.get("per-address datagram rate", 0) - before >= 100, h3.dropped
    assert h3_request(world["h3url"] + "/healthz", **_kw(world, "alice")).status == 200


def test_the_per_identity_connection_cap_applies_over_h3(world: dict[str, Any]) -> None:
    cap = LIMITS.max_connections_per_identity
    sessions = []
    try:
        for _ in range(cap):
            session = H3Session(world["h3url"], **_kw(world, "audrey"))
            sessions.append(session)
            assert session.request("GET", "/healthz").status == 200
        with H3Session(world["h3url"], **_kw(world, "audrey")) as over:
            r = over.request("GET", "/healthz")
            assert r.status == 503 and r.header("retry-after")
    finally:
        for session in sessions:
            session.close()
    time.sleep(0.3)
    assert h3_request(world["h3url"] + "/healthz", **_kw(world, "audrey")).status == 200


def test_refused_handshakes_and_dropped_datagrams_reach_the_audit_log(world: dict[str, Any]) -> None:
    with pytest.raises(CertificateRefusedError):
        h3_request(world["h3url"] + "/healthz", **_kw(world, "eve"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        junk.bind(("127.0.0.7", 0))  # a fresh address: its first drop of a reason is an event
        junk.sendto(b"\x40junk", ("127.0.0.1", world["h3"].port))
    deadline, reasons = time.monotonic() + 5, set()
    while time.monotonic() < deadline:
        entries = _entries(world)
        reasons = {r for e in entries if e.kind == "auth.failure" and e.data.get("stage") == "tls-handshake"
                   for r in e.data["reasons"]}
        refused = {r for e in entries if e.kind == "connection.refused" for r in e.data["reasons"]}
        if any("issuer" in r for r in reasons) and any(r.startswith("udp: ") for r in refused):
            return
        time.sleep(0.2)
    raise AssertionError(reasons)
