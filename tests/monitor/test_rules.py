"""The rule-file parser: the default pack, one-line FILE:LINE errors for every way a file can be wrong, and no
other exception whatever the text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield.errors import InputError
from edgeshield.monitor._events import KINDS
from edgeshield.monitor._rules import RuleFileError, default_rules_path, load_rules, parse_rules

GOOD = """\
- rule: r1
  desc: a rule
  condition: {kinds: [auth.forbidden], group_by: actor, count: 3, window_s: 10}
  severity: high
  output: "{key}: {count} in {window_s:g} s"
  tags: [AML.T0040, gdpr_IV_32.2]
  responses: [alert, {action: block, duration_s: 60}]
"""


def _error(text: str) -> str:
    with pytest.raises(RuleFileError) as info:
        parse_rules(text, source="rules.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, InputError)
    return message


def test_the_default_pack_loads_and_covers_the_issue_s_sources() -> None:
    rules = load_rules(None)
    assert rules.path is None and len(rules.sha256) == 64
    kinds = {k for r in rules.rules for k in r.condition.kinds}
    for kind in ("tls.handshake_failed", "auth.failure", "auth.forbidden", "input.rejected", "input.flagged",
                 "extraction.alert", "extraction.blocked", "ratelimit.exceeded", "integrity.changed",
                 "resource.pressure", "client.rate_anomaly", "crl.expired", "witness.inconsistent", "server.error",
                 "fl.update_rejected", "privacy.budget_exhausted", "attestation.failed", "update.refused"):
        assert kind in kinds, kind
    for r in rules.rules:  # every rule evidences a regulation clause, and an ATLAS ID where one applies (audit-log
        # tampering is no AI-specific technique, so witness_inconsistent has none)
        assert any(t.startswith("AML.") for t in r.tags) or r.name == "witness_inconsistent", r.name
        assert any(re.match(r"(gdpr|hipaa|sox|ccpa|eu_ai_act|pci_dss|nist_800_53)_", t) for t in r.tags), r.name
        assert not any(k.startswith("monitor.") for k in r.condition.kinds), r.name
    actions = {x.action for r in rules.rules for x in r.responses}
    assert {"alert", "block", "throttle", "deny_cert", "quarantine"} <= actions
    assert load_rules(default_rules_path()).sha256 == rules.sha256


def test_a_good_file_parses_into_frozen_rules() -> None:
    rules = parse_rules(GOOD)
    (r,) = rules.rules
    assert r.condition.count == 3 and r.condition.window_s == 10 and r.condition.group_by == "actor"
    assert [x.action for x in r.responses] == ["alert", "block"]
    assert r.responses[1].target == "identity" and r.responses[1].duration_s == 60
    assert rules.by_kind["auth.forbidden"] == (r,)
    assert r.render({"key": "identity:a", "count": 3, "window_s": 10.0}) == "identity:a: 3 in 10 s"
    with pytest.raises(AttributeError):
        r.name = "other"  # type: ignore[misc]


def test_rate_per_s_becomes_a_count_over_the_window() -> None:
    text = GOOD.replace("count: 3, window_s: 10", "rate_per_s: 2.5, window_s: 4")
    assert parse_rules(text).rules[0].condition.count == 10


@pytest.mark.parametrize(("change", "line", "needle"), [
    (("  severity: high", "  severity: urgent"), 4, "severity must be one of"),
    (("  desc: a rule", "  desc: a rule\n  priority: high"), 3, "unknown field 'priority'"),
    (("[auth.forbidden]", "[auth.forbiden]"), 3, "unknown event kind 'auth.forbiden'"),
    (("count: 3", "count: three"), 3, "count must be an integer"),
    (("count: 3", "count: 2.5"), 3, "count must be an integer"),
    (("{action: block, duration_s: 60}", "{action: ban}"), 7, "unknown action 'ban'"),
    (("{action: block, duration_s: 60}", "{action: block}"), 7, "needs 'duration_s'"),
    (("{action: block, duration_s: 60}", "{action: block, duration_s: 60, rate: 3}"), 7, "unknown field 'rate'"),
    (("{action: block, duration_s: 60}", "{action: throttle, duration_s: 60}"), 7, "needs 'rate'"),
    (("{action: block, duration_s: 60}", "{action: quarantine, role: policy}"), 7, "role must be one of"),
    (("[alert, {", "[deny_cert, alert, {"), 0, ""),  # fine with actor grouping
    (("{key}", "{secret}"), 5, "unknown placeholder {secret}"),
    (("{key}", "{key.__class__}"), 5, "unknown placeholder"),
    (("{window_s:g}", "{window_s:d}"), 5, "output does not format"),
    (("AML.T0040", "AML.T40"), 6, "tag 'AML.T40'"),
    (("gdpr_IV_32.2", "gdpr"), 6, "tag 'gdpr'"),
    (("gdpr_IV_32.2", "GDPR-32"), 6, "tag 'GDPR-32'"),
    (("- rule: r1", "- rule: 1r"), 1, "rule name"),
    (("count: 3, window_s: 10", "count: 3"), 3, "needs 'window_s'"),
    (("window_s: 10", "window_s: -1"), 3, "window_s must be >"),
    (("window_s: 10", "window_s: .nan"), 3, "must be finite"),
    (("group_by: actor", "group_by: role"), 3, "group_by must be one of"),
    (("group_by: actor,", "where: {nosuch: 1}, group_by: actor,"), 3, "unknown field 'nosuch'"),
    (("group_by: actor,", "where: {role: {has: x}}, group_by: actor,"), 3, "unknown field 'has'"),
    (("group_by: actor,", "where: {role: {in: []}}, group_by: actor,"), 3, "at least one value"),
    (("  severity: high", "  severity: [high]"), 4, "must be a single value"),
    (("  severity: high", "  severity: high\n  severity: low"), 5, "given twice"),
    (("[alert, {", "[alert, alert, {"), 7, "listed twice"),
    (("  severity: high", "  enabled: yes please\n  severity: high"), 4, "enabled must be true or false"),
])
def test_each_problem_is_one_line_naming_its_line(change: tuple[str, str], line: int, needle: str) -> None:
    old, new = change
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if not needle:
        parse_rules(text)
        return
    message = _error(text)
    assert message.startswith(f"rules.yaml:{line}: "), message
    assert needle in message, message


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("", 1, "empty"),
    ("rule: x\n", 1, "must be a list"),
    ("- [a, b\n", 2, "invalid YAML"),
    ("- rule: a\n\t- b\n", 2, "invalid YAML"),
    ("- !!python/object:os.system {}\n", 1, "unsupported YAML tag"),
    (GOOD.replace("rule: r1", "rule: !!python/name:os.system r1"), 1, "cannot read"),
    ("- {rule: a, <<: {desc: b}}\n", 1, "merge keys"),
    ("\n\n- 3\n", 3, "must be a mapping"),
    ("- rule: a\n  desc: b\n", 1, "needs 'condition'"),
    ("- " + "[" * 5000 + "]" * 5000 + "\n", 1, ""),
    ("- \x07\n", 1, "invalid YAML"),
    ("- a\n- \ud800\n", 2, "not UTF-8"),
])
def test_malformed_files(text: str, line: int, needle: str) -> None:
    message = _error(text)
    assert message.startswith(f"rules.yaml:{line}: "), message
    assert needle in message, message


def test_deny_cert_needs_a_serial_to_deny() -> None:
    text = GOOD.replace("group_by: actor", "group_by: address").replace("[alert, {action: block, duration_s: 60}]",
                                                                          "[alert, deny_cert]")
    assert _error(text).startswith("rules.yaml:7: rule 'r1': response deny_cert needs group_by serial or actor")


def test_duplicate_rule_names_and_billion_laughs() -> None:
    assert "defined twice (first at line 1)" in _error(GOOD + GOOD)
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    laughs = ("- rule: x\n  runbook: [" + ", ".join(levels) + "]\n"
              "  condition: {kinds: [auth.failure], where: {reason: {in: *a8}}}\n  desc: d\n  severity: low\n"
              "  output: o\n")
    # 10**9 leaves by alias: refused at the first (the line is the anchor's), never expanded
    assert _error(laughs).startswith("rules.yaml:2: ")


def test_load_rules_on_missing_directory_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match=r":1: rule file not found"):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(RuleFileError, match=r":1: rule file is a directory"):
        load_rules(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"- rule: a\n- \xff\xfe\n")
    with pytest.raises(RuleFileError, match=r"bad.yaml:2: not UTF-8"):
        load_rules(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(GOOD)
    assert load_rules(ok).path == ok


def _only_rule_file_errors(text: str) -> None:
    try:
        parse_rules(text)
    except RuleFileError as exc:
        message = str(exc)
    else:
        return
    assert re.match(r"<rules>:\d+: ", message) and "\n" not in message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_rule_file_errors(text: str) -> None:
    _only_rule_file_errors(text)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from([*KINDS, "alert", "block", "throttle", "deny_cert",
                                                            "identity", "address", "actor", "serial", "high"]))
_keys = st.sampled_from(["rule", "desc", "condition", "severity", "output", "tags", "runbook", "enabled",
                         "cooldown_s", "responses", "kinds", "where", "group_by", "count", "window_s", "rate_per_s",
                         "action", "duration_s", "target", "rate", "burst", "role", "in", "not_in", "x"])
_docs = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=6),
                     max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_docs, max_size=3))
def test_arbitrary_rule_shaped_documents_raise_only_rule_file_errors(doc: list[object]) -> None:
    _only_rule_file_errors(yaml.safe_dump(doc))


def _paths(doc: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


_VALID = yaml.safe_load(GOOD)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_valid_file_with_any_one_part_replaced_raises_only_rule_file_errors(data: st.DataObject) -> None:
    import copy

    doc = copy.deepcopy(_VALID)
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = data.draw(_docs)
    _only_rule_file_errors(yaml.safe_dump(doc))
