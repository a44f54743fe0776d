"""The operations side of ``serve``: the security monitor and its event sources, started beside the server.

:func:`start_operations` subscribes the rule engine (``edgeshield.monitor.Monitor``) to the server's event stream,
starts the watchers that feed it (file digests, resources, per-client request rates), the optional local event
endpoint for other processes, and the retention purge, and registers each one's stop with the server's shutdown.
``make_server`` then connects the monitor's responses to the listener (address blocks before TLS, live connections
of denied certificates closed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshield.monitor import SecurityEvent

if TYPE_CHECKING:
    from edgeshield.monitor import EventStream, FileWatcher, RuleSet
    from edgeshield.server._app import ServerState
    from edgeshield.server._model import ServedModel
    from edgeshield.server._rbac import Rbac
    from edgeshield.server._serve import ServeConfig

log = logging.getLogger("edgeshield.monitor")
RETENTION_EVERY_S = 6 * 3600.0


class BackgroundPublisher:
    """Hands events to a worker thread that publishes them: for sources called on the event loop (the rate-anomaly
    subscriber), whose events must still reach the audit log without an fsync on the loop. Bounded: when the queue
    is full the event is dropped and counted (``dropped``), never waited for."""

    def __init__(self, stream: EventStream, maxsize: int = 10_000) -> None:
        self.stream, self.dropped = stream, 0
        self._queue: queue.Queue[SecurityEvent | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name="edgeshield-event-publisher", daemon=True)
        self._thread.start()

    def __call__(self, event: SecurityEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                self.stream.publish(event)
            except Exception:  # keep publishing the rest
                log.exception("could not publish a %s event", event.kind)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


class RetentionPurge(threading.Thread):
    """Deletes personal-data records older than the retention period (the served-watermark evidence), at start and
    every ``every_s`` seconds, and says so in the audit log each time (``retention.purged``, counts only)."""

    def __init__(self, state: ServerState, days: float, every_s: float = RETENTION_EVERY_S) -> None:
        super().__init__(name="edgeshield-retention", daemon=True)
        self.state, self.days, self.every_s = state, days, every_s
        self.stop_event = threading.Event()

    def purge_now(self) -> int:
        before = time.time() - self.days * 86400
        stores, records = [], 0
        evidence = self.state.served_evidence
        if evidence is not None:
            stores.append("served-watermark evidence")
            records += evidence.purge_before(before)
        self.state.events.publish(SecurityEvent("retention.purged", "server", {
            "before": round(before, 3), "records": records, "stores": stores, "retention_days": self.days}))
        return records

    def run(self) -> None:
        while True:
            try:
                self.purge_now()
            except Exception:  # the next run tries again; the compliance check sees the gap
                log.exception("retention purge failed")
            if self.stop_event.wait(self.every_s):
                return

    def stop(self) -> None:
        self.stop_event.set()


MODEL_ROLES = ("bundle", "detector")  # the watched files a model reload replaces


class ModelFileWatch:
    """The file watcher, re-made for the new model's files when a reload swaps the model.

    The new watcher's sanctioned digests are those of the files the reload opened (not whatever is on disk when it
    starts), and every other role keeps its sanctioned digest, so an edit to the policy or the rules made before
    the reload is still reported. The reload's ``integrity.accepted`` events name who reloaded, and a quarantine of
    a model file is lifted: the model now served is the verified file on disk. An edit after the reload is an
    ``integrity.changed`` against the new digest, and ``bundle_changed`` quarantines as before.
    """

    def __init__(self, watcher: FileWatcher, make: Callable[[dict[str, Path], dict[str, str]], FileWatcher],
                 state: ServerState) -> None:
        self.current, self._make, self.state = watcher, make, state
        self._lock = threading.Lock()

    def swapped(self, _old: ServedModel, new: ServedModel, by: str) -> None:
        with self._lock:
            old_watcher = self.current
            files = {r: p for r, p in old_watcher.paths().items() if r not in MODEL_ROLES}
            expected = {r: d for r, d in old_watcher.digests().items() if r in files}
            files.update(new.files)
            expected.update({r: new.digests[r] for r in new.files})
            fresh = self._make(files, expected)
            old_watcher.stop()
            fresh.start()
            self.current = fresh
        for role, path in new.files.items():
            self.state.events.publish(SecurityEvent("integrity.accepted", by, {
                "role": role, "path": str(path), "sha256": new.digests[role]}, source="watcher"))
        monitor = self.state.security_monitor
        if monitor is not None:
            for role in MODEL_ROLES:
                monitor.lift("quarantine", f"file:{role}", by)

    def accept(self, by: str) -> None:
        self.current.accept(by=by)

    def stop(self) -> None:
        self.current.stop()


def start_operations(cfg: ServeConfig, state: ServerState, rules: RuleSet, rbac: Rbac) -> None:
    """Subscribe the monitor and start its sources; every stop is added to ``state.on_shutdown``."""
    from edgeshield.monitor import FileWatcher, Monitor, MonitorStore, RateAnomaly, ResourceWatcher, WebhookConfig

    stream = state.events
    webhook = None
    if cfg.webhook_url is not None:
        webhook = WebhookConfig.from_env(cfg.webhook_url, cfg.webhook_token_env, ca=cfg.webhook_ca)
    store = MonitorStore(cfg.monitor_db or cfg.audit_db.with_name(cfg.audit_db.name + ".monitor"))
    monitor = Monitor(rules, store, emit=stream.publish, webhook=webhook, rules_path=cfg.monitor_rules,
                      registry=state.metrics.registry if state.metrics is not None else None)
    state.security_monitor = monitor

    served = state.model
    # the files the model was opened from (an update slot's, with --update-dir), the policy, rules and config
    files: dict[str, Path] = {**served.files, "policy": rbac.policy_path}
    if cfg.monitor_rules is not None:
        files["rules"] = cfg.monitor_rules
    if cfg.config_file is not None:
        files["config"] = cfg.config_file

    def make(files: dict[str, Path], expected: dict[str, str]) -> FileWatcher:
        return FileWatcher(files, stream.publish, cfg.watch_interval_s, expected=expected)

    # the digests of what the server actually opened: a file changed between loading and watching is reported
    watcher = ModelFileWatch(make(files, {r: d for r, d in served.digests.items() if r in files}), make, state)
    state.on_model_swap.append(watcher.swapped)
    resources = ResourceWatcher(stream.publish, disk_path=cfg.audit_db.parent, interval_s=cfg.resource_interval_s)
    background = BackgroundPublisher(stream)
    rates = RateAnomaly(background)

    def lifted(action: str, target: str) -> None:
        kind, _, name = target.partition(":")
        if action == "block" and kind == "identity" and state.monitor is not None:
            state.monitor.reset(name)  # the extraction monitor's own verdict for that client starts over

    def reloaded() -> None:
        rbac.reload()
        watcher.accept(by="monitor reload")  # the files as they are now are the sanctioned ones

    monitor.on_lift, monitor.on_reload = lifted, reloaded
    stream.subscribe(monitor)
    stream.subscribe(rates)
    monitor.start()
    watcher.current.start()
    resources.start()
    stops = [watcher.stop, resources.stop, background.stop]
    if cfg.events_socket is not None:
        from edgeshield.monitor import EventEndpoint

        endpoint = EventEndpoint(cfg.events_socket, stream.publish)
        endpoint.run_in_thread()
        stops.insert(0, endpoint.close)
    if cfg.retention_days is not None:
        purge = RetentionPurge(state, cfg.retention_days)
        purge.start()
        stops.append(purge.stop)
    state.compliance_summary = _compliance_summary(cfg, state)
    # Stopped before the audit subscriber flushes and the log is checkpointed: their last events are still written.
    state.on_shutdown.extend([*stops, monitor.stop])


def _compliance_summary(cfg: ServeConfig, state: ServerState) -> Callable[[], dict[str, Any]]:
    """For the status page: the compliance summary of this deployment, assessed from its evidence when called
    (the page calls it in a worker thread, throttled, since it verifies the audit log)."""

    def summary() -> dict[str, Any]:
        from edgeshield.compliance import Deployment, assess

        if cfg.config_file is not None:
            deployment = Deployment.from_toml(cfg.config_file)
        else:
            deployment = Deployment(
                bundle=state.model.files.get("bundle", cfg.bundle), owner_key=cfg.owner_key,
                device_key=cfg.device_key, ca=Path(cfg.ca), crl=cfg.crl,
                cert=cfg.cert, key=cfg.key, audit_db=cfg.audit_db, audit_key=cfg.audit_key, policy=cfg.policy,
                host=cfg.host, port=cfg.port, served_watermark_evidence=cfg.served_watermark_evidence,
                witness=cfg.witness_url, witness_note=cfg.witness_note, crl_expired=cfg.crl_expired,
                retention_days=cfg.retention_days, subject_header=cfg.subject_header,
                subject_keys=cfg.subject_keys, monitor=cfg.monitor, monitor_db=cfg.monitor_db,
                monitor_rules=cfg.monitor_rules)
        report = assess(deployment)
        return {"regulations": report.summary, "generated": time.time()}

    return summary
