"""Mapping files: the packaged ones load and cite only real checks; every malformed file is one typed line naming
the file and the line (property-tested)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.compliance import (
    CHECKS,
    COMPLIANCE_KEYS,
    Deployment,
    DeploymentError,
    MappingFileError,
    default_mapping_paths,
    load_mapping,
    load_mappings,
    parse_mapping,
)

GOOD = """\
regulation: demo
title: A demo regulation
requirements:
  - id: r1
    title: First
    reference: Demo §1
    checks: [audit_log_verifying]
  - id: r2
    title: Second
    reference: Demo §2
    checks: []
    note: organisational
"""


def test_the_packaged_mappings_load() -> None:
    regs = load_mappings()
    assert {r.id for r in regs} == {"gdpr", "ccpa", "hipaa", "sox", "eu_ai_act"}
    assert [p.name for p in default_mapping_paths()] == sorted(p.name for p in default_mapping_paths())
    cited = {c for r in regs for q in r.requirements for c in q.checks}
    assert cited == set(CHECKS)  # every check is used, and every cited one exists
    assert all(q.note for r in regs for q in r.requirements if not q.checks)  # say why nothing checks it


def test_a_good_file_parses() -> None:
    reg = parse_mapping(GOOD, file="demo.yaml", known_checks=CHECKS)
    assert reg.id == "demo" and [q.id for q in reg.requirements] == ["r1", "r2"]
    assert reg.requirements[0].checks == ("audit_log_verifying",) and reg.requirements[1].note == "organisational"


@pytest.mark.parametrize(("text", "line", "words"), [
    (GOOD.replace("    checks: []\n", "    checks: []\n    owner: me\n"), 12, "unknown field 'owner'"),
    (GOOD.replace("[audit_log_verifying]", "[audit_log_verifying, magic]"), 7, "unknown check 'magic'"),
    (GOOD.replace("id: r2", "id: r1"), 8, "already used on line 4"),
    (GOOD.replace("    reference: Demo §2\n", ""), 8, "lacks the field 'reference'"),
    (GOOD.replace("title: A demo regulation", "title: [a, b"), 3, "not valid YAML"),
    (GOOD.replace("reference: Demo §1", "reference: 164.312"), 6, "must be a non-empty string"),
    (GOOD.replace("id: r1", "id: R 1"), 4, "must be 1-64 lowercase"),
    (GOOD.replace("[audit_log_verifying]", "audit_log_verifying"), 7, "checks must be a list"),
    ("", 1, "the file is empty"),
    ("- a\n- b\n", 1, "must be a mapping"),
])
def test_errors_name_the_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(MappingFileError) as info:
        parse_mapping(text, file="demo.yaml", known_checks=CHECKS)
    assert str(info.value).startswith(f"demo.yaml:{line}: ") and words in str(info.value)
    assert "\n" not in str(info.value) and info.value.line == line


def test_load_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("checks: []", "checks: [nope]"), encoding="utf-8")
    with pytest.raises(MappingFileError, match=rf"^{path}:11: unknown check 'nope'"):
        load_mapping(path)
    other = tmp_path / "dup.yaml"
    other.write_text(GOOD, encoding="utf-8")
    (tmp_path / "dup2.yaml").write_text(GOOD, encoding="utf-8")
    with pytest.raises(MappingFileError, match="already mapped"):
        load_mappings([other, tmp_path / "dup2.yaml"])


_field = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(
    lambda f: f not in {"id", "title", "reference", "checks", "note"})


@settings(max_examples=60, deadline=None)
@given(field=_field, which=st.integers(0, 1), value=st.text(st.characters(categories=("L", "N")), min_size=1,
                                                                 max_size=8))
def test_an_unknown_field_anywhere_is_named_with_its_line(field: str, which: int, value: str) -> None:
    lines = GOOD.splitlines(keepends=True)
    at = 5 if which == 0 else 10  # after a requirement's title line
    lines.insert(at, f"    {field}: {value!r}\n".replace("'", '"'))
    with pytest.raises(MappingFileError) as info:
        parse_mapping("".join(lines), file="f.yaml", known_checks=CHECKS)
    assert str(info.value).startswith(f"f.yaml:{at + 1}: unknown field {field!r}")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_loads_or_fails_with_a_located_mapping_error(text: str) -> None:
    try:
        parse_mapping(text, file="fuzz.yaml", known_checks=CHECKS)
    except MappingFileError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("fuzz.yaml:") and "\n" not in message


def test_deployment_keys_types_and_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('audit-db = "a.db"\nsubject_header = "x-subject-id"\nretention-days = 7\nport = 9443\n'
                   'management-interfaces = ["10.0.0.2"]\n', encoding="utf-8")
    d = Deployment.from_toml(cfg, serve_keys={"audit-db", "port"})
    assert d.audit_db == tmp_path / "a.db" and d.retention_days == 7.0 and d.port == 9443
    assert d.subject_keys == tmp_path / "a.db.subjects" and d.monitor_db == tmp_path / "a.db.monitor"
    assert d.management_interfaces == ("10.0.0.2",)
    for text, words in (('port = "x"\n', "port must be a whole number"), ("retention-days = -1\n", "positive"),
                        ('subject-header = "a b"\n', "not an HTTP header"), ("other = 1\n", "unknown key 'other'"),
                        ('exposure = "all"\n', "exposure"), ("management-interfaces = [1]\n", "list of strings"),
                        ('retention_days = 1\nretention-days = 2\n', "given twice"), ("x = [\n", "not valid TOML")):
        cfg.write_text(text, encoding="utf-8")
        with pytest.raises(DeploymentError, match=words):
            Deployment.from_toml(cfg, serve_keys={"port"})
    assert "management-interfaces" in COMPLIANCE_KEYS
