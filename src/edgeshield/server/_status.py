"""The operator status page the server serves itself: ``GET /status`` (HTML) and its JSON twin ``/status.json``.

One look tells an operator or an auditor whether the device is under attack and what it did about it: current
alerts, active responses (blocked and throttled clients, denied certificates, quarantines) and pending revocations,
recent security events, whether the audit log verifies, the compliance summary and what is served.

The page is rendered here with plain string building, every value through :func:`html.escape`; it loads nothing
(no script, no font, no image from anywhere, one inline stylesheet allowed by its hash) and is sent with a strict
Content-Security-Policy. Who may see it is the RBAC policy's business (admin and auditor), checked by the security
middleware like every other route: nothing here bypasses it.

The two expensive parts are throttled so that refreshing the page cannot burn the device's CPU: the audit-log
verification (which rehashes the whole log) and the compliance summary each run in a worker thread, one at a time,
at most once per ``max(10 s, 10 × their last duration)``; the page waits for a fresh run at most two seconds and
otherwise shows the previous result with its age.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import html
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edgeshield.errors import EdgeShieldError

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState

log = logging.getLogger("edgeshield.server")

REFRESH_S = 10  # the page reloads itself this often (<meta http-equiv="refresh">, which the CSP allows)
CHECK_EVERY_S = 10.0  # the audit verification and the compliance summary run at most this often...
CHECK_DUTY = 10.0  # ...and at most once per this many times their own last duration (a large log: less often)
CHECK_WAIT_S = 2.0  # how long a page waits for a fresh run before showing the previous result
MAX_ROWS = 50  # rows per list (the JSON twin has the same cap)
EVENT_ROWS = 15  # rows of recent events on the page, repeats folded into one
COMPLY_HINT = "edgeshield comply report"

_CSS = """\
:root{color-scheme:light;--ok:#1b7f3b;--warn:#a15c00;--bad:#b3261e;--muted:#5f6368;--line:#dadce0}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#202124;background:#f6f7f9}
header{padding:16px 24px;background:#fff;border-bottom:1px solid var(--line)}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:var(--muted)}
main{padding:16px 24px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:16px;margin:0 0 8px}
p.note{color:var(--muted);margin:6px 0 0;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:4px 8px;border-top:1px solid var(--line);vertical-align:top;overflow-wrap:anywhere}
th{font-weight:600;color:var(--muted);border-top:none;white-space:nowrap}
td.nw{white-space:nowrap}
.banner{grid-column:1/-1;border-radius:8px;padding:12px 16px;font-weight:600;color:#fff}
.banner.ok{background:var(--ok)}.banner.warning{background:var(--warn)}.banner.critical{background:var(--bad)}
.empty{color:var(--muted);margin:0}
.tag{display:inline-block;padding:0 6px;margin:1px 2px;border-radius:4px;background:#eef1f4;font-size:12px}
.sev{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;
background:var(--muted)}
.sev.critical{background:#7b1fa2}.sev.high{background:var(--bad)}.sev.medium{background:var(--warn)}
.sev.low{background:#1a73e8}
.good{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}.unknown{color:var(--warn);font-weight:600}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#eef1f4;padding:0 4px;border-radius:3px}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 16px;margin:0}dt{color:var(--muted)}
dd{margin:0;min-width:0;overflow-wrap:anywhere}dd code{word-break:break-all}
"""
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()

# No script may run, nothing may load from anywhere (the stylesheet is allowed by its hash alone), the page cannot be
# framed, and a form could only post back here. <meta http-equiv="refresh"> is navigation, which the CSP allows.
CSP = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self' data:; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "cache-control": "no-store"}
JSON_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store"}

T = TypeVar("T")


class Throttled(Generic[T]):
    """A blocking computation run in a worker thread, one run at a time, at most once per
    ``max(every_s, duty × last duration)``: what an unauthenticated-CPU-burning refresh loop cannot push past.

    ``await get()`` returns (value or None, wall time it was computed or None, the error text of the last run or
    None); it waits for a run it starts at most ``wait_s`` and otherwise returns the previous result.
    """

    def __init__(self, fn: Callable[[], T], *, every_s: float = CHECK_EVERY_S, duty: float = CHECK_DUTY,
                 wait_s: float = CHECK_WAIT_S) -> None:
        self.fn, self.every_s, self.duty, self.wait_s = fn, every_s, duty, wait_s
        self.value: T | None = None
        self.error: str | None = None
        self.computed_at: float | None = None  # wall clock of the last finished run
        self.runs = 0
        self._done_at: float | None = None  # monotonic
        self._duration = 0.0
        self._task: asyncio.Future[tuple[T | None, str | None, float, float]] | None = None

    def _run(self) -> tuple[T | None, str | None, float, float]:
        started = time.perf_counter()
        try:
            value, error = self.fn(), None
        except (EdgeShieldError, sqlite3.Error, OSError) as exc:
            value, error = None, f"{type(exc).__name__}: {exc}"[:300]
        return value, error, time.perf_counter() - started, time.time()

    def _collect(self) -> None:
        task = self._task
        if task is None or not task.done():
            return
        self._task = None
        try:
            value, error, duration, at = task.result()
        except Exception as exc:  # a bug in the computation: show it as unavailable, keep serving the page
            log.exception("status page check failed")
            value, error, duration, at = None, f"internal error ({type(exc).__name__})", 0.0, time.time()
        self.value, self.error, self.computed_at = value, error, at
        self._duration, self._done_at = duration, time.monotonic()
        self.runs += 1

    def stale(self) -> bool:
        if self._done_at is None:
            return True
        return time.monotonic() - self._done_at >= max(self.every_s, self.duty * self._duration)

    async def get(self) -> tuple[T | None, float | None, str | None]:
        self._collect()
        if self._task is None and self.stale():
            self._task = asyncio.ensure_future(asyncio.to_thread(self._run))
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self.wait_s)  # waiting never cancels the run
            self._collect()
        return self.value, self.computed_at, self.error


# --- gathering ----------------------------------------------------------------------------------------------------
def _verify(audit_log: Any) -> dict[str, Any]:
    """Verify the whole log (chain, every checkpoint root and signature): a failed check is a result, not an error."""
    from edgeshield.errors import AuditIntegrityError

    try:
        report = audit_log.verify()
    except AuditIntegrityError as exc:
        return {"verifies": False, "problem": str(exc)[:300], "entries_checked": None, "checkpoints": None,
                "uncovered": None, "signatures_checked": None}
    return {"verifies": True, "problem": None, "entries_checked": report.entries, "checkpoints": report.checkpoints,
            "uncovered": report.uncovered, "signatures_checked": report.signatures_checked}


def _audit_now(audit_log: Any) -> dict[str, Any]:
    """The cheap, always-current part: entry count and the newest checkpoint."""
    cp = audit_log.latest_checkpoint()
    return {"entries": len(audit_log),
            "latest_checkpoint": None if cp is None else {"tree_size": cp.tree_size, "ts": cp.ts}}


def _recent_audit(audit_log: Any, n: int) -> list[dict[str, Any]]:
    """Recent entries of the audit log as events (when the monitor is off): kind, who, when; never their data."""
    from edgeshield.audit._format import CHECKPOINT_KIND

    rows = []
    for e in reversed(audit_log.tail(n + 10)):
        if e.kind == CHECKPOINT_KIND:
            continue
        try:
            ts = dt.datetime.fromisoformat(e.ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            ts = None
        rows.append({"ts": ts, "kind": e.kind, "actor": e.actor, "address": None, "summary": ""})
    return rows[:n]


class StatusPage:
    """Collects what the page shows from the server's state; ``await data(viewer)`` is the JSON twin."""

    def __init__(self, state: ServerState) -> None:
        from edgeshield.audit import AuditLog

        self.state = state
        started = getattr(state, "started", None)
        self.started = started if isinstance(started, int | float) else time.time()
        audit_log = state.audit
        self.audit_log: AuditLog | None = audit_log if isinstance(audit_log, AuditLog) else None
        self.verification: Throttled[dict[str, Any]] | None = None
        if self.audit_log is not None:
            log_ = self.audit_log
            self.verification = Throttled(lambda: _verify(log_))
        self.compliance: Throttled[dict[str, Any]] | None = None
        self._compliance_fn: object = None

    def _compliance(self) -> Throttled[dict[str, Any]] | None:
        fn = getattr(self.state, "compliance_summary", None)
        if fn is None or not callable(fn):
            return None
        if fn is not self._compliance_fn:  # set (or replaced) after start-up: a fresh throttle for it
            self._compliance_fn, self.compliance = fn, Throttled(lambda: dict(fn()))
        return self.compliance

    async def data(self, viewer: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        now = time.time()
        return {
            "generated": now,
            "refresh_s": REFRESH_S,
            "viewer": dict(viewer) if viewer else None,
            "server": self._server(now),
            "monitor": await self._monitor(),
            "audit": await self._audit(now),
            "compliance": await self._compliance_data(now),
        }

    def _server(self, now: float) -> dict[str, Any]:
        s = self.state
        served = getattr(s, "model", None)  # once: a reload between two reads must not mix two models
        m = served.manifest if served is not None else s.manifest
        out = {"bundle_id": m.bundle_id, "model_version": m.model_version, "model_sha256": m.model_sha256,
               "created": m.created, "detector": (served or s).robust is not None,
               "extraction_monitor": s.monitor is not None,
               "served_watermark": (served or s).served_watermark is not None, "started": self.started,
               "uptime_s": max(0.0, now - self.started)}
        if served is not None and served.slot is not None:
            out["slot"] = served.slot
        if served is not None and served.licence is not None:
            served.licence.expired_now()
            out["licence"] = served.licence.describe()
        return out

    async def _monitor(self) -> dict[str, Any]:
        mon = getattr(self.state, "security_monitor", None)
        if mon is None:
            out: dict[str, Any] = {"enabled": False}
            if self.audit_log is not None:
                try:
                    out["recent_events"] = await asyncio.to_thread(_recent_audit, self.audit_log, 20)
                    out["recent_events_source"] = "audit log"
                except (EdgeShieldError, sqlite3.Error, OSError) as exc:
                    out["problem"] = f"{type(exc).__name__}: {exc}"[:300]
            return out
        try:
            snap = await asyncio.to_thread(mon.snapshot)
        except Exception as exc:  # the monitor's bug must not take the page (and the view of everything else) down
            log.exception("the monitor's snapshot failed")
            return {"enabled": True, "problem": f"snapshot unavailable ({type(exc).__name__})"}
        out = {"enabled": True}
        for key in ("alerts", "responses", "pending_revocations", "rules", "recent_events"):
            rows = list(snap.get(key) or [])
            if key in ("alerts", "recent_events"):  # newest first
                rows.sort(key=lambda r: _num(r.get("ts")) or 0.0, reverse=True)
            out[key] = rows[:MAX_ROWS] if key != "rules" else rows
        out["counters"] = dict(snap.get("counters") or {})
        return out

    async def _audit(self, now: float) -> dict[str, Any]:
        if self.audit_log is None or self.verification is None:
            return {"enabled": False}
        out: dict[str, Any] = {"enabled": True}
        try:
            out.update(await asyncio.to_thread(_audit_now, self.audit_log))
        except (EdgeShieldError, sqlite3.Error, OSError) as exc:
            out["problem"] = f"{type(exc).__name__}: {exc}"[:300]
        value, at, error = await self.verification.get()
        check: dict[str, Any] = {"checked_at": at, "age_s": None if at is None else max(0.0, now - at)}
        if value is not None:
            check.update(value)
        elif error is not None:
            check.update({"verifies": False, "problem": error})
        else:
            check["verifies"] = None  # the first check is still running
        out["verification"] = check
        return out

    async def _compliance_data(self, now: float) -> dict[str, Any]:
        throttle = self._compliance()
        if throttle is None:
            return {"available": False, "hint": COMPLY_HINT}
        value, at, error = await throttle.get()
        out: dict[str, Any] = {"available": value is not None, "hint": COMPLY_HINT, "computed_at": at}
        if value is not None:
            out["summary"] = value
        if error is not None:
            out["problem"] = error
        return out


def overall(data: Mapping[str, Any]) -> tuple[str, str]:
    """(level ok|warning|critical, one sentence) for the banner."""
    mon, audit_ = data.get("monitor") or {}, data.get("audit") or {}
    verification = audit_.get("verification") or {}
    problems = []
    level = "ok"
    if audit_.get("enabled") and verification.get("verifies") is False:
        problems.append("the audit log does NOT verify: treat this device as tampered with")
        level = "critical"
    alerts, responses = mon.get("alerts") or [], mon.get("responses") or []
    quarantined = [r for r in responses if r.get("action") == "quarantine"]
    if quarantined:
        problems.append(f"{_plural(len(quarantined), 'file')} quarantined: the model is not being served")
        level = "critical"
    if any(str(a.get("severity", "")).lower() == "critical" for a in alerts):
        level = "critical"
    if alerts:
        problems.append(f"{_plural(len(alerts), 'alert')}")
        level = "warning" if level == "ok" else level
    others = len(responses) - len(quarantined)
    if others:
        problems.append(f"{_plural(others, 'active response')} (blocked, throttled or denied clients)")
        level = "warning" if level == "ok" else level
    pending = mon.get("pending_revocations") or []
    if pending:
        problems.append(f"{_plural(len(pending), 'certificate')} waiting to be revoked at the CA")
        level = "warning" if level == "ok" else level
    if not problems:
        if not mon.get("enabled"):
            return "warning", "Security monitoring is off: nothing watches for attacks on this device"
        return "ok", "All clear: no alerts and no active responses"
    return level, "; ".join(problems).capitalize()


# --- rendering ----------------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: object) -> float | None:
    """A finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cls(value: object) -> str:
    """A CSS class from data: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "", str(value).lower())[:20] or "none"


def _ago(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d {s % 86400 // 3600} h ago"


def _duration(seconds: float) -> str:
    return _ago(seconds).removesuffix(" ago")


def _when(ts: object, now: float) -> str:
    t = _num(ts)
    if t is None:
        return _e(ts) if isinstance(ts, str) else "—"
    try:
        when = dt.datetime.fromtimestamp(t, dt.UTC)
        today = dt.datetime.fromtimestamp(now, dt.UTC).date() == when.date()
    except (ValueError, OverflowError, OSError):  # out of the calendar's range
        return _e(ts)
    stamp = when.strftime("%H:%M:%S UTC" if today else "%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({_ago(now - t)})" if t <= now else stamp


def _target(target: object) -> str:
    kind, _, value = str(target).partition(":")
    label = {"identity": "client", "address": "address", "serial": "certificate serial", "file": "file"}.get(kind)
    return f"{label} {value}" if label and value else str(target)


def _table(headers: Iterable[str], rows: list[list[str]], empty: str, *, nowrap: Iterable[int] = ()) -> str:
    """A table of already-escaped cells, or the ``empty`` line when there are no rows; ``nowrap``: column indexes
    kept on one line (times, addresses)."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    keep = set(nowrap)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="nw">{c}</td>' if i in keep else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tags(tags: object) -> str:
    if not isinstance(tags, list | tuple):
        return ""
    return "".join(f'<span class="tag">{_e(t)}</span>' for t in tags)


def _section(id_: str, title: str, body: str, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f'<section id="{_e(id_)}"{cls}><h2>{_e(title)}</h2>{body}</section>'


_OFF = '<p class="empty">Security monitoring is off on this server.</p>'
_RESPONSE_TITLES = {"block": "Blocked", "throttle": "Throttled", "deny_cert": "Certificate denied",
                    "quarantine": "Quarantined"}


def _alerts(mon: Mapping[str, Any], now: float) -> str:
    if not mon.get("enabled"):
        return _OFF
    rows = [[f'<span class="sev {_cls(a.get("severity"))}">{_e(a.get("severity"))}</span>', _e(a.get("rule")),
             _e(_target(a.get("key", ""))), _e(a.get("count")), _e(a.get("output")), _when(a.get("ts"), now),
             _tags(a.get("tags"))] for a in mon.get("alerts") or []]
    return _table(["Severity", "Rule", "About", "Count", "What happened", "When", "Tags"], rows, "No alerts.",
                  nowrap=(0, 1, 5))


def _responses(mon: Mapping[str, Any], now: float) -> str:
    if not mon.get("enabled"):
        return _OFF
    rows = []
    for r in mon.get("responses") or []:
        until = _num(r.get("until"))
        ends = "until an admin lifts it" if until is None else f"until {_when(until, now)}"
        rows.append([_e(_RESPONSE_TITLES.get(str(r.get("action")), r.get("action"))), _e(_target(r.get("target"))),
                     _e(r.get("reason")), _e(r.get("rule")), _when(r.get("since"), now), ends])
    body = _table(["Action", "Who or what", "Why", "Rule", "Since", "Lasts"], rows,
                  "No active responses: no client is blocked, throttled or denied, and nothing is quarantined.",
                  nowrap=(0, 4))
    if rows:
        body += ('<p class="note">An admin lifts a response with <code>edgeshield monitor</code> (unblock, release, '
                 '…) or <code>POST /v1/admin/monitor/lift</code>; every lift is audited.</p>')
    return body


def _revocations(mon: Mapping[str, Any], now: float) -> str:
    if not mon.get("enabled"):
        return _OFF
    pending = [[_e(p.get("serial")), _e(p.get("identity")), _e(p.get("rule")), _when(p.get("since"), now)]
               for p in mon.get("pending_revocations") or []]
    body = _table(["Certificate serial", "Client", "Rule", "Since"], pending, "No revocation requests are waiting.")
    if pending:
        body += ('<p class="note">These certificates are already refused on this device; revoke them on the CA host '
                 'so every device refuses them.</p>')
    return body


def _events(mon: Mapping[str, Any], now: float) -> str:
    from edgeshield.monitor._events import KINDS

    rows: list[list[str]] = []
    for ev, repeats in _runs(mon.get("recent_events") or [])[:EVENT_ROWS]:
        kind = str(ev.get("kind", ""))
        info = KINDS.get(kind)
        times = f" <span class=\"tag\">×{repeats}</span>" if repeats > 1 else ""
        rows.append([_when(ev.get("ts"), now), _e(kind) + times, _e(info.description if info is not None else ""),
                     _e(ev.get("summary")), _e(ev.get("actor")), _e(ev.get("address"))])
    body = _table(["When", "Event", "What it means", "Details (newest)", "Who", "Address"], rows,
                  "No recent security events.", nowrap=(0, 1, 4, 5))
    if not mon.get("enabled"):
        source = "the audit log" if mon.get("recent_events_source") else "nowhere (no audit log)"
        body = f'<p class="note">Monitoring is off: the most recent entries of {_e(source)}.</p>' + body
    return body


def _runs(events: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], int]]:
    """Consecutive events of the same kind, actor and address as one row (the newest) with its count."""
    out: list[tuple[Mapping[str, Any], int]] = []
    for ev in events:
        same = out and all(out[-1][0].get(k) == ev.get(k) for k in ("kind", "actor", "address"))
        if same:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((ev, 1))
    return out


def _audit_html(audit_: Mapping[str, Any], now: float) -> str:
    if not audit_.get("enabled"):
        return '<p class="empty">This server writes no audit log.</p>'
    v = audit_.get("verification") or {}
    verifies = v.get("verifies")
    if verifies is True:
        state = '<span class="good">verifies</span>'
    elif verifies is False:
        state = '<span class="bad">does NOT verify</span>'
    else:
        state = '<span class="unknown">being checked</span>'
    cp = audit_.get("latest_checkpoint")
    items = [("Entries", _e(audit_.get("entries"))),
             ("Latest signed checkpoint", "none yet" if not cp else
              f"{_e(cp.get('tree_size'))} entries, at {_e(cp.get('ts'))}"),
             ("Integrity", state)]
    if v.get("checked_at") is not None:
        checked = _when(v["checked_at"], now)
        if v.get("entries_checked") is not None:
            checked += f", {_e(v['entries_checked'])} entries and {_e(v.get('checkpoints'))} checkpoints"
        items.append(("Last checked", checked))
        uncovered = v.get("uncovered")
        if verifies and uncovered:
            items.append(("Not yet under a checkpoint", (f"{_e(uncovered)} newest entries (protected by the hash "
                                                         "chain until the next checkpoint)")))
        if verifies and v.get("signatures_checked") is False:
            items.append(("Signatures", "not checked (no verify key)"))
    if v.get("problem"):
        items.append(("Problem", _e(v["problem"])))
    if audit_.get("problem"):
        items.append(("Reading the log", _e(audit_["problem"])))
    body = "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{val}</dd>" for k, val in items) + "</dl>"
    return body + (f'<p class="note">The whole log is re-verified at most every {CHECK_EVERY_S:g} s. An auditor '
                   'checks it independently with <code>edgeshield audit verify</code>.</p>')


def _compliance_html(comp: Mapping[str, Any], now: float) -> str:
    summary = comp.get("summary") if comp.get("available") else None
    if not isinstance(summary, Mapping):
        body = ('<p class="empty">No compliance summary on this server. Produce the report with '
                f'<code>{_e(comp.get("hint") or COMPLY_HINT)}</code>.</p>')
        if comp.get("problem"):
            body += f'<p class="note">It could not be computed: {_e(comp["problem"])}</p>'
        return body
    regs = summary.get("regulations") or {}
    cols = ("pass", "fail", "not_assessed", "not_applicable")
    rows = []
    for name, counts in sorted(regs.items()) if isinstance(regs, Mapping) else []:
        c = counts if isinstance(counts, Mapping) else {}
        cells = [_e(c.get(k, 0)) for k in cols]
        if _num(c.get("fail")):
            cells[1] = f'<span class="bad">{cells[1]}</span>'
        rows.append([_e(name), *cells])
    body = _table(["Regulation", "Pass", "Fail", "Not assessed", "Not applicable"], rows, "No regulations assessed.")
    generated = summary.get("generated")
    when = _when(generated, now) if generated is not None else _when(comp.get("computed_at"), now)
    return body + (f'<p class="note">Computed {when}. "Not assessed" means no check produces evidence for that '
                   f'requirement: nothing passes without evidence. Full report: <code>{_e(COMPLY_HINT)}</code>.</p>')


def _onoff(value: object) -> str:
    return "on" if value is True else "off" if value is False else "unknown"


def _server_html(srv: Mapping[str, Any], viewer: Mapping[str, Any] | None, now: float) -> str:
    items = [("Bundle", _e(srv.get("bundle_id"))), ("Model version", _e(srv.get("model_version"))),
             ("Model SHA-256", f"<code>{_e(srv.get('model_sha256'))}</code>"),
             ("Bundle created", _e(srv.get("created"))),
             ("Adversarial-input detector", _onoff(srv.get("detector"))),
             ("Extraction monitor", _onoff(srv.get("extraction_monitor"))),
             ("Served watermark", _onoff(srv.get("served_watermark"))),
             ("Running since", f"{_when(srv.get('started'), now)}"),
             ("Uptime", _e(_duration(_num(srv.get("uptime_s")) or 0.0)))]
    if viewer:
        items.append(("You are", f"{_e(viewer.get('name'))} ({_e(viewer.get('role'))})"))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def render(data: Mapping[str, Any]) -> str:
    """The whole page, every value escaped."""
    now = _num(data.get("generated")) or time.time()
    mon = data.get("monitor") or {}
    level, headline = overall(data)
    srv = data.get("server") or {}
    counters = mon.get("counters") or {}
    counted = ""
    if mon.get("enabled") and counters:
        def n(key: str, word: str) -> str:
            value = counters.get(key, 0)
            return f"{_e(value)} {word}" + ("" if value == 1 else "s")

        counted = (f"Since start-up: {n('events', 'event')} seen, {n('alerts', 'alert')} raised, "
                   f"{n('responses_ok', 'response')} run, {_e(counters.get('responses_failed', 0))} failed.")
    parts = [
        f'<div class="banner {_cls(level)}" id="overall" role="status">{_e(headline)}</div>',
        _section("alerts", "Current alerts", _alerts(mon, now) + (f'<p class="note">{counted}</p>' if counted else ""),
                 wide=True),
        _section("responses", "Active responses", _responses(mon, now), wide=True),
        _section("revocations", "Revocations waiting for the CA", _revocations(mon, now), wide=True),
        _section("events", "Recent security events", _events(mon, now), wide=True),
        _section("audit", "Audit log", _audit_html(data.get("audit") or {}, now)),
        _section("compliance", "Compliance", _compliance_html(data.get("compliance") or {}, now)),
        _section("server", "This server", _server_html(srv, data.get("viewer"), now)),
    ]
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(_num(data.get("refresh_s")) or REFRESH_S)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        '<link rel="icon" href="data:,">'  # no /favicon.ico request (a 404 in the audit log each refresh)
        f"<title>EdgeShield status · {_e(srv.get('bundle_id'))}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>EdgeShield device status</h1><p>Bundle {_e(srv.get('bundle_id'))} · page generated {stamp} · "
        f"refreshes every {int(_num(data.get('refresh_s')) or REFRESH_S)} s</p></header>"
        f"<main>{''.join(parts)}</main></body></html>"
    )


def add_status_routes(app: FastAPI, state: ServerState) -> None:
    """Register ``GET /status`` (HTML) and ``GET /status.json`` on ``app``; RBAC decides who may see them."""
    page = StatusPage(state)

    def viewer_of(request: Request) -> dict[str, str | None] | None:
        identity = request.scope.get("state", {}).get("identity")
        return None if identity is None else {"name": identity.name, "role": identity.role}

    async def status_html(request: Request) -> Response:
        data = await page.data(viewer_of(request))
        return Response(render(data), media_type="text/html; charset=utf-8", headers=HEADERS)

    async def status_json(request: Request) -> Response:
        data = await page.data(viewer_of(request))
        level, headline = overall(data)
        return JSONResponse({**data, "overall": {"level": level, "headline": headline}}, headers=JSON_HEADERS)

    # Out of the OpenAPI document: a page for people and its script-friendly twin, not part of the inference API.
    app.add_api_route("/status", status_html, methods=["GET"], include_in_schema=False, response_class=Response)
    app.add_api_route("/status.json", status_json, methods=["GET"], include_in_schema=False,
                      response_class=JSONResponse)
