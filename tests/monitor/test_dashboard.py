"""The Grafana dashboard (dashboards/edgeshield.json) imports and cannot drift from what the server exposes: every
metric a panel queries is a family the real server serves at /metrics, and every label a query groups or filters
by is one that family has."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))  # the real-server helpers live beside those tests

from edgeshield import audit, transport
from edgeshield.server import ServeConfig, build_state

from _serving import mtls_client, protected_digits, serving

DASHBOARD = Path(__file__).parents[2] / "dashboards" / "edgeshield.json"
DS = "${DS_PROMETHEUS}"
# PromQL words that are not metric names: functions are followed by "(", these are not always
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels of a collapsed row
    return out


def queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers, ranges and by-lists that
    are neither functions nor keywords (a label_values() variable query names its metric as the first argument)."""
    m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr)
    if m:
        return {m.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end():].lstrip()
        if word in _KEYWORDS or rest.startswith("(") or text[max(0, m.start() - 1)] == "$":
            continue
        names.add(word)
    return names


def labels_used(expr: str) -> dict[str, set[str]]:
    """{metric: labels its selector matches on or its aggregation groups by}."""
    used: dict[str, set[str]] = {}
    for m in re.finditer(r"(edgeshield_\w+)\{([^}]*)\}", expr):
        used.setdefault(m.group(1), set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)))
    groups = {g for grp in re.findall(r"\bby\s*\(([^)]*)\)", expr) for g in re.split(r"\s*,\s*", grp.strip()) if g}
    for name in re.findall(r"edgeshield_\w+", expr):
        used.setdefault(name, set()).update(groups)
    return used


def test_the_json_is_an_importable_dashboard() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not here & cells, f"panel {p['title']!r} overlaps another"
        cells |= here
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DS}
        assert p["targets"] and p.get("description")
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DS and t["expr"].count("(") == t["expr"].count(")")
            assert t["expr"].count("{") == t["expr"].count("}")
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == DS


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (kind) (rate(edgeshield_security_events_total{instance=~"$instance", kind=~"a|b"}[5m]))',
     {"edgeshield_security_events_total"}),
    (('histogram_quantile(0.95, sum by (le) (rate(edgeshield_request_seconds_bucket{path="/v1/predict"}'
     '[$__rate_interval])))'), {"edgeshield_request_seconds_bucket"}),
    ("sum(edgeshield_monitor_active_responses) or vector(0)", {"edgeshield_monitor_active_responses"}),
    ("label_values(edgeshield_requests_total, instance)", {"edgeshield_requests_total"}),
    ("rate(node_cpu_seconds_total[5m])", {"node_cpu_seconds_total"}),  # a foreign metric is seen, and refused
])
def test_metric_names_are_found(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_labels_used_are_found() -> None:
    expr = 'sum by (rule, severity) (increase(edgeshield_monitor_alerts_total{instance=~"$i", outcome="x"}[1h]))'
    assert labels_used(expr) == {"edgeshield_monitor_alerts_total": {"instance", "outcome", "rule", "severity"}}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, set[str]], Any]]:
    """{sample name: labels} the real server exposes at /metrics (after some traffic), and its metrics registry."""
    from prometheus_client.parser import text_string_to_metric_families

    root = tmp_path_factory.mktemp("dashboard")
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {"aud": transport.issue(ca, name="aud", role="auditor"),
             "alice": transport.issue(ca, name="alice", role="client")}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, log_level="warning")
    state = build_state(cfg)
    with contextlib.ExitStack() as stack:
        _with_monitor(state, root, stack)
        _srv, _watcher, port = stack.enter_context(serving(cfg, state))
        world = {"ca": ca, "certs": certs, "url": f"https://127.0.0.1:{port}"}
        with mtls_client(world, "alice") as c:
            assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
            assert c.get("/metrics").status_code == 403
        with mtls_client(world, "aud") as c:
            text = c.get("/metrics").text
        found: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for suffix in _SUFFIXES.get(family.type, ("",)):
                found.setdefault(family.name + suffix, set())
            for sample in family.samples:
                found.setdefault(sample.name, set()).update(sample.labels)
        yield found, state.metrics.registry


def _declared_labels(registry: Any) -> dict[str, set[str]]:
    """Label names each collector declares, for families with no sample yet (a labelled counter nobody hit)."""
    out: dict[str, set[str]] = {}
    for collector in list(getattr(registry, "_collector_to_names", {})):
        labels = set(getattr(collector, "_labelnames", ()))
        for name in registry._collector_to_names[collector]:
            out[name] = labels
    return out


def test_every_panel_queries_what_the_server_exposes(exposed: tuple[dict[str, set[str]], Any]) -> None:
    found, registry = exposed
    declared = _declared_labels(registry)
    assert {"edgeshield_requests_total", "edgeshield_security_events_total",
            "edgeshield_monitor_alerts_total"} <= set(found)  # the scrape really saw the families
    for expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, expr
        for name in names:
            assert name in found, f"{name} (in {expr!r}) is not exposed at /metrics"
        for name, labels in labels_used(expr).items():
            have = found.get(name, set()) | declared.get(name, set()) | {"instance", "job"}
            if name.endswith("_bucket"):
                have |= {"le"}
            assert labels <= have, f"{name} has no label {labels - have} (in {expr!r})"


def _with_monitor(state: Any, root: Path, stack: contextlib.ExitStack) -> None:
    """The security monitor with the default rule pack, subscribed to the server's stream (as serve wires it)."""
    if getattr(state, "security_monitor", None) is not None:
        return
    from edgeshield.monitor._engine import Monitor
    from edgeshield.monitor._rules import load_rules
    from edgeshield.monitor._store import MonitorStore

    store = MonitorStore(root / "monitor.db")
    mon = Monitor(load_rules(None), store, emit=state.events.publish, registry=state.metrics.registry)
    state.security_monitor = mon
    state.events.subscribe(mon)
    mon.start()
    stack.callback(store.close)
    stack.callback(mon.stop)
