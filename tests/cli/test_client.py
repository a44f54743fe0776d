"""`edgeshield client` against the real server: predict, model, health, and a one-line reason for every refusal."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from edgeshield import audit, transport
from edgeshield.cli import main
from edgeshield.cli._client import REFUSED
from edgeshield.server import ServeConfig

from _serving import protected_digits, serving


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("client")
    bundle, k = protected_digits(root)
    ca, other = root / "ca", root / "other-ca"
    transport.init_ca(ca)
    transport.init_ca(other)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    now = dt.datetime.now(dt.UTC)
    certs = {
        "alice": transport.issue(ca, name="alice", role="client"),
        "aud": transport.issue(ca, name="aud", role="auditor"),
        "foreign": transport.issue(other, name="foreign", role="client"),
        "expired": transport.issue(ca, name="expired", role="client", not_before=now - dt.timedelta(days=9),
                                   not_after=now - dt.timedelta(days=1)),
        "revoked": transport.issue(ca, name="revoked", role="client"),
        "mallory": transport.issue(ca, name="mallory", role="client"),
    }
    transport.revoke(ca, name="revoked")
    audit.generate_signing_key(root / "audit.key")
    np.save(root / "x.npy", np.zeros((2, 64), np.float32))
    np.save(root / "bad.npy", np.zeros((2, 63), np.float32))
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, crl_poll_s=0.1, log_level="warning",
                      rate_limits=(("operator", 0.001, 2.0),))
    certs["otto"] = transport.issue(ca, name="otto", role="operator")
    with serving(cfg) as (_srv, _watcher, port):
        yield {"root": root, "ca": ca, "other": other, "certs": certs, "url": f"https://127.0.0.1:{port}"}


def client(world: Any, who: str, *args: object, ca: Path | None = None, url: str | None = None) -> list[str]:
    cert = world["certs"][who]
    return ["client", *map(str, args), "--url", url or world["url"], "--ca", str(ca or world["ca"] / "ca.crt"),
            "--cert", str(cert.cert_path), "--key", str(cert.key_path)]


def outcome(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    got, out, err = outcome(capsys, argv)
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeshield: error: ") and "Traceback" not in err, err
    return lines[0]


def test_predict_model_and_health(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = outcome(capsys, [*client(world, "alice", "health"), "--json"])
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, _ = outcome(capsys, [*client(world, "alice", "predict", "--input", world["root"] / "x.npy"), "--json"])
    assert code == 0 and len(json.loads(out)["predictions"]) == 2
    code, out, _ = outcome(capsys, [*client(world, "alice", "model"), "--json"])
    shown = json.loads(out)
    assert code == 0 and shown["model_io"]["inputs"] == [{"dtype": "float32", "name": "input", "shape": ["batch", 64]}]
    code, out, _ = outcome(capsys, client(world, "alice", "model"))
    assert code == 0 and "[batch, 64]" in out and shown["bundle_id"] in out and "edgeshield.model_io" not in out


@pytest.mark.parametrize("who", ["foreign", "expired", "revoked"])
@pytest.mark.parametrize("command", ["health", "model", "predict"])
def test_a_refused_certificate_is_named_as_such(world: Any, capsys: pytest.CaptureFixture[str], who: str,
                                                command: str) -> None:
    extra = ["--input", world["root"] / "x.npy"] if command == "predict" else []
    line = one_line_error(capsys, client(world, who, command, *extra), 4)
    assert REFUSED in line and "Server disconnected" not in line
    if who == "expired":
        assert "expired at" in line  # what the local certificate shows
    if who == "foreign":
        assert "not issued by the CA" in line


def test_a_certificate_revoked_while_the_server_runs(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert outcome(capsys, client(world, "mallory", "health"))[0] == 0
    transport.revoke(world["ca"], name="mallory")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server picks the new CRL up within crl_poll_s
        code, _, err = outcome(capsys, client(world, "mallory", "health"))
        if code != 0:
            break
        time.sleep(0.1)
    assert code == 4 and REFUSED in err


def test_http_refusals_give_the_servers_reason_and_exit_code(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, client(world, "aud", "predict", "--input", world["root"] / "x.npy"), 4)
    assert "(403)" in line and "auditor" in line
    line = one_line_error(capsys, client(world, "alice", "predict", "--input", world["root"] / "bad.npy"), 2)
    assert "(422)" in line and "63" in line  # the server's own one-line reason


def test_a_rate_limited_client_is_told_when_to_retry(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    x = world["root"] / "x.npy"
    assert outcome(capsys, client(world, "otto", "predict", "--input", x))[0] == 0  # the burst of 2 inputs
    line = one_line_error(capsys, client(world, "otto", "predict", "--input", x), 2)
    assert "(429)" in line and "retry after" in line
    assert int(line.rsplit("retry after ", 1)[1].split()[0]) >= 1


def test_connection_failures_are_explained(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, client(world, "alice", "health", ca=world["other"] / "ca.crt"), 1)
    assert "is not who it should be" in line and "--ca" in line
    line = one_line_error(capsys, client(world, "alice", "health", url=world["url"].replace("127.0.0.1", "localhost")),
                          1)
    assert "not valid for 'localhost'" in line
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    line = one_line_error(capsys, client(world, "alice", "health", url=f"https://127.0.0.1:{free}"), 1)
    assert "connection refused" in line
    line = one_line_error(capsys, client(world, "alice", "health", url=world["url"].replace("https", "http")), 2)
    assert "https://" in line


@pytest.fixture(scope="module")
def alerting_server(world: Any) -> Any:
    """A plain blocking TLS 1.3 server with the same CA and CRL: OpenSSL writes its alert before closing, as a
    server on its own listener may (the asyncio server closes without one). Answers one HTTP request a connection."""
    import socket
    import ssl
    import threading

    server_cert = world["root"] / "ca" / "issued" / "edge-1"
    ctx = transport.server_context(world["ca"], server_cert.with_suffix(".crt"), server_cert.with_suffix(".key"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # so that the thread sees stop
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(65536)
                        body = b'{"status": "ok"}'
                        tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                    + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
                except (ssl.SSLError, OSError):
                    pass  # a refused handshake: OpenSSL has sent the alert

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.mark.parametrize(("who", "alert"), [("foreign", "unknown_ca"), ("expired", "certificate_expired"),
                                            ("revoked", "certificate_revoked")])
def test_a_tls_alert_names_the_reason(world: Any, alerting_server: str, capsys: pytest.CaptureFixture[str],
                                      who: str, alert: str) -> None:
    assert outcome(capsys, client(world, "alice", "health", url=alerting_server))[0] == 0  # the control
    line = one_line_error(capsys, client(world, who, "health", url=alerting_server), 4)
    assert REFUSED in line and f"TLS alert {alert}" in line
