"""The stream's standard subscribers: the audit log (durable) and the Prometheus event counter (immediate)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edgeshield.monitor._events import SecurityEvent

log = logging.getLogger("edgeshield.monitor")

# What an aggregated kind becomes in the audit log: (entry kind, fixed data). One entry per interval with the count
# and the count by reason — the entries the server has always written for these.
_AGGREGATES: dict[str, tuple[str, dict[str, Any]]] = {
    "tls.handshake_failed": ("auth.failure", {"stage": "tls-handshake"}),
    "connection.rejected": ("connection.refused", {}),
}


class AuditSink(Protocol):
    def append(self, kind: str, actor: str, data: dict[str, Any]) -> object: ...


class AuditSubscriber:
    """Writes events to the audit log: ``entry`` kinds one committed entry each (the emitter waits for it),
    ``aggregate`` kinds counted by reason and written as one entry per ``interval_s`` by a background thread, so a
    flood of failed handshakes can neither stall the event loop nor grow the log without bound."""

    durable = True

    def __init__(self, sink: AuditSink, interval_s: float = 1.0) -> None:
        self.sink, self.interval_s = sink, interval_s
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, event: SecurityEvent) -> None:
        if event.info.audit == "aggregate":
            reason = str(event.data.get("reason", "unknown"))[:100]
            with self._lock:
                by_reason = self._counts.setdefault(event.kind, {})
                by_reason[reason] = by_reason.get(reason, 0) + 1
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, name="edgeshield-audit-aggregate",
                                                    daemon=True)
                    self._thread.start()
            return
        self.sink.append(event.kind, event.actor, dict(event.data))

    async def handle_async(self, event: SecurityEvent) -> None:
        """An ``entry`` event from the loop: it joins the log's group commit and this returns once it is durable;
        a sink without ``append_async`` is called in a worker thread, as before."""
        if event.info.audit == "aggregate":
            self.handle(event)
            return
        append_async = getattr(self.sink, "append_async", None)
        if append_async is None:
            await asyncio.to_thread(self.sink.append, event.kind, event.actor, dict(event.data))
        else:
            await append_async(event.kind, event.actor, dict(event.data))

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        for kind, by_reason in counts.items():
            entry, fixed = _AGGREGATES.get(kind, (kind, {}))
            self.sink.append(entry, "anonymous", {**fixed, "count": sum(by_reason.values()), "reasons": by_reason})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # keep counting; the next flush retries what it can
                log.exception("aggregated audit entries could not be written")

    def stop(self) -> None:
        """Write what is counted and stop the flush thread (at shutdown, before the checkpoint)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self.flush()


class MetricsSubscriber:
    """``edgeshield_security_events_total{kind}``: every event, by kind (a declared name: bounded label values)."""

    durable = False

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self._events = Counter("edgeshield_security_events", "Security events on the device's event stream, by "
                               "kind", ["kind"], registry=registry)

    def handle(self, event: SecurityEvent) -> None:
        self._events.labels(event.kind).inc()
