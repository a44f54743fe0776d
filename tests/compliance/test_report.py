"""The report: the JSON contract, audit evidence with verifiable Merkle proofs, escaped self-contained HTML, OSCAL
assessment results that compliance-trestle parses back, and the `comply` commands."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeshield import audit
from edgeshield.cli._comply import app
from edgeshield.compliance import STATUSES, Regulation, Requirement, assess, load_mappings, render, write_report
from edgeshield.errors import OutputExistsError

from _deploy import Built

REGULATIONS = {"gdpr", "ccpa", "hipaa", "sox", "eu_ai_act"}


def test_json_contract(built: Built) -> None:
    doc = json.loads(render(assess(built.deployment()), "json"))
    assert set(doc) >= {"requirements", "summary", "generated", "deployment"}
    assert {r["regulation"] for r in doc["requirements"]} == REGULATIONS
    for item in doc["requirements"]:
        assert set(item) >= {"regulation", "id", "reference", "status", "evidence", "command"}
        assert item["status"] in STATUSES and isinstance(item["evidence"], list)
        if item["status"] == "pass":
            assert item["evidence"] and item["command"]
        if not item["checks"]:
            assert item["status"] == "not_assessed" and item["reason"].startswith("no automated check")
            assert item["command"] is None
    for reg, counts in doc["summary"].items():
        assert sum(counts.values()) == sum(1 for r in doc["requirements"] if r["regulation"] == reg)
        assert set(counts) == set(STATUSES)
    assert "%" not in json.dumps(doc["summary"]) and "score" not in json.dumps(doc).lower()
    refs = {r["reference"] for r in doc["requirements"]}
    assert {"GDPR Art. 32(1)(a)", "45 CFR 164.312(b)", "SOX §404", "CCPA §1798.105", "EU AI Act Art. 19(1)"} <= refs


def test_audit_evidence_carries_a_proof_an_auditor_can_check(built: Built) -> None:
    doc = assess(built.deployment()).to_dict()
    items = [e for r in doc["requirements"] for e in r["evidence"] if e["kind"] == "audit_entry"]
    assert items
    pub = audit.load_verify_key(built.root / "audit.pub")
    for e in items:
        proof, cp = e["proof"]["inclusion"], e["proof"]["checkpoint"]
        assert cp is not None and proof["root"] == cp["root"] and proof["tree_size"] == cp["tree_size"]
        assert audit.merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), proof["seq"], proof["tree_size"],
                                             [bytes.fromhex(p) for p in proof["path"]], bytes.fromhex(cp["root"]))
        pub.verify(base64.b64decode(cp["signature"]), cp["text"].encode())  # signed by the device


def _hostile(built: Built) -> Regulation:
    evil = '<script>alert("x")</script>'
    return Regulation("gdpr", f"GDPR {evil}", (
        Requirement("gdpr", "evil", f"title {evil}", f"Art. {evil}", ("audit_log_verifying",), note=evil),
        Requirement("gdpr", "none", "an organisational one", "Art. 30", ()),))


def test_html_is_self_contained_and_escapes_everything(built: Built) -> None:
    page = render(assess(built.deployment(), regulations=[_hostile(built)]), "html").decode()
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(""", page)  # no external asset of any kind
    assert "default-src 'none'" in page
    assert "Met" in page and "Not checked automatically" in page


def test_oscal_validates_with_trestle(built: Built, tmp_path: Path) -> None:
    if importlib.util.find_spec("trestle") is None:
        pytest.skip("compliance-trestle is not installed (pip install 'edgeshield[comply]'): OSCAL not validated")
    from trestle.oscal.assessment_results import AssessmentResults

    report = assess(built.deployment())
    out = tmp_path / "ar.json"
    write_report(report, "oscal", out)
    parsed = AssessmentResults.oscal_read(out)
    assert parsed is not None
    result = parsed.results[0]
    assert result.findings is not None and len(result.findings) == len(report.requirements)
    by_target = {f.target.target_id: f for f in result.findings}
    for r in report.requirements:
        f = by_target[f"{r.requirement.regulation}.{r.requirement.id}"]
        assert f.target.status is not None
        state = f.target.status.state.value
        assert state == ("satisfied" if r.status in ("pass", "not_applicable") else "not-satisfied")
    assert result.observations is not None
    assert any(o.relevant_evidence for o in result.observations)
    again = AssessmentResults.model_validate_json(json.dumps(json.loads(out.read_text())["assessment-results"]))
    assert again.uuid == parsed.uuid


def test_write_refuses_to_overwrite(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    report = assess(built.deployment(), regulations=load_mappings()[:1])
    write_report(report, "json", out)
    with pytest.raises(OutputExistsError):
        write_report(report, "json", out)


def test_cli_report_erase_purge_and_checks(built: Built, tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = str(built.config)
    built.deployment()
    r = runner.invoke(app, ["report", "--config", cfg, "--format", "html", "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    r = runner.invoke(app, ["report", "--config", cfg])
    assert r.exit_code == 0 and json.loads(r.stdout)["requirements"]
    r = runner.invoke(app, ["erase", "--config", cfg, "--subject", "-", "--json"], input="patient-9\n")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["audit_seq"] is not None
    r = runner.invoke(app, ["purge", "--config", cfg, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["stores"] == {"served_evidence": 0}
    r = runner.invoke(app, ["checks", "--json"])
    names = {c["name"] for c in json.loads(r.stdout)["checks"]}
    assert {"raw_inputs_on_device", "encryption_at_rest", "network_exposure", "monitoring_enabled"} <= names
    assert runner.invoke(app, ["checks"]).exit_code == 0
    (built.root / "serve.toml").write_text(built.config.read_text() + 'no-such-key = 1\n')
    r = runner.invoke(app, ["report", "--config", cfg])
    assert r.exit_code != 0 and "no-such-key" in str(r.exception)
