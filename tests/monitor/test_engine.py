"""The monitor engine with real SQLite and a real webhook receiver: windows, cooldowns, responses in force at once,
their records and events on the worker thread, persistence across a restart, lifting, reloading, metrics."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor._engine import Monitor
from edgeshield.monitor._events import EventStream, SecurityEvent
from edgeshield.monitor._responses import WebhookConfig
from edgeshield.monitor._rules import RuleFileError, load_rules, parse_rules
from edgeshield.monitor._store import MonitorStore

RULES = """\
- rule: forbidden
  desc: RBAC denials
  condition: {kinds: [auth.forbidden], group_by: actor, count: 3, window_s: 10}
  severity: high
  output: "{key}: {count} denials"
  tags: [AML.T0040, gdpr_IV_32.2]
  cooldown_s: 30
  responses: [alert, {action: block, duration_s: 60}]
- rule: handshakes
  desc: failed handshakes per address
  condition: {kinds: [tls.handshake_failed], group_by: address, count: 2, window_s: 5}
  severity: high
  output: "{key}"
  responses: [{action: block, target: address, duration_s: null}]
- rule: revoked
  desc: a refused certificate keeps coming back
  condition: {kinds: [auth.failure], group_by: serial, count: 2, window_s: 5}
  severity: critical
  output: "{key} {actor}"
  responses: [alert, deny_cert]
- rule: burst
  desc: rejected inputs
  condition: {kinds: [input.rejected], where: {status: {in: [422]}}, group_by: actor, count: 2, window_s: 5}
  severity: medium
  output: "{key}"
  responses: [{action: throttle, rate: 1, burst: 2, duration_s: 20}]
- rule: changed
  desc: the bundle changed
  condition: {kinds: [integrity.changed], where: {role: {in: [bundle, detector]}}, group_by: none, count: 1}
  severity: critical
  output: "{key}"
  cooldown_s: 0
  responses: [alert, quarantine]
- rule: refusals
  desc: named explicitly, so it sees the monitor's own event
  condition: {kinds: [monitor.refused], group_by: actor, count: 1}
  severity: info
  output: "{key}"
  responses: [{action: alert, webhook: false, stderr: false}]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """The ``emit`` side: every event the monitor publishes, and the thread it came from."""

    def __init__(self) -> None:
        self.events: list[tuple[str, SecurityEvent]] = []
        self.lock = threading.Lock()

    def __call__(self, event: SecurityEvent) -> None:
        with self.lock:
            self.events.append((threading.current_thread().name, event))

    def kinds(self) -> list[str]:
        return [e.kind for _t, e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [dict(e.data) for _t, e in self.events if e.kind == kind]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _monitor(tmp_path: Path, clock: Clock, rec: Recorder, text: str = RULES, **kw: Any) -> Monitor:
    m = Monitor(parse_rules(text), MonitorStore(tmp_path / "monitor.db"), emit=rec, clock=clock, **kw)
    m.start()
    return m


def _forbidden(actor: str = "mallory", address: str = "10.0.0.9", serial: int = 0x51) -> SecurityEvent:
    return SecurityEvent("auth.forbidden", actor, {"role": "client", "path": "/v1/admin/monitor", "method": "GET"},
                         address=address, serial=serial)


def test_trips_at_the_count_refuses_at_once_records_on_the_worker(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    m.handle(_forbidden())
    m.handle(_forbidden())
    assert m.refusal("mallory", 0x51, "10.0.0.9") is None
    m.handle(_forbidden())
    refusal = m.refusal("mallory", 0x51, "10.0.0.9")  # inside the same call that tripped: nothing waited for
    assert refusal is not None and (refusal.status, refusal.action, refusal.rule) == (403, "block", "forbidden")
    assert refusal.target == "identity:mallory" and refusal.headers["retry-after"] == "60"
    assert m.refusal("alice", 0x52, "10.0.0.9") is None  # an identity block, not the address
    assert m.flush()
    assert rec.kinds() == ["monitor.alert", "monitor.response"]
    assert {t for t, _e in rec.events} == {"edgeshield-monitor"}  # never on the caller's thread
    alert = rec.of("monitor.alert")[0]
    assert alert == {"rule": "forbidden", "severity": "high", "key": "identity:mallory", "count": 3,
                     "window_s": 10.0, "tags": ["AML.T0040", "gdpr_IV_32.2"], "output": "identity:mallory: 3 denials"}
    assert rec.of("monitor.response")[0] == {"rule": "forbidden", "action": "block", "target": "identity:mallory",
                                             "ok": True, "error": None, "until": clock.now + 60}
    snap = m.snapshot()
    assert [a["rule"] for a in snap["alerts"]] == ["forbidden"]
    assert snap["responses"] == [{"action": "block", "target": "identity:mallory", "rule": "forbidden",
                                  "since": clock.now, "until": clock.now + 60, "reason": "identity:mallory: 3 denials"}]
    assert snap["counters"]["events"] == 3 and snap["counters"]["alerts"] == 1
    assert snap["recent_events"][0]["kind"] == "auth.forbidden" and "role=client" in snap["recent_events"][0]["summary"]
    assert {r["name"] for r in snap["rules"]} >= {"forbidden", "handshakes"}
    m.stop()


def test_sliding_window_and_cooldown_one_burst_one_alert(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    for _ in range(2):
        m.handle(_forbidden("slow"))
        clock.now += 6  # three events, never three within 10 s
    m.handle(_forbidden("slow"))
    assert m.refusal("slow", None, None) is None
    for _ in range(12):  # a burst: fires once, then the cooldown holds
        m.handle(_forbidden("fast"))
    assert m.alerts == 1
    clock.now += 31  # cooldown over
    for _ in range(3):
        m.handle(_forbidden("fast"))
    assert m.alerts == 2
    m.stop()


def test_block_expires_by_itself_and_the_expiry_is_recorded(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    for _ in range(3):
        m.handle(_forbidden())
    assert m.refusal("mallory", None, None) is not None
    assert m.flush()
    clock.now += 61
    assert m.refusal("mallory", None, None) is None  # at once, before any sweep
    m._queue(m._sweep)  # what the worker does once a second when idle
    assert m.flush()
    assert rec.of("monitor.lifted") == [{"action": "block", "target": "identity:mallory", "by": "expired"}]
    assert m.store is not None and m.store.history()[0]["lifted_by"] == "expired"
    m.stop()


def test_address_block_before_tls_and_ipv6_by_64(tmp_path: Path, clock: Clock) -> None:
    m = _monitor(tmp_path, clock, Recorder())
    for addr in ("2001:db8::1", "2001:db8::2"):  # the same /64
        m.handle(SecurityEvent("tls.handshake_failed", "anonymous", {"reason": "x"}, address=addr))
    assert m.address_refused("2001:db8::ffff") is not None
    assert m.address_refused("2001:db8:0:1::1") is None
    r = m.refusal(None, None, "2001:db8::77")
    assert r is not None and r.status == 403 and r.target == "address:2001:db8::/64"
    for _ in range(2):
        m.handle(SecurityEvent("tls.handshake_failed", "anonymous", {"reason": "x"}, address="::ffff:192.0.2.7"))
    assert m.address_refused("192.0.2.7") is not None
    m.stop()


def test_deny_cert_closes_records_a_revocation_request_and_undeny(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    denied: list[frozenset[int]] = []
    m.on_deny = denied.append
    lifts: list[tuple[str, str]] = []
    m.on_lift = lambda a, t: lifts.append((a, t))
    for _ in range(2):
        m.handle(SecurityEvent("auth.failure", "eve", {"reason": "revoked", "serial": 0xABC}, address="10.0.0.3",
                               serial=0xABC))
    r = m.refusal("eve", 0xABC, "10.0.0.3")
    assert r is not None and (r.status, r.close, r.headers) == (401, True, {"connection": "close"})
    assert m.denied_serials() == frozenset({0xABC})
    assert m.flush()
    assert denied == [frozenset({0xABC})]
    assert m.snapshot()["pending_revocations"] == [{"serial": "abc", "identity": "eve", "rule": "revoked",
                                                    "since": clock.now}]
    with pytest.raises(InvalidArgumentError):
        m.lift("deny_cert", "identity:eve", "adm")
    assert m.lift("deny_cert", "serial:0xABC", "adm") is True
    assert m.refusal("eve", 0xABC, None) is None and m.snapshot()["pending_revocations"] == []
    assert lifts == [("deny_cert", "serial:abc")]
    assert rec.of("monitor.lifted")[-1] == {"action": "deny_cert", "target": "serial:abc", "by": "adm"}
    assert m.lift("deny_cert", "serial:abc", "adm") is False
    m.stop()


def test_throttle_is_a_token_bucket_with_retry_after(tmp_path: Path, clock: Clock) -> None:
    m = _monitor(tmp_path, clock, Recorder())
    m.handle(SecurityEvent("input.rejected", "bob", {"status": 415}))  # filtered out by where
    m.handle(SecurityEvent("input.rejected", "bob", {"status": 415}))
    assert m.refusal("bob", None, None) is None and m.alerts == 0
    for _ in range(2):
        m.handle(SecurityEvent("input.rejected", "bob", {"status": 422}))
    assert [m.refusal("bob", None, None) for _ in range(2)] == [None, None]  # the burst
    r = m.refusal("bob", None, None)
    assert r is not None and r.status == 429 and r.headers == {"retry-after": "1"}
    clock.now += 1.0
    assert m.refusal("bob", None, None) is None
    assert m.lift("throttle", "identity:bob", "adm") is True
    assert all(m.refusal("bob", None, None) is None for _ in range(5))
    m.stop()


def test_quarantine_and_release(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    m.handle(SecurityEvent("integrity.changed", "watcher", {"role": "policy"}, source="watcher"))
    assert m.quarantined() is None  # not this rule's roles
    m.handle(SecurityEvent("integrity.changed", "watcher", {"role": "detector"}, source="watcher"))
    assert "detector" in (m.quarantined() or "")
    assert m.lift("quarantine", "file:detector", "adm") is True
    assert m.quarantined() is None
    m.stop()


def test_a_response_that_cannot_run_says_so(tmp_path: Path, clock: Clock) -> None:
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec)
    for _ in range(3):
        m.handle(_forbidden("anonymous"))  # no identity to block
    assert m.flush()
    assert rec.of("monitor.response") == [{"rule": "forbidden", "action": "block", "target": None, "ok": False,
                                           "error": "no client identity to block (anonymous)", "until": None}]
    assert m.responses_failed == 1
    m.stop()


def test_its_own_events_only_where_a_rule_names_them(tmp_path: Path, clock: Clock) -> None:
    stream = EventStream()
    rec = Recorder()
    m = Monitor(parse_rules(RULES), MonitorStore(tmp_path / "m.db"), emit=stream.publish, clock=clock)
    stream.subscribe(m)
    audit = Recorder()

    class Durable:
        durable = True

        def handle(self, event: SecurityEvent) -> None:
            audit(event)
            rec(event)

    stream.subscribe(Durable())
    m.start()
    for _ in range(3):
        stream.publish(_forbidden())
    assert m.flush()
    assert m.alerts == 1  # monitor.alert and monitor.response match no rule: no feedback
    stream.publish(SecurityEvent("monitor.refused", "mallory", {"action": "block", "rule": "forbidden",
                                                                  "status": 403}, source="monitor"))
    assert m.flush()
    assert m.alerts == 2 and m.snapshot()["alerts"][0]["rule"] == "refusals"
    assert rec.kinds().count("monitor.alert") == 2
    m.stop()


def test_default_pack_does_not_react_to_monitor_refused(tmp_path: Path) -> None:
    m = Monitor(load_rules(None), MonitorStore(tmp_path / "m.db"))
    for _ in range(100):
        m.handle(SecurityEvent("monitor.refused", "mallory", {"action": "block", "status": 403}))
    assert m.alerts == 0


def test_state_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    m = _monitor(tmp_path, clock, Recorder())
    for _ in range(3):
        m.handle(_forbidden())
    for _ in range(2):
        m.handle(SecurityEvent("auth.failure", "eve", {}, serial=0x77))
    for _ in range(2):
        m.handle(SecurityEvent("input.rejected", "bob", {"status": 422}))
    m.handle(SecurityEvent("integrity.changed", "watcher", {"role": "bundle"}))
    m.stop()
    assert m.store is not None
    m.store.close()
    again = Monitor(parse_rules(RULES), MonitorStore(tmp_path / "monitor.db"), clock=clock)
    assert again.refusal("mallory", None, None) is not None
    assert again.denied_serials() == frozenset({0x77})
    assert again.quarantined() is not None
    assert {r["action"] for r in again.snapshot()["responses"]} == {"block", "deny_cert", "throttle", "quarantine"}
    assert [a["rule"] for a in again.snapshot()["alerts"]] == ["changed", "revoked", "forbidden"]
    assert again.lift("block", "identity:mallory", "adm")
    clock.now += 100  # past the throttle's 20 s
    third = Monitor(parse_rules(RULES), MonitorStore(tmp_path / "monitor.db"), clock=clock)
    assert third.refusal("mallory", None, None) is None and third.refusal("bob", None, None) is None
    assert {r["action"] for r in third.snapshot()["responses"]} == {"deny_cert", "quarantine"}


def test_lift_resets_the_window_so_a_new_burst_fires_again(tmp_path: Path, clock: Clock) -> None:
    m = _monitor(tmp_path, clock, Recorder())
    for _ in range(3):
        m.handle(_forbidden())
    assert m.lift("block", "identity:mallory", "adm")
    assert not m.lift("block", "identity:mallory", "adm")
    for _ in range(3):
        m.handle(_forbidden())
    assert m.refusal("mallory", None, None) is not None  # within the cooldown, yet fired: the admin reset it
    with pytest.raises(InvalidArgumentError):
        m.lift("explode", "identity:mallory", "adm")
    with pytest.raises(InvalidArgumentError):
        m.lift("block", "address:not-an-ip", "adm")
    m.stop()


def test_windows_are_bounded(tmp_path: Path, clock: Clock) -> None:
    m = Monitor(parse_rules(RULES), None, clock=clock, max_keys=100)
    for i in range(5000):
        m.handle(_forbidden(f"c{i}"))
    assert len(m._windows) == 100
    assert m.alerts == 0


def test_reload_validates_first_and_calls_the_hook(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    rec = Recorder()
    m = Monitor(load_rules(path), MonitorStore(tmp_path / "m.db"), emit=rec, clock=clock, rules_path=path)
    reloads: list[int] = []
    m.on_reload = lambda: reloads.append(1)
    path.write_text(RULES.replace("count: 3, window_s: 10", "count: 3, windw_s: 10"))
    with pytest.raises(RuleFileError, match=r"rules.yaml:3: .*unknown field 'windw_s'"):
        m.reload("adm")
    assert reloads == [] and len(m.rules) == 6  # the old rules stay
    path.write_text(RULES.split("- rule: handshakes")[0])
    info = m.reload("adm")
    assert info["rules"] == 1 and info["path"] == str(path) and reloads == [1]
    assert rec.of("monitor.reload") == [{"rules": 1, "rules_sha256": info["rules_sha256"], "by": "adm"}]
    for _ in range(2):
        m.handle(SecurityEvent("tls.handshake_failed", "anonymous", {}, address="10.1.1.1"))
    assert m.address_refused("10.1.1.1") is None


def test_metrics(tmp_path: Path, clock: Clock) -> None:
    registry = CollectorRegistry()
    m = _monitor(tmp_path, clock, Recorder(), registry=registry)
    for _ in range(3):
        m.handle(_forbidden())
    assert m.flush()
    value = registry.get_sample_value
    assert value("edgeshield_monitor_alerts_total", {"rule": "forbidden", "severity": "high"}) == 1
    assert value("edgeshield_monitor_responses_total", {"action": "block", "outcome": "ok"}) == 1
    assert value("edgeshield_monitor_responses_total", {"action": "alert", "outcome": "ok"}) == 1
    assert value("edgeshield_monitor_active_responses", {"action": "block"}) == 1
    assert value("edgeshield_monitor_active_responses", {"action": "deny_cert"}) == 0
    m.stop()


def test_alert_line_on_stderr_logger(tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    m = _monitor(tmp_path, clock, Recorder())
    with caplog.at_level(logging.WARNING, logger="edgeshield.monitor"):
        for _ in range(3):
            m.handle(_forbidden())
        assert m.flush()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "edgeshield.monitor"]
    assert json.loads(line.removeprefix("monitor alert "))["key"] == "identity:mallory"
    m.stop()


# --- the webhook, against a real HTTP receiver -------------------------------------------------------------------
class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.fail_first = 0
        self.delay_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        time.sleep(self.server.delay_s)
        if self.server.fail_first > 0:
            self.server.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        self.server.bodies.append(json.loads(body))
        self.server.auth.append(self.headers.get("authorization"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_posts_alerts_with_the_token_and_retries(tmp_path: Path, clock: Clock, receiver: Receiver,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "s3cret-token")
    receiver.fail_first = 2
    cfg = WebhookConfig.from_env(receiver.url, "HOOK_TOKEN", backoff_s=0.01, timeout_s=2)
    assert "s3cret" not in repr(cfg)
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec, webhook=cfg)
    for _ in range(3):
        m.handle(_forbidden())
    m.stop()  # flushes the queue and the sender
    (body,) = receiver.bodies
    assert body["alert"]["rule"] == "forbidden" and body["labels"] == {"alertname": "forbidden", "severity": "high"}
    assert receiver.auth == ["Bearer s3cret-token"]
    assert m._sender is not None and m._sender.sent == 1


def test_webhook_failure_is_an_event_and_never_blocks(tmp_path: Path, clock: Clock, receiver: Receiver) -> None:
    receiver.fail_first = 100
    cfg = WebhookConfig(receiver.url, retries=1, backoff_s=0.01, timeout_s=2)
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec, webhook=cfg)
    for _ in range(3):
        m.handle(_forbidden())
    m.stop()
    hook = [d for d in rec.of("monitor.response") if d["action"] == "webhook"]
    assert hook == [{"rule": "forbidden", "action": "webhook", "target": None, "ok": False, "error": "HTTP 503",
                     "until": None}]


def test_webhook_queue_overflow_is_dropped_and_counted(tmp_path: Path, clock: Clock, receiver: Receiver) -> None:
    receiver.delay_s = 0.3
    cfg = WebhookConfig(receiver.url, retries=0, timeout_s=2, queue_size=1)
    m = Monitor(parse_rules(RULES), None, emit=Recorder(), clock=clock, webhook=cfg)
    m.start()
    t0 = time.perf_counter()
    for i in range(10):
        for _ in range(3):
            m.handle(_forbidden(f"c{i}"))
    assert time.perf_counter() - t0 < 0.25  # handle() never waits for the receiver
    assert m.flush()
    assert m.webhook_dropped >= 5 and m.snapshot()["counters"]["dropped"] >= 5
    m.stop(timeout_s=3)


def test_webhook_config_refuses_plain_http_off_loopback_and_credentials_in_the_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("http://example.com/hook", "ftp://127.0.0.1/", "https://user:pw@example.com/", "not a url"):
        with pytest.raises(InvalidArgumentError):
            WebhookConfig(url)
    WebhookConfig("https://alerts.example.com/hook")
    WebhookConfig("http://[::1]:9/hook")
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(InvalidArgumentError, match="NO_SUCH_TOKEN"):
        WebhookConfig.from_env("https://a.example/", "NO_SUCH_TOKEN")


def test_unreachable_webhook_gives_up_after_its_retries(tmp_path: Path, clock: Clock) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = Recorder()
    m = _monitor(tmp_path, clock, rec, webhook=WebhookConfig(f"http://127.0.0.1:{port}/", retries=2, backoff_s=0.01,
                                                             timeout_s=1))
    for _ in range(3):
        m.handle(_forbidden())
    m.stop()
    hook = [d for d in rec.of("monitor.response") if d["action"] == "webhook"]
    assert hook[0]["ok"] is False and hook[0]["error"] == "ConnectError"
