"""Regulation mapping files: one editable YAML file per regulation, each requirement tied to the checks that
evaluate it.

    regulation: gdpr
    title: General Data Protection Regulation (EU) 2016/679
    requirements:
      - id: art32-1a
        title: Pseudonymisation and encryption of personal data
        reference: GDPR Art. 32(1)(a)
        checks: [encryption_at_rest, encryption_in_transit]
        note: optional text shown beside the result (why these checks, or why none)

A requirement with ``checks: []`` is reported ``not_assessed`` ("no automated check"). Files are read with
PyYAML's safe loader, node by node, so every error names the file and line: an unknown field, a missing one, a
value of the wrong type, a duplicate id, or a check id no check implements is a :class:`MappingFileError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeshield.errors import InvalidArgumentError

_ID_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")  # an OSCAL token too: ids become OSCAL control ids
_TOP_FIELDS = {"regulation": True, "title": True, "source": False, "requirements": True}  # name -> required
_REQ_FIELDS = {"id": True, "title": True, "reference": True, "checks": True, "note": False}
MAX_MAPPING_BYTES = 1024 * 1024


class MappingFileError(InvalidArgumentError):
    """A regulation mapping file is malformed; the message is one line, ``FILE:LINE: what is wrong``."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(f"{file}:{line if line is not None else '?'}: {message}")
        self.file = file
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Requirement:
    """One requirement of a regulation and the ids of the checks that evaluate it (none: not assessed)."""

    regulation: str
    id: str
    title: str
    reference: str
    checks: tuple[str, ...]
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"regulation": self.regulation, "id": self.id, "title": self.title, "reference": self.reference,
                "checks": list(self.checks), "note": self.note}


@dataclass(frozen=True)
class Regulation:
    """A mapping file: the regulation's id and title, and its requirements in file order."""

    id: str
    title: str
    requirements: tuple[Requirement, ...]
    source: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "title": self.title, "source": self.source, "path": self.path,
                "requirements": [r.to_dict() for r in self.requirements]}


def default_mapping_paths() -> list[Path]:
    """The packaged mapping files (edgeshield/compliance/mappings/*.yaml), in name order."""
    root = resources.files("edgeshield.compliance") / "mappings"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml"))


def _line(node: object) -> int | None:
    mark = getattr(node, "start_mark", None)
    return None if mark is None else int(mark.line) + 1


def _text(file: str, node: object, what: str) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str" or not str(node.value).strip():
        raise MappingFileError(file, _line(node), f"{what} must be a non-empty string")
    value = str(node.value)
    if len(value) > 4096:
        raise MappingFileError(file, _line(node), f"{what} is longer than 4096 characters")
    return value


def _ident(file: str, node: object, what: str) -> str:
    value = _text(file, node, what)
    if not _ID_RE.match(value):
        raise MappingFileError(file, _line(node), f"{what} {value!r} must be 1-64 lowercase letters, digits, '.', "
                                                  "'_' or '-', starting with a letter")
    return value


def _fields(file: str, node: object, spec: dict[str, bool], what: str) -> dict[str, object]:
    """The mapping's values by key, each key known and given once, every required key present."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise MappingFileError(file, _line(node), f"{what} must be a mapping of fields")
    out: dict[str, object] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in spec:
            known = ", ".join(spec)
            raise MappingFileError(file, _line(key_node), f"unknown field {key!r} in {what} (the fields are: "
                                                          f"{known})")
        if key in out:
            raise MappingFileError(file, _line(key_node), f"field {key!r} given twice in {what}")
        out[key] = value_node
    for key, required in spec.items():
        if required and key not in out:
            raise MappingFileError(file, _line(node), f"{what} lacks the field {key!r}")
    return out


def parse_mapping(text: str, *, file: str, known_checks: Collection[str]) -> Regulation:
    """Parse one mapping file's text; ``known_checks`` are the check ids a requirement may name."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        raise MappingFileError(file, line, f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:  # a reader error (bad bytes) carries no mark of the MarkedYAMLError kind
        raise MappingFileError(file, None, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if root is None:
        raise MappingFileError(file, 1, "the file is empty")
    top = _fields(file, root, _TOP_FIELDS, "the file")
    reg_id = _ident(file, top["regulation"], "regulation")
    title = _text(file, top["title"], "title")
    source = _text(file, top["source"], "source") if "source" in top else None
    reqs_node = top["requirements"]
    if not isinstance(reqs_node, yaml.SequenceNode) or not reqs_node.value:
        raise MappingFileError(file, _line(reqs_node), "requirements must be a non-empty list")
    seen: dict[str, int | None] = {}
    requirements = []
    for item in reqs_node.value:
        fields = _fields(file, item, _REQ_FIELDS, "a requirement")
        rid = _ident(file, fields["id"], "id")
        if rid in seen:
            raise MappingFileError(file, _line(fields["id"]), f"requirement id {rid!r} is already used on line "
                                                              f"{seen[rid]}")
        seen[rid] = _line(fields["id"])
        checks_node = fields["checks"]
        if not isinstance(checks_node, yaml.SequenceNode):
            raise MappingFileError(file, _line(checks_node), "checks must be a list of check ids ([] for none)")
        checks = []
        for c in checks_node.value:
            name = _text(file, c, "a check id")
            if name not in known_checks:
                raise MappingFileError(file, _line(c), f"unknown check {name!r} (the checks are: "
                                                       f"{', '.join(sorted(known_checks))})")
            if name in checks:
                raise MappingFileError(file, _line(c), f"check {name!r} listed twice")
            checks.append(name)
        note = _text(file, fields["note"], "note") if "note" in fields else None
        requirements.append(Requirement(reg_id, rid, _text(file, fields["title"], "title"),
                                        _text(file, fields["reference"], "reference"), tuple(checks), note))
    return Regulation(reg_id, title, tuple(requirements), source, file)


def load_mapping(path: str | os.PathLike[str], *, known_checks: Collection[str] | None = None) -> Regulation:
    """Read and validate one mapping file (``known_checks`` defaults to the registered checks)."""
    from edgeshield._io import check_readable_file

    p = check_readable_file(path, what="mapping file")
    if p.stat().st_size > MAX_MAPPING_BYTES:
        raise MappingFileError(str(p), None, f"the file is larger than {MAX_MAPPING_BYTES} bytes")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MappingFileError(str(p), None, f"not UTF-8 text ({exc.reason})") from None
    if known_checks is None:
        from edgeshield.compliance._checks import CHECKS

        known_checks = CHECKS
    return parse_mapping(text, file=str(p), known_checks=known_checks)


def load_mappings(paths: Iterable[str | os.PathLike[str]] | None = None, *,
                  known_checks: Collection[str] | None = None) -> list[Regulation]:
    """Every mapping file (default: the packaged ones); two files for one regulation is an error."""
    regs: list[Regulation] = []
    for path in (default_mapping_paths() if paths is None else paths):
        reg = load_mapping(path, known_checks=known_checks)
        other = next((r for r in regs if r.id == reg.id), None)
        if other is not None:
            raise MappingFileError(str(path), 1, f"regulation {reg.id!r} is already mapped in {other.path}")
        regs.append(reg)
    return regs
