"""The monitor: rules over the event stream, responses enforced at once, their slow parts on a worker thread.

:meth:`Monitor.handle` is an immediate subscriber of the event stream. It counts each event into a sliding window
per (rule, group key) and, when a rule fires, applies its block, throttle, certificate denial or quarantine to
the in-memory :class:`Enforcement` *inside the call*, so the very next request or connection is refused. Everything
slow — the SQLite record, the ``monitor.alert`` and ``monitor.response`` events (which the audit subscriber writes
synchronously), the stderr line, the webhook — goes on a bounded queue to the monitor's worker thread and never
runs on the caller's thread (the event loop or a watcher).

Bounded memory: at most ``max_keys`` windows (the least recently used is evicted), each holding at most its rule's
``count`` timestamps; alerts and recent events in fixed-size rings; the worker queue bounded (overflow dropped and
counted). A rule's cooldown makes one burst one alert. The monitor reacts to its own ``monitor.*`` events only where
a rule names one explicitly, so its own output never feeds back by default.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshield.errors import EdgeShieldError
from edgeshield.monitor._events import SecurityEvent
from edgeshield.monitor._responses import (
    LIFTABLE,
    Enforcement,
    Refusal,
    WebhookConfig,
    WebhookSender,
    check_target,
    normalize_address,
)
from edgeshield.monitor._rules import QUARANTINE_ROLES, Response, Rule, RuleSet, load_rules
from edgeshield.monitor._store import ActiveResponse, MonitorStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("edgeshield.monitor")

__all__ = ["Monitor", "Refusal"]

MAX_KEYS = 10_000
MAX_QUEUE = 10_000
RECENT_EVENTS = 100
RECENT_ALERTS = 200
_ROUTINE = frozenset({"inference.predict", "watermark.served", "inference.request", "resource.sample"})
_NOT_IDENTITIES = frozenset({"", "anonymous", "server", "monitor"})
_UNSET = float("-inf")


class _Window:
    __slots__ = ("fired", "times")

    def __init__(self, count: int) -> None:
        self.times: collections.deque[float] = collections.deque(maxlen=count)
        self.fired = _UNSET


class _Registered:
    """The monitor's Prometheus series (the security event counter is the server's, not registered here)."""

    def __init__(self, registry: CollectorRegistry, enforcement: Enforcement, monitor: Monitor) -> None:
        from prometheus_client import Counter, Gauge

        self.alerts = Counter("edgeshield_monitor_alerts", "Monitor rules fired", ["rule", "severity"],
                              registry=registry)
        self.responses = Counter("edgeshield_monitor_responses", "Monitor responses run, by outcome",
                                 ["action", "outcome"], registry=registry)
        active = Gauge("edgeshield_monitor_active_responses", "Blocks, throttles, denials and quarantines in force",
                       ["action"], registry=registry)
        for action in LIFTABLE:
            active.labels(action).set_function(functools.partial(enforcement.count, action))
        dropped = Gauge("edgeshield_monitor_dropped", "Monitor work and webhook sends dropped on a full queue",
                        ["queue"], registry=registry)
        dropped.labels("worker").set_function(lambda: monitor.dropped)
        dropped.labels("webhook").set_function(lambda: monitor.webhook_dropped)


class Monitor:
    """Rules over security events, with automated, persisted, reversible responses (see the module docstring)."""

    durable = False

    def __init__(self, rules: RuleSet, store: MonitorStore | None, *,
                 emit: Callable[[SecurityEvent], None] | None = None, webhook: WebhookConfig | None = None,
                 rules_path: str | os.PathLike[str] | None = None,
                 registry: CollectorRegistry | None = None, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.time) -> None:
        self._rules = rules
        self.store = store
        self.rules_path = Path(rules_path) if rules_path is not None else rules.path
        self._emit = emit
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._windows: collections.OrderedDict[tuple[str, str], _Window] = collections.OrderedDict()
        self._alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ALERTS)
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._pending: dict[str, dict[str, Any]] = {}  # revocation requests, when there is no store
        self.enforcement = Enforcement(clock)
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=MAX_QUEUE)
        self._worker: threading.Thread | None = None
        self.on_deny: Callable[[frozenset[int]], object] | None = None
        self.on_lift: Callable[[str, str], object] | None = None
        self.on_reload: Callable[[], object] | None = None
        self.events = self.alerts = self.responses_ok = self.responses_failed = self.dropped = 0
        self._sender = WebhookSender(webhook, self._webhook_result) if webhook is not None else None
        if store is not None:
            for r in store.active_responses(clock()):
                self.enforcement.apply(r)
            self._alerts.extend(store.recent_alerts(RECENT_ALERTS))
        self._metrics = _Registered(registry, self.enforcement, self) if registry is not None else None

    @property
    def rules(self) -> RuleSet:
        return self._rules

    @property
    def webhook_dropped(self) -> int:
        return self._sender.dropped if self._sender is not None else 0

    # --- life cycle ---
    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="edgeshield-monitor", daemon=True)
            self._worker.start()
            if self._sender is not None:
                self._sender.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the queued work (records, audit events) and the webhook sends it makes, each up to ``timeout_s``."""
        self.flush(timeout_s)  # alert jobs hand their sends to the webhook sender ...
        if self._sender is not None:
            self._sender.stop(timeout_s)  # ... whose outcomes come back to the worker as monitor.response jobs
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                self._jobs.put(None, timeout=timeout_s)
            except queue.Full:
                log.error("monitor queue still full at shutdown; its last records are lost")
            worker.join(timeout_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the work queued so far is done (tests, shutdown); False if it did not finish in time."""
        if self._worker is None:
            return self._jobs.empty()
        if threading.current_thread() is self._worker:
            return False  # the worker cannot wait for itself
        done = threading.Event()
        try:
            self._jobs.put(done.set, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                job = self._sweep
            if job is None:
                self._sweep()
                return
            try:
                job()
            except Exception:  # one bad job must not stop the monitor
                log.exception("monitor job failed")

    def _queue(self, job: Callable[[], None]) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.dropped += 1

    def _publish(self, kind: str, actor: str, data: dict[str, Any]) -> None:
        if self._emit is not None:
            self._emit(SecurityEvent(kind, actor, data, source="monitor"))

    def _sweep(self) -> None:
        """Blocks, throttles and denials with a duration end on their own; record when they did."""
        for r in self.enforcement.expire():
            if self.store is not None:
                self.store.lift_response(r.action, r.target, "expired", self._clock())
            self._publish("monitor.lifted", "monitor", {"action": r.action, "target": r.target, "by": "expired"})

    # --- the subscriber ---
    def handle(self, event: SecurityEvent) -> None:
        self.events += 1
        if event.kind not in _ROUTINE:
            self._recent.append({"ts": event.ts, "kind": event.kind, "actor": event.actor, "address": event.address,
                                 "summary": _summary(event)})
        rules = self._rules.by_kind.get(event.kind)
        if not rules:
            return
        now = self._clock()
        for rule in rules:
            if not all(f.matches(_field(event, f.field)) for f in rule.condition.where):
                continue
            key = _key(rule, event)
            if key is None:
                continue
            count = self._count(rule, key, now)
            if count:
                self._fire(rule, key, event, count, now)

    def _count(self, rule: Rule, key: str, now: float) -> int:
        """Add one event to the rule's window for ``key``; the count when the rule fires now, else 0."""
        c = rule.condition
        with self._lock:
            w = self._windows.get((rule.name, key))
            if w is None:
                w = self._windows[(rule.name, key)] = _Window(c.count)
                if len(self._windows) > self._max_keys:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end((rule.name, key))
            if now - w.fired < rule.cooldown_s:
                return 0
            w.times.append(now)
            if len(w.times) < c.count or now - w.times[0] > c.window_s:
                return 0
            w.fired = now
            w.times.clear()
            return c.count

    def _fire(self, rule: Rule, key: str, event: SecurityEvent, count: int, now: float) -> None:
        values = {"rule": rule.name, "key": key, "count": count, "window_s": rule.condition.window_s,
                  "actor": event.actor, "address": event.address or "-",
                  "serial": f"{event.serial:x}" if event.serial is not None else "-", "kind": event.kind,
                  "severity": rule.severity, "desc": rule.desc, "source": event.source}
        try:
            output = rule.render(values)
        except (ValueError, TypeError, KeyError, IndexError):
            output = f"{rule.name}: {key}"
        alert = {"ts": now, "rule": rule.name, "severity": rule.severity, "key": key, "count": count,
                 "output": output, "tags": list(rule.tags)}
        self._alerts.append(alert)
        self.alerts += 1
        if self._metrics is not None:
            self._metrics.alerts.labels(rule.name, rule.severity).inc()
        for resp in rule.responses:
            if resp.action == "alert":
                self._queue(functools.partial(self._alert_job, rule, alert, resp, event))
            elif resp.action == "reload":
                self._queue(lambda: self._reload_job(rule))
            else:
                self._enforce(rule, resp, key, event, output, now)

    def _enforce(self, rule: Rule, resp: Response, key: str, event: SecurityEvent, reason: str, now: float) -> None:
        try:
            r = self._response_for(rule, resp, key, event, reason, now)
        except _CannotRespond as exc:
            error = str(exc)
            self._queue(lambda: self._outcome(rule.name, resp.action, None, None, error))
            return
        self.enforcement.apply(r)  # in force from this instant: the next request is refused
        identity = event.actor if event.actor not in _NOT_IDENTITIES else "-"
        self._queue(lambda: self._persist_job(r, identity))

    def _response_for(self, rule: Rule, resp: Response, key: str, event: SecurityEvent, reason: str,
                      now: float) -> ActiveResponse:
        until = now + resp.duration_s if resp.duration_s is not None else None
        if resp.action in ("block", "throttle"):
            if resp.target == "address":
                if not event.address:
                    raise _CannotRespond("the event has no address")
                target = f"address:{normalize_address(event.address)}"
            else:
                if event.actor in _NOT_IDENTITIES:
                    raise _CannotRespond(f"no client identity to {resp.action} ({event.actor or 'none'})")
                target = f"identity:{event.actor}"
            params = {"rate": resp.rate, "burst": resp.burst} if resp.action == "throttle" else {}
            return ActiveResponse(resp.action, target, rule.name, now, until, reason, params)
        if resp.action == "deny_cert":
            serial = event.serial if event.serial is not None else _int(event.data.get("serial"))
            if serial is None and key.startswith("serial:"):
                serial = int(key.removeprefix("serial:"), 16)
            if serial is None:
                raise _CannotRespond("the event carries no certificate serial")
            return ActiveResponse("deny_cert", f"serial:{serial:x}", rule.name, now, None, reason)
        role = resp.role or event.data.get("role")
        if role not in QUARANTINE_ROLES:
            raise _CannotRespond(f"nothing to quarantine: file role {str(role)[:40]!r} is not bundle or detector")
        return ActiveResponse("quarantine", f"file:{role}", rule.name, now, None, reason)

    # --- worker jobs ---
    def _alert_job(self, rule: Rule, alert: dict[str, Any], resp: Response, event: SecurityEvent) -> None:
        if self.store is not None:
            self.store.add_alert(alert)
        if resp.stderr:
            log.warning("monitor alert %s", json.dumps(alert, sort_keys=True))
        if resp.audit:
            self._publish("monitor.alert", "monitor", {"rule": rule.name, "severity": rule.severity,
                                                       "key": alert["key"], "count": alert["count"],
                                                       "window_s": rule.condition.window_s, "tags": alert["tags"],
                                                       "output": alert["output"]})
        self._counted("alert", True)
        if resp.webhook and self._sender is not None:
            payload = {"source": "edgeshield", "kind": "monitor.alert", "alert": alert,
                       "labels": {"alertname": rule.name, "severity": rule.severity},
                       "annotations": {"summary": alert["output"], "description": rule.desc,
                                       "runbook": rule.runbook or ""},
                       "event": {"kind": event.kind, "actor": event.actor, "address": event.address}}
            if not self._sender.submit(payload):
                self._outcome(rule.name, "webhook", None, None, "webhook queue full: alert dropped")

    def _persist_job(self, r: ActiveResponse, identity: str) -> None:
        try:
            if r.action == "deny_cert" and self.on_deny is not None:
                self.on_deny(self.enforcement.denied_serials())
            if self.store is not None:
                self.store.put_response(r)
                if r.action == "deny_cert":
                    self.store.request_revocation(r.target.removeprefix("serial:"), identity, r.rule, r.since,
                                                  r.reason)
            elif r.action == "deny_cert":
                self._pending[r.target] = {"serial": r.target.removeprefix("serial:"), "identity": identity,
                                           "rule": r.rule, "since": r.since}
        except Exception as exc:  # in force in memory even so; say that it could not be kept
            log.exception("monitor could not record %s %s", r.action, r.target)
            self._outcome(r.rule, r.action, r.target, r.until, f"in force, not persisted: {type(exc).__name__}")
            return
        self._outcome(r.rule, r.action, r.target, r.until, None)

    def _reload_job(self, rule: Rule) -> None:
        try:
            self.reload(f"rule:{rule.name}")
        except EdgeShieldError as exc:
            self._outcome(rule.name, "reload", None, None, str(exc)[:300])
            return
        self._outcome(rule.name, "reload", None, None, None)

    def _webhook_result(self, payload: Mapping[str, Any], ok: bool, error: str | None) -> None:
        rule = str(payload.get("labels", {}).get("alertname", "-"))
        self._queue(lambda: self._outcome(rule, "webhook", None, None, error if not ok else None))

    def _outcome(self, rule: str, action: str, target: str | None, until: float | None, error: str | None) -> None:
        self._counted(action, error is None)
        self._publish("monitor.response", "monitor", {"rule": rule, "action": action, "target": target,
                                                      "ok": error is None, "error": error, "until": until})

    def _counted(self, action: str, ok: bool) -> None:
        if ok:
            self.responses_ok += 1
        else:
            self.responses_failed += 1
        if self._metrics is not None:
            self._metrics.responses.labels(action, "ok" if ok else "failed").inc()

    # --- enforcement, per request and connection ---
    def refusal(self, identity: str | None, serial: int | None, address: str | None) -> Refusal | None:
        """Why to refuse this request now (a denied certificate, a block, an exhausted throttle), or None."""
        return self.enforcement.refusal(identity, serial, address)

    def address_refused(self, address: str) -> str | None:
        """Before TLS: the reason when ``address`` is blocked, else None."""
        return self.enforcement.address_refused(address)

    def quarantined(self) -> str | None:
        """The reason predictions must be refused (503) while the bundle or detector is quarantined, else None."""
        return self.enforcement.quarantined()

    def denied_serials(self) -> frozenset[int]:
        return self.enforcement.denied_serials()

    # --- admin ---
    def lift(self, action: str, target: str, by: str) -> bool:
        """Lift a block, throttle, denial (and its pending revocation request) or quarantine; True if one was in
        force. Writes SQLite and emits ``monitor.lifted`` (audited): call it from a worker thread, not the loop."""
        target = check_target(action, target)
        self.flush()  # a response still being recorded is recorded first, so the lift below reaches its row
        now = self._clock()
        removed = self.enforcement.lift(action, target)
        stored = self.store.lift_response(action, target, by, now) if self.store is not None else False
        if action == "deny_cert":
            serial = target.removeprefix("serial:")
            if self.store is not None:
                stored = self.store.cancel_revocation(serial, by, now) or stored
            stored = self._pending.pop(target, None) is not None or stored
        if removed is None and not stored:
            return False
        with self._lock:  # the client starts afresh: a new burst fires again without waiting out the cooldown
            for (_name, key), w in self._windows.items():
                if key == target:
                    w.fired = _UNSET
                    w.times.clear()
        if self.on_lift is not None:
            try:
                self.on_lift(action, target)
            except Exception:  # the lead's hook (extraction reset); the lift itself stands
                log.exception("on_lift hook failed for %s %s", action, target)
        self._publish("monitor.lifted", by, {"action": action, "target": target, "by": by})
        return True

    def reload(self, by: str) -> dict[str, Any]:
        """Re-read the rule file (validated first: a bad file keeps the old rules and raises RuleFileError), run
        ``on_reload`` (the RBAC policy), emit ``monitor.reload``. Blocking: call it from a worker thread."""
        new = load_rules(self.rules_path)
        if self.on_reload is not None:
            self.on_reload()
        with self._lock:
            self._rules = new
            self._windows.clear()
        info = {"rules": len(new), "rules_sha256": new.sha256, "by": by}
        self._publish("monitor.reload", by, info)
        return {**info, "path": str(self.rules_path) if self.rules_path is not None else None}

    def snapshot(self) -> dict[str, Any]:
        """Alerts (newest first), responses in force, pending revocation requests, rules, recent events, counters."""
        pending = self.store.pending_revocations() if self.store is not None else list(self._pending.values())
        return {
            "alerts": list(reversed(self._alerts)),
            "responses": [r.to_dict() for r in self.enforcement.active()],
            "pending_revocations": [{k: p[k] for k in ("serial", "identity", "rule", "since")} for p in pending],
            "rules": [{"name": r.name, "severity": r.severity, "enabled": r.enabled,
                       "responses": [x.action for x in r.responses]} for r in self._rules.rules],
            "recent_events": list(reversed(self._recent)),
            "counters": {"events": self.events, "alerts": self.alerts, "responses_ok": self.responses_ok,
                         "responses_failed": self.responses_failed, "dropped": self.dropped + self.webhook_dropped},
        }


class _CannotRespond(Exception):
    pass


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def _field(event: SecurityEvent, name: str) -> Any:
    if name == "actor":
        return event.actor
    if name == "address":
        return event.address
    if name == "serial":
        return event.serial
    if name == "source":
        return event.source
    return event.data.get(name)


def _key(rule: Rule, event: SecurityEvent) -> str | None:
    g = rule.condition.group_by
    if g == "actor":
        return f"identity:{event.actor}"
    if g == "address":
        return f"address:{normalize_address(event.address)}" if event.address else None
    if g == "serial":
        serial = event.serial if event.serial is not None else _int(event.data.get("serial"))
        return f"serial:{serial:x}" if serial is not None else None
    return "all"


def _summary(event: SecurityEvent) -> str:
    parts = []
    for k in event.info.fields or tuple(event.data)[:6]:
        v = event.data.get(k)
        if v is None or k.endswith("sha256"):
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        parts.append(f"{k}={' '.join(text.split())[:60]}")
    return ", ".join(parts)[:200]
