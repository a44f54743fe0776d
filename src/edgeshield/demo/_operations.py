"""Demo stages for operations: an attack burst raises alerts and blocks, an admin lifts a block, and the deployment's
compliance is reported (HTML for people, OSCAL for machines) from the evidence the device recorded."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from edgeshield import audit, transport, watermark
from edgeshield.demo import DemoContext, DemoFailure, Stage

ATTACKER_ADDRESS = "127.0.0.9"  # the address whose failed handshakes get it blocked before TLS


def _client(ca: Path, cert: transport.IssuedCert, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, verify=transport.client_context(ca / "ca.crt", cert.cert_path, cert.key_path),
                        timeout=10)


def _handshake_fails(port: int, ca: Path) -> str:
    """One TLS handshake without a client certificate from ATTACKER_ADDRESS: "failed", or "refused" when the server
    closed the connection before TLS (the monitor blocked the address)."""
    ctx = ssl.create_default_context(cafile=str(ca / "ca.crt"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(ATTACKER_ADDRESS, 0)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            tls.recv(1)  # TLS 1.3: the server's certificate demand fails on the first read
    except ssl.SSLError as exc:
        return "refused" if "EOF" in str(exc) or "UNEXPECTED_EOF" in str(exc) else "failed"
    except OSError:
        return "refused"
    return "served"


def _config(ctx: DemoContext) -> tuple[Any, dict[str, Any]]:
    from edgeshield.server import ServeConfig

    work, kdir = ctx.workdir / "operations", ctx.state["kdir"]
    ca = work / "ca"
    transport.init_ca(ca)
    server_cert = transport.issue(ca, name="edge-gateway", role="server", server=True, sans=["127.0.0.1"])
    certs = {"admin": transport.issue(ca, name="ops-admin", role="admin"),
             "alice": transport.issue(ca, name="alice", role="client"),
             "mallory": transport.issue(ca, name="mallory", role="client")}
    audit.generate_signing_key(work / "audit.key")
    watermark.generate_key(work / "served.key")
    # The deployment as an operator writes it: one serve.toml that `serve --config` and `comply` both read.
    toml = work / "serve.toml"
    settings = {"bundle": ctx.state["bundle"], "owner-key": kdir / "owner.pub", "device-key": kdir / "device.key",
                "ca": ca, "cert": server_cert.cert_path, "key": server_cert.key_path, "audit-db": work / "audit.db",
                "audit-key": work / "audit.key", "subject-header": "x-subject-id", "retention-days": 30,
                "served-watermark-key": work / "served.key", "served-watermark-rate": 0.5,
                "served-watermark-evidence": work / "evidence.db"}
    toml.write_text("".join(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n"
                            for k, v in settings.items()), encoding="utf-8")
    # the server runs exactly what the file says (its keys are ServeConfig's fields, dashed)
    cfg = ServeConfig(**{k.replace("-", "_"): v for k, v in settings.items()}, port=0, log_level="error",
                      config_file=toml)
    return cfg, {"ca": ca, "certs": certs, "toml": toml, "work": work}


def _monitor(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.models import load_digits_split
    from edgeshield.server import running

    cfg, w = _config(ctx)
    ca, certs = w["ca"], w["certs"]
    digits = load_digits_split().x_test
    x = digits[:4].tolist()
    # the patient's request: at watermark rate 0.5, 32 inputs leave no marked row (no evidence to erase) with
    # probability 2^-32, where 4 inputs did 1 time in 16
    x_subject = digits[:32].tolist()
    with running(cfg) as (_server, _watcher, port):
        url = f"https://127.0.0.1:{port}"
        with _client(ca, certs["alice"], url) as alice, _client(ca, certs["mallory"], url) as mallory, \
                _client(ca, certs["admin"], url) as admin:
            if alice.post("/v1/predict", json={"inputs": x_subject},
                          headers={"x-subject-id": "patient-17"}).status_code != 200:
                raise DemoFailure("an honest client was not served")
            # Attack 1: mallory probes endpoints its role may not use until the rbac_denials rule blocks it.
            denied = 0
            for _ in range(40):
                r = mallory.get("/metrics")
                if r.status_code != 403 or "security monitor" in r.text:
                    break
                denied += 1
            t0 = time.perf_counter()
            blocked = mallory.post("/v1/predict", json={"inputs": x})
            if blocked.status_code != 403 or "security monitor" not in blocked.text:
                raise DemoFailure(f"mallory was not blocked after {denied} RBAC denials: {blocked.status_code}")
            trip_ms = (time.perf_counter() - t0) * 1000
            # Attack 2: an address floods the server with handshakes that have no client certificate.
            outcomes = [_handshake_fails(port, ca) for _ in range(40)]
            if "refused" not in outcomes:
                raise DemoFailure("an address failing 40 TLS handshakes was never blocked")
            if alice.post("/v1/predict", json={"inputs": x}).status_code != 200:
                raise DemoFailure("the honest client was caught by another client's block")
            status = admin.get("/v1/admin/monitor").json()
            lifted = admin.post("/v1/admin/monitor/lift", json={"action": "block", "target": "identity:mallory"})
            if lifted.status_code != 200 or not lifted.json().get("lifted"):
                raise DemoFailure(f"the admin could not lift mallory's block: {lifted.status_code} {lifted.text}")
            after = mallory.post("/v1/predict", json={"inputs": x}).status_code
            if after != 200:
                raise DemoFailure(f"mallory was still refused ({after}) after the admin lifted its block")
            page = admin.get("/status")
            if page.status_code != 200 or "content-security-policy" not in page.headers:
                raise DemoFailure("the status page did not load for the admin")
    table = Table(title="security monitor: alerts raised by the attack burst")
    for col in ("rule", "severity", "key", "what"):
        table.add_column(col)
    for a in status["alerts"]:
        table.add_row(a["rule"], a["severity"], a["key"], a["output"])
    ctx.tables.append(table)
    rules = sorted({a["rule"] for a in status["alerts"]})
    if not {"rbac_denials", "tls_handshake_failures"} <= set(rules):
        raise DemoFailure(f"expected alerts from rbac_denials and tls_handshake_failures, got {rules}")
    ctx.state["operations"] = w
    first_refused = outcomes.index("refused") + 1
    ctx.summary["operations"] = {"alerts": rules, "rbac_denials_before_block": denied,
                                 "handshakes_before_address_block": first_refused,
                                 "responses_in_force_before_lift": len(status["responses"]),
                                 "refused_after_trip_ms": round(trip_ms, 1), "lifted_by_admin": True}
    return (f"{len(status['alerts'])} alerts ({', '.join(rules)}); mallory blocked after {denied} denials, "
            f"the flooding address after {first_refused} failed handshakes; admin lifted mallory's block, served again")


def _comply(ctx: DemoContext) -> str:
    from edgeshield.compliance import Deployment, assess, erase_subject, write_report

    w = ctx.state["operations"]
    deployment = Deployment.from_toml(w["toml"])
    erased = erase_subject(deployment, "patient-17")
    report = assess(deployment)
    out = {"html": w["work"] / "compliance.html", "oscal": w["work"] / "compliance-oscal.json",
           "json": w["work"] / "compliance.json"}
    for fmt, path in out.items():
        write_report(report, fmt, path, overwrite=True)
    counts: dict[str, int] = {}
    for item in report.requirements:
        counts[item.status] = counts.get(item.status, 0) + 1
    if counts.get("pass", 0) == 0:
        raise DemoFailure(f"no requirement passed on a configured deployment: {counts}")
    ctx.summary["compliance"] = {"statuses": counts, "reports": {k: str(v) for k, v in out.items()},
                                 "erasure": {"records": erased.records}}
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    where = "" if ctx.keep_files else " (the demo's temp dir is removed at exit; --workdir keeps them)"
    return (f"{shown}; patient-17 erased ({erased.records} records, key destroyed); "
            f"HTML {out['html']}, OSCAL {out['oscal']}{where}")


STAGES = [
    Stage("Monitor an attack burst: alerts, automatic blocks, an admin lifts one", _monitor),
    Stage("Report compliance from the device's evidence (GDPR, CCPA, HIPAA, SOX, EU AI Act)", _comply),
]
