"""Each compliance check passing and failing on a real deployment (keys, CA, protected bundle, audit log), the
live ones against the real server on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeshield import audit, transport
from edgeshield.compliance import CHECKS, CheckContext, CheckResult, Deployment, purge, run_check
from edgeshield.models import digits_model_path, load_digits_split
from edgeshield.server import running
from edgeshield.watermark import EvidenceStore

from _deploy import Built, build


def check(name: str, deployment: Deployment, **kw: Any) -> CheckResult:
    result = run_check(CHECKS[name], CheckContext(deployment, timeout_s=3.0, **kw))
    assert result.check == name
    if result.status == "pass":
        assert result.evidence, "nothing passes without evidence"
    return result


def append(b: Built, kind: str, data: dict[str, Any], actor: str = "server") -> None:
    with audit.AuditLog(b.root / "audit.db", signing_key=audit.load_signing_key(b.root / "audit.key")) as log:
        log.append(kind, actor, data)
        log.checkpoint()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A deployment whose server runs: a client predicted and was once refused by RBAC."""
    b = build(tmp_path_factory.mktemp("live") / "device")
    import httpx

    with running(b.serve) as (_srv, _watcher, port):
        url = f"https://127.0.0.1:{port}"
        alice = b.certs["alice"]
        ctx = transport.client_context(b.root / "ca" / "ca.crt", alice.cert_path, alice.key_path)
        with httpx.Client(base_url=url, verify=ctx, timeout=10) as c:
            r = c.post("/v1/predict", json={"inputs": load_digits_split().x_test[:16].tolist()})
            assert r.status_code == 200, r.text
            assert c.get("/metrics").status_code == 403  # auth.forbidden: RBAC enforced
        yield {"built": b, "url": url, "port": port, "deployment": b.deployment(port=port)}


# --- raw_inputs_on_device ---------------------------------------------------------------------------------------
def test_raw_inputs_pass_on_the_served_log(live: dict[str, Any]) -> None:
    r = check("raw_inputs_on_device", live["deployment"])
    assert r.status == "pass", r.reason
    entry = next(e for e in r.evidence if e.kind == "audit_entry")
    assert entry.data["kind"] == "inference.predict" and len(entry.data["data"]["input_sha256"]) == 64
    assert entry.proof is not None and entry.proof["verified"]


def test_raw_inputs_fail_on_a_logged_array_and_a_readable_store(built: Built) -> None:
    append(built, "inference.request", {"inputs": [[0.25, 0.5, 0.75, 0.125]]}, actor="tool")
    r = check("raw_inputs_on_device", built.deployment())
    assert r.status == "fail" and "look like raw inputs" in r.reason and "data.inputs" in r.reason
    fresh = build(built.root.parent / "again")
    (fresh.root / "evidence.db").chmod(0o644)
    r = check("raw_inputs_on_device", fresh.deployment())
    assert r.status == "fail" and "0644" in r.reason


# --- encryption_at_rest -----------------------------------------------------------------------------------------
def test_encryption_at_rest_pass(built: Built) -> None:
    r = check("encryption_at_rest", built.deployment())
    assert r.status == "pass", r.reason
    assert r.evidence[0].data["verified"] is True and r.evidence[0].data["aead"]


def test_encryption_at_rest_fails_on_a_plaintext_copy_or_a_plain_model(built: Built) -> None:
    shutil.copy(digits_model_path(), built.root / "digits.onnx")
    r = check("encryption_at_rest", built.deployment())
    assert r.status == "fail" and str(built.root / "digits.onnx") in r.reason
    r = check("encryption_at_rest", built.deployment(bundle="digits.onnx"))
    assert r.status == "fail" and "not a valid EdgeShield bundle" in r.reason


# --- encryption_in_transit --------------------------------------------------------------------------------------
def test_encryption_in_transit_pass_with_a_live_probe(live: dict[str, Any]) -> None:
    r = check("encryption_in_transit", live["deployment"], probe_url=live["url"])
    assert r.status == "pass", r.reason
    probes = [e.data for e in r.evidence if e.kind == "probe"]
    assert [p["version"] for p in probes] == ["TLSv1_2", "TLSv1_3"]
    assert all(p["outcome"] == "refused" for p in probes)


@pytest.fixture
def lax_tls_server(built: Built) -> Iterator[int]:
    """A TLS server that takes TLS 1.2 and no client certificate (what the check must catch)."""
    server = built.root / "ca"
    cert = next(c for c in (built.root / "ca").rglob("*.crt") if "edge-1" in c.name)
    key = next(c for c in (server).rglob("*.key") if "edge-1" in c.name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    sock.close()


def test_encryption_in_transit_fails_when_the_live_server_takes_tls12(built: Built, lax_tls_server: int) -> None:
    r = check("encryption_in_transit", built.deployment(), probe_url=f"https://127.0.0.1:{lax_tls_server}")
    assert r.status == "fail"
    assert "TLS 1.2 handshake was served" in r.reason and "without a client certificate was served" in r.reason


def test_encryption_in_transit_fails_when_nothing_answers(built: Built) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        r = check("encryption_in_transit", built.deployment(), probe_url=f"https://127.0.0.1:{port}")
    assert r.status == "fail" and "could not reach" in r.reason


# --- access_control ---------------------------------------------------------------------------------------------
def test_access_control_pass_with_denials_observed(live: dict[str, Any]) -> None:
    r = check("access_control", live["deployment"])
    assert r.status == "pass", r.reason
    assert "1 denials observed" in r.reason or "denials observed" in r.reason
    assert any(e.kind == "audit_entry" and e.data["kind"] == "auth.forbidden" for e in r.evidence)


def test_access_control_fails_when_the_policy_changed_or_was_never_loaded(built: Built) -> None:
    assert check("access_control", built.deployment()).status == "pass"
    (built.root / "policy.csv").write_text("p, client, /*, (GET|POST)\n", encoding="utf-8")
    r = check("access_control", built.deployment())
    assert r.status == "fail" and "changed since the server loaded it" in r.reason
    (built.root / "audit.db").rename(built.root / "old.db")
    with audit.AuditLog(built.root / "audit.db", signing_key=audit.load_signing_key(built.root / "audit.key")) as log:
        log.append("server.note", "server", {})
        log.checkpoint()
    r = check("access_control", built.deployment())
    assert r.status == "fail" and "no config.rbac entry" in r.reason


# --- audit_log_verifying and log_retention ----------------------------------------------------------------------
def _tamper(db: Path) -> None:
    with sqlite3.connect(db) as conn:  # an attacker with the file edits an entry
        conn.execute("DROP TRIGGER entries_no_update")
        conn.execute("UPDATE entries SET actor = 'mallory' WHERE seq = 0")


def test_audit_log_verifying_pass_and_fail(built: Built) -> None:
    r = check("audit_log_verifying", built.deployment())
    assert r.status == "pass", r.reason
    assert r.evidence[0].data["signatures_checked"] is True
    _tamper(built.root / "audit.db")
    r = check("audit_log_verifying", built.deployment())
    assert r.status == "fail" and "does not verify" in r.reason


def test_audit_log_verifying_require_checkpoint(built: Built) -> None:
    with audit.AuditLog(built.root / "audit.db", signing_key=audit.load_signing_key(built.root / "audit.key")) as log:
        log.append("server.note", "server", {})  # not yet under a checkpoint
    assert check("audit_log_verifying", built.deployment()).status == "pass"
    r = check("audit_log_verifying", built.deployment(**{"require-checkpoint": True}))
    assert r.status == "fail" and "not covered" in r.reason


def test_log_retention_pass_and_fail(built: Built) -> None:
    r = check("log_retention", built.deployment())
    assert r.status == "pass", r.reason
    assert r.evidence[0].data["seq"] == 0 and r.evidence[0].proof and r.evidence[0].proof["verified"]
    _tamper(built.root / "audit.db")
    assert check("log_retention", built.deployment()).status == "fail"
    r = check("log_retention", built.deployment(**{"audit-db": "missing.db"}))
    assert r.status == "fail" and "not found" in r.reason


# --- retention_policy -------------------------------------------------------------------------------------------
def _add_rows(b: Built, n: int, subject: str | None = None, *, seed: int = 0) -> None:
    x = np.random.default_rng(seed).random((n, 64), dtype=np.float32)
    with EvidenceStore(b.root / "evidence.db") as store:
        store.add("alice", x, np.arange(n) % 10, subject=subject)


def _age_rows(b: Built, iso: str) -> None:
    with sqlite3.connect(b.root / "evidence.db") as conn:
        conn.execute("UPDATE evidence SET time = ?", (iso,))


def test_retention_policy_fails_until_purged_then_passes(built: Built) -> None:
    r = check("retention_policy", built.deployment())
    assert r.status == "fail" and "never applied" in r.reason
    _add_rows(built, 5)
    _age_rows(built, "2020-01-01T00:00:00.000+00:00")
    done = purge(built.deployment())
    assert done.stores == {"served_evidence": 5} and done.audit_seq is not None
    r = check("retention_policy", built.deployment())
    assert r.status == "pass", r.reason
    assert any(e.kind == "audit_entry" and e.data["kind"] == "retention.purged" for e in r.evidence)
    _add_rows(built, 3, seed=1)
    _age_rows(built, "2020-01-01T00:00:00.000+00:00")  # stored since the purge and now too old
    r = check("retention_policy", built.deployment())
    assert r.status == "fail" and "older than 30 days" in r.reason


def test_retention_policy_fails_without_a_period(built: Built) -> None:
    r = check("retention_policy", built.deployment(**{"retention-days": None}))
    assert r.status == "fail" and "no retention period" in r.reason


# --- erasure_supported ------------------------------------------------------------------------------------------
def test_erasure_supported_pass_and_fail(built: Built) -> None:
    assert check("erasure_supported", built.deployment()).status == "pass"
    r = check("erasure_supported", built.deployment(**{"subject-header": None}))
    assert r.status == "fail" and "no subject-header" in r.reason
    (built.root / "subjects.db").chmod(0o644)
    r = check("erasure_supported", built.deployment())
    assert r.status == "fail" and "0644" in r.reason
    r = check("erasure_supported", built.deployment(**{"subject-keys": "nowhere.db"}))
    assert r.status == "fail" and "does not exist" in r.reason


# --- dp_on_shared_updates ---------------------------------------------------------------------------------------
def test_dp_not_applicable_without_federated_learning_and_not_assessed_with_it(built: Built) -> None:
    r = check("dp_on_shared_updates", built.deployment())
    assert r.status == "not_applicable" and "federated learning" in r.reason
    append(built, "fl.update_rejected", {"round": 1, "client": "c1", "reason": "norm"}, actor="fl")
    r = check("dp_on_shared_updates", built.deployment())
    assert r.status == "not_assessed" and "no privacy ledger" in r.reason


# --- network_exposure -------------------------------------------------------------------------------------------
def test_network_exposure_pass_on_the_loopback_server(live: dict[str, Any]) -> None:
    r = check("network_exposure", live["deployment"], probe_url=live["url"])
    assert r.status == "pass", r.reason
    sockets = next(e for e in r.evidence if e.kind == "sockets").data["listening"]
    assert {"address": "127.0.0.1", "port": live["port"]}.items() <= sockets[0].items()


def test_network_exposure_fails_on_a_wildcard_socket(built: Built) -> None:
    with socket.create_server(("0.0.0.0", 0)) as s:  # noqa: S104 - the exposure under test
        port = s.getsockname()[1]
        r = check("network_exposure", built.deployment(port=port))
    assert r.status == "fail" and f"0.0.0.0:{port}" in r.reason
    r = check("network_exposure", built.deployment(host="0.0.0.0", port=port))  # noqa: S104
    assert r.status == "fail" and "configured to listen on 0.0.0.0" in r.reason


def test_network_exposure_management_interface_and_nothing_listening(built: Built) -> None:
    with socket.create_server(("127.0.0.2", 0)) as s:
        port = s.getsockname()[1]
        r = check("network_exposure", built.deployment(port=port, **{"management-interfaces": ["lo"]}))
        assert r.status == "pass", r.reason
    r = check("network_exposure", built.deployment(port=port))
    assert r.status == "not_assessed" and "nothing listens" in r.reason
    r = check("network_exposure", built.deployment(**{"management-interfaces": ["no-such-if0"]}))
    assert r.status == "fail" and "no-such-if0" in r.reason


# --- monitoring_enabled -----------------------------------------------------------------------------------------
def test_monitoring_fails_without_the_monitor_and_passes_with_its_rules(built: Built) -> None:
    r = check("monitoring_enabled", built.deployment())
    assert r.status == "fail" and "no monitor_rules_sha256" in r.reason
    rules = built.root / "rules.yaml"
    rules.write_text("rules: []\n", encoding="utf-8")
    import hashlib

    digest = hashlib.sha256(rules.read_bytes()).hexdigest()
    # the server.startup entry as the server writes it with the monitor on (the lead's start-up data field)
    append(built, "server.startup", {"bundle_id": "b", "monitor_rules_sha256": digest})
    (built.root / "monitor.db").touch(mode=0o600)
    r = check("monitoring_enabled", built.deployment(**{"monitor-rules": "rules.yaml", "monitor-db": "monitor.db"}))
    assert r.status == "pass", r.reason
    rules.write_text("rules: [changed]\n", encoding="utf-8")
    r = check("monitoring_enabled", built.deployment(**{"monitor-rules": "rules.yaml"}))
    assert r.status == "fail" and "changed since the server loaded it" in r.reason


def test_a_check_that_cannot_run_fails_with_the_reason(built: Built) -> None:
    r = check("encryption_at_rest", built.deployment(bundle=None))
    assert r.status == "fail" and "bundle" in r.reason and not r.evidence
