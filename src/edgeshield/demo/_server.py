"""Demo stage for the secure inference server: fresh PKI, mutual TLS calls allowed and refused, audit log checked."""

from __future__ import annotations

import sqlite3
import ssl
from typing import Any

import httpx

from edgeshield import audit, transport
from edgeshield.demo import DemoContext, DemoFailure, Stage


def _status(ctx_ssl: ssl.SSLContext, url: str, method: str, path: str, **kw: Any) -> str:
    try:
        with httpx.Client(base_url=url, verify=ctx_ssl, timeout=10) as c:
            return str(c.request(method, path, **kw).status_code)
    except httpx.HTTPError:
        return "TLS handshake refused"


def _serve(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.models import load_digits_split
    from edgeshield.server import ServeConfig, running

    work, kdir = ctx.workdir / "server", ctx.state["kdir"]
    ca, other = work / "ca", work / "other-ca"
    transport.init_ca(ca)
    transport.init_ca(other)
    server_cert = transport.issue(ca, name="edge-gateway", role="server", server=True, sans=["127.0.0.1"])
    certs = {"alice (client)": transport.issue(ca, name="alice", role="client"),
             "aud (auditor)": transport.issue(ca, name="aud", role="auditor"),
             "eve (another CA)": transport.issue(other, name="eve", role="admin")}
    audit.generate_signing_key(work / "audit.key")
    cfg = ServeConfig(bundle=ctx.state["bundle"], owner_key=kdir / "owner.pub", device_key=kdir / "device.key",
                      ca=ca, cert=server_cert.cert_path, key=server_cert.key_path, audit_db=work / "audit.db",
                      audit_key=work / "audit.key", port=0, log_level="warning")
    x = load_digits_split().x_test[:8].tolist()
    calls = [
        ("alice (client)", "POST", "/v1/predict", {"json": {"inputs": x}}, "200"),
        ("alice (client)", "POST", "/v1/predict", {"json": {"inputs": [[2.0] * 64]}}, "422"),
        ("alice (client)", "GET", "/metrics", {}, "403"),
        ("aud (auditor)", "GET", "/metrics", {}, "200"),
        ("aud (auditor)", "POST", "/v1/predict", {"json": {"inputs": x}}, "403"),
        ("eve (another CA)", "GET", "/healthz", {}, "TLS handshake refused"),
    ]
    table = Table(title="mutual TLS 1.3 calls")
    for col in ("client", "request", "answer", "expected"):
        table.add_column(col)
    with running(cfg) as (_server, _watcher, port):
        url = f"https://127.0.0.1:{port}"
        table.title = f"mutual TLS 1.3 calls to {url}"
        for who, method, path, kw, expected in calls:
            cert = certs[who]
            client = transport.client_context(ca / "ca.crt", cert.cert_path, cert.key_path)
            got = _status(client, url, method, path, **kw)
            table.add_row(who, f"{method} {path}", got, expected)
            if got != expected:
                raise DemoFailure(f"{who} {method} {path}: got {got}, expected {expected}")
        got = _status(httpx.create_ssl_context(verify=str(ca / "ca.crt")), url, "GET", "/healthz")
        table.add_row("(no certificate)", "GET /healthz", got, "TLS handshake refused")
        if got != "TLS handshake refused":
            raise DemoFailure("a client without a certificate got through")
    ctx.tables.append(table)
    ctx.state["audit_db"], ctx.state["audit_pub"] = work / "audit.db", work / "audit.pub"
    ctx.summary["server"] = {"calls": [{"client": c[0], "request": f"{c[1]} {c[2]}", "expected": c[4]} for c in calls]}
    return "6 calls over mTLS: authorised ones answered, wrong role 403, foreign CA and no certificate refused"


def _audit(ctx: DemoContext) -> str:
    db, pub = ctx.state["audit_db"], audit.load_verify_key(ctx.state["audit_pub"])
    log = audit.AuditLog(db, readonly=True)
    report = log.verify(public_key=pub)
    kinds = [e.kind for e in log.entries()]
    tampered = db.with_name("audit-tampered.db")
    with sqlite3.connect(db) as src, sqlite3.connect(tampered) as dst:
        src.backup(dst)  # a consistent copy, including what still sits in the write-ahead log
    with sqlite3.connect(tampered) as conn:  # an attacker with the file: drop the guards, rewrite one entry
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f'DROP TRIGGER "{name}"')
        conn.execute("UPDATE entries SET actor = 'someone-else' WHERE seq = 3")
    try:
        audit.AuditLog(tampered, readonly=True).verify(public_key=pub)
    except audit.AuditIntegrityError as exc:
        caught = str(exc)
    else:
        raise DemoFailure("a tampered audit log verified")
    if report.unanchored or not report.signatures_checked:
        raise DemoFailure("the audit log's entries are not all under a signed checkpoint after shutdown")
    ctx.summary["audit"] = {"entries": len(kinds), "kinds": sorted(set(kinds)), "verified": True,
                            "checkpoints": report.checkpoints, "tampered_copy": caught}
    return (f"{len(kinds)} entries ({', '.join(sorted(set(kinds)))}); hash chain and Ed25519-signed Merkle "
            f"checkpoint verify; tampered copy: {caught}")


STAGES = [
    Stage("Serve the bundle over mutual TLS 1.3 with RBAC", _serve),
    Stage("Verify the tamper-evident audit log", _audit),
]
