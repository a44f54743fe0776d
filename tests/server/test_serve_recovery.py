"""`serve` checks its audit log at start-up: a server killed mid-traffic leaves entries no checkpoint covers, and the
next start covers them (``server.recovered``); a log that was tampered with stops the device from serving (exit 3)."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgeshield import audit, bundles, keys, transport
from edgeshield.models import digits_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_cli import assert_one_line_error, cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def device(tmp_path: Path) -> dict[str, Path]:
    k = tmp_path / "keys"
    keys.init_keys(k)
    bundles.protect(digits_model_path(), tmp_path / "m.esb", signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")])
    ca = tmp_path / "ca"
    transport.init_ca(ca)
    transport.issue(ca, name="edge", role="server", server=True, sans=["127.0.0.1"])
    transport.issue(ca, name="alice", role="client")
    audit.generate_signing_key(tmp_path / "audit.key")
    conf = tmp_path / "serve.toml"
    conf.write_text(f'bundle = "m.esb"\nowner-key = "keys/owner.pub"\ndevice-key = "keys/device.key"\nca = "ca"\n'
                    f'cert = "ca/issued/edge.crt"\nkey = "ca/issued/edge.key"\naudit-db = "audit.db"\n'
                    f'audit-key = "audit.key"\nport = {_free_port()}\nlog-level = "info"\n')
    return {"root": tmp_path, "conf": conf, "ca": ca}


def _start(d: dict[str, Path]) -> tuple[subprocess.Popen[str], int]:
    port = int(next(line.split("=")[1] for line in d["conf"].read_text().splitlines() if line.startswith("port")))
    proc = subprocess.Popen([sys.executable, "-m", "edgeshield", "serve", "--config", str(d["conf"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else "server exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def _predict(d: dict[str, Path], port: int, n: int) -> None:
    ctx = transport.client_context(d["ca"] / "ca.crt", d["ca"] / "issued" / "alice.crt",
                                   d["ca"] / "issued" / "alice.key")
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as c:
        for _ in range(n):
            assert c.post("/v1/predict", json={"inputs": [[0.5] * 64]}).status_code == 200


def _forbidden(d: dict[str, Path], port: int) -> None:
    ctx = transport.client_context(d["ca"] / "ca.crt", d["ca"] / "issued" / "alice.crt",
                                   d["ca"] / "issued" / "alice.key")
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as c:
        assert c.get("/metrics").status_code == 403
        assert c.get("/nowhere").status_code == 404


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_a_killed_server_is_recovered_at_the_next_start(device: dict[str, Path]) -> None:
    proc, port = _start(device)
    _predict(device, port, 5)
    proc.send_signal(signal.SIGKILL)  # no shutdown entry, no final checkpoint
    proc.wait(timeout=10)
    db, pub = device["root"] / "audit.db", device["root"] / "audit.pub"
    uncovered = cli("audit", "verify", db, "--checkpoint-key", pub, "--require-checkpoint")
    assert uncovered.returncode == 3  # the crash left entries no checkpoint covers
    proc, port = _start(device)
    _predict(device, port, 1)
    _forbidden(device, port)  # a denial: pycasbin would print "Request: ... ---> False" outside the JSON log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert stderr and all(_is_json_object(line) for line in stderr.splitlines()), stderr[-2000:]
    kinds = [e.kind for e in audit.AuditLog(db, readonly=True).entries()]
    restart = kinds.index("server.startup", 1)
    assert kinds.count("server.recovered") == 1 and kinds.index("server.recovered") < restart
    assert cli("audit", "verify", db, "--checkpoint-key", pub, "--require-checkpoint").returncode == 0


def test_a_tampered_log_stops_the_device_from_serving(device: dict[str, Path]) -> None:
    proc, port = _start(device)
    _predict(device, port, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    with sqlite3.connect(device["root"] / "audit.db") as conn:  # an attacker with the file edits an entry
        conn.execute("DROP TRIGGER entries_no_update")
        conn.execute("UPDATE entries SET actor = 'nobody' WHERE kind = 'inference.predict'")
    result = subprocess.run([sys.executable, "-m", "edgeshield", "serve", "--config", str(device["conf"])],
                            capture_output=True, text=True, timeout=60, check=False)
    assert_one_line_error(result, 3, "entry")
