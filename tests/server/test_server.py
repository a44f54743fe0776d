"""The real server on 127.0.0.1: mutual TLS 1.3, RBAC, validation, audit — and every way to be refused."""

from __future__ import annotations

import datetime as dt
import io
import json
import ssl
import time
from typing import Any

import httpx
import numpy as np
import pytest

from edgeshield import audit, transport
from edgeshield.models import digits_model_path, load_digits_split
from edgeshield.server import ServeConfig

from _serving import mtls_client, protected_digits, serving

ROLES = {"alice": "client", "otto": "operator", "aud": "auditor", "adm": "admin"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("server")
    bundle, k = protected_digits(root)
    ca, other = root / "ca", root / "other-ca"
    transport.init_ca(ca)
    transport.init_ca(other)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1", "localhost"])
    certs = {name: transport.issue(ca, name=name, role=role) for name, role in ROLES.items()}
    certs["foreign"] = transport.issue(other, name="foreign", role="admin")
    now = dt.datetime.now(dt.UTC)
    certs["expired"] = transport.issue(ca, name="expired", role="admin", not_before=now - dt.timedelta(days=10),
                                       not_after=now - dt.timedelta(days=1))
    certs["mallory"] = transport.issue(ca, name="mallory", role="client")
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, max_body_bytes=64 * 1024, crl_poll_s=0.1)
    with serving(cfg) as (srv, watcher, port):
        yield {"root": root, "ca": ca, "certs": certs, "url": f"https://127.0.0.1:{port}", "port": port,
               "watcher": watcher, "server": srv}


client = mtls_client


def refused(world: dict[str, Any], ctx: ssl.SSLContext) -> bool:
    try:
        with httpx.Client(base_url=world["url"], verify=ctx, timeout=10) as c:
            c.get("/healthz")
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def audit_kinds(world: dict[str, Any]) -> list[str]:
    return [e.kind for e in audit.AuditLog(world["root"] / "audit.db", readonly=True).entries()]


def _number_lists(value: Any) -> list[list[Any]]:
    """Every list of numbers anywhere inside ``value``."""
    if isinstance(value, dict):
        return [run for v in value.values() for run in _number_lists(v)]
    if isinstance(value, list):
        if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return [value]
        return [run for v in value for run in _number_lists(v)]
    return []


def test_authorised_predictions_json_and_npy(world: dict[str, Any]) -> None:
    x = load_digits_split().x_test[:16]
    with client(world, "alice") as c:
        r = c.post("/v1/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, r.text
        from edgeshield.bundles._ort import onnxruntime as ort

        want = ort.InferenceSession(str(digits_model_path())).run(None, {"input": x})[0].argmax(1).tolist()
        assert r.json()["predictions"] == want
        buf = io.BytesIO()
        np.save(buf, x)
        r = c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert r.status_code == 200 and r.json()["predictions"] == want
        assert c.get("/v1/model").json()["model_sha256"]
        assert c.get("/healthz").json() == {"status": "ok"}


def test_rbac(world: dict[str, Any]) -> None:
    with client(world, "alice") as c:
        assert c.get("/metrics").status_code == 403
        assert c.get("/openapi.json").status_code == 403
    with client(world, "aud") as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}).status_code == 403
    with client(world, "adm") as c:
        assert c.get("/openapi.json").json()["info"]["title"] == "EdgeShield inference server"
    assert "auth.forbidden" in audit_kinds(world)


def test_bad_inputs_are_422_and_audited(world: dict[str, Any]) -> None:
    with client(world, "alice") as c:
        buf = io.BytesIO()
        np.save(buf, np.full((1, 64), np.nan, np.float32))
        r = c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert r.status_code == 422 and r.json()["field"] == "nan"
        r = c.post("/v1/predict", json={"inputs": [[0.5] * 63]})
        assert r.status_code == 422 and r.json()["field"] == "shape[1]"
        r = c.post("/v1/predict", json={"inputs": [[2.0] * 64]})
        assert r.status_code == 422 and r.json()["field"] == "max"
        r = c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/predict", content=b"x" * (128 * 1024), headers={"content-type": "application/x-npy"})
        assert r.status_code == 413
    assert "input.rejected" in audit_kinds(world)


def test_negative_tls_matrix(world: dict[str, Any]) -> None:
    ca = world["ca"] / "ca.crt"
    certs = world["certs"]
    no_cert = ssl.create_default_context(cafile=str(ca))
    assert refused(world, no_cert)
    for name in ("foreign", "expired"):
        assert refused(world, transport.client_context(ca, certs[name].cert_path, certs[name].key_path))
    tls12 = transport.client_context(ca, certs["alice"].cert_path, certs["alice"].key_path)
    tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert refused(world, tls12)
    deadline = time.monotonic() + 5  # handshake failures are counted and written at most once a second
    while time.monotonic() < deadline:
        failures = [e for e in audit.AuditLog(world["root"] / "audit.db", readonly=True).entries()
                    if e.kind == "auth.failure" and e.data.get("stage") == "tls-handshake"]
        if sum(e.data["count"] for e in failures) >= 4:
            break
        time.sleep(0.2)
    assert sum(e.data["count"] for e in failures) >= 4


def test_revoked_after_crl_reload_without_restart(world: dict[str, Any]) -> None:
    m = world["certs"]["mallory"]
    ctx = transport.client_context(world["ca"] / "ca.crt", m.cert_path, m.key_path)
    assert not refused(world, ctx)
    transport.revoke(world["ca"], m.serial)
    deadline = time.monotonic() + 10
    while "crl.reload" not in audit_kinds(world) and time.monotonic() < deadline:
        time.sleep(0.1)
    fresh = transport.client_context(world["ca"] / "ca.crt", m.cert_path, m.key_path)
    assert refused(world, fresh)


def test_audit_log_verifies(world: dict[str, Any]) -> None:
    log = audit.AuditLog(world["root"] / "audit.db", readonly=True)
    kinds = [e.kind for e in log.entries()]
    assert kinds[:3] == ["server.startup", "model.load", "config.rbac"]
    assert "inference.predict" in kinds
    for e in log.entries():  # metadata only, never the raw input: no request document, no run of pixel values
        assert '"inputs":' not in json.dumps(e.data)
        assert not any(len(run) >= 8 for run in _number_lists(e.data))
    pub = audit.load_verify_key(world["root"] / "audit.pub")
    log.verify(public_key=pub)
