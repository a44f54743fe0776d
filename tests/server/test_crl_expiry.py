"""An expiring CRL is warned about (log, metric, audit) and an expired one fails closed — or, only when asked for,
keeps revoking with its serials; either way a revoked certificate is never served."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeshield import audit, transport
from edgeshield.errors import CrlError
from edgeshield.server import ServeConfig, make_server

from _serving import protected_digits, publish_crl, serving

X = {"inputs": [[0.5] * 64]}


def _world(root: Path, **cfg_kw: Any) -> tuple[ServeConfig, dict[str, Any]]:
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role=r) for n, r in (("alice", "client"), ("gone", "client"),
                                                                  ("aud", "auditor"))}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, crl_poll_s=0.1, log_level="warning", **cfg_kw)
    return cfg, {"ca": ca, "certs": certs, "root": root}


def _client(w: dict[str, Any], name: str, port: int) -> httpx.Client:
    cert = w["certs"][name]
    ctx = transport.client_context(w["ca"] / "ca.crt", cert.cert_path, cert.key_path)
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=5)


class _Records(logging.Handler):
    """What the server logs (its loggers do not propagate to pytest's caplog: they write JSON lines themselves)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> list[logging.LogRecord]:
        logging.getLogger("edgeshield.server").addHandler(self)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("edgeshield.server").removeHandler(self)


def _status(w: dict[str, Any], name: str, port: int) -> int | str:
    try:
        with _client(w, name, port) as c:
            return c.post("/v1/predict", json=X).status_code
    except httpx.HTTPError:
        return "refused"


def _wait_for(w: dict[str, Any], kind: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in audit.AuditLog(w["root"] / "audit.db", readonly=True).entries() if e.kind == kind]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no {kind} entry within {timeout_s} s")


def test_fail_closed_by_default(tmp_path: Path) -> None:
    cfg, w = _world(tmp_path)
    assert cfg.crl_expired == "fail-closed"
    with serving(cfg) as (_srv, _wt, port), _Records() as records:
        with _client(w, "alice", port) as kept, _client(w, "aud", port) as auditor:
            assert kept.post("/v1/predict", json=X).status_code == 200  # a connection opened while current
            publish_crl(w["ca"], 2.0)
            assert _wait_for(w, "crl.expiring").data["policy"] == "fail-closed"
            assert any("expires in" in r.getMessage() for r in records)
            metrics = auditor.get("/metrics").text
            left = float(next(line.split()[-1] for line in metrics.splitlines()
                              if line.startswith("edgeshield_crl_seconds_to_next_update")))
            assert 0 < left <= 2.0
            _wait_for(w, "crl.expired")
            r = kept.post("/v1/predict", json=X)  # the open connection: the middleware refuses it
            assert r.status_code == 401 and "CRL has expired" in r.json()["error"]
        # A new connection is not served either. (OpenSSL alone would not guarantee it: it falls back to an older CRL
        # in its store that is still within its dates, which is why the server checks every request itself.)
        assert _status(w, "alice", port) in ("refused", 401)
        assert any("expired" in r.getMessage() and r.levelno == logging.ERROR for r in records)


def test_keep_last_keeps_revoking_with_the_last_crl(tmp_path: Path) -> None:
    cfg, w = _world(tmp_path, crl_expired="keep-last")
    transport.revoke(w["ca"], w["certs"]["gone"].serial)
    with serving(cfg) as (_srv, _wt, port), _Records() as records:
        publish_crl(w["ca"], 1.0)
        assert _wait_for(w, "crl.expired").data["policy"] == "keep-last"
        assert _status(w, "alice", port) == 200
        assert _status(w, "gone", port) in ("refused", 401)  # its serial is still in the last CRL
        assert any("NOT refused" in r.getMessage() for r in records)  # loudly logged
        transport.update_crl(w["ca"])  # a current CRL again: OpenSSL's own check is back on
        _wait_for(w, "crl.reload")
        time.sleep(0.3)
        assert _status(w, "alice", port) == 200 and _status(w, "gone", port) in ("refused", 401)


def test_an_expired_crl_at_start_up(tmp_path: Path) -> None:
    cfg, w = _world(tmp_path)
    publish_crl(w["ca"], 0.5)
    time.sleep(1.0)
    with pytest.raises(CrlError, match="expired"):
        make_server(cfg)
    from dataclasses import replace

    server, _watcher = make_server(replace(cfg, crl_expired="keep-last"))  # the operator's explicit choice
    assert server is not None
