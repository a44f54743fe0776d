"""Each rule of the default pack and each response, end to end against the real mutual-TLS server (issue 10).

For every rule whose source a test can produce, real traffic (or a real file change, a real expired CRL, a real
event from another process) trips it, and the test checks that the alert is in ``GET /v1/admin/monitor``, that the
response takes effect from the very next request or connection while other clients are still served, that alert,
response and refusal are in the audit log, that an admin lifts it (through the API or ``edgeshield monitor``) and
that the lift is audited. Blocks survive a restart on the same monitor database.

Three servers share the module: ``world_d`` runs the unmodified default pack (one test per response type on it),
``world_c`` has its own CA (its CRL is let expire), and ``world_t`` runs a copy of the default pack with small
counts for the rules whose default threshold is large, plus what those rules need (a rate-limited role, a detector,
a plug-in stage with a bug in it). The persistence and witness tests start their own servers.

Not covered: ``client_rate_anomaly`` (its source, RateAnomaly, learns each client's baseline for 60 s before it
judges, and the server does not configure that warm-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from edgeshield import audit, transport
from edgeshield.monitor._endpoint import send_events
from edgeshield.monitor._rules import default_rules_path
from edgeshield.server import ServeConfig, build_state
from edgeshield.server._admin import AlertItem, EventItem, ResponseItem, RevocationItem, RuleItem
from edgeshield.server._limits import Limits

from _serving import protected_digits, publish_crl, serving

ROLES = {"adm": "admin", "alice": "client", "mallory": "client", "fuzzer": "client", "harvester": "client",
         "dev-9": "client", "metered": "metered", "flagger": "client", "buggy": "client", "reader": "client",
         "ext": "client"}
GOOD = {"inputs": [[0.5] * 64]}  # one input, the same every time: never more than one distinct query
BAD = {"inputs": [[5.0] * 64]}  # out of the spec's range: refused 422, input.rejected
PACK_RULES = 20


# --- the worlds ---------------------------------------------------------------------------------------------------
@dataclass
class World:
    cfg: ServeConfig
    state: Any
    port: int
    ca: Path
    certs: dict[str, Any]
    root: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def monitor(self) -> Any:
        return self.state.security_monitor

    def client(self, name: str, source: str | None = None) -> httpx.Client:
        cert = self.certs[name]
        ctx = transport.client_context(self.ca / "ca.crt", cert.cert_path, cert.key_path)
        if source is None:
            return httpx.Client(base_url=self.url, verify=ctx, timeout=10)
        return httpx.Client(base_url=self.url, timeout=10,
                            transport=httpx.HTTPTransport(verify=ctx, local_address=source))

    def snapshot(self) -> dict[str, Any]:
        with self.client("adm") as c:
            r = c.get("/v1/admin/monitor")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def lift(self, action: str, target: str) -> bool:
        with self.client("adm") as c:
            r = c.post("/v1/admin/monitor/lift", json={"action": action, "target": target})
        assert r.status_code == 200, r.text
        return r.json()["lifted"]  # type: ignore[no-any-return]

    def entries(self, kind: str, **data: Any) -> list[audit.Entry]:
        """The audit log's entries of ``kind`` whose data has ``data``, once the monitor's queued work is done."""
        assert self.monitor.flush()
        return [e for e in audit.AuditLog(self.cfg.audit_db, readonly=True).entries()
                if e.kind == kind and all(e.data.get(k) == v for k, v in data.items())]

    def cli(self, *args: str) -> Any:
        from edgeshield.cli._monitor import app

        adm = self.certs["adm"]
        return CliRunner().invoke(app, [*args, "--url", self.url, "--ca", str(self.ca / "ca.crt"),
                                        "--cert", str(adm.cert_path), "--key", str(adm.key_path)])


def _pki(root: Path) -> dict[str, Any]:
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {name: transport.issue(ca, name=name, role=role) for name, role in ROLES.items()}
    audit.generate_signing_key(root / "audit.key")
    return {"root": root, "bundle": bundle, "keys": k, "ca": ca, "server": server, "certs": certs}


def _config(pki: dict[str, Any], d: Path, **kw: Any) -> ServeConfig:
    """A server of its own in ``d``: its own bundle, policy and rule file copies (the tests change them on disk)."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki["bundle"], d / "digits.esb")
    from edgeshield.server._rbac import default_policy_path

    (d / "policy.csv").write_text(default_policy_path().read_text() + "p, metered, /v1/predict, POST\n")
    if "monitor_rules" not in kw:
        shutil.copy(default_rules_path(), d / "rules.yaml")  # byte for byte the default pack, watched and reloadable
        kw["monitor_rules"] = d / "rules.yaml"
    k, server = pki["keys"], pki["server"]
    return ServeConfig(bundle=d / "digits.esb", owner_key=k / "owner.pub", device_key=k / "device.key",
                       ca=pki["ca"], cert=server.cert_path, key=server.key_path, audit_db=d / "audit.db",
                       audit_key=pki["root"] / "audit.key", port=0, log_level="warning", policy=d / "policy.csv",
                       monitor_db=d / "monitor.db", watch_interval_s=0.2, **kw)


@contextlib.contextmanager
def _running(pki: dict[str, Any], cfg: ServeConfig, prepare: Callable[[Any], None] | None = None) -> Iterator[World]:
    state = build_state(cfg)
    if prepare is not None:
        prepare(state)
    with serving(cfg, state) as (_srv, _watcher, port):
        yield World(cfg, state, port, pki["ca"], pki["certs"], cfg.audit_db.parent)


def _test_pack(path: Path, counts: dict[str, int]) -> Path:
    """The default pack with smaller counts for the named rules (everything else as shipped)."""
    rules = yaml.safe_load(default_rules_path().read_text())
    for rule in rules:
        if rule["rule"] in counts:
            rule["condition"]["count"] = counts[rule["rule"]]
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _pki(tmp_path_factory.mktemp("monitor-rules"))


@pytest.fixture(scope="module")
def world_d(pki: dict[str, Any]) -> Iterator[World]:
    """The unmodified default pack, with everything watched, the event socket and the extraction monitor on."""
    d = pki["root"] / "d"
    d.mkdir()
    (d / "serve.toml").write_text("# the server's config file, watched like the policy\n")
    sock_dir = Path(tempfile.mkdtemp(dir="/tmp"))  # a Unix socket path must fit in 107 bytes
    cfg = _config(pki, d, config_file=d / "serve.toml", events_socket=sock_dir / "events.sock",
                  extraction_action="block", query_budget=5)
    try:
        with _running(pki, cfg) as w:
            yield w
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------------------------
def _wait(what: str, check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy (a bounded wait for a watcher or an aggregate, not a
    timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.05)


def _alert(snap: dict[str, Any], rule: str, key: str | None = None) -> dict[str, Any]:
    found = [a for a in snap["alerts"] if a["rule"] == rule and (key is None or a["key"] == key)]
    assert found, (rule, key, [a["rule"] for a in snap["alerts"]])
    return found[0]


def _response(snap: dict[str, Any], action: str, target: str) -> dict[str, Any] | None:
    found = [r for r in snap["responses"] if r["action"] == action and r["target"] == target]
    return found[0] if found else None


def _assert_audited(w: World, rule: str, action: str | None, target: str | None, *, refused: bool = True) -> None:
    """alert, response (ok) and, where a request was refused, the refusal: each in the audit log."""
    assert w.entries("monitor.alert", rule=rule), rule
    if action is not None:
        (resp,) = w.entries("monitor.response", rule=rule, action=action, target=target)
        assert resp.data["ok"] is True and resp.actor == "monitor"
    if refused:
        assert w.entries("monitor.refused", rule=rule, action=action), (rule, action)


def _assert_lifted(w: World, action: str, target: str) -> None:
    (lifted,) = w.entries("monitor.lifted", action=action, target=target)
    assert lifted.actor == "adm" and lifted.data["by"] == "adm"


def _tls(w: World, name: str | None, source: str | None = None) -> ssl.SSLSocket:
    """A raw TLS connection as ``name`` (no client certificate for None), optionally from a source address."""
    if name is None:
        ctx = ssl.create_default_context(cafile=str(w.ca / "ca.crt"))
    else:
        cert = w.certs[name]
        ctx = transport.client_context(w.ca / "ca.crt", cert.cert_path, cert.key_path)
    raw = socket.create_connection(("127.0.0.1", w.port), timeout=5,
                                   source_address=(source, 0) if source else None)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def _get(sock: ssl.SSLSocket, path: str) -> int:
    """One HTTP/1.1 request on a kept-alive connection; its status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1])


def _closed(sock: ssl.SSLSocket, timeout_s: float = 5.0) -> bool:
    """Whether the server closes the connection within ``timeout_s`` (EOF or reset), sending nothing."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def _expire_soon(w: World) -> None:
    """Have the server load a CRL that expires in a moment (a longer moment again if, on a loaded machine, it only
    got to it once expired: an expired CRL is not loaded)."""
    for seconds in (1.5, 4.0, 10.0):
        failures = len(w.entries("crl.reload_failed"))
        number = publish_crl(w.ca, seconds)
        _wait("the short CRL", lambda n=number, f=failures: w.entries("crl.reload", crl_number=n)
              or len(w.entries("crl.reload_failed")) > f)
        if w.entries("crl.reload", crl_number=number):
            return
    raise AssertionError("the server never loaded a short-lived CRL in time")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the default pack: world_d ------------------------------------------------------------------------------------
def test_rbac_denials_block_the_identity_lifted_through_the_cli(world_d: World) -> None:
    w = world_d
    with w.client("mallory") as c:
        assert [c.get("/metrics").status_code for _ in range(20)] == [403] * 20  # what a client may not call
        r = c.get("/healthz")  # the very next request, allowed for its role: refused by the monitor's block
        assert r.status_code == 403 and r.json()["error"] == "refused by the security monitor"
        assert int(r.headers["retry-after"]) > 500  # the rule's 600 s
    with w.client("alice") as c:
        assert c.get("/healthz").status_code == 200  # only mallory
    snap = w.snapshot()
    alert = _alert(snap, "rbac_denials", "identity:mallory")
    assert alert["count"] == 20 and alert["severity"] == "high" and "AML.T0040" in alert["tags"]
    block = _response(snap, "block", "identity:mallory")
    assert block is not None and block["rule"] == "rbac_denials" and block["until"] - block["since"] == 600
    for name, model in (("alerts", AlertItem), ("responses", ResponseItem), ("rules", RuleItem),
                        ("recent_events", EventItem)):  # field for field what the admin API's schema says
        assert snap[name]
        for item in snap[name]:
            assert set(item) == set(model.model_fields), (name, item)
    assert len(snap["rules"]) == PACK_RULES
    _assert_audited(w, "rbac_denials", "block", "identity:mallory")

    r = w.cli("unblock", "mallory")
    assert r.exit_code == 0, r.output
    with w.client("mallory") as c:
        assert c.get("/healthz").status_code == 200
    assert _response(w.snapshot(), "block", "identity:mallory") is None
    _assert_lifted(w, "block", "identity:mallory")


def test_failed_handshakes_block_the_address_before_tls(world_d: World) -> None:
    """30 handshakes without a client certificate from 127.0.0.7: that address is refused before TLS, even with a
    valid certificate, from the very next connection; 127.0.0.1 is still served."""
    w, source = world_d, "127.0.0.7"
    for _ in range(30):
        with contextlib.suppress(OSError), _tls(w, None, source) as s:
            s.recv(1)  # the server's alert: certificate required
    with pytest.raises((ssl.SSLError, ConnectionError)):  # closed before TLS: no handshake, certificate or not
        _tls(w, "alice", source).close()
    with w.client("alice") as c:
        assert c.get("/healthz").status_code == 200
    snap = w.snapshot()
    _alert(snap, "tls_handshake_failures", f"address:{source}")
    block = _response(snap, "block", f"address:{source}")
    assert block is not None and block["until"] - block["since"] == 60
    _assert_audited(w, "tls_handshake_failures", "block", f"address:{source}", refused=False)

    def refused_before_tls() -> bool:  # connections are audited in one aggregate entry a second
        return any("address blocked by the security monitor (tls_handshake_failures)" in e.data.get("reasons", {})
                   for e in w.entries("connection.refused"))

    _wait("the refused connection's audit entry", refused_before_tls)
    assert w.lift("block", f"address:{source}")
    with w.client("alice", source=source) as c:
        assert c.get("/healthz").status_code == 200
    _assert_lifted(w, "block", f"address:{source}")


def test_adversarial_input_burst_throttles_the_identity(world_d: World) -> None:
    w = world_d
    with w.client("fuzzer") as c:
        assert {c.post("/v1/predict", json=BAD).status_code for _ in range(100)} == {422}
        codes = [c.post("/v1/predict", json=GOOD).status_code for _ in range(10)]
        assert codes == [200] * 10  # the throttle's bucket (burst 10) ...
        r = next(r for r in (c.post("/v1/predict", json=GOOD) for _ in range(50)) if r.status_code != 200)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # ... then 429 beyond 2 a second
        assert r.json()["error"] == "rate limited by the security monitor"
    with w.client("alice") as c:
        assert c.post("/v1/predict", json=GOOD).status_code == 200
    snap = w.snapshot()
    assert _alert(snap, "adversarial_input_burst", "identity:fuzzer")["count"] == 100
    assert _response(snap, "throttle", "identity:fuzzer") is not None
    _assert_audited(w, "adversarial_input_burst", "throttle", "identity:fuzzer")
    assert w.lift("throttle", "identity:fuzzer")
    with w.client("fuzzer") as c:
        assert {c.post("/v1/predict", json=GOOD).status_code for _ in range(15)} == {200}
    _assert_lifted(w, "throttle", "identity:fuzzer")


def _distinct(i: int) -> dict[str, Any]:
    return {"inputs": [[(i % 16) / 16 + 0.01 * (i // 16)] * 64]}


def test_an_extraction_block_is_a_monitor_block_and_lifting_it_resets_the_extraction_monitor(world_d: World) -> None:
    w = world_d
    with w.client("harvester") as c:
        assert [c.post("/v1/predict", json=_distinct(i)).status_code for i in range(5)] == [200] * 5
        tripped = c.post("/v1/predict", json=_distinct(5))  # over the budget of 5 distinct inputs
        assert tripped.status_code == 403 and "extraction" in tripped.json()["error"]
        r = c.post("/v1/predict", json=GOOD)  # the very next request: the monitor's block, before the pipeline
        assert r.status_code == 403 and r.json()["error"] == "refused by the security monitor"
    snap = w.snapshot()
    _alert(snap, "extraction_blocked", "identity:harvester")
    block = _response(snap, "block", "identity:harvester")
    assert block is not None and block["until"] is None  # until an admin lifts it
    _assert_audited(w, "extraction_blocked", "block", "identity:harvester")
    assert w.lift("block", "identity:harvester")
    with w.client("harvester") as c:  # served again, with a budget that starts over (not over it at once)
        assert [c.post("/v1/predict", json=_distinct(10 + i)).status_code for i in range(5)] == [200] * 5
    _assert_lifted(w, "block", "identity:harvester")


def test_events_from_other_processes_raise_their_alerts(world_d: World) -> None:
    w = world_d
    path = str(w.cfg.events_socket)
    script = ("import sys; from edgeshield.monitor._endpoint import send_events; print(send_events(sys.argv[1], "
              "[{'kind': 'attestation.failed', 'actor': 'device-12', 'data': {'device': 'd12', 'reason': 'pcr7'}, "
              "'source': 'keyrelease'}]))")
    out = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and "'ok': True" in out.stdout, out.stderr[-2000:]
    replies = send_events(path, [
        *({"kind": "fl.update_rejected", "actor": "client-7", "data": {"round": i, "reason": "norm 41 over 10"},
           "source": "fl"} for i in range(3)),
        {"kind": "privacy.budget_exhausted", "actor": "client-8", "data": {"epsilon": 8.0, "delta": 1e-5},
         "source": "fl"},
        {"kind": "update.refused", "actor": "updater", "data": {"version": "2.1.0", "reason": "rollback"},
         "source": "updater"},
        {"kind": "inference.predict", "actor": "mallory", "data": {"batch": 1}},  # the server's own: refused
    ])
    assert [r["ok"] for r in replies] == [True] * 5 + [False]
    snap = w.snapshot()
    _alert(snap, "attestation_failed", "identity:device-12")
    assert _alert(snap, "fl_update_rejected", "identity:client-7")["count"] == 3
    _alert(snap, "privacy_budget_exhausted", "identity:client-8")
    _alert(snap, "update_refused", "all")
    for rule in ("attestation_failed", "fl_update_rejected", "privacy_budget_exhausted", "update_refused"):
        _assert_audited(w, rule, None, None, refused=False)
    (failed,) = w.entries("attestation.failed")
    assert failed.actor == "device-12" and failed.data["reason"] == "pcr7"


def test_configuration_changes_alert_without_quarantine_and_reload_accepts_them(world_d: World) -> None:
    w = world_d
    policy, config, rules = w.cfg.policy, w.cfg.config_file, w.cfg.monitor_rules
    assert policy is not None and config is not None and rules is not None
    shipped = rules.read_text()
    before = len(w.entries("monitor.alert", rule="configuration_changed"))
    for path in (policy, config, rules):  # edited on disk outside a sanctioned update
        with path.open("a") as f:
            f.write("# edited by hand\n")
    _wait("an alert per changed file",
          lambda: len(w.entries("monitor.alert", rule="configuration_changed")) - before == 3)
    changed = {e.data["role"]: e.data for e in w.entries("integrity.changed")}
    assert set(changed) >= {"policy", "config", "rules"}
    assert changed["policy"]["actual_sha256"] == _sha256(policy)
    snap = w.snapshot()
    assert _alert(snap, "configuration_changed", "all")["severity"] == "critical"
    assert any(e["kind"] == "integrity.changed" and e["address"] is None for e in snap["recent_events"])
    assert not [r for r in w.snapshot()["responses"] if r["action"] == "quarantine"]
    with w.client("alice") as c:
        assert c.post("/v1/predict", json=GOOD).status_code == 200  # no quarantine: still served

    # the admin reviews the change and reloads: the rule file is re-read and the files as they are now accepted
    try:
        rules.write_text(shipped.split("- rule: update_refused")[0])  # one rule fewer
        with w.client("adm") as c:
            r = c.post("/v1/admin/monitor/reload")
        assert r.status_code == 200 and r.json()["rules"] == PACK_RULES - 1, r.text
        accepted = {e.data["role"]: e.data["sha256"] for e in w.entries("integrity.accepted")}
        assert accepted["policy"] == _sha256(policy) and accepted["config"] == _sha256(config)
        assert accepted["rules"] == _sha256(rules)
        assert "update_refused" not in {x["name"] for x in w.snapshot()["rules"]}
        (reload,) = w.entries("monitor.reload", rules=PACK_RULES - 1)
        assert reload.actor == "adm" and reload.data["rules_sha256"] == _sha256(rules)
        alerts = len(w.entries("monitor.alert", rule="configuration_changed"))
        time.sleep(3 * w.cfg.watch_interval_s)  # a few polls: the accepted files raise nothing more
        assert len(w.entries("monitor.alert", rule="configuration_changed")) == alerts
    finally:
        rules.write_text(shipped)
        with w.client("adm") as c:
            assert c.post("/v1/admin/monitor/reload").json()["rules"] == PACK_RULES


def test_a_changed_bundle_quarantines_predictions_until_released(world_d: World) -> None:
    """Last on world_d: its bundle stays changed (accepted) afterwards."""
    w = world_d
    with w.client("reader") as c:
        assert c.post("/v1/predict", json=GOOD).status_code == 200
        with w.cfg.bundle.open("ab") as f:
            f.write(b"\0")  # the bundle changed on disk outside a sanctioned update
        _wait("the quarantine", lambda: _response(w.snapshot(), "quarantine", "file:bundle"))
        r = c.post("/v1/predict", json=GOOD)
        assert r.status_code == 503 and "quarantined" in r.json()["error"] and r.headers["retry-after"]
        assert c.get("/healthz").status_code == 200 and c.get("/v1/model").status_code == 200  # the rest is up
        snap = w.snapshot()
        assert _alert(snap, "bundle_changed", "all")["severity"] == "critical"
        assert w.entries("monitor.refused", action="quarantine")
        _assert_audited(w, "bundle_changed", "quarantine", "file:bundle", refused=False)
        with w.client("adm") as admin:
            assert admin.post("/v1/admin/monitor/reload").status_code == 200  # accept the file as it is now
        assert any(e.data["sha256"] == _sha256(w.cfg.bundle) for e in w.entries("integrity.accepted", role="bundle"))
        assert c.post("/v1/predict", json=GOOD).status_code == 503  # accepting is not releasing
        assert w.lift("quarantine", "file:bundle")
        assert c.post("/v1/predict", json=GOOD).status_code == 200
    _assert_lifted(w, "quarantine", "file:bundle")


# --- a certificate kept presented while refused: world_c (its own CA, its CRL let expire) ------------------------
@pytest.fixture(scope="module")
def world_c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pki = _pki(tmp_path_factory.mktemp("monitor-crl"))
    limits = Limits(keep_alive_s=60, request_head_timeout_s=60)  # idle connections stay open for the test
    cfg = _config(pki, pki["root"] / "c", crl_poll_s=0.1, limits=limits)
    with _running(pki, cfg) as w:
        yield w


def test_refused_authentications_deny_the_certificate(world_c: World) -> None:
    """Fail-closed on an expired CRL, every request on dev-9's 11 open connections is refused 401; after 10 the
    default pack denies its certificate: the 11th connection is closed, a revocation request is queued for the CA
    host, and once the CRL is current again dev-9 alone is still refused, until an admin lifts the denial."""
    w = world_c
    conns = [_tls(w, "dev-9") for _ in range(11)]
    other = _tls(w, "alice")
    try:
        assert [_get(s, "/healthz") for s in [*conns, other]] == [200] * 12
        _expire_soon(w)
        _wait("the CRL to expire", lambda: any(a["rule"] == "crl_expired" for a in w.monitor.snapshot()["alerts"]))
        assert [_get(s, "/healthz") for s in conns[:10]] == [401] * 10  # the CRL check refuses; the 10th trips
        assert w.monitor.denied_serials() == {w.certs["dev-9"].serial}  # in force at once, before any record
        assert _closed(conns[10])  # dev-9's live connection, closed by the denial
        number = publish_crl(w.ca, 7 * 86400)  # a current CRL again
        _wait("the new CRL", lambda: w.entries("crl.reload", crl_number=number))
        assert _get(other, "/healthz") == 200  # alice's kept-alive connection: untouched and served
    finally:
        for s in [*conns, other]:
            s.close()
    serial = f"{w.certs['dev-9'].serial:x}"
    with w.client("dev-9") as c:
        r = c.get("/healthz")
        assert r.status_code == 401 and "denied by the security monitor" in r.json()["error"]
    snap = w.snapshot()
    _alert(snap, "crl_expired", "all")
    assert _alert(snap, "certificate_misuse", f"serial:{serial}")["count"] == 10
    assert _response(snap, "deny_cert", f"serial:{serial}") is not None
    (pending,) = snap["pending_revocations"]
    assert pending["serial"] == serial and pending["identity"] == "dev-9"
    assert set(pending) == set(RevocationItem.model_fields)
    _assert_audited(w, "certificate_misuse", "deny_cert", f"serial:{serial}")
    _assert_audited(w, "crl_expired", None, None, refused=False)

    from edgeshield.cli._monitor import app

    out = w.root / "requests.json"
    r = CliRunner().invoke(app, ["revocations", "--db", str(w.cfg.monitor_db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert serial in out.read_text() and (out.stat().st_mode & 0o777) == 0o600  # for the CA host
    r = w.cli("undeny", serial)
    assert r.exit_code == 0, r.output
    with w.client("dev-9") as c:
        assert c.get("/healthz").status_code == 200
    assert w.snapshot()["pending_revocations"] == []  # the request is withdrawn too
    _assert_lifted(w, "deny_cert", f"serial:{serial}")


# --- the rules whose default threshold is large, and the sources that need configuring: world_t -----------------
class _Bug:
    """A plug-in stage with a bug that only buggy's requests reach (an unexpected exception: server.error)."""

    name = "bug"

    async def run(self, ctx: Any) -> None:
        if ctx.actor == "buggy":
            raise RuntimeError("a bug in a plug-in stage")


@pytest.fixture(scope="module")
def world_t(pki: dict[str, Any]) -> Iterator[World]:
    from edgeshield import bundles, keys
    from edgeshield.adversarial import calibrate
    from edgeshield.models import digits_input_spec, load_digits_split
    from edgeshield.server._pipeline import default_pipeline

    d = pki["root"] / "t"
    d.mkdir()
    k = pki["keys"]
    opened = bundles.open_bundle(pki["bundle"], keys.load_owner_public_key(k / "owner.pub"),
                                 keys.load_device_private_key(k / "device.key"))
    calibrate(opened.session, load_digits_split().x_test[:100], model_sha256=opened.manifest.model_sha256,
              input_spec=digits_input_spec(), detectors=["squeeze"]).save(d / "detector.json")
    rules = _test_pack(d / "rules.yaml", {"ratelimit_burst": 3, "scanning": 3, "server_errors": 3})
    cfg = _config(pki, d, monitor_rules=rules, detector=d / "detector.json", rate_limits=(("metered", 0.001, 1),),
                  extraction_action="flag", query_budget=3, resource_interval_s=0.2)

    def with_a_bug(state: Any) -> None:
        state.pipeline = [*default_pipeline(state, state.spec), _Bug()]

    with _running(pki, cfg, with_a_bug) as w:
        yield w


def test_rate_limit_refusals_scanning_and_server_errors_alert(world_t: World) -> None:
    w = world_t
    with w.client("metered") as c:
        assert [c.post("/v1/predict", json=GOOD).status_code for _ in range(4)] == [200, 429, 429, 429]
    with w.client("alice") as c:
        assert [c.get(f"/no/such/{i}").status_code for i in range(3)] == [404] * 3
        assert c.delete("/healthz").status_code == 405
    with w.client("buggy") as c:
        assert [c.post("/v1/predict", json=GOOD).status_code for _ in range(3)] == [500] * 3
    snap = w.snapshot()
    assert _alert(snap, "ratelimit_burst", "identity:metered")["count"] == 3
    assert _alert(snap, "scanning", "identity:alice")["count"] == 3
    assert _alert(snap, "server_errors", "all")["count"] == 3
    for rule in ("ratelimit_burst", "scanning", "server_errors"):
        _assert_audited(w, rule, None, None, refused=False)
    assert not snap["responses"]  # alerts only


def test_an_extraction_flag_alerts_and_the_client_is_still_served(world_t: World) -> None:
    w = world_t
    with w.client("flagger") as c:
        assert [c.post("/v1/predict", json=_distinct(i)).status_code for i in range(5)] == [200] * 5
    _alert(w.snapshot(), "extraction_alert", "identity:flagger")
    assert w.entries("extraction.alert", action="flag")
    _assert_audited(w, "extraction_alert", None, None, refused=False)
    assert _response(w.snapshot(), "block", "identity:flagger") is None


def test_open_files_near_the_limit_are_resource_pressure(world_t: World) -> None:
    """The process's descriptors at 95 % of a lowered RLIMIT_NOFILE soft limit, for a few samples."""
    w = world_t
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = psutil.Process().num_fds()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(opened / 0.95), hard))
        _wait("open-files pressure", lambda: any(  # in memory: opening the audit log now would take descriptors
            e["kind"] == "resource.pressure" and "resource=open_files" in e["summary"]
            for e in w.monitor.snapshot()["recent_events"]))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (pressure,) = w.entries("resource.pressure", resource="open_files")
    assert pressure.data["value"] >= pressure.data["threshold"]
    _alert(w.snapshot(), "resource_pressure", "all")  # (on a busy machine CPU pressure may have fired it first)
    _assert_audited(w, "resource_pressure", None, None, refused=False)


def test_a_changed_detector_quarantines_predictions(world_t: World) -> None:
    """Last on world_t."""
    w = world_t
    detector = w.cfg.detector
    assert detector is not None
    with w.client("reader") as c:
        assert c.post("/v1/predict", json=GOOD).status_code == 200
        detector.write_text(detector.read_text().replace("}", " }", 1))  # same meaning, other bytes
        _wait("the quarantine", lambda: _response(w.snapshot(), "quarantine", "file:detector"))
        assert c.post("/v1/predict", json=GOOD).status_code == 503
        assert c.get("/healthz").status_code == 200
        _assert_audited(w, "detector_changed", "quarantine", "file:detector", refused=False)
        r = w.cli("release", "detector")  # the admin's call (here without accepting the file first)
        assert r.exit_code == 0, r.output
        assert c.post("/v1/predict", json=GOOD).status_code == 200
    _assert_lifted(w, "quarantine", "file:detector")


# --- persistence: blocks survive a restart on the same monitor database ------------------------------------------
def test_blocks_survive_a_restart(pki: dict[str, Any]) -> None:
    cfg = _config(pki, pki["root"] / "p", extraction_action="block", query_budget=5)
    with _running(pki, cfg) as w:
        with w.client("mallory") as c:
            for _ in range(20):
                c.get("/metrics")
        with w.client("ext") as c:
            for i in range(6):
                c.post("/v1/predict", json=_distinct(i))
        targets = {r["target"] for r in w.snapshot()["responses"] if r["action"] == "block"}
        assert targets == {"identity:mallory", "identity:ext"}
    with _running(pki, cfg) as w:  # a new process would do the same: the store is all that is carried over
        with w.client("mallory") as c, w.client("ext") as e:
            assert c.get("/healthz").status_code == 403
            assert e.post("/v1/predict", json=GOOD).status_code == 403  # its extraction state is gone; the block not
        assert w.entries("monitor.refused", action="block", rule="rbac_denials")
        assert w.entries("monitor.refused", action="block", rule="extraction_blocked")
        assert w.lift("block", "identity:mallory") and w.lift("block", "identity:ext")
        with w.client("mallory") as c, w.client("ext") as e:
            assert c.get("/healthz").status_code == 200
            assert e.post("/v1/predict", json=GOOD).status_code == 200
    with _running(pki, cfg) as w:  # and so do lifts
        assert not w.snapshot()["responses"]
        with w.client("mallory") as c:
            assert c.get("/healthz").status_code == 200


# --- the witness: a restarted device whose log no longer extends what the witness cosigned ------------------------
def test_a_log_cut_back_below_the_witness_alerts(pki: dict[str, Any]) -> None:
    import sqlite3

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root = pki["root"] / "w"
    vkey = audit.log_vkey(audit.load_signing_key(pki["root"] / "audit.key").public_key())
    witness = audit.Witness(root.with_name("witness.db"), Ed25519PrivateKey.generate(), "witness.example/w1",
                            {vkey.name: [vkey]})
    server = transport.issue(pki["ca"], name="witness", role="server", server=True, sans=["127.0.0.1"])
    wserver = audit.WitnessServer(witness, ("127.0.0.1", 0), audit.witness_server_context(server.cert_path,
                                                                                          server.key_path))
    audit.serve_in_thread(wserver)
    try:
        cfg = _config(pki, root, witness_url=f"https://127.0.0.1:{wserver.server_address[1]}",
                      witness_ca=pki["ca"] / "ca.crt", witness_vkeys=(str(witness.vkey),), witness_every_s=0.2)
        with _running(pki, cfg) as w, w.client("alice") as c:
            c.get("/healthz")
            with sqlite3.connect(cfg.audit_db) as src, sqlite3.connect(root / "older.db") as dst:
                src.backup(dst)  # a copy of the log as it is now: what an attacker later puts back
            for _ in range(3):
                c.get("/healthz")
        assert witness.checkpoint(vkey.name) is not None  # the shutdown checkpoint was cosigned
        for suffix in ("", "-wal", "-shm"):
            Path(f"{cfg.audit_db}{suffix}").unlink(missing_ok=True)
        shutil.copy(root / "older.db", cfg.audit_db)
        with _running(pki, cfg) as w:
            _wait("the witness alarm", lambda: any(a["rule"] == "witness_inconsistent"
                                                   for a in w.monitor.snapshot()["alerts"]))
            assert _alert(w.snapshot(), "witness_inconsistent", "all")["severity"] == "critical"
            _assert_audited(w, "witness_inconsistent", None, None, refused=False)
    finally:
        wserver.shutdown()

