"""Evidence and check results, and the audit log as a source of evidence (each entry with its Merkle proof).

An :class:`Evidence` item is one thing a check looked at: a file's mode, a TLS context's settings, a listening
socket, or an audit entry. Audit entries come with their RFC 9162 inclusion proof under the first checkpoint that
covers them, and that signed checkpoint, so an auditor holding the device's public key can check the entry is the
one the device logged (``edgeshield.audit.merkle.verify_inclusion``) without trusting the report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeshield.audit import AuditLog, Checkpoint, Entry

Status = Literal["pass", "fail", "not_assessed", "not_applicable"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "not_assessed", "not_applicable")
MAX_PROOFS = 32  # inclusion proofs per report: each one reads the leaves up to its checkpoint
_RAW_MIN_FLOATS = 4  # a list holding this many non-integral numbers looks like raw input values
_RAW_MIN_LENGTH = 32  # and so does any list of this many numbers


@dataclass(frozen=True)
class Evidence:
    """What a check looked at: ``kind`` (audit_entry, file, tls, probe, socket, store, config, network_layer), a
    plain-language ``description``, where it came from (``source``: a path or URL), the observed ``data``, and for an
    audit entry its inclusion ``proof`` and the checkpoint it is under."""

    kind: str
    description: str
    source: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    proof: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "description": self.description, "source": self.source,
                               "data": self.data}
        if self.proof is not None:
            out["proof"] = self.proof
        return out


@dataclass(frozen=True)
class CheckResult:
    """A check's verdict with its reason, the evidence it rests on, and a command that reproduces what it saw."""

    check: str
    status: Status
    reason: str
    evidence: tuple[Evidence, ...] = ()
    command: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if self.status == "pass" and not self.evidence:  # a design rule, not user input: nothing passes bare
            raise ValueError(f"check {self.check} cannot pass without evidence")

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "reason": self.reason,
                "evidence": [e.to_dict() for e in self.evidence], "command": self.command}


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def raw_looking(value: Any, path: str = "data") -> list[str]:
    """The paths inside an audit entry's data that look like raw model inputs rather than digests and counts: a
    list of lists of numbers (a tensor), a list holding several non-integral numbers, a long list of numbers
    (other than ``labels``: answered class indices), or a ``*_sha256`` field that is not a SHA-256 hex digest."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            if key.endswith("sha256") and v is not None and not (
                    _is_digest(v) or (isinstance(v, list) and all(_is_digest(d) for d in v))):
                found.append(f"{path}.{key} (not a SHA-256 digest)")
            elif key == "labels" and isinstance(v, list) and all(isinstance(x, int) for x in v):
                continue
            else:
                found += raw_looking(v, f"{path}.{key}")
    elif isinstance(value, list):
        numbers = [v for v in value if _number(v)]
        fractional = sum(1 for v in numbers if isinstance(v, float) and math.isfinite(v) and not v.is_integer())
        if any(isinstance(v, list) and any(_number(x) for x in v) for v in value):
            found.append(f"{path} (a nested list of numbers)")
        elif fractional >= _RAW_MIN_FLOATS or len(numbers) >= _RAW_MIN_LENGTH:
            found.append(f"{path} (a list of {len(numbers)} numbers)")
        else:
            for i, v in enumerate(value):
                if isinstance(v, dict | list):
                    found += raw_looking(v, f"{path}[{i}]")
    return found


@dataclass
class AuditScan:
    """One pass over the whole log: entries per kind, the newest of each kind, and entries whose data looks raw."""

    entries: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    newest: dict[str, Entry] = field(default_factory=dict)
    raw: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (seq, kind, paths), the first 20
    raw_total: int = 0

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> AuditScan:
        scan = cls()
        for e in entries:
            scan.entries += 1
            scan.counts[e.kind] += 1
            scan.newest[e.kind] = e
            paths = raw_looking(e.data)
            if paths:
                scan.raw_total += 1
                if len(scan.raw) < 20:
                    scan.raw.append((e.seq, e.kind, paths))
        return scan


class AuditSource:
    """The deployment's audit log, read-only: one scan shared by every check, and entries as evidence."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = AuditLog(path, readonly=True)
        self._scan: AuditScan | None = None
        self._checkpoints: list[Checkpoint] | None = None
        self._proofs = 0

    @property
    def scan(self) -> AuditScan:
        if self._scan is None:
            self._scan = AuditScan.of(self.log.entries())
        return self._scan

    def newest(self, kind: str) -> Entry | None:
        return self.scan.newest.get(kind)

    def count(self, *kinds: str) -> int:
        return sum(self.scan.counts.get(k, 0) for k in kinds)

    def _covering(self, seq: int) -> Checkpoint | None:
        if self._checkpoints is None:
            self._checkpoints = self.log.checkpoints()
        return next((cp for cp in self._checkpoints if cp.tree_size > seq), None)

    def evidence(self, entry: Entry, description: str) -> Evidence:
        """The entry as evidence, with its inclusion proof under the first checkpoint covering it (or, for an
        entry no checkpoint covers yet, under the whole log, said so)."""
        proof: dict[str, Any] | None = None
        if self._proofs < MAX_PROOFS:
            self._proofs += 1
            cp = self._covering(entry.seq)
            inclusion = self.log.inclusion_proof(entry.seq, cp.tree_size if cp is not None else None)
            proof = {"inclusion": inclusion.to_dict(), "checkpoint": cp.to_dict() if cp is not None else None,
                     "verified": inclusion.verify(cp.root if cp is not None else None)}
            if cp is None:
                proof["note"] = "no checkpoint covers this entry yet: the proof is against the log's current root"
        else:
            proof = {"note": f"proof omitted: a report carries at most {MAX_PROOFS}; run `edgeshield audit show`"}
        data = {"seq": entry.seq, "ts": entry.ts, "kind": entry.kind, "actor": entry.actor, "data": entry.data,
                "entry_hash": entry.entry_hash.hex()}
        return Evidence("audit_entry", description, str(self.path), data, proof)
