"""The report as OSCAL assessment results, built and validated with compliance-trestle's models.

One result holds one observation per check (its evidence as ``relevant-evidence``, each item's data and proof in
its remarks as JSON) and one finding per requirement whose target is the requirement (``objective-id``
``REGULATION.ID``): ``satisfied`` for pass, ``not-satisfied`` for fail; ``not_assessed`` is ``not-satisfied``
with reason ``other`` (nothing may be claimed satisfied without evidence), ``not_applicable`` is ``satisfied``
with reason ``other`` and implementation status ``not-applicable``. Every finding and observation also carries
the exact EdgeShield status as a property. compliance-trestle is heavy: it is imported here only, lazily
(``pip install 'edgeshield[comply]'``).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from edgeshield.errors import MissingDependencyError

if TYPE_CHECKING:
    from edgeshield.compliance._report import Report

_NS = uuid.UUID("6d1c4b8e-3f0a-5b7e-9c2d-ed6e5e1d0000")  # EdgeShield's namespace for its OSCAL uuids
_TOOL = uuid.uuid5(_NS, "edgeshield/comply")
_STATE = {"pass": ("satisfied", "pass"), "fail": ("not-satisfied", "fail"),
          "not_assessed": ("not-satisfied", "other"), "not_applicable": ("satisfied", "other")}


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "/".join(parts)))


def _line(text: str) -> str:
    """OSCAL titles and property values: one line, no surrounding space, never empty."""
    flat = " ".join(str(text).split())
    return flat or "-"


def _prop(name: str, value: object) -> dict[str, str]:
    return {"name": name, "ns": "https://edgeshield.invalid/ns/oscal", "value": _line(str(value))}


def assessment_results(report: Report) -> dict[str, Any]:
    """The OSCAL document as a plain dict (OSCAL JSON field names), not yet validated."""
    from edgeshield import __version__

    when = report.generated
    plan = _uid("plan", when)
    observations, obs_of = [], {}
    for c in report.checks:
        oid = _uid("observation", when, c.check)
        obs_of[c.check] = oid
        obs: dict[str, Any] = {
            "uuid": oid, "title": _line(f"check {c.check}"), "description": c.reason or c.status,
            "props": [_prop("edgeshield-check", c.check), _prop("edgeshield-status", c.status)],
            "methods": ["TEST"], "types": ["finding"],
            "origins": [{"actors": [{"type": "tool", "actor-uuid": str(_TOOL)}]}],
            "collected": when, "remarks": f"command: {c.command}" if c.command else None}
        if c.evidence:
            obs["relevant-evidence"] = [{
                "description": e.description, "props": [_prop("edgeshield-evidence-kind", e.kind)]
                + ([_prop("edgeshield-source", e.source)] if e.source else []),
                "remarks": json.dumps({"data": e.data, "proof": e.proof}, sort_keys=True, default=str)}
                for e in c.evidence]
        observations.append({k: v for k, v in obs.items() if v is not None})
    findings = []
    for r in report.requirements:
        req = r.requirement
        state, reason = _STATE[r.status]
        target: dict[str, Any] = {"type": "objective-id", "target-id": f"{req.regulation}.{req.id}",
                                  "title": _line(req.reference), "status": {"state": state, "reason": reason},
                                  "props": [_prop("edgeshield-status", r.status)]}
        if r.status == "not_applicable":
            target["implementation-status"] = {"state": "not-applicable"}
        finding: dict[str, Any] = {
            "uuid": _uid("finding", when, req.regulation, req.id), "title": _line(f"{req.reference}: {req.title}"),
            "description": r.reason, "props": [_prop("edgeshield-regulation", req.regulation),
                                               _prop("edgeshield-reference", req.reference)],
            "origins": [{"actors": [{"type": "tool", "actor-uuid": str(_TOOL)}]}], "target": target}
        related = [{"observation-uuid": obs_of[c.check]} for c in r.results]
        if related:
            finding["related-observations"] = related
        findings.append(finding)
    controls = [{"control-id": f"{r.requirement.regulation}.{r.requirement.id}"} for r in report.requirements]
    result: dict[str, Any] = {
        "uuid": _uid("result", when), "title": "EdgeShield automated compliance checks",
        "description": "Requirements of the mapped regulations judged by automated checks against the evidence the "
                       "device produces (audit log with Merkle proofs, files, TLS context, sockets).",
        "start": when, "end": when,
        "reviewed-controls": {"control-selections": [{"include-controls": controls}]},
        "findings": findings}
    if observations:
        result["observations"] = observations
    return {
        "uuid": _uid("assessment-results", when),
        "metadata": {"title": "EdgeShield compliance assessment results", "last-modified": when,
                     "version": __version__, "oscal-version": _oscal_version(),
                     "props": [_prop("edgeshield-deployment", report.deployment.get("config") or "-")]},
        "import-ap": {"href": f"#{plan}"},
        "results": [result],
        "back-matter": {"resources": [{
            "uuid": plan, "title": "EdgeShield regulation mapping files",
            "description": "The assessment plan: each regulation's mapping file names the checks that evaluate each "
                           "requirement (" + ", ".join(str(g.path) for g in report.regulations) + ")."}]},
    }


def _oscal_version() -> str:
    try:
        from trestle.oscal import OSCAL_VERSION
    except ImportError:
        raise MissingDependencyError("the OSCAL report needs compliance-trestle: pip install 'edgeshield[comply]'") \
            from None
    return str(OSCAL_VERSION)


def to_oscal_json(report: Report) -> str:
    """The validated OSCAL assessment-results document as JSON (trestle's serialisation, wrapped)."""
    doc = assessment_results(report)
    try:
        from trestle.oscal.assessment_results import AssessmentResults
    except ImportError:
        raise MissingDependencyError("the OSCAL report needs compliance-trestle: pip install 'edgeshield[comply]'") \
            from None
    model = AssessmentResults.model_validate(doc)
    return str(model.oscal_serialize_json(pretty=True)) + "\n"
