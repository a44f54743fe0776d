"""The update index: one small signed target naming the parts of one update (bundle, detector file, input spec).

The owner publishes ``<model>/update.json`` beside the parts; TUF pins its hash like any target, so a device that
reads it knows which three files make up the newest update and which model version they carry. Each part's TUF
target also carries ``custom.edgeshield`` with the same model name, version and part name, and the device checks
the parts against each other (the bundle's signed ``model_version`` and ``model_sha256``), so a part from another
update is refused even under a compromised repository key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edgeshield.updates._errors import MalformedUpdateError, UpdateMismatchError

FORMAT = "edgeshield.update"
FORMAT_VERSION = 1
MAX_INDEX_BYTES = 16384
PARTS = ("bundle", "detector", "input_spec")
PART_FILES = {"bundle": "model.esb", "detector": "detector.json", "input_spec": "input-spec.json"}
MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_VERSION = 2**63 - 1


def index_path(model: str) -> str:
    return f"{model}/update.json"


def part_path(model: str, version: int, part: str) -> str:
    return f"{model}/{version}/{PART_FILES[part]}"


def check_model_name(model: object) -> str:
    if not isinstance(model, str) or not MODEL_RE.fullmatch(model):
        raise MalformedUpdateError(f"model name must match {MODEL_RE.pattern}, got {model!r}")
    return model


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_VERSION:
        raise MalformedUpdateError(f"update index {what} must be a whole number in 0..2**63-1")
    return value


@dataclass(frozen=True)
class UpdateIndex:
    """What one published update is: the model, its version, the bundle's identity and the parts' target paths."""

    model: str
    model_version: int
    bundle_id: str
    model_sha256: str
    targets: dict[str, str]  # part -> target path; "bundle" always, "detector" / "input_spec" when published

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model": self.model, "model_version": self.model_version,
                "bundle_id": self.bundle_id, "model_sha256": self.model_sha256, "targets": dict(self.targets)}

    def encode(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n").encode()

    def custom(self, part: str) -> dict[str, Any]:
        """The ``custom`` value of a part's TUF target."""
        return {"edgeshield": {"model": self.model, "model_version": self.model_version, "part": part}}

    @classmethod
    def decode(cls, raw: bytes) -> UpdateIndex:
        if len(raw) > MAX_INDEX_BYTES:
            raise MalformedUpdateError("update index is too large")
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedUpdateError("update index is not JSON") from None
        fields = {"format", "version", "model", "model_version", "bundle_id", "model_sha256", "targets"}
        if not isinstance(d, dict) or set(d) != fields:
            raise MalformedUpdateError("update index has the wrong fields")
        if d["format"] != FORMAT or d["version"] != FORMAT_VERSION:
            raise MalformedUpdateError("not an EdgeShield update index (version 1)")
        model = check_model_name(d["model"])
        version = _int(d["model_version"], "model_version")
        if not isinstance(d["bundle_id"], str) or not _HEX32.fullmatch(d["bundle_id"]):
            raise MalformedUpdateError("update index bundle_id must be 32 hex digits")
        if not isinstance(d["model_sha256"], str) or not _HEX64.fullmatch(d["model_sha256"]):
            raise MalformedUpdateError("update index model_sha256 must be 64 hex digits")
        targets = d["targets"]
        if not isinstance(targets, dict) or "bundle" not in targets or not set(targets) <= set(PARTS):
            raise MalformedUpdateError(f"update index targets must name the bundle and only {', '.join(PARTS)}")
        for part, path in targets.items():
            if path != part_path(model, version, part):
                raise MalformedUpdateError(f"update index names {path!r} for the {part}, not "
                                           f"{part_path(model, version, part)!r}")
        return cls(model, version, d["bundle_id"], d["model_sha256"], dict(targets))


def check_custom(custom: object, index: UpdateIndex, part: str) -> None:
    """A part's TUF ``custom`` must say it belongs to this update (mix-and-match under a repository's own key)."""
    want = index.custom(part)
    if custom != want:
        raise UpdateMismatchError(f"the {part} target is labelled {custom!r}, not as part of {index.model} "
                                  f"version {index.model_version}")
