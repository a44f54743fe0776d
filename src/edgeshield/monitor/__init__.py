"""Security monitoring: one event stream, rules over it, automated responses an admin can reverse.

The runtime half of operations: everything here runs on the device (numpy-free, no extras).
"""

from edgeshield.monitor._events import KINDS, EventKind, EventStream, SecurityEvent, Subscriber, declare

__all__ = ["KINDS", "EventKind", "EventStream", "SecurityEvent", "Subscriber", "declare"]
