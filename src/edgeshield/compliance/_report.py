"""Assess a deployment against the mapping files and write the report: JSON, self-contained HTML, or OSCAL.

Every check runs once; each requirement takes the results of the checks its mapping names. A requirement's status
is ``fail`` if any of its checks fails, else ``not_assessed`` if any could not be judged, else ``pass`` if any
passed (checks that do not apply are left out), else ``not_applicable``; a requirement with no check is
``not_assessed`` ("no automated check"). There are counts per regulation and status, never a percentage score.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgeshield.compliance._checks import CHECKS, Check, CheckContext, run_check
from edgeshield.compliance._deployment import Deployment
from edgeshield.compliance._evidence import STATUSES, CheckResult, Status
from edgeshield.compliance._mappings import Regulation, Requirement, load_mappings

NO_CHECK = "no automated check"
FORMATS = ("json", "html", "oscal")


@dataclass(frozen=True)
class RequirementResult:
    requirement: Requirement
    status: Status
    reason: str
    results: tuple[CheckResult, ...]

    @property
    def command(self) -> str | None:
        commands = list(dict.fromkeys(r.command for r in self.results if r.command))
        return " ; ".join(commands) if commands else None

    def to_dict(self) -> dict[str, Any]:
        r = self.requirement
        return {"regulation": r.regulation, "id": r.id, "title": r.title, "reference": r.reference,
                "status": self.status, "reason": self.reason, "note": r.note, "checks": list(r.checks),
                "evidence": [{"check": c.check, **e.to_dict()} for c in self.results for e in c.evidence],
                "command": self.command}


@dataclass(frozen=True)
class Report:
    generated: str
    deployment: dict[str, Any]
    regulations: tuple[Regulation, ...]
    requirements: tuple[RequirementResult, ...]
    checks: tuple[CheckResult, ...]
    probe_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {reg.id: dict.fromkeys(STATUSES, 0) for reg in self.regulations}
        for r in self.requirements:
            out[r.requirement.regulation][r.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"generated": self.generated, "deployment": self.deployment, "probe_url": self.probe_url,
                "regulations": [{"id": g.id, "title": g.title, "source": g.source} for g in self.regulations],
                "requirements": [r.to_dict() for r in self.requirements],
                "checks": [c.to_dict() for c in self.checks], "summary": self.summary}


def _combine(req: Requirement, results: Sequence[CheckResult]) -> tuple[Status, str]:
    if not results:
        return "not_assessed", NO_CHECK + (f": {req.note}" if req.note else "")
    order: tuple[Status, ...] = ("fail", "not_assessed", "pass", "not_applicable")
    for status in order:
        chosen = [r for r in results if r.status == status]
        if chosen:
            return status, "; ".join(f"{r.check}: {r.reason}" for r in chosen)
    raise AssertionError("unreachable: every result has one of the four statuses")


def assess(deployment: Deployment, *, probe_url: str | None = None, regulations: Iterable[Regulation] | None = None,
           checks: dict[str, Check] | None = None, now: float | None = None, timeout_s: float = 5.0) -> Report:
    """Run every check a mapping names (once each) against ``deployment`` and map the results to requirements."""
    regs = tuple(load_mappings() if regulations is None else regulations)
    available = dict(CHECKS) if checks is None else checks
    ctx = CheckContext(deployment, probe_url=probe_url, now=time.time() if now is None else now, timeout_s=timeout_s)
    needed = list(dict.fromkeys(c for reg in regs for req in reg.requirements for c in req.checks))
    results = {name: run_check(available[name], ctx) for name in needed}
    reqs = []
    for reg in regs:
        for req in reg.requirements:
            rs = tuple(results[c] for c in req.checks)
            status, reason = _combine(req, rs)
            reqs.append(RequirementResult(req, status, reason, rs))
    generated = datetime.fromtimestamp(ctx.now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Report(generated, deployment.to_dict(), regs, tuple(reqs), tuple(results.values()), probe_url)


# --- HTML ---------------------------------------------------------------------------------------------------------
PLAIN = {"pass": ("Met", "The automated checks found evidence that this requirement is met."),
         "fail": ("Not met", "The automated checks found a problem (see why)."),
         "not_assessed": ("Not checked automatically", ("A person must assess this (policies, contracts, "
                                                       "procedures), or the check could not be run.")),
         "not_applicable": ("Does not apply", "This deployment does not do what the requirement is about.")}
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:75em;padding:0 1em;
color:#1b1b1b}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:2px solid #ccc}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left;overflow-wrap:anywhere}
th{background:#f2f2f2}
.s{font-weight:bold;white-space:nowrap;border-radius:.3em;padding:.1em .5em}
.pass{background:#dff3e3;color:#0b5d1e}.fail{background:#fde2e1;color:#8a1010}
.not_assessed{background:#fff4d6;color:#6b4e00}.not_applicable{background:#e9ecef;color:#444}
.ref{color:#555;font-size:.9em}details{margin:.2em 0}pre{white-space:pre-wrap;word-break:break-all;
font-size:.8em;background:#f7f7f7;padding:.5em;max-height:20em;overflow:auto}
.legend td{border:none;padding:.2em .6em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_html(report: Report) -> str:
    """A self-contained page (inline CSS, no script, no external asset); every value is HTML-escaped."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>EdgeShield compliance report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Compliance report</h1>",
           (f"<p>Generated {_e(report.generated)} from the deployment described in "
           f"<code>{_e(report.deployment.get('config') or 'the given configuration')}</code>. Each requirement below "
           "was judged by automated checks against what the device actually records and runs; a requirement no "
           "check can judge says so.</p>"), '<table class="legend">']
    for status, (label, meaning) in PLAIN.items():
        out.append(f'<tr><td><span class="s {status}">{_e(label)}</span></td><td>{_e(meaning)}</td></tr>')
    out.append("</table><h2>Summary</h2><table><tr><th>Regulation</th>")
    out += [f"<th>{_e(PLAIN[s][0])}</th>" for s in STATUSES]
    out.append("</tr>")
    summary = report.summary
    for reg in report.regulations:
        out.append(f"<tr><td>{_e(reg.title)}</td>" + "".join(f"<td>{summary[reg.id][s]}</td>" for s in STATUSES)
                   + "</tr>")
    out.append("</table>")
    for reg in report.regulations:
        out.append(f"<h2>{_e(reg.title)}</h2><table><tr><th>Requirement</th><th>Status</th><th>Why</th>"
                   "<th>Evidence</th></tr>")
        for r in (x for x in report.requirements if x.requirement.regulation == reg.id):
            req = r.requirement
            items = []
            for c in r.results:
                for ev in c.evidence:
                    detail = json.dumps(ev.to_dict(), indent=2, sort_keys=True, default=str)
                    items.append(f"<details><summary>{_e(ev.description)}</summary><pre>{_e(detail)}</pre>"
                                 "</details>")
            if r.command:
                items.append(f"<details><summary>How to reproduce</summary><pre>{_e(r.command)}</pre></details>")
            note = f"<br><span class=\"ref\">{_e(req.note)}</span>" if req.note else ""
            out.append(f"<tr><td>{_e(req.title)}<br><span class=\"ref\">{_e(req.reference)}</span>{note}</td>"
                       f"<td><span class=\"s {r.status}\">{_e(PLAIN[r.status][0])}</span></td>"
                       f"<td>{_e(r.reason)}</td><td>{''.join(items) or 'none'}</td></tr>")
        out.append("</table>")
    out.append("<p class=\"ref\">Automated checks cannot show organisational measures (policies, training, "
               "contracts such as HIPAA business associate agreements, DPIAs): those requirements are marked "
               "&ldquo;Not checked automatically&rdquo; and need a person's assessment.</p></body></html>")
    return "\n".join(out) + "\n"


def render(report: Report, fmt: str) -> bytes:
    if fmt == "json":
        return (json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n").encode()
    if fmt == "html":
        return render_html(report).encode()
    if fmt == "oscal":
        from edgeshield.compliance._oscal import to_oscal_json

        return to_oscal_json(report).encode()
    from edgeshield.errors import InvalidArgumentError

    raise InvalidArgumentError(f"report format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def write_report(report: Report, fmt: str, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Render and write atomically (refusing to overwrite unless ``overwrite``)."""
    from edgeshield._io import atomic_write_bytes

    atomic_write_bytes(out, render(report, fmt), overwrite=overwrite)
