"""The other way in: follow another process's EdgeShield audit log and feed its entries to this monitor.

A process that already writes an :class:`~edgeshield.audit.AuditLog` (a second server, the FL server, the updater)
needs no socket: point an :class:`AuditLogFollower` at its log. The log is opened read-only (SQLite ``mode=ro``; the
follower never writes it) and polled; each new entry becomes a :class:`SecurityEvent` of the same kind, with source
``auditlog:<file name>``. The follower checks that each new entry chains onto the last one it saw, so a log cut back,
rewritten or swapped underneath it is reported (``external.event`` with ``original_kind`` ``audit.discontinuity``)
rather than silently followed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from edgeshield._io import atomic_write_bytes
from edgeshield.audit import AuditLog, Entry
from edgeshield.audit._format import MAX_DATA_BYTES, canonical_json, chain_hash
from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor._events import KINDS, SecurityEvent
from edgeshield.monitor._watchers import _Poller, _positive

log = logging.getLogger("edgeshield.monitor")

_MARGIN = 256  # room the audit subscriber may need beside the data when it writes the event


def _epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except (TypeError, ValueError):
        return time.time()


class AuditLogFollower(_Poller):
    """Tails the audit log at ``db_path`` and emits its new entries (every ``interval_s``, on a daemon thread).

    ``start``: ``"end"`` follows only entries appended from now on, ``"beginning"`` replays the whole log first.
    With ``position_file`` the next entry to read (and the hash of the last one read) survive a restart; a position
    that no longer matches the log (cut back or replaced) is reported and following restarts as ``start`` says.
    Kinds this build does not declare arrive as ``external.event`` with the ``original_kind``, and so do the other
    log's ``monitor.*`` kinds (another monitor's decisions are not this one's); the log's own ``audit.*`` entries
    (checkpoints) are skipped. Delivery is at least once: an entry whose ``emit`` raised is retried next poll.
    Pass the server's own log as ``own_log``: following it would feed every event back to itself.
    """

    _name = "edgeshield-audit-follower"

    def __init__(self, db_path: str | os.PathLike[str], emit: Callable[[SecurityEvent], None], *,
                 interval_s: float = 1.0, start: Literal["end", "beginning"] = "end",
                 position_file: str | os.PathLike[str] | None = None, own_log: str | os.PathLike[str] | None = None,
                 max_per_poll: int = 10_000) -> None:
        super().__init__()
        if start not in ("end", "beginning"):
            raise InvalidArgumentError(f"start must be 'end' or 'beginning', got {start!r}")
        if isinstance(max_per_poll, bool) or not isinstance(max_per_poll, int) or max_per_poll < 1:
            raise InvalidArgumentError(f"max_per_poll must be a whole number >= 1, got {max_per_poll!r}")
        self.db_path = Path(db_path)
        self.interval_s = _positive("interval_s", interval_s)
        self.start_at = start
        self.position_file = Path(position_file) if position_file is not None else None
        self.own_log = Path(own_log) if own_log is not None else None
        self.max_per_poll = max_per_poll
        self.source = f"auditlog:{self.db_path.name}"
        self._emit = emit
        self._lock = threading.Lock()
        self._log: AuditLog | None = None
        self._next: int | None = None  # seq of the next entry to emit
        self._last_hash: bytes | None = None  # entry_hash of entry _next - 1, when known
        self._resumed = False
        self.emitted = 0
        self.discontinuities = 0
        self._check_not_own()
        self._load_position()

    def _check_not_own(self) -> None:
        if self.own_log is not None and self.db_path.exists() and self.own_log.exists() and os.path.samefile(
                self.db_path, self.own_log):
            raise InvalidArgumentError(f"{self.db_path} is this server's own audit log: following it would feed "
                                       "every event back into it")

    # -- position --
    def _load_position(self) -> None:
        if self.position_file is None or not self.position_file.exists():
            return
        try:
            saved = json.loads(self.position_file.read_bytes())
            if saved.get("db") != str(self.db_path.resolve()):
                return  # a position for another log
            nxt, last = saved["next_seq"], saved.get("last_hash")
            if isinstance(nxt, bool) or not isinstance(nxt, int) or nxt < 0:
                raise ValueError("next_seq")
            self._next, self._last_hash = nxt, bytes.fromhex(last) if last else None
            self._resumed = True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring unreadable follower position file %s", self.position_file)

    def _save_position(self) -> None:
        if self.position_file is None or self._next is None:
            return
        body = {"db": str(self.db_path.resolve()), "next_seq": self._next,
                "last_hash": self._last_hash.hex() if self._last_hash is not None else None}
        atomic_write_bytes(self.position_file, json.dumps(body).encode(), mode=0o600)

    def position(self) -> int | None:
        """Seq of the next entry to be emitted (None before the log was first opened)."""
        return self._next

    # -- polling --
    def _poll(self) -> None:
        self.poll_now()

    def poll_now(self) -> int:
        """Emit what was appended since the last poll (at most ``max_per_poll``); returns how many events."""
        with self._lock:
            if self._log is None:
                if not self.db_path.exists():
                    return 0  # the other process has not created it yet
                self._check_not_own()
                self._log = AuditLog(self.db_path, readonly=True)
            before = (self._next, self._last_hash)
            try:
                return self._follow(self._log)
            finally:  # also after an emit that raised: what was delivered stays delivered
                if (self._next, self._last_hash) != before:
                    self._save_position()

    def _hash_at(self, audit: AuditLog, seq: int) -> bytes | None:
        if seq < 0:
            return None
        entry = next(audit.entries(seq, seq + 1), None)
        return entry.entry_hash if entry is not None else None

    def _restart(self, audit: AuditLog, size: int) -> None:
        self._next = size if self.start_at == "end" else 0
        self._last_hash = self._hash_at(audit, self._next - 1)

    def _follow(self, audit: AuditLog) -> int:
        size = len(audit)
        if self._next is None:
            self._restart(audit, size)
        elif self._resumed:  # does the saved position still describe this log?
            if self._next > size or (self._last_hash is not None
                                     and self._hash_at(audit, self._next - 1) != self._last_hash):
                self._discontinuity("replaced" if self._next <= size else "truncated", self._next)
                self._restart(audit, size)
        elif self._next > size:
            self._discontinuity("truncated", self._next)
            self._restart(audit, size)
        self._resumed = False
        count, start = 0, self._next or 0
        for entry in audit.entries(start, min(size, start + self.max_per_poll)):
            intact = chain_hash(entry.prev_hash, entry.leaf()) == entry.entry_hash
            if not intact or (self._last_hash is not None and entry.prev_hash != self._last_hash):
                self._discontinuity("rewritten", entry.seq)
            if not entry.kind.startswith("audit."):
                self._emit(self._event(entry))  # raises: stop here, retry this entry next poll
                count += 1
                self.emitted += 1
            self._next, self._last_hash = entry.seq + 1, entry.entry_hash
        return count

    def _discontinuity(self, reason: str, seq: int) -> None:
        self.discontinuities += 1
        log.warning("followed audit log %s: %s at entry %d", self.db_path, reason, seq)
        self._emit(SecurityEvent("external.event", self.source, {
            "original_kind": "audit.discontinuity", "reason": reason, "seq": seq, "log": str(self.db_path)},
            source=self.source))

    def _event(self, entry: Entry) -> SecurityEvent:
        info = KINDS.get(entry.kind)
        data: dict[str, Any]
        if info is None or info.source == "monitor":
            kind, data = "external.event", {"original_kind": entry.kind, "origin_seq": entry.seq, "data": entry.data}
        else:
            kind, data = entry.kind, {**entry.data, "origin_seq": entry.seq}
        if len(canonical_json(data)) > MAX_DATA_BYTES - _MARGIN:  # the original was near the audit limit
            data = {"original_kind": entry.kind, "origin_seq": entry.seq, "data_truncated": True,
                    "data_sha256": hashlib.sha256(canonical_json(entry.data).encode()).hexdigest()}
        return SecurityEvent(kind, entry.actor, data, ts=_epoch(entry.ts), source=self.source)

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
