"""Security monitoring: one event stream, rules over it, automated responses an admin can reverse.

The runtime half of operations; everything here runs on the device with the core install (numpy, onnxruntime,
cryptography, the server stack, pyyaml and psutil).

- :class:`EventStream` / :class:`SecurityEvent`: the stream every part emits onto (``_events``; kinds in
  :data:`KINDS`), with the audit log and the metrics as subscribers (``_subscribers``).
- :class:`Monitor`: Falco-like rules (:func:`load_rules`, ``rules/default.yaml``) over the stream, and the responses
  they trigger (alert, block, throttle, deny a certificate, quarantine, reload), persisted in a
  :class:`MonitorStore` and lifted by an admin.
- Its own sources: :class:`FileWatcher`, :class:`ResourceWatcher`, :class:`RateAnomaly`; other processes feed it
  through the local :class:`EventEndpoint` (:func:`send_events`) or the audit log they write
  (:class:`AuditLogFollower`).
"""

from edgeshield.monitor._endpoint import EventEndpoint, send_events
from edgeshield.monitor._engine import Monitor
from edgeshield.monitor._events import KINDS, EventKind, EventStream, SecurityEvent, Subscriber, declare
from edgeshield.monitor._follow import AuditLogFollower
from edgeshield.monitor._responses import Refusal, WebhookConfig
from edgeshield.monitor._rules import RuleFileError, RuleSet, load_rules
from edgeshield.monitor._store import MonitorStore
from edgeshield.monitor._watchers import FileWatcher, RateAnomaly, ResourceThresholds, ResourceWatcher

__all__ = [
    "KINDS", "AuditLogFollower", "EventEndpoint", "EventKind", "EventStream", "FileWatcher", "Monitor",
    "MonitorStore", "RateAnomaly", "Refusal", "ResourceThresholds", "ResourceWatcher", "RuleFileError", "RuleSet",
    "SecurityEvent", "Subscriber", "WebhookConfig", "declare", "load_rules", "send_events",
]
