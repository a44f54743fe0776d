"""One in-process stream of typed security events; the audit log, the metrics and the monitor subscribe to it.

Every part of the device that sees something security-relevant — the request pipeline's stages, the security
middleware, the TLS listener, the CRL watcher, the file and resource watchers, and (through the local event
endpoint, ``_endpoint``) other processes — emits a :class:`SecurityEvent`. Subscribers are small objects with one
method; adding one never means editing the code that emits.

Two kinds of subscriber:

- *durable* ones (the audit log) are waited for: ``await stream.emit(event)`` returns only once each has handled
  the event, so a request is answered only after its audit entry is committed. From the event loop their work runs
  in a worker thread (an fsync must not stall the loop).
- *immediate* ones (metrics, the monitor) are called inline and must be quick and thread-safe; anything slow they
  do (a webhook, a SQLite write) they hand to their own worker. An exception in one is logged and swallowed: a bug in
  the monitor must never fail a request.

Every kind is declared in :data:`KINDS` with its audit treatment: ``"entry"`` (one audit entry each), ``"aggregate"``
(counted and written as one entry per second — failed TLS handshakes and refused connections, which unauthenticated
peers can cause at line rate) or ``"none"`` (watch-only: metrics and rules see it, the log does not). An emitted kind
that is not declared is a bug (``ValueError``); a rule that names one is refused when the rule file loads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

log = logging.getLogger("edgeshield.monitor")

AuditTreatment = Literal["entry", "aggregate", "none"]


@dataclass(frozen=True, slots=True)
class EventKind:
    """A declared event kind: what it means, how the audit log treats it, and the fields its data may carry."""

    name: str
    description: str
    audit: AuditTreatment = "entry"
    fields: tuple[str, ...] = ()
    source: str = "server"  # who emits it: server, watcher, or an external process (fl, keyrelease, updater)


def _kinds(*kinds: EventKind) -> dict[str, EventKind]:
    return {k.name: k for k in kinds}


# The catalogue. Names are the audit log's entry kinds, so an audit entry and the event it came from share a name.
_KINDS: dict[str, EventKind] = _kinds(
    # server life cycle and configuration
    EventKind("server.startup", "the server started (bundle and detector digests, listen address)"),
    EventKind("server.shutdown", "graceful shutdown began"),
    EventKind("server.recovered", "entries a crash left without a checkpoint are now covered"),
    EventKind("server.error", "an unexpected exception, contained and answered 500", fields=("path", "method",
                                                                                                "error")),
    EventKind("server.busy", "refused 503: a connection or in-flight cap", fields=("status", "reason", "limit")),
    EventKind("model.load", "the bundle was opened into ONNX Runtime", fields=("bundle_id", "model_sha256")),
    EventKind("model.reload", "the served model was reloaded (SIGHUP or the admin API): verified, opened, swapped",
              fields=("by", "old", "new")),
    EventKind("model.reload_failed", "a model reload was refused; the old model keeps serving",
              fields=("by", "reason", "error", "bundle_id")),
    EventKind("licence.expired", "the licence of the released key the model was opened with expired (wall clock "
              "or TPM clock); predictions answer 451", fields=("bundle_id", "reason", "licence")),
    EventKind("licence.refused", "a prediction refused 451: the model's licence has expired",
              fields=("input_sha256", "bundle_id", "status")),
    EventKind("config.rbac", "the RBAC policy loaded, with its digests", fields=("policy_sha256", "model_sha256")),
    # authentication and authorisation
    EventKind("tls.handshake_failed", "a TLS handshake failed (no or bad client certificate, wrong protocol)",
              audit="aggregate", fields=("reason",)),
    EventKind("connection.rejected", "a connection refused before or during TLS (caps, rates, timeouts, "
              "malformed HTTP, denied address)", audit="aggregate", fields=("reason",)),
    EventKind("auth.failure", "a request refused 401: no identity, or its certificate revoked or denied",
              fields=("status", "path", "reason", "serial", "stage", "count", "reasons")),
    EventKind("auth.forbidden", "RBAC refused a request 403", fields=("status", "role", "path", "method",
                                                                      "serial")),
    EventKind("connection.refused", "aggregate of refused connections (written once a second)",
              fields=("count", "reasons")),
    # request framing
    EventKind("request.not_found", "404: no such endpoint", fields=("status", "path", "method")),
    EventKind("request.method_not_allowed", "405: wrong method", fields=("status", "path", "method")),
    EventKind("request.too_large", "413: body over the limit", fields=("status", "path", "declared")),
    EventKind("request.timeout", "408: body too slow", fields=("status", "path", "timeout_s")),
    # inputs and inference
    EventKind("input.rejected", "an input refused: body, spec or ONNX Runtime", fields=("input_sha256", "reason",
                                                                                        "field", "status")),
    EventKind("input.flagged", "robust inference flagged or rejected inputs of a batch", fields=("input_sha256",
                                                                                                "decisions")),
    EventKind("inference.predict", "a batch answered", fields=("role", "input_sha256", "batch", "decisions",
                                                               "subject")),
    EventKind("inference.timeout", "504: inference over its deadline", fields=("input_sha256", "timeout_s")),
    EventKind("inference.request", "a prediction made outside the server (edgeshield run)"),
    # model extraction
    EventKind("extraction.alert", "the extraction monitor raised its action for a client", fields=("action",
                                                                                                   "reasons")),
    EventKind("extraction.blocked", "a client refused 403: its queries look like extraction", fields=(
        "input_sha256",)),
    EventKind("ratelimit.exceeded", "429: over the client's rate", fields=("role", "batch")),
    EventKind("watermark.served", "inputs answered with the served watermark", fields=("inputs_sha256", "labels",
                                                                                       "subject")),
    # revocation and transparency
    EventKind("crl.reload", "a new CRL was loaded", fields=("crl_number", "revoked", "next_update")),
    EventKind("crl.reload_failed", "a changed CRL could not be loaded", fields=("reason",)),
    EventKind("crl.current", "the CRL is current again", fields=("seconds_left", "policy")),
    EventKind("crl.expiring", "the CRL's nextUpdate is near", fields=("seconds_left", "policy")),
    EventKind("crl.expired", "the CRL's nextUpdate has passed", fields=("seconds_left", "policy")),
    EventKind("witness.cosigned", "a witness cosigned a checkpoint"),
    EventKind("witness.unreachable", "the witness could not be reached (once per outage)"),
    EventKind("witness.inconsistent", "the witness holds a tree this log does not extend"),
    # watchers (the monitor's own sources)
    EventKind("integrity.changed", "a watched file (bundle, detector, policy, config) changed on disk",
              source="watcher", fields=("role", "path", "expected_sha256", "actual_sha256")),
    EventKind("integrity.accepted", "an admin accepted a watched file's new digest", source="watcher",
              fields=("role", "path", "sha256")),
    EventKind("resource.pressure", "CPU, memory, disk or open files over their threshold", source="watcher",
              fields=("resource", "value", "threshold", "unit")),
    EventKind("resource.sample", "a periodic resource reading (watch-only)", audit="none", source="watcher",
              fields=("cpu_percent", "memory_percent", "disk_percent", "open_files", "open_files_limit")),
    EventKind("client.rate_anomaly", "a client's request rate far above its own recent baseline",
              source="watcher", fields=("rate", "baseline", "factor")),
    # the monitor's own decisions
    EventKind("monitor.alert", "a rule fired", source="monitor", fields=("rule", "severity", "key", "count",
                                                                        "window_s", "tags", "output")),
    EventKind("monitor.response", "a response ran (ok or failed)", source="monitor", fields=(
        "rule", "action", "target", "ok", "error", "until")),
    EventKind("monitor.lifted", "an admin lifted a block, denial, throttle or quarantine", source="monitor",
              fields=("action", "target", "by")),
    EventKind("monitor.reload", "the rule file and watched digests were reloaded", source="monitor",
              fields=("rules", "rules_sha256", "by")),
    EventKind("monitor.refused", "a request refused because of a monitor response (a connection from a blocked "
              "address is a connection.rejected event)", source="monitor",
              fields=("action", "rule", "status", "target", "path", "reason")),
    # data subjects and retention (edgeshield.compliance)
    EventKind("subject.erased", "a data subject's records and key were erased", source="compliance",
              fields=("subject_ref", "records", "stores")),
    EventKind("retention.purged", "records older than the retention policy were purged", source="compliance",
              fields=("before", "records", "stores")),
    # other processes, through the local event endpoint (the capabilities that come next)
    EventKind("fl.update_rejected", "the federated-learning server refused a client's update", source="fl",
              fields=("round", "client", "reason")),
    EventKind("privacy.spend", "a differentially private release was charged to a client's privacy budget",
              source="fl", fields=("client", "round", "noise_multiplier", "sampling_rate", "epsilon", "delta",
                                   "budget")),
    EventKind("privacy.budget_exhausted", "a client's privacy budget is spent", source="fl", fields=(
        "client", "epsilon", "delta")),
    EventKind("attestation.failed", "a device failed attestation; its key was not released", source="keyrelease",
              fields=("device", "reason", "step", "bundle_id", "detail")),
    EventKind("attestation.enrolled", "a device's attestation key was enrolled (credential activated under its EK)",
              source="keyrelease", fields=("device", "ek_sha256")),
    EventKind("keyrelease.released", "the release service re-wrapped a bundle's key to an attested device's TPM",
              source="keyrelease", fields=("device", "bundle_id", "licence", "floor")),
    EventKind("update.refused", "the updater refused a model update (rollback, freeze, bad signature)",
              source="updater", fields=("model", "action", "version", "reason", "error")),
    EventKind("update.failed", "an update step failed without a refusal (repository unreachable, timeout)",
              source="updater", fields=("model", "action", "reason", "error")),
    EventKind("update.staged", "the updater downloaded and verified an update (TUF, owner signature, floor)",
              source="updater", fields=("model", "version", "bundle_id", "url")),
    EventKind("update.installed", "an update was installed into the inactive slot, switched to and health-checked",
              source="updater", fields=("model", "version", "bundle_id", "slot", "previous")),
    EventKind("update.committed", "an installed update was committed: the version floor rose to it",
              source="updater", fields=("model", "version", "bundle_id", "previous_floor", "floor")),
    EventKind("update.rolled_back", "the device switched back to its previous slot (never below the floor)",
              source="updater", fields=("model", "version", "bundle_id", "slot", "from_version")),
    EventKind("update.recovered", "after a crash the updater restored a verified model in the current slot",
              source="updater", fields=("model", "actions", "floor")),
    EventKind("external.event", "any other event an external process reports", source="external"),
)
KINDS: Mapping[str, EventKind] = MappingProxyType(_KINDS)  # a read-only view; declare() adds to it


def declare(kind: EventKind) -> None:
    """Add a kind to the catalogue (a plug-in's own events); re-declaring a name is an error."""
    if kind.name in _KINDS:
        raise ValueError(f"event kind {kind.name!r} is already declared")
    _KINDS[kind.name] = kind


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Something security-relevant that happened: the ``kind`` (declared in :data:`KINDS`), who caused it
    (``actor``: an identity's name, ``anonymous`` or ``server``), its ``data`` (metadata only: digests, counts,
    reasons; never a raw input or a secret), the peer ``address`` when one is known, and when."""

    kind: str
    actor: str
    data: Mapping[str, Any] = field(default_factory=dict)
    address: str | None = None
    serial: int | None = None  # the client certificate's serial, when the actor is a verified identity
    ts: float = field(default_factory=time.time)
    source: str = "server"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"undeclared event kind {self.kind!r}")

    @property
    def info(self) -> EventKind:
        return KINDS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "actor": self.actor, "data": dict(self.data), "address": self.address,
                "serial": self.serial, "ts": self.ts, "source": self.source}


class Subscriber(Protocol):
    """Handles events. ``durable`` ones are waited for; the others must be quick and thread-safe. A durable one may
    also offer ``async def handle_async(event)``, which ``emit`` awaits on the loop instead of a thread hop."""

    durable: bool

    def handle(self, event: SecurityEvent) -> None: ...


class EventStream:
    """Fan-out of security events to subscribers; safe to use from the event loop and from any thread."""

    def __init__(self, subscribers: Iterable[Subscriber] = ()) -> None:
        self._durable: tuple[Subscriber, ...] = ()
        self._immediate: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        self.emitted = 0
        for s in subscribers:
            self.subscribe(s)

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:  # tuples swapped whole: emitters iterate a snapshot, never a list being changed
            if subscriber.durable:
                self._durable = (*self._durable, subscriber)
            else:
                self._immediate = (*self._immediate, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._durable = tuple(s for s in self._durable if s is not subscriber)
            self._immediate = tuple(s for s in self._immediate if s is not subscriber)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        return self._durable + self._immediate

    def _notify(self, event: SecurityEvent) -> None:
        self.emitted += 1
        for s in self._immediate:
            try:
                s.handle(event)
            except Exception:  # a watcher's bug must never fail the request that emitted
                log.exception("event subscriber %s failed on %s", type(s).__name__, event.kind)

    def _persist(self, event: SecurityEvent) -> None:
        for s in self._durable:
            s.handle(event)

    async def emit(self, event: SecurityEvent) -> None:
        """From the event loop: immediate subscribers now, then the durable ones, awaited: a subscriber with a
        ``handle_async`` coroutine (the audit log's group commit) on the loop itself, any other in a worker thread."""
        self._notify(event)
        if self._durable and event.info.audit != "none":
            if event.info.audit == "aggregate":
                self._persist(event)  # counting only: cheap, no I/O on the loop
                return
            for s in self._durable:
                handle_async = getattr(s, "handle_async", None)
                if handle_async is not None:
                    await handle_async(event)
                else:
                    await asyncio.to_thread(s.handle, event)

    def publish(self, event: SecurityEvent) -> None:
        """From a thread (a watcher, the CRL poller) or for an ``aggregate`` kind on the loop: synchronously.

        Never call it on the event loop for an ``entry`` kind: its durable subscribers would fsync on the loop.
        """
        self._notify(event)
        if self._durable and event.info.audit != "none":
            self._persist(event)
