"""A/B model slots on the device: two directories and a ``current`` symlink switched by one atomic rename.

A slot is valid only once its record (``slot.json``) is written, last, after every file in it is fsynced; the
record is removed first when a slot is rewritten. So a crash at any point leaves each slot either complete (its
record names exactly the files in it) or visibly incomplete, and ``current`` names one slot or the other, never
half of each: ``os.replace`` of a symlink is atomic on POSIX.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from edgeshield._io import atomic_write_bytes, atomic_writer, fsync_dir, sha256_file
from edgeshield.updates._errors import SlotIntegrityError
from edgeshield.updates._index import PART_FILES, PARTS, check_model_name

SLOTS = ("a", "b")
RECORD = "slot.json"
FORMAT = "edgeshield.update-slot"
Health = Literal["unchecked", "passed", "failed"]
_HEALTH = ("unchecked", "passed", "failed")
_MAX_RECORD = 16384


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class SlotRecord:
    """What a slot holds: the update's model, version and bundle id, its files' digests, and its health."""

    slot: str
    model: str
    model_version: int
    bundle_id: str
    files: dict[str, FileRecord]
    installed: str
    health: Health = "unchecked"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "model": self.model, "model_version": self.model_version,
                "bundle_id": self.bundle_id, "files": {p: f.to_dict() for p, f in self.files.items()},
                "installed": self.installed, "health": self.health}

    def summary(self) -> dict[str, Any]:
        return {"slot": self.slot, "model": self.model, "model_version": self.model_version,
                "bundle_id": self.bundle_id, "health": self.health, "installed": self.installed,
                "parts": sorted(self.files)}

    @classmethod
    def from_dict(cls, slot: str, d: object) -> SlotRecord:
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != 1:
                raise ValueError("not a slot record")
            files = {}
            for part, f in d["files"].items():
                if part not in PARTS or f["name"] != PART_FILES[part]:
                    raise ValueError(f"unexpected part {part!r}")
                size = f["size"]
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError("bad size")
                files[part] = FileRecord(str(f["name"]), str(f["sha256"]), size)
            version = d["model_version"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 0 or "bundle" not in files:
                raise ValueError("bad version or no bundle")
            if d["health"] not in _HEALTH:
                raise ValueError("bad health")
            return cls(slot, check_model_name(d["model"]), version, str(d["bundle_id"]), files, str(d["installed"]),
                       d["health"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SlotIntegrityError(f"slot {slot}'s record is malformed: {exc}") from None


class Slots:
    """The two slots under ``root/slots`` and the ``root/current`` pointer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "slots"
        self.current_link = root / "current"

    def path(self, slot: str) -> Path:
        return self.dir / slot

    # -- reading --
    def record(self, slot: str) -> SlotRecord | None:
        """The slot's record, or None when the slot is empty or incomplete (no record)."""
        path = self.path(slot) / RECORD
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) > _MAX_RECORD:
            raise SlotIntegrityError(f"slot {slot}'s record is too large")
        try:
            return SlotRecord.from_dict(slot, json.loads(raw))
        except ValueError:
            raise SlotIntegrityError(f"slot {slot}'s record is not JSON") from None

    def check_files(self, record: SlotRecord, *, digests: bool = True) -> None:
        """Every file the record names is there with its size (and, with ``digests``, its SHA-256)."""
        for part, f in record.files.items():
            p = self.path(record.slot) / f.name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise SlotIntegrityError(f"slot {record.slot} lacks its {part} ({f.name})") from None
            if size != f.size or (digests and sha256_file(p) != f.sha256):
                raise SlotIntegrityError(f"slot {record.slot}'s {part} ({f.name}) is not the file it installed")

    def valid(self, slot: str) -> SlotRecord | None:
        """The record of a complete slot whose files match it; None for an empty, incomplete or altered slot."""
        try:
            record = self.record(slot)
            if record is not None:
                self.check_files(record)
        except SlotIntegrityError:
            return None
        return record

    def current(self) -> str | None:
        """The slot ``current`` points at, or None (no link, or a link to anything else)."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        name = Path(target)
        if name.parent != Path("slots") or name.name not in SLOTS:
            return None
        return name.name

    @staticmethod
    def other(slot: str | None) -> str:
        return "b" if slot == "a" else "a"

    # -- writing --
    def clear(self, slot: str) -> None:
        """Invalidate a slot (its record first, durably), then remove its files."""
        path = self.path(slot)
        path.mkdir(parents=True, exist_ok=True)
        (path / RECORD).unlink(missing_ok=True)
        fsync_dir(path)
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        fsync_dir(path)

    def write(self, slot: str, *, model: str, model_version: int, bundle_id: str,
              sources: dict[str, Path]) -> SlotRecord:
        """Copy ``sources`` (part -> file) into an emptied ``slot``, fsync each, then write the record last."""
        self.clear(slot)
        files: dict[str, FileRecord] = {}
        for part, src in sources.items():
            name = PART_FILES[part]
            h = hashlib.sha256()
            size = 0
            with atomic_writer(self.path(slot) / name) as out, src.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            files[part] = FileRecord(name, h.hexdigest(), size)
        record = SlotRecord(slot, model, model_version, bundle_id, files,
                            _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.write_record(record)
        return record

    def write_record(self, record: SlotRecord) -> None:
        atomic_write_bytes(self.path(record.slot) / RECORD,
                           (json.dumps(record.to_dict(), sort_keys=True, indent=1) + "\n").encode())

    def set_health(self, record: SlotRecord, health: Health) -> SlotRecord:
        updated = replace(record, health=health)
        self.write_record(updated)
        return updated

    def switch(self, slot: str | None) -> None:
        """Point ``current`` at ``slot`` (None: at nothing) with one atomic rename, made durable."""
        if slot is None:
            self.current_link.unlink(missing_ok=True)
            fsync_dir(self.root)
            return
        tmp = self.root / f".current.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"slots/{slot}", tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)

    def remove_temporaries(self) -> None:
        for tmp in self.root.glob(".current.*.tmp"):
            tmp.unlink(missing_ok=True)
        for slot in SLOTS:
            for tmp in self.path(slot).glob(".*.tmp") if self.path(slot).is_dir() else ():
                tmp.unlink(missing_ok=True)
