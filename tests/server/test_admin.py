"""The monitor's admin API on the real mutual-TLS server: admin only, bodies validated (422, never a 5xx), and a
rule's block end to end — tripped by real requests, refused at once, audited, shown, lifted by an admin."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgeshield import audit, transport
from edgeshield.errors import InputError
from edgeshield.monitor._responses import check_target
from edgeshield.monitor._rules import default_rules_path
from edgeshield.server import ServeConfig, _admin, build_state

from _serving import mtls_client, protected_digits, serving

ROLES = {"adm": "admin", "aud": "auditor", "alice": "client", "mallory": "client", "trudy": "client"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("admin")
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {name: transport.issue(ca, name=name, role=role) for name, role in ROLES.items()}
    audit.generate_signing_key(root / "audit.key")
    rules = root / "rules.yaml"
    shutil.copy(default_rules_path(), rules)  # a rule file this module can rewrite (the reload test)
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, log_level="warning", monitor_rules=rules,
                      monitor_db=root / "monitor.db")
    state = build_state(cfg)
    with serving(cfg, state) as (_srv, _watcher, port):
        yield {"root": root, "ca": ca, "certs": certs, "url": f"https://127.0.0.1:{port}", "state": state,
               "monitor": state.security_monitor, "rules": rules}


@pytest.fixture(scope="module")
def admin(world: dict[str, Any]) -> Iterator[httpx.Client]:
    """One kept-alive admin connection (a new handshake per example would run into the handshake rate)."""
    with mtls_client(world, "adm") as c:
        yield c


def _entries(world: dict[str, Any]) -> list[audit.Entry]:
    return list(audit.AuditLog(world["root"] / "audit.db", readonly=True).entries())


def test_admin_only(world: dict[str, Any]) -> None:
    with mtls_client(world, "adm") as c:
        r = c.get("/v1/admin/monitor")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["enabled"] is True
        assert {"tls_handshake_failures", "rbac_denials", "bundle_changed"} <= {x["name"] for x in body["rules"]}
        assert set(body) >= {"alerts", "responses", "pending_revocations", "recent_events", "counters"}
    for name in ("aud", "alice"):
        with mtls_client(world, name) as c:
            for method, path in (("GET", "/v1/admin/monitor"), ("POST", "/v1/admin/monitor/lift"),
                                 ("POST", "/v1/admin/monitor/reload")):
                assert c.request(method, path, json={}).status_code == 403, (name, path)


def test_openapi_documents_the_admin_routes(world: dict[str, Any]) -> None:
    with mtls_client(world, "adm") as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    assert "$ref" in json.dumps(paths["/v1/admin/monitor"]["get"]["responses"]["200"])
    lift = paths["/v1/admin/monitor/lift"]["post"]
    variants = lift["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    actions = [a for v in variants for a in v["properties"]["action"].get("enum", [v["properties"]["action"].get(
        "const")])]
    assert actions == ["block", "throttle", "deny_cert", "quarantine"]
    for v in variants:
        assert v["required"] == ["action", "target"] and v["additionalProperties"] is False
        assert v["properties"]["target"]["pattern"].startswith("^") and v["properties"]["target"]["maxLength"] == 300
    assert {"200", "403", "409", "422"} <= set(lift["responses"])
    assert "/v1/admin/monitor/reload" in paths
    assert "MonitorStatus" in doc["components"]["schemas"]


@pytest.mark.parametrize(("body", "field"), [
    (b"not json", None),
    (b'{"action": "block"}', "target"),
    (b'{"action": "ban", "target": "identity:x"}', "action"),
    (b'{"action": "block", "target": "identity:x", "extra": 1}', "extra"),
    (b'{"action": "block", "target": "nocolon"}', "target"),
    (b'{"action": "block", "target": "serial:ab"}', "target"),
    (b'{"action": "block", "target": "address:nope"}', "target"),
    (b'{"action": "deny_cert", "target": "serial:zz"}', "target"),
    (b'{"action": "quarantine", "target": "file:passwd"}', "target"),
    (b"[1, 2]", None),
    (b'{"action": "block", "target": "' + b"x" * 5000 + b'"}', None),
])
def test_bad_lift_bodies_are_422_with_a_reason(world: dict[str, Any], body: bytes, field: str | None) -> None:
    with mtls_client(world, "adm") as c:
        r = c.post("/v1/admin/monitor/lift", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]
    if field is not None:
        assert r.json()["field"] == field


_TARGET_PATTERNS = {"block": _admin.CLIENT_TARGET, "throttle": _admin.CLIENT_TARGET,
                    "deny_cert": _admin.SERIAL_TARGET, "quarantine": _admin.FILE_TARGET}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_TARGET_PATTERNS)).flatmap(lambda a: st.tuples(
    st.just(a), st.from_regex(_TARGET_PATTERNS[a], fullmatch=True).filter(lambda t: len(t) <= 300))))
def test_every_target_the_schema_allows_the_server_accepts(case: tuple[str, str]) -> None:
    """What the published pattern allows, pydantic's pattern and the monitor's own check accept (no ST202)."""
    action, target = case
    _admin.LiftRequest.validate_python({"action": action, "target": target})
    check_target(action, target)


_ADDRESSES = st.one_of(st.ip_addresses().map(str), st.ip_addresses(v=4).map(lambda a: f"{a}/{a.packed[0] % 33}"),
                       st.ip_addresses(v=6).map(lambda a: f"{a}/64"))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({
    "action": st.sampled_from(["block", "throttle", "deny_cert", "quarantine", "ban"]),
    "target": st.one_of(st.text(max_size=12), _ADDRESSES.map("address:".__add__),
                        st.from_regex(r"\Aserial:(0x)?[0-9a-fA-F_ -]{0,5}\Z"),
                        st.sampled_from(["file:bundle", "file:rules", "file:passwd", "identity:", "identity:a\n",
                                         "address:1.2.3.4/33", "address:01.2.3.4", "address:1:2:3:4:5:6:7:8:9"]),
                        st.text(max_size=8).map("identity:".__add__))}))
def test_the_schema_and_the_server_agree(body: dict[str, str]) -> None:
    """A JSON Schema validator (the one Schemathesis uses) and the server accept exactly the same lift bodies."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = _admin._LIFT_BODY["requestBody"]["content"]["application/json"]["schema"]  # type: ignore[index]
    try:
        _admin.LiftRequest.validate_python(body)
        check_target(body["action"], body["target"])
        accepted = True
    except (ValidationError, InputError):
        accepted = False
    assert jsonschema_rs.validator_for(schema).is_valid(body) is accepted, body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                        st.sampled_from(["action", "target", "x"]), kids, max_size=3), max_leaves=8)
       | st.fixed_dictionaries({"action": st.sampled_from(["block", "throttle", "deny_cert", "quarantine", "x"]),
                                "target": st.text(max_size=30)}))
def test_lift_never_answers_5xx(admin: httpx.Client, body: Any) -> None:
    r = admin.post("/v1/admin/monitor/lift", json=body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert r.json() == {"lifted": False}


def test_rbac_denials_block_the_identity_until_an_admin_lifts_it(world: dict[str, Any]) -> None:
    with mtls_client(world, "mallory") as c:
        codes = [c.get("/v1/admin/monitor").status_code for _ in range(20)]  # the default rule: 20 in 60 s
        assert codes == [403] * 20
        t0 = time.perf_counter()
        r = c.get("/healthz")  # allowed for a client, yet refused: the monitor's block
        trip_to_refusal = time.perf_counter() - t0
        assert r.status_code == 403 and "security monitor" in r.json()["error"]
        assert trip_to_refusal < 1.0
    with mtls_client(world, "alice") as c:
        assert c.get("/healthz").status_code == 200  # only mallory
    with mtls_client(world, "adm") as c:
        snap = c.get("/v1/admin/monitor").json()
        block = [x for x in snap["responses"] if x["target"] == "identity:mallory"]
        assert block and block[0]["action"] == "block" and block[0]["rule"] == "rbac_denials"
        assert snap["alerts"][0]["rule"] == "rbac_denials" and "AML.T0040" in snap["alerts"][0]["tags"]
        lifted = c.post("/v1/admin/monitor/lift", json={"action": "block", "target": "identity:mallory"})
        assert lifted.status_code == 200 and lifted.json() == {"lifted": True}
        again = c.post("/v1/admin/monitor/lift", json={"action": "block", "target": "identity:mallory"})
        assert again.json() == {"lifted": False}
    with mtls_client(world, "mallory") as c:
        assert c.get("/healthz").status_code == 200
    assert world["monitor"].flush()
    entries = _entries(world)
    kinds = [e.kind for e in entries]
    for kind in ("monitor.alert", "monitor.response", "monitor.refused", "monitor.lifted"):
        assert kind in kinds, kind
    (lift,) = [e for e in entries if e.kind == "monitor.lifted"]
    assert lift.actor == "adm" and lift.data == {"action": "block", "target": "identity:mallory", "by": "adm"}
    (resp,) = [e for e in entries if e.kind == "monitor.response"]
    assert resp.data["ok"] is True and resp.data["target"] == "identity:mallory"


def test_reload_validates_the_file_first(world: dict[str, Any]) -> None:
    rules: Path = world["rules"]
    good = rules.read_text()
    try:
        bad = good.replace("window_s: 10}", "windw_s: 10}", 1)
        rules.write_text(bad)
        line = bad[:bad.index("windw_s")].count("\n") + 1
        with mtls_client(world, "adm") as c:
            r = c.post("/v1/admin/monitor/reload")
            assert r.status_code == 409 and r.json()["error"].startswith(f"{rules}:{line}: "), r.text
            assert "unknown field 'windw_s'" in r.json()["error"]
            assert len(c.get("/v1/admin/monitor").json()["rules"]) == 20  # the old rules stay
            rules.write_text(good.split("- rule: certificate_misuse")[0])
            r = c.post("/v1/admin/monitor/reload")
            assert r.status_code == 200, r.text
            assert r.json()["rules"] == 1 and r.json()["by"] == "adm" and r.json()["path"] == str(rules)
    finally:
        rules.write_text(good)
        world["monitor"].reload("test")
    assert world["monitor"].flush()
    reloads = [e for e in _entries(world) if e.kind == "monitor.reload"]
    assert reloads[0].actor == "adm" and reloads[0].data["rules"] == 1


def test_without_a_monitor(world: dict[str, Any]) -> None:
    state = world["state"]
    mon, state.security_monitor = state.security_monitor, None
    try:
        with mtls_client(world, "adm") as c:
            assert c.get("/v1/admin/monitor").json() == {"enabled": False}
            r = c.post("/v1/admin/monitor/lift", json={"action": "block", "target": "identity:x"})
            assert r.status_code == 409
            assert c.post("/v1/admin/monitor/reload").status_code == 409
    finally:
        state.security_monitor = mon


def test_the_cli_is_a_client_of_the_admin_api(world: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from edgeshield.cli._monitor import app

    adm = world["certs"]["adm"]
    opts = ["--url", world["url"], "--ca", str(world["ca"] / "ca.crt"), "--cert", str(adm.cert_path), "--key",
            str(adm.key_path)]
    with mtls_client(world, "trudy") as c:
        for _ in range(20):
            c.get("/v1/admin/monitor")
        assert c.get("/healthz").status_code == 403
    runner = CliRunner()
    r = runner.invoke(app, ["status", *opts, "--json"])
    assert r.exit_code == 0, r.output
    assert "identity:trudy" in {x["target"] for x in json.loads(r.output)["responses"]}
    r = runner.invoke(app, ["status", *opts])
    assert r.exit_code == 0 and "responses in force" in r.output and "identity:trudy" in r.output
    r = runner.invoke(app, ["unblock", "trudy", *opts, "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == {"action": "block", "target": "identity:trudy",
                                                         "lifted": True}
    with mtls_client(world, "trudy") as c:
        assert c.get("/healthz").status_code == 200
    r = runner.invoke(app, ["reload", *opts])
    assert r.exit_code == 0 and "reloaded 20 rules" in r.output
    alice = world["certs"]["alice"]
    r = runner.invoke(app, ["status", "--url", world["url"], "--ca", str(world["ca"] / "ca.crt"), "--cert",
                            str(alice.cert_path), "--key", str(alice.key_path)])
    assert r.exit_code != 0 and "403" in str(r.exception)
    r = runner.invoke(app, ["status", "--url", world["url"]])
    assert r.exit_code != 0 and "--ca" in str(r.exception)
