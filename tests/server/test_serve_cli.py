"""`edgeshield serve` as a real process and `edgeshield client predict` against it; SIGTERM shuts down cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeshield import bundles, keys, transport
from edgeshield.models import load_digits_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_cli import assert_one_line_error, cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running(tmp_path: Path):  # type: ignore[no-untyped-def]
    from edgeshield.models import digits_model_path

    k = tmp_path / "keys"
    keys.init_keys(k)
    bundles.protect(digits_model_path(), tmp_path / "m.esb", signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")])
    ca = tmp_path / "ca"
    assert cli("pki", "init", ca).returncode == 0
    for args in (["--name", "edge", "--role", "server", "--server", "--san", "127.0.0.1"],
                 ["--name", "alice", "--role", "client"], ["--name", "aud", "--role", "auditor"]):
        assert cli("pki", "issue", ca, *args).returncode == 0
    assert cli("audit", "keygen", tmp_path / "audit.key").returncode == 0
    (tmp_path / "wm.key").write_bytes(bytes(range(32)))  # fixed, so the test knows which inputs are marked
    port = _free_port()
    issued = ca / "issued"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeshield", "serve", tmp_path / "m.esb", "--owner-key", k / "owner.pub",
         "--device-key", k / "device.key", "--ca", ca, "--cert", issued / "edge.crt", "--key", issued / "edge.key",
         "--audit-db", tmp_path / "audit.db", "--audit-key", tmp_path / "audit.key", "--port", str(port),
         "--extraction-monitor", "block", "--query-budget", "1000", "--served-watermark-key", tmp_path / "wm.key",
         "--served-watermark-rate", "0.5", "--served-watermark-evidence", tmp_path / "evidence.db"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read()) from None
            time.sleep(0.1)
    np.save(tmp_path / "x.npy", load_digits_split().x_test[:5])
    yield {"tmp": tmp_path, "ca": ca, "issued": issued, "url": f"https://127.0.0.1:{port}", "proc": proc}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _predict(w: dict, name: str, *extra: object):  # type: ignore[no-untyped-def, type-arg]
    return cli("client", "predict", "--url", w["url"], "--cert", w["issued"] / f"{name}.crt",
               "--key", w["issued"] / f"{name}.key", "--ca", w["ca"] / "ca.crt", "--input", w["tmp"] / "x.npy", *extra)


def test_client_predict_and_refusals_then_graceful_shutdown(running: dict) -> None:  # type: ignore[type-arg]
    ok = _predict(running, "alice", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(__import__("json").loads(ok.stdout)["predictions"]) == 5
    assert_one_line_error(_predict(running, "aud"), 4, "403")  # auditors may not predict
    other = running["tmp"] / "other-ca"
    transport.init_ca(other)
    transport.issue(other, name="alice", role="client")
    stranger = cli("client", "predict", "--url", running["url"], "--cert", other / "issued" / "alice.crt",
                   "--key", other / "issued" / "alice.key", "--ca", running["ca"] / "ca.crt",
                   "--input", running["tmp"] / "x.npy")
    assert_one_line_error(stranger, 4, "server refused our certificate")  # another CA's: named as such, exit 4
    proc = running["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    verify = cli("audit", "verify", running["tmp"] / "audit.db", "--checkpoint-key", running["tmp"] / "audit.pub",
                 "--json")
    assert verify.returncode == 0, verify.stderr
    shown = __import__("json").loads(cli("audit", "show", running["tmp"] / "audit.db", "--json").stdout)
    kinds = [e["kind"] for e in (shown["entries"] if isinstance(shown, dict) else shown)]
    assert kinds[0] == "server.startup" and kinds[-2:] == ["server.shutdown", "audit.checkpoint"]  # ends covered
    assert {"inference.predict", "auth.forbidden", "auth.failure", "watermark.served"} <= set(kinds)
    # the served watermark: alice's marked inputs are in the evidence store; the honest model does not repeat them
    from edgeshield.extraction import LeaderKeys
    from edgeshield.models import digits_model_path
    from edgeshield.watermark import ServedWatermark

    x5 = load_digits_split().x_test[:5]  # the server's canonical keys: a fresh registry, five distinct digits
    marked, _ = ServedWatermark(bytes(range(32)), 0.5, classes=10).marks(x5, keys=LeaderKeys().keys(x5))
    check = cli("watermark", "verify-copy", digits_model_path(), "--evidence", running["tmp"] / "evidence.db",
                "--client", "alice", "--json")
    assert check.returncode == 0, check.stderr
    result = __import__("json").loads(check.stdout)
    assert result["evidence"] == marked.sum() > 0 and result["matches"] == 0 and result["present"] is False
