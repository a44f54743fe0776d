"""Compliance with evidence: regulation mappings as code, checks against what the device really records, data
subjects (pseudonyms, erasure by crypto-shredding, retention), and reports (JSON, HTML, OSCAL).

    deployment = Deployment.from_toml("serve.toml")          # the server's own config, plus compliance keys
    report = assess(deployment, probe_url="https://127.0.0.1:8443")
    write_report(report, "html", "compliance.html")           # or "json", or "oscal" (needs edgeshield[comply])

    keys = SubjectKeys("subjects.db")                         # the server: a pseudonym per data subject
    keys.pseudonym("patient-17")                              # -> 32 hex characters, under that subject's own key
    erase_subject(deployment, "patient-17")                   # rows deleted, key destroyed, subject.erased audited
    purge(deployment)                                         # retention: older rows deleted, retention.purged

Mapping files (``mappings/*.yaml``) tie each requirement to checks (:data:`CHECKS`); a requirement with none is
``not_assessed``. See docs/compliance.md.
"""

from __future__ import annotations

from edgeshield.compliance._checks import CHECKS, Check, CheckContext, run_check
from edgeshield.compliance._deployment import COMPLIANCE_KEYS, Deployment, DeploymentError
from edgeshield.compliance._evidence import STATUSES, CheckResult, Evidence, Status
from edgeshield.compliance._mappings import (
    MappingFileError,
    Regulation,
    Requirement,
    default_mapping_paths,
    load_mapping,
    load_mappings,
    parse_mapping,
)
from edgeshield.compliance._report import FORMATS, Report, RequirementResult, assess, render, write_report
from edgeshield.compliance._subjects import (
    ErasureReport,
    NotASubjectKeyStoreError,
    PurgeReport,
    SubjectKeys,
    check_subject_id,
    erase_subject,
    purge,
)

__all__ = [
    "CHECKS",
    "COMPLIANCE_KEYS",
    "FORMATS",
    "STATUSES",
    "Check",
    "CheckContext",
    "CheckResult",
    "Deployment",
    "DeploymentError",
    "ErasureReport",
    "Evidence",
    "MappingFileError",
    "NotASubjectKeyStoreError",
    "PurgeReport",
    "Regulation",
    "Report",
    "Requirement",
    "RequirementResult",
    "Status",
    "SubjectKeys",
    "assess",
    "check_subject_id",
    "default_mapping_paths",
    "erase_subject",
    "load_mapping",
    "load_mappings",
    "parse_mapping",
    "purge",
    "render",
    "run_check",
    "write_report",
]
