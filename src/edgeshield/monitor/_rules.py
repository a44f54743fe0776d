"""The monitor's rule file: Falco-like YAML records, validated once when loaded, into frozen dataclasses.

A rule file is a YAML list of rules::

    - rule: rbac_denials
      desc: one identity keeps asking for what its role may not use
      condition: {kinds: [auth.forbidden], group_by: actor, count: 20, window_s: 60}
      severity: high
      output: "{key}: {count} RBAC denials in {window_s:g} s"
      tags: [AML.T0040, gdpr_IV_32.2]
      runbook: "check the client's role; lift with: edgeshield monitor unblock identity:NAME"
      cooldown_s: 300
      responses: [alert, {action: block, duration_s: 600}]

Everything is checked on load — an unknown field, an undeclared event kind, a wrong type, a placeholder the output
may not use, a malformed tag, a response that cannot work for the rule's grouping — and the first problem becomes
one :class:`RuleFileError` line ``FILE:LINE: message``. Lines come from PyYAML's composed nodes (``yaml.safe``
only: no tags beyond the core schema construct anything).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from edgeshield.errors import InputError
from edgeshield.monitor._events import KINDS

SEVERITIES = ("info", "low", "medium", "high", "critical")  # Prometheus/Alertmanager's labels, least first
GroupBy = Literal["actor", "address", "serial", "none"]
GROUP_BY: tuple[GroupBy, ...] = ("actor", "address", "serial", "none")
ACTIONS = ("alert", "block", "throttle", "deny_cert", "quarantine", "reload")
QUARANTINE_ROLES = ("bundle", "detector")
EVENT_ATTRIBUTES = ("actor", "address", "serial", "source")  # filterable besides the data fields
PLACEHOLDERS = frozenset({"rule", "key", "count", "window_s", "actor", "address", "serial", "kind", "severity",
                          "desc", "source"})
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000  # aliases are shared nodes: bound the walk, so a "billion laughs" file is an error, not a hang
MAX_COUNT = 100_000
MAX_WINDOW_S = 7 * 86400.0

# Tags: MITRE ATLAS technique/mitigation IDs, regulation clauses (Wazuh style), or a plain lowercase category word.
_ATLAS = re.compile(r"AML\.(T\d{4}(\.\d{3})?|M\d{4})")
_REGULATIONS = ("gdpr", "ccpa", "hipaa", "sox", "eu_ai_act", "pci_dss", "nist_800_53", "iso_27001")
_CLAUSE = re.compile(r"(" + "|".join(_REGULATIONS) + r")_[A-Za-z0-9]+([._][A-Za-z0-9]+)*")
_WORD = re.compile(r"[a-z][a-z0-9]{0,31}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class RuleFileError(InputError):
    """A rule file that cannot be used; the message is one line, ``FILE:LINE: what is wrong``."""


def _fail(source: str, node: yaml.Node | None, message: str) -> NoReturn:
    line = node.start_mark.line + 1 if node is not None else 1
    raise RuleFileError(f"{source}:{line}: {message}")


# --- the parsed form ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Filter:
    """``field`` (an event data field, or actor/address/serial/source) equal to, in, or not in ``values``."""

    field: str
    op: Literal["eq", "in", "not_in"]
    values: tuple[Any, ...]

    def matches(self, value: Any) -> bool:
        hit = any(_same(value, v) for v in self.values)
        return not hit if self.op == "not_in" else hit


def _same(a: Any, b: Any) -> bool:
    # YAML's 5 and an event's 5.0 are equal; True is not 1 (bools are not numbers here).
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


@dataclass(frozen=True, slots=True)
class Condition:
    """Events of ``kinds`` passing every filter, grouped by ``group_by``; fires at ``count`` within ``window_s``."""

    kinds: tuple[str, ...]
    count: int
    window_s: float
    group_by: GroupBy = "actor"
    where: tuple[Filter, ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    """One automated response; which parameters mean something depends on ``action``."""

    action: str
    audit: bool = True  # alert: a monitor.alert event (audited)
    stderr: bool = True  # alert: one JSON log line
    webhook: bool = True  # alert: POST to the configured webhook, if any
    duration_s: float | None = None  # block/throttle: None = until an admin lifts it
    target: Literal["identity", "address"] | None = None  # block/throttle: None = from the rule's grouping
    rate: float = 1.0  # throttle: tokens per second
    burst: float = 1.0  # throttle: bucket size
    role: str | None = None  # quarantine: bundle|detector; None = the event's data.role


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    desc: str
    condition: Condition
    severity: str
    output: str
    tags: tuple[str, ...] = ()
    runbook: str | None = None
    enabled: bool = True
    cooldown_s: float = 60.0
    responses: tuple[Response, ...] = ()
    line: int = 0  # where the rule starts in its file

    def render(self, values: Mapping[str, Any]) -> str:
        """The output template filled in; a placeholder without a value reads ``-``."""
        return self.output.format_map(_Defaulting(values))


class _Defaulting(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        return "-"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules of one file, the file they came from (None: the packaged default) and its digest."""

    rules: tuple[Rule, ...]
    path: Path | None = None
    sha256: str = ""
    by_kind: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, list[Rule]] = {}
        for r in self.rules:
            if r.enabled:
                for k in r.condition.kinds:
                    index.setdefault(k, []).append(r)
        object.__setattr__(self, "by_kind", {k: tuple(v) for k, v in index.items()})

    def __len__(self) -> int:
        return len(self.rules)


def default_rules_path() -> Path:
    return Path(str(resources.files("edgeshield.monitor") / "rules" / "default.yaml"))


def load_rules(path: str | os.PathLike[str] | None = None) -> RuleSet:
    """Read and validate a rule file (None: the packaged default pack)."""
    p = Path(path) if path is not None else default_rules_path()
    source = str(p)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RuleFileError(f"{source}:1: rule file not found") from None
    except IsADirectoryError:
        raise RuleFileError(f"{source}:1: rule file is a directory") from None
    except OSError as exc:
        raise RuleFileError(f"{source}:1: cannot read the rule file: {exc.strerror or exc}") from None
    rules = parse_rules(data, source=source)
    return RuleSet(rules.rules, path=Path(path) if path is not None else None, sha256=rules.sha256)


def parse_rules(text: str | bytes, *, source: str = "<rules>") -> RuleSet:
    """Validate rule-file text; raises :class:`RuleFileError` (and nothing else) on any problem."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_FILE_BYTES:
        raise RuleFileError(f"{source}:1: rule file over {MAX_FILE_BYTES} bytes")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RuleFileError(f"{source}:{line}: not UTF-8 text") from None
    try:
        root = yaml.compose(decoded, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise RuleFileError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # a reader error (a control character, say), which has no mark
        position = getattr(exc, "position", None)
        line = decoded[:position].count("\n") + 1 if isinstance(position, int) else 1
        raise RuleFileError(f"{source}:{line}: invalid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise RuleFileError(f"{source}:1: YAML nested too deeply") from None
    parser = _Parser(source)
    try:
        rules = parser.file(root)
    except RecursionError:
        raise RuleFileError(f"{source}:1: YAML nested too deeply") from None
    return RuleSet(rules, sha256=hashlib.sha256(raw).hexdigest())


# --- validation over composed nodes --------------------------------------------------------------------------------
_RULE_FIELDS = ("rule", "desc", "condition", "severity", "output", "tags", "runbook", "enabled", "cooldown_s",
                "responses")
_REQUIRED = ("rule", "desc", "condition", "severity", "output")
_CONDITION_FIELDS = ("kinds", "where", "group_by", "count", "window_s", "rate_per_s")
_RESPONSE_FIELDS: dict[str, tuple[str, ...]] = {
    "alert": ("audit", "stderr", "webhook"),
    "block": ("duration_s", "target"),
    "throttle": ("rate", "burst", "duration_s", "target"),
    "deny_cert": (),
    "quarantine": ("role",),
    "reload": (),
}


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = 0
        self._scalars = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node | None, message: str) -> NoReturn:
        _fail(self.source, node, message)

    def _count(self, node: yaml.Node) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.fail(node, f"more than {MAX_NODES} YAML nodes")

    def scalar(self, node: yaml.Node, what: str) -> Any:
        self._count(node)
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, f"{what} must be a single value, not a {_shape(node)}")
        try:
            value = self._scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            self.fail(node, f"{what}: cannot read {node.value[:40]!r}: {' '.join(str(exc).split())[:120]}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(node, f"{what} must be finite")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            self.fail(node, f"{what} must be a string, number, boolean or null, not {type(value).__name__}")
        return value

    def string(self, node: yaml.Node, what: str, *, empty: bool = False) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str):
            self.fail(node, f"{what} must be a string, not {_typename(value)}")
        if not empty and not value.strip():
            self.fail(node, f"{what} must not be empty")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            self.fail(node, f"{what} must be true or false, not {_typename(value)}")
        return value

    def number(self, node: yaml.Node, what: str, *, low: float, high: float, low_open: bool = True,
               integer: bool = False) -> float:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            self.fail(node, f"{what} must be {'an integer' if integer else 'a number'}, not {_typename(value)}")
        if (value <= low if low_open else value < low) or value > high:
            self.fail(node, f"{what} must be {'>' if low_open else '>='} {low:g} and <= {high:g}, not {value}")
        return float(value)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        self._count(node)
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping, not a {_shape(node)}")
        if node.tag != "tag:yaml.org,2002:map":
            self.fail(node, f"{what}: unsupported YAML tag {node.tag[:60]!r}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.fail(key_node, f"merge keys (<<) are not supported in {what}")
            key = self.scalar(key_node, f"a key of {what}")
            if not isinstance(key, str):
                self.fail(key_node, f"a key of {what} must be a string, not {_typename(key)}")
            if key not in allowed:
                self.fail(key_node, f"unknown field {key!r} in {what} (expected one of: {', '.join(allowed)})")
            if key in out:
                self.fail(key_node, f"field {key!r} given twice in {what}")
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        self._count(node)
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list, not a {_shape(node)}")
        if node.tag != "tag:yaml.org,2002:seq":
            self.fail(node, f"{what}: unsupported YAML tag {node.tag[:60]!r}")
        return list(node.value)

    # -- the file --
    def file(self, root: yaml.Node | None) -> tuple[Rule, ...]:
        if root is None:
            self.fail(None, "the rule file is empty (expected a list of rules)")
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for item in self.sequence(root, "the rule file"):
            rule = self.rule(item)
            if rule.name in seen:
                self.fail(item, f"rule {rule.name!r} is defined twice (first at line {seen[rule.name]})")
            seen[rule.name] = rule.line
            rules.append(rule)
        return tuple(rules)

    def rule(self, node: yaml.Node) -> Rule:
        fields = self.mapping(node, "a rule", _RULE_FIELDS)
        for name in _REQUIRED:
            if name not in fields:
                self.fail(node, f"a rule needs {name!r}")
        name_node = fields["rule"][1]
        name = self.string(name_node, "rule")
        if not _NAME.fullmatch(name):
            self.fail(name_node, f"rule name {name[:40]!r} must be a letter then letters, digits, '_', '.', '-' "
                                 "(64 at most)")
        where = f"rule {name!r}"
        condition = self.condition(fields["condition"][1], where)
        severity_node = fields["severity"][1]
        severity = self.string(severity_node, f"{where}: severity")
        if severity not in SEVERITIES:
            self.fail(severity_node, f"{where}: severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
        output = self.output(fields["output"][1], where)
        tags = self.tags(fields["tags"][1], where) if "tags" in fields else ()
        runbook = self.string(fields["runbook"][1], f"{where}: runbook") if "runbook" in fields else None
        enabled = self.boolean(fields["enabled"][1], f"{where}: enabled") if "enabled" in fields else True
        cooldown = (self.number(fields["cooldown_s"][1], f"{where}: cooldown_s", low=0, high=MAX_WINDOW_S,
                                low_open=False) if "cooldown_s" in fields else max(60.0, condition.window_s))
        responses = (self.responses(fields["responses"][1], where, condition)
                     if "responses" in fields else (Response("alert"),))
        return Rule(name=name, desc=self.string(fields["desc"][1], f"{where}: desc"), condition=condition,
                    severity=severity, output=output, tags=tags, runbook=runbook, enabled=enabled,
                    cooldown_s=cooldown, responses=responses, line=node.start_mark.line + 1)

    def condition(self, node: yaml.Node, where: str) -> Condition:
        what = f"{where}: condition"
        fields = self.mapping(node, what, _CONDITION_FIELDS)
        if "kinds" not in fields:
            self.fail(node, f"{what} needs 'kinds' (a list of event kinds)")
        kinds: list[str] = []
        kinds_node = fields["kinds"][1]
        items = self.sequence(kinds_node, f"{what}: kinds")
        if not items:
            self.fail(kinds_node, f"{what}: kinds must not be empty")
        for item in items:
            kind = self.string(item, f"{what}: a kind")
            if kind not in KINDS:
                self.fail(item, f"{what}: unknown event kind {kind!r}")
            if kind in kinds:
                self.fail(item, f"{what}: kind {kind!r} listed twice")
            kinds.append(kind)
        group_by: GroupBy = "actor"
        if "group_by" in fields:
            g_node = fields["group_by"][1]
            g = self.string(g_node, f"{what}: group_by")
            if g not in GROUP_BY:
                self.fail(g_node, f"{what}: group_by must be one of {', '.join(GROUP_BY)}, not {g!r}")
            group_by = g
        if "count" in fields and "rate_per_s" in fields:
            self.fail(fields["rate_per_s"][0], f"{what}: give either 'count' or 'rate_per_s', not both")
        window = (self.number(fields["window_s"][1], f"{what}: window_s", low=0, high=MAX_WINDOW_S)
                  if "window_s" in fields else None)
        if "rate_per_s" in fields:
            rate = self.number(fields["rate_per_s"][1], f"{what}: rate_per_s", low=0, high=MAX_COUNT)
            window = window if window is not None else 10.0
            count = max(1, math.ceil(rate * window - 1e-9))
            if count > MAX_COUNT:
                self.fail(fields["rate_per_s"][1], f"{what}: rate_per_s × window_s is over {MAX_COUNT} events")
        else:
            count = int(self.number(fields["count"][1], f"{what}: count", low=1, high=MAX_COUNT, low_open=False,
                                    integer=True)) if "count" in fields else 1
            if window is None:
                if count > 1:
                    self.fail(node, f"{what}: a count above 1 needs 'window_s'")
                window = 1.0
        filters = self.filters(fields["where"][1], what, kinds) if "where" in fields else ()
        return Condition(kinds=tuple(kinds), count=count, window_s=window, group_by=group_by, where=filters)

    def filters(self, node: yaml.Node, what: str, kinds: list[str]) -> tuple[Filter, ...]:
        declared: set[str] = set()
        open_kinds = False
        for k in kinds:
            declared.update(KINDS[k].fields)
            open_kinds = open_kinds or not KINDS[k].fields  # a kind with no declared fields takes any field
        self._count(node)
        if not isinstance(node, yaml.MappingNode) or node.tag != "tag:yaml.org,2002:map":
            self.fail(node, f"{what}: where must be a mapping of field: value, not a {_shape(node)}")
        out: list[Filter] = []
        names: set[str] = set()
        for key_node, value_node in node.value:
            name = self.string(key_node, f"{what}: a where field")
            if name in names:
                self.fail(key_node, f"{what}: where field {name!r} given twice")
            names.add(name)
            if name not in EVENT_ATTRIBUTES and not open_kinds and name not in declared:
                self.fail(key_node, f"{what}: unknown field {name!r} for {', '.join(kinds)} (expected one of: "
                                    f"{', '.join([*EVENT_ATTRIBUTES, *sorted(declared)])})")
            if isinstance(value_node, yaml.MappingNode):
                ops = self.mapping(value_node, f"{what}: where {name}", ("in", "not_in"))
                if len(ops) != 1:
                    self.fail(value_node, f"{what}: where {name} takes exactly one of 'in' or 'not_in'")
                ((op, (_k, list_node)),) = ops.items()
                values = [self.scalar(v, f"{what}: where {name} {op}")
                          for v in self.sequence(list_node, f"{what}: where {name} {op}")]
                if not values:
                    self.fail(list_node, f"{what}: where {name} {op} must list at least one value")
                out.append(Filter(name, "in" if op == "in" else "not_in", tuple(values)))
            else:
                out.append(Filter(name, "eq", (self.scalar(value_node, f"{what}: where {name}"),)))
        return tuple(out)

    def output(self, node: yaml.Node, where: str) -> str:
        text = self.string(node, f"{where}: output")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            self.fail(node, f"{where}: output is not a valid template: {exc}")
        for _literal, name, spec, _conversion in parsed:
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                self.fail(node, f"{where}: output uses unknown placeholder {{{name}}} (allowed: "
                                f"{', '.join(sorted(PLACEHOLDERS))})")
            if spec and "{" in spec:
                self.fail(node, f"{where}: output may not nest placeholders")
        sample = {"rule": "r", "key": "identity:x", "count": 1, "window_s": 1.0, "actor": "x", "address": "::1",
                  "serial": "1a", "kind": "auth.failure", "severity": "high", "desc": "d", "source": "server"}
        try:
            text.format_map(sample)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self.fail(node, f"{where}: output does not format: {exc}")
        return text

    def tags(self, node: yaml.Node, where: str) -> tuple[str, ...]:
        out: list[str] = []
        for item in self.sequence(node, f"{where}: tags"):
            tag = self.string(item, f"{where}: a tag")
            if not (_ATLAS.fullmatch(tag) or _CLAUSE.fullmatch(tag)
                    or (_WORD.fullmatch(tag) and tag not in _REGULATIONS)):
                self.fail(item, f"{where}: tag {tag[:40]!r} is neither a MITRE ATLAS ID (AML.T0024, AML.M0004), a "
                                "regulation clause (gdpr_IV_32.2, hipaa_164.312.b, eu_ai_act_12) nor a lowercase word")
            if tag not in out:
                out.append(tag)
        return tuple(out)

    def responses(self, node: yaml.Node, where: str, condition: Condition) -> tuple[Response, ...]:
        out: list[Response] = []
        for item in self.sequence(node, f"{where}: responses"):
            resp = self.response(item, where, condition)
            if any(r.action == resp.action for r in out):
                self.fail(item, f"{where}: response {resp.action!r} listed twice")
            out.append(resp)
        return tuple(out)

    def response(self, node: yaml.Node, where: str, condition: Condition) -> Response:
        what = f"{where}: a response"
        if isinstance(node, yaml.ScalarNode):
            action = self.string(node, what)
            params: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        else:
            fields = self.mapping(node, what, ("action", *sorted({f for fs in _RESPONSE_FIELDS.values()
                                                                   for f in fs})))
            if "action" not in fields:
                self.fail(node, f"{what} needs 'action' (one of {', '.join(ACTIONS)})")
            action = self.string(fields["action"][1], f"{what}: action")
            params = {k: v for k, v in fields.items() if k != "action"}
        if action not in ACTIONS:
            self.fail(node, f"{what}: unknown action {action!r} (expected one of: {', '.join(ACTIONS)})")
        what = f"{where}: response {action}"
        for key, (key_node, _v) in params.items():
            if key not in _RESPONSE_FIELDS[action]:
                allowed = ", ".join(_RESPONSE_FIELDS[action]) or "nothing"
                self.fail(key_node, f"{what}: unknown field {key!r} (it takes {allowed})")
        kw: dict[str, Any] = {}
        for flag in ("audit", "stderr", "webhook"):
            if flag in params:
                kw[flag] = self.boolean(params[flag][1], f"{what}: {flag}")
        if "duration_s" in params:
            d_node = params["duration_s"][1]
            if isinstance(d_node, yaml.ScalarNode) and d_node.tag == "tag:yaml.org,2002:null":
                self.scalar(d_node, f"{what}: duration_s")
            else:
                kw["duration_s"] = self.number(d_node, f"{what}: duration_s", low=0, high=365 * 86400.0)
        elif action in ("block", "throttle"):
            self.fail(node, f"{what} needs 'duration_s' (seconds, or null for until an admin lifts it)")
        if action in ("block", "throttle"):
            target: str | None = None
            if "target" in params:
                t_node = params["target"][1]
                target = self.string(t_node, f"{what}: target")
                if target not in ("identity", "address"):
                    self.fail(t_node, f"{what}: target must be identity or address, not {target!r}")
            elif condition.group_by in ("actor", "address"):
                target = "identity" if condition.group_by == "actor" else "address"
            else:
                self.fail(node, f"{what} needs 'target' (identity or address): the rule groups by "
                                f"{condition.group_by}")
            kw["target"] = target
        if action == "throttle":
            for name in ("rate", "burst"):
                if name not in params:
                    self.fail(node, f"{what} needs {name!r}")
            kw["rate"] = self.number(params["rate"][1], f"{what}: rate", low=0, high=1e6)
            kw["burst"] = self.number(params["burst"][1], f"{what}: burst", low=1, high=1e6, low_open=False)
        if action == "deny_cert" and condition.group_by not in ("serial", "actor"):
            self.fail(node, f"{what} needs group_by serial or actor (a certificate serial to deny), not "
                            f"{condition.group_by}")
        if action == "quarantine" and "role" in params:
            r_node = params["role"][1]
            role = self.string(r_node, f"{what}: role")
            if role not in QUARANTINE_ROLES:
                self.fail(r_node, f"{what}: role must be one of {', '.join(QUARANTINE_ROLES)}, not {role!r}")
            kw["role"] = role
        return Response(action, **kw)


def _shape(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    return "list" if isinstance(node, yaml.SequenceNode) else "single value"


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value),
                                                                                         type(value).__name__)
