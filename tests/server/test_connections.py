"""The real server against clients that hold on: slowloris, idle, stalled handshakes, too many connections — and a
certificate revoked while its connection is open. An honest client with another identity is served throughout."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeshield import audit, transport
from edgeshield.server import ServeConfig
from edgeshield.server._limits import Limits

from _serving import protected_digits, serving

LIMITS = Limits(handshake_timeout_s=1.0, request_head_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0,
                max_connections=64, max_connections_per_address=8, max_connections_per_identity=3,
                handshakes_per_second_per_address=50.0, handshake_burst_per_address=30)
ATTACKER, HONEST = "127.0.0.2", "127.0.0.3"
X = {"inputs": [[0.5] * 64]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("connections")
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role="client") for n in ("alice", "mallory", "trudy")}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, crl_poll_s=0.1, limits=LIMITS, log_level="warning")
    with serving(cfg) as (srv, _watcher, port):
        yield {"root": root, "ca": ca, "certs": certs, "port": port, "server": srv}


def _ctx(world: dict[str, Any], name: str) -> ssl.SSLContext:
    cert = world["certs"][name]
    return transport.client_context(world["ca"] / "ca.crt", cert.cert_path, cert.key_path)


def _client(world: dict[str, Any], name: str, source: str) -> httpx.Client:
    transport_ = httpx.HTTPTransport(verify=_ctx(world, name), local_address=source)
    return httpx.Client(base_url=f"https://127.0.0.1:{world['port']}", transport=transport_, timeout=5)


def _tcp(world: dict[str, Any], source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", world["port"]), timeout=5, source_address=(source, 0))
    return sock


def _tls(world: dict[str, Any], name: str, source: str) -> ssl.SSLSocket:
    return _ctx(world, name).wrap_socket(_tcp(world, source), server_hostname="127.0.0.1")


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``within_s`` seconds."""
    sock.settimeout(within_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        return not isinstance(exc, TimeoutError)


def _audit_kinds(world: dict[str, Any]) -> list[Any]:
    return list(audit.AuditLog(world["root"] / "audit.db", readonly=True).entries())


def test_an_attacker_at_every_cap_does_not_stop_an_honest_client(world: dict[str, Any]) -> None:
    """One address holds as many stalled, idle and slowloris connections as the caps allow; alice from another
    address and identity gets every request answered 200 within 2 s meanwhile."""
    stop = threading.Event()
    held: list[socket.socket] = []

    def attack() -> None:
        with ExitStack() as stack:
            while not stop.is_set():
                for make in (lambda: _tcp(world, ATTACKER),  # never starts TLS: a stalled handshake
                             lambda: _tls(world, "mallory", ATTACKER),  # authenticated, never sends a request
                             lambda: _slowloris(world)):  # one header line at a time
                    with suppress(OSError, ssl.SSLError):  # refused at the cap: the attacker keeps trying
                        held.append(stack.enter_context(make()))
                stop.wait(0.05)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    latencies, codes = [], []
    try:
        time.sleep(0.5)
        with _client(world, "alice", HONEST) as c:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    codes.append(c.post("/v1/predict", json=X).status_code)
                except httpx.HTTPError as exc:
                    codes.append(type(exc).__name__)
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)
    finally:
        stop.set()
        attacker.join(timeout=10)
    assert codes and all(code == 200 for code in codes), codes
    assert max(latencies) < 2.0
    assert len(held) > LIMITS.max_connections_per_address  # it did reconnect past the caps' timeouts
    refused = [e for e in _audit_kinds(world) if e.kind == "connection.refused"]
    reasons = {r for e in refused for r in e.data["reasons"]}
    assert {"per-address connection cap", "request head timeout"} <= reasons


def _slowloris(world: dict[str, Any]) -> Any:
    sock = _tls(world, "mallory", ATTACKER)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\n")

    class Dripping:
        def __enter__(self) -> ssl.SSLSocket:
            def drip() -> None:
                try:
                    for i in range(100):
                        time.sleep(0.3)
                        sock.sendall(f"X-Drip-{i}: 1\r\n".encode())
                except OSError:
                    return

            threading.Thread(target=drip, daemon=True).start()
            return sock

        def __exit__(self, *exc: object) -> None:
            sock.close()

    return Dripping()


def test_each_way_to_hold_a_connection_is_cut_in_time(world: dict[str, Any]) -> None:
    with _tcp(world, ATTACKER) as stalled:  # no ClientHello: the handshake deadline closes it
        assert _closed_by_server(stalled, 4.0)
    with _tls(world, "trudy", ATTACKER) as idle:  # authenticated, never sends a request
        assert _closed_by_server(idle, 4.0)
    with _slowloris(world) as drip:  # headers one line every 0.3 s: the head deadline is not reset by bytes
        assert _closed_by_server(drip, 4.0)
    with _tls(world, "trudy", ATTACKER) as slow_body:  # complete head, then a body that never finishes
        slow_body.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\ncontent-type: application/json\r\n"
                          b"content-length: 100\r\n\r\n{")
        slow_body.settimeout(4.0)
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408")


def test_over_the_per_identity_cap_is_a_503_with_retry_after(world: dict[str, Any]) -> None:
    with ExitStack() as stack:
        for _ in range(LIMITS.max_connections_per_identity):
            stack.enter_context(_tls(world, "trudy", ATTACKER))
        extra = stack.enter_context(_tls(world, "trudy", ATTACKER))
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        extra.settimeout(4.0)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        with _client(world, "alice", HONEST) as c:  # another identity is unaffected
            assert c.get("/healthz").status_code == 200
    assert any(e.kind == "server.busy" and e.data["reason"] == "connections per identity"
               for e in _audit_kinds(world))


def test_over_the_per_address_cap_is_refused_before_the_handshake(world: dict[str, Any]) -> None:
    with ExitStack() as stack:
        for _ in range(LIMITS.max_connections_per_address):
            stack.enter_context(_tcp(world, ATTACKER))
        time.sleep(0.2)
        with pytest.raises((ssl.SSLError, OSError)):
            _tls(world, "trudy", ATTACKER).close()
        with _client(world, "alice", HONEST) as c:
            assert c.get("/healthz").status_code == 200


def test_a_revoked_certificate_loses_its_open_connection(world: dict[str, Any], tmp_path: Path) -> None:
    name = "revokee"
    world["certs"][name] = cert = transport.issue(world["ca"], name=name, role="client")
    answered = 0
    with _client(world, name, HONEST) as c:
        assert c.post("/v1/predict", json=X).status_code == 200  # the connection is open and kept alive
        raw = _tls(world, name, HONEST)  # and a second one, held without a request
        transport.revoke(world["ca"], cert.serial)
        deadline = time.monotonic() + 10
        while not any(e.kind == "crl.reload" and e.data["revoked"] >= 1 for e in _audit_kinds(world)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(4):
            with suppress(httpx.HTTPError):
                answered += c.post("/v1/predict", json=X).status_code == 200
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        raw.settimeout(4.0)
        try:
            reply = raw.recv(4096)
        except (OSError, ssl.SSLError):
            reply = b""
        raw.close()
    assert answered == 0
    assert not reply.startswith(b"HTTP/1.1 200")


def test_malformed_http_is_a_400_and_counted_for_the_audit_log(world: dict[str, Any]) -> None:
    with _tls(world, "trudy", HONEST) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\nContent-Length: abc\r\n\r\n")
        sock.settimeout(4.0)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    deadline = time.monotonic() + 5  # counted on the event loop, written at most once a second
    while time.monotonic() < deadline:
        reasons = {r for e in _audit_kinds(world) if e.kind == "connection.refused" for r in e.data["reasons"]}
        if "malformed HTTP request" in reasons:
            return
        time.sleep(0.2)
    raise AssertionError("no connection.refused entry for the malformed request")
