"""`edgeshield monitor` offline: rule files checked, the monitor database read and changed directly, revocation
requests exported for the CA host."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeshield.cli._monitor import app
from edgeshield.errors import InputError, OutputExistsError
from edgeshield.monitor._rules import RuleFileError, default_rules_path
from edgeshield.monitor._store import ActiveResponse, MonitorStore

runner = CliRunner()


def test_rules_check_and_show(tmp_path: Path) -> None:
    r = runner.invoke(app, ["rules", "check", str(default_rules_path())])
    assert r.exit_code == 0 and r.output.strip() == "20 rules OK"
    bad = tmp_path / "bad.yaml"
    bad.write_text(default_rules_path().read_text().replace("severity: high", "severity: hgih", 1))
    r = runner.invoke(app, ["rules", "check", str(bad)])
    assert isinstance(r.exception, RuleFileError)
    assert str(r.exception).startswith(f"{bad}:") and "severity must be one of" in str(r.exception)
    assert r.exception.exit_code == 2
    r = runner.invoke(app, ["rules", "show", "--json"])
    assert r.exit_code == 0
    shown = json.loads(r.output)
    assert len(shown["rules"]) == 20 and shown["rules"][0]["tags"]
    r = runner.invoke(app, ["rules", "show"])
    assert r.exit_code == 0 and "tls_handshake_failures" in r.output


def _store(tmp_path: Path) -> Path:
    db = tmp_path / "monitor.db"
    with MonitorStore(db) as s:
        s.put_response(ActiveResponse("block", "identity:eve", "rbac_denials", 1.0, None, "20 denials"))
        s.put_response(ActiveResponse("deny_cert", "serial:abc", "certificate_misuse", 2.0, None, "misuse"))
        s.request_revocation("abc", "eve", "certificate_misuse", 2.0, "misuse")
        s.add_alert({"ts": 1.0, "rule": "rbac_denials", "severity": "high", "key": "identity:eve", "count": 20,
                     "output": "identity:eve: 20 RBAC denials", "tags": ["AML.T0040"]})
    return db


def test_status_and_lift_on_the_database(tmp_path: Path) -> None:
    db = _store(tmp_path)
    r = runner.invoke(app, ["status", "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert [x["target"] for x in body["responses"]] == ["identity:eve", "serial:abc"]
    assert body["pending_revocations"][0]["serial"] == "abc" and body["alerts"][0]["rule"] == "rbac_denials"
    r = runner.invoke(app, ["status", "--db", str(db)])
    assert r.exit_code == 0 and "identity:eve" in r.output
    r = runner.invoke(app, ["unblock", "eve", "--db", str(db)])
    assert r.exit_code == 0 and "lifted" in r.output and "restarts" in r.output
    r = runner.invoke(app, ["undeny", "ABC", "--db", str(db), "--json"])
    assert json.loads(r.output) == {"action": "deny_cert", "target": "serial:abc", "lifted": True}
    r = runner.invoke(app, ["release", "bundle", "--db", str(db)])
    assert r.exit_code == 0 and "none in force" in r.output
    with MonitorStore(db) as s:
        assert s.active_responses(0.0) == [] and s.pending_revocations() == []
    r = runner.invoke(app, ["lift", "block", "nocolon", "--db", str(db)])
    assert isinstance(r.exception, InputError)


def test_revocations_export(tmp_path: Path) -> None:
    db = _store(tmp_path)
    out = tmp_path / "revoke.json"
    r = runner.invoke(app, ["revocations", "--out", str(out), "--db", str(db)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "edgeshield-revocation-requests/v1"
    assert doc["requests"] == [{"serial": "abc", "identity": "eve", "rule": "certificate_misuse", "since": 2.0,
                                "reason": "misuse"}]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    r = runner.invoke(app, ["revocations", "--out", str(out), "--db", str(db)])
    assert isinstance(r.exception, OutputExistsError)
    assert runner.invoke(app, ["revocations", "--out", str(out), "--db", str(db), "--force"]).exit_code == 0
    r = runner.invoke(app, ["revocations", "--out", str(out), "--db", str(tmp_path / "none.db"), "--force"])
    assert isinstance(r.exception, InputError)


@pytest.mark.parametrize("command", [["status"], ["reload"], ["unblock", "eve"]])
def test_networked_commands_need_the_admin_certificate(command: list[str]) -> None:
    r = runner.invoke(app, command)
    assert isinstance(r.exception, InputError) and "--url" in str(r.exception)
