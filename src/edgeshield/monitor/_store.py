"""The monitor's memory across restarts: active responses, pending revocation requests, alert history (SQLite).

One file, WAL, created 0600 (its rows name identities and addresses), marked by its ``application_id``. Each write
is one transaction with ``synchronous=FULL``: a kill -9 or a power cut leaves either the whole change or none of it.
Alert history is pruned to the newest :data:`MAX_ALERTS` rows; responses and revocation requests are kept (lifted
ones with who lifted them and when: that is the incident record).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeshield._sqlite import PrivateStore
from edgeshield.errors import InputError

_APPLICATION_ID = 0x45534D4E  # "ESMN": marks the SQLite file as a monitor store
_SCHEMA_VERSION = 1
MAX_ALERTS = 10_000

_SCHEMA = (
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
    ("CREATE TABLE responses (id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL, target TEXT NOT NULL,"
     " rule TEXT NOT NULL, since REAL NOT NULL, until REAL, reason TEXT NOT NULL, params TEXT NOT NULL,"
     " lifted_at REAL, lifted_by TEXT)"),
    "CREATE INDEX responses_open ON responses (action, target) WHERE lifted_at IS NULL",
    ("CREATE TABLE revocations (serial TEXT PRIMARY KEY, identity TEXT NOT NULL, rule TEXT NOT NULL,"
     " since REAL NOT NULL, reason TEXT NOT NULL, cancelled_at REAL, cancelled_by TEXT)"),
    ("CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rule TEXT NOT NULL,"
     " severity TEXT NOT NULL, key TEXT NOT NULL, count INTEGER NOT NULL, output TEXT NOT NULL, tags TEXT NOT NULL)"),
)


class NotAMonitorStoreError(InputError):
    """The file is not an EdgeShield monitor database."""


@dataclass(frozen=True, slots=True)
class ActiveResponse:
    """A response in force: ``action`` on ``target`` (``identity:NAME``, ``address:IP``, ``serial:HEX``,
    ``file:ROLE``), by ``rule``, from ``since`` until ``until`` (None: until lifted)."""

    action: str
    target: str
    rule: str
    since: float
    until: float | None
    reason: str
    params: Mapping[str, Any] = field(default_factory=dict)  # throttle: rate, burst

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "rule": self.rule, "since": self.since,
                "until": self.until, "reason": self.reason}


class MonitorStore(PrivateStore):
    """Blocks, throttles, denials, quarantines, pending revocations and alerts, in one SQLite file."""

    _what = "monitor store"
    _application_id = _APPLICATION_ID
    _schema = _SCHEMA
    _tables = frozenset({"responses", "revocations", "alerts"})
    _not_a_store = NotAMonitorStoreError

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] > _SCHEMA_VERSION:
            raise NotAMonitorStoreError(f"{self.path} is a newer monitor store than this build reads")
        conn.execute("PRAGMA synchronous=FULL")

    # --- responses ---
    def put_response(self, r: ActiveResponse) -> None:
        """Record ``r`` as in force, replacing an earlier open row for the same action and target."""
        with self._tx() as conn:
            conn.execute("UPDATE responses SET lifted_at = ?, lifted_by = 'replaced' WHERE action = ? AND target = ?"
                         " AND lifted_at IS NULL", (r.since, r.action, r.target))
            conn.execute("INSERT INTO responses (action, target, rule, since, until, reason, params)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", (r.action, r.target, r.rule, r.since, r.until,
                                                           r.reason[:500], json.dumps(dict(r.params))))

    def lift_response(self, action: str, target: str, by: str, at: float) -> bool:
        with self._tx() as conn:
            cur = conn.execute("UPDATE responses SET lifted_at = ?, lifted_by = ? WHERE action = ? AND target = ?"
                               " AND lifted_at IS NULL", (at, by[:200], action, target))
            return cur.rowcount > 0

    def active_responses(self, now: float) -> list[ActiveResponse]:
        """Responses not lifted and not expired at ``now``, oldest first."""
        rows = self._read("SELECT action, target, rule, since, until, reason, params FROM responses"
                          " WHERE lifted_at IS NULL AND (until IS NULL OR until > ?) ORDER BY id", (now,))
        out = []
        for action, target, rule, since, until, reason, params in rows:
            try:
                p = json.loads(params)
            except json.JSONDecodeError:
                p = {}
            out.append(ActiveResponse(action, target, rule, since, until, reason, p if isinstance(p, dict) else {}))
        return out

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest responses, lifted or not, with who lifted them."""
        rows = self._read("SELECT action, target, rule, since, until, reason, lifted_at, lifted_by FROM responses"
                          " ORDER BY id DESC LIMIT ?", (limit,))
        keys = ("action", "target", "rule", "since", "until", "reason", "lifted_at", "lifted_by")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # --- revocation requests for the CA host ---
    def request_revocation(self, serial_hex: str, identity: str, rule: str, since: float, reason: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO revocations (serial, identity, rule, since, reason) VALUES (?, ?, ?, ?, ?)"
                         " ON CONFLICT (serial) DO UPDATE SET identity = excluded.identity, rule = excluded.rule,"
                         " since = excluded.since, reason = excluded.reason, cancelled_at = NULL,"
                         " cancelled_by = NULL WHERE cancelled_at IS NOT NULL",
                         (serial_hex, identity[:200], rule, since, reason[:500]))

    def cancel_revocation(self, serial_hex: str, by: str, at: float) -> bool:
        with self._tx() as conn:
            cur = conn.execute("UPDATE revocations SET cancelled_at = ?, cancelled_by = ? WHERE serial = ?"
                               " AND cancelled_at IS NULL", (at, by[:200], serial_hex))
            return cur.rowcount > 0

    def pending_revocations(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT serial, identity, rule, since, reason FROM revocations WHERE cancelled_at IS NULL"
                          " ORDER BY since")
        return [{"serial": s, "identity": i, "rule": r, "since": t, "reason": why} for s, i, r, t, why in rows]

    # --- alerts ---
    def add_alert(self, alert: Mapping[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO alerts (ts, rule, severity, key, count, output, tags)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (float(alert["ts"]), str(alert["rule"]), str(alert["severity"]), str(alert["key"])[:300],
                          int(alert["count"]), str(alert["output"])[:1000], json.dumps(list(alert["tags"]))))
            conn.execute("DELETE FROM alerts WHERE id <= (SELECT MAX(id) FROM alerts) - ?", (MAX_ALERTS,))

    def recent_alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` alerts, oldest first."""
        rows = self._read("SELECT ts, rule, severity, key, count, output, tags FROM alerts ORDER BY id DESC LIMIT ?",
                          (limit,))
        out = []
        for ts, rule, severity, key, count, output, tags in reversed(rows):
            try:
                t = json.loads(tags)
            except json.JSONDecodeError:
                t = []
            out.append({"ts": ts, "rule": rule, "severity": severity, "key": key, "count": count, "output": output,
                        "tags": t if isinstance(t, list) else []})
        return out

    def alert_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM alerts")[0][0])
