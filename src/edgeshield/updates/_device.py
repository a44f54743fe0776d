"""The device's updater: pull (TUF), install into the inactive slot, switch, health-check, commit, roll back.

    updater = DeviceUpdater("/var/lib/edgeshield/update", device_key=load_device_private_key("device.key"))
    updater.pull()                    # TUF refresh + download + verify into staged/ (refused: typed error, audited)
    updater.install()                 # inactive slot, fsync, switch `current`, health check (fail: switch back)
    updater.commit()                  # raise the floor to the running version: no way back below it
    updater.rollback()                # to the previous slot, never below the floor

Each step follows the order of trust: nothing is written to a slot before the update verified (owner signature,
this device among its recipients, model version not below the floor, the parts bound to each other); the floor
rises only on commit; every attempt, refused or not, is one audit entry. Every command first ``recover``s from
whatever a crash (kill -9, power loss) left, so the device always comes back with a verified model in
``current`` (or none, if it never had one). The directory is driven by one updater at a time (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeshield._io import atomic_write_bytes
from edgeshield.errors import (
    EdgeShieldError,
    InputError,
    IntegrityError,
    KeyMaterialError,
    NotARecipientError,
    OutputExistsError,
)
from edgeshield.keys import DevicePrivateKey, OwnerPublicKey, key_id, load_owner_public_key
from edgeshield.updates._errors import (
    FloorStateError,
    FloorViolationError,
    HealthCheckError,
    MalformedUpdateError,
    NothingToDoError,
    UpdateConfigError,
    UpdateInProgressError,
    UpdateMismatchError,
    UpdatePendingError,
    UpdateRefusedError,
)
from edgeshield.updates._floor import Floor, SignedFileFloor
from edgeshield.updates._health import health_check
from edgeshield.updates._index import PART_FILES, UpdateIndex, check_model_name
from edgeshield.updates._slots import SlotRecord, Slots

if TYPE_CHECKING:
    from edgeshield.audit import AuditLog

CONFIG = "update.json"
CONFIG_FORMAT = "edgeshield.update-device"
ACTOR = "updater"
_T = TypeVar("_T")


FLOOR_FILE = "signed-file"
FLOOR_TPM = "tpm-nv-counter"


@dataclass(frozen=True)
class FloorConfig:
    """Which floor a device keeps: the signed state file in its directory, or a TPM NV counter (``index``, and the
    TCTI given at provisioning, if any)."""

    kind: str = FLOOR_FILE
    index: int | None = None
    tcti: str | None = None

    @classmethod
    def parse(cls, spec: str, tcti: str | None = None) -> FloorConfig:
        """``file`` or ``tpm[:0xINDEX]`` (the CLI's ``--floor``)."""
        if spec in ("file", FLOOR_FILE):
            if tcti is not None:
                raise UpdateConfigError("--tcti is for a TPM floor (--floor tpm)")
            return cls()
        kind, _, index = spec.partition(":")
        if kind != "tpm":
            raise UpdateConfigError(f"unknown floor {spec!r}: give file or tpm[:0xINDEX]")
        from edgeshield.hardware._nvfloor import DEFAULT_FLOOR_INDEX, parse_index

        return cls(FLOOR_TPM, parse_index(index) if index else DEFAULT_FLOOR_INDEX, tcti)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == FLOOR_FILE:
            return {"kind": FLOOR_FILE}
        return {"kind": self.kind, "index": f"0x{self.index:08x}", "tcti": self.tcti}

    @classmethod
    def from_dict(cls, d: object) -> FloorConfig:
        if d is None:
            return cls()  # provisioned before TPM floors existed
        if not isinstance(d, dict) or d.get("kind") not in (FLOOR_FILE, FLOOR_TPM):
            raise ValueError("floor")
        if d["kind"] == FLOOR_FILE:
            return cls()
        index, tcti = d.get("index"), d.get("tcti")
        if not isinstance(index, str) or not (tcti is None or isinstance(tcti, str)):
            raise ValueError("floor")
        from edgeshield.hardware._nvfloor import parse_index

        try:
            return cls(FLOOR_TPM, parse_index(index), tcti)
        except InputError:
            raise ValueError("floor index") from None

    def open(self, device_dir: Path, *, tcti: str | None = None) -> Floor:
        """The floor object. For a TPM floor the TCTI is ``tcti``, else ``$EDGESHIELD_TPM_TCTI``, else the one
        given at provisioning, else ``device:/dev/tpmrm0``."""
        if self.kind == FLOOR_FILE:
            return SignedFileFloor(device_dir / "floor.json", device_dir / "floor.key")
        from edgeshield.hardware._nvfloor import TpmCounterFloor
        from edgeshield.hardware._tpm import TCTI_ENV

        if self.index is None:
            raise UpdateConfigError("a TPM floor needs its NV index")
        return TpmCounterFloor(self.index, tcti=tcti or os.environ.get(TCTI_ENV) or self.tcti)


@dataclass(frozen=True)
class DeviceConfig:
    """What a device was provisioned with (``update init``): the model it runs, where its repository is, and which
    floor it keeps."""

    model: str
    url: str | None
    floor: FloorConfig = FloorConfig()

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, "version": 1, "model": self.model, "url": self.url,
                "floor": self.floor.to_dict()}

    @classmethod
    def load(cls, device_dir: Path) -> DeviceConfig:
        path = device_dir / CONFIG
        try:
            d = json.loads(path.read_bytes())
            if d.get("format") != CONFIG_FORMAT or d.get("version") != 1:
                raise ValueError("format")
            url = d.get("url")
            if url is not None and not isinstance(url, str):
                raise ValueError("url")
            return cls(check_model_name(d["model"]), url, FloorConfig.from_dict(d.get("floor")))
        except FileNotFoundError:
            raise UpdateConfigError(f"not an update device directory (run 'edgeshield update init'): "
                                    f"{device_dir}") from None
        except (ValueError, KeyError, TypeError, AttributeError, MalformedUpdateError):
            raise UpdateConfigError(f"the device's {path} is malformed") from None


@dataclass(frozen=True)
class Verified:
    """An update that passed every check the device makes before writing anything."""

    index: UpdateIndex
    files: dict[str, Path]


def init_device(device_dir: str | os.PathLike[str], *, root: bytes, owner_key_pem: bytes, model: str,
                url: str | None = None, floor: FloorConfig | None = None) -> Path:
    """Provision ``device_dir``: the TUF root it trusts, the owner's bundle key, the model name, and a new floor:
    by default a signed state file (key 0600, state at 0), or with ``floor=FloorConfig(FLOOR_TPM, index)`` a TPM
    NV counter defined now (at 1, or above if this TPM's counters went further before; refused when the index
    is already defined). Refuses a directory already provisioned."""
    d = Path(device_dir)
    check_model_name(model)
    if (d / CONFIG).exists():
        raise OutputExistsError(f"the device directory is already provisioned: {d}")
    try:
        json.loads(root)
    except ValueError:
        raise UpdateConfigError("the TUF root is not JSON (give the repository's metadata/root.json)") from None
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    (d / "tuf").mkdir(exist_ok=True, mode=0o700)
    atomic_write_bytes(d / "owner.pub", owner_key_pem)
    load_owner_public_key(d / "owner.pub")  # a key of the right kind, or a typed error now rather than later
    atomic_write_bytes(d / "tuf" / "root.json", root)
    floor = floor or FloorConfig()
    if floor.kind == FLOOR_FILE:
        SignedFileFloor.create(d / "floor.json", d / "floor.key")
    else:
        from edgeshield.hardware._nvfloor import TpmCounterFloor

        if floor.index is None:
            raise UpdateConfigError("a TPM floor needs its NV index")
        TpmCounterFloor.create(floor.index, tcti=floor.tcti)
    config = DeviceConfig(model, url, floor)
    atomic_write_bytes(d / CONFIG, (json.dumps(config.to_dict(), indent=1) + "\n").encode())
    return d


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UpdateRefusedError):
        return exc.reason
    if isinstance(exc, FloorStateError):
        return "floor-state"
    if isinstance(exc, NotARecipientError):
        return "not-a-recipient"
    if isinstance(exc, KeyMaterialError):
        return "key"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, HealthCheckError):
        return "health-check"
    return type(exc).__name__


class DeviceUpdater:
    """The updater for one device directory (``init_device`` made it). ``floor`` defaults to the one the
    directory was provisioned with (its signed state file, or its TPM NV counter, on ``tcti`` if given);
    ``audit`` to an unsigned-checkpoint log at ``DIR/audit.db`` (pass your own, signed, log)."""

    def __init__(self, device_dir: str | os.PathLike[str], *, device_key: DevicePrivateKey,
                 owner_key: OwnerPublicKey | None = None, floor: Floor | None = None, audit: AuditLog | None = None,
                 lock_timeout_s: float = 10.0, tcti: str | None = None) -> None:
        self.dir = Path(device_dir)
        self.config = DeviceConfig.load(self.dir)
        self.device_key = device_key
        self.owner_key = owner_key if owner_key is not None else load_owner_public_key(self.dir / "owner.pub")
        self.floor: Floor = floor if floor is not None else self.config.floor.open(self.dir, tcti=tcti)
        self.slots = Slots(self.dir)
        self.lock_timeout_s = lock_timeout_s
        self._audit = audit
        self._owns_audit = audit is None

    # -- plumbing --
    def close(self) -> None:
        if self._owns_audit and self._audit is not None:
            self._audit.close()
            self._audit = None

    def __enter__(self) -> DeviceUpdater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, kind: str, data: dict[str, Any]) -> None:
        if self._audit is None:
            from edgeshield.audit import AuditLog

            self._audit = AuditLog(self.dir / "audit.db")
        self._audit.append(kind, ACTOR, {"model": self.config.model, **data})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UpdateInProgressError(f"another updater is working on {self.dir}") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock (so does the process dying)

    def _attempt(self, action: str, fn: Callable[[], _T], version: Callable[[], int | None] | None = None, *,
                 recovered: list[str] | None = None) -> _T:
        """Run one step under the lock, after recovery; audit a refusal or failure (the step audits success)."""
        with self._locked():
            try:
                actions = self._recover()
                if recovered is not None:
                    recovered.extend(actions)
                return fn()
            except (IntegrityError, KeyMaterialError, UpdateRefusedError, HealthCheckError) as exc:
                self._log("update.refused", {"action": action, "version": version() if version else None,
                                             "reason": _reason(exc), "error": str(exc)[:500]})
                raise
            except EdgeShieldError as exc:
                if not isinstance(exc, NothingToDoError | InputError):
                    self._log("update.failed", {"action": action, "reason": _reason(exc), "error": str(exc)[:500]})
                raise

    # -- checks --
    def verify(self, index: UpdateIndex, files: dict[str, Path]) -> Verified:
        """Every check made before anything is written: the parts belong together, the bundle is the owner's and
        addressed to this device, and its version is not below the floor."""
        from edgeshield import bundles

        if index.model != self.config.model:
            raise UpdateMismatchError(f"the update is for {index.model}, this device runs {self.config.model}")
        if set(files) != set(index.targets):
            raise UpdateMismatchError("the update's files are not the parts its index names")
        manifest = bundles.verify(files["bundle"], self.owner_key)
        if (manifest.model_version, manifest.bundle_id, manifest.model_sha256) != (
                index.model_version, index.bundle_id, index.model_sha256):
            raise UpdateMismatchError(
                f"the bundle (version {manifest.model_version}, id {manifest.bundle_id}) is not the one the update "
                f"index names (version {index.model_version}, id {index.bundle_id})")
        me = key_id(self.device_key.public_key())
        if me not in manifest.recipient_key_ids:
            raise NotARecipientError(f"the update's bundle is not addressed to this device ({me})")
        floor = self.floor.read()
        if manifest.model_version < floor:
            raise FloorViolationError(f"the update's model version {manifest.model_version} is below this device's "
                                      f"floor {floor}")
        check_raise = getattr(self.floor, "check_raise", None)  # a TPM counter floor bounds one raise's NV writes
        if callable(check_raise):
            check_raise(manifest.model_version, floor)
        self._check_parts(index, files)
        return Verified(index, files)

    @staticmethod
    def _check_parts(index: UpdateIndex, files: dict[str, Path]) -> None:
        from edgeshield.adversarial import DetectorFile, InputSpec

        try:
            spec = InputSpec.load(files["input_spec"]) if "input_spec" in files else None
            detector = DetectorFile.load(files["detector"]) if "detector" in files else None
        except InputError as exc:
            raise MalformedUpdateError(f"a part of the update does not load: {exc}") from None
        if detector is not None:
            if detector.model_sha256 != index.model_sha256:
                raise UpdateMismatchError("the update's detector file was calibrated for another model")
            if spec is not None and detector.input_spec != spec:
                raise UpdateMismatchError("the update's input spec differs from its detector file's")

    # -- recovery --
    def _usable(self, slot: str) -> SlotRecord | None:
        """A slot that may be current: complete, not failed, for this model, and not below the floor."""
        record = self.slots.valid(slot)
        if record is None or record.health == "failed" or record.model != self.config.model:
            return None
        return record if record.model_version >= self.floor.read() else None

    def _health(self, record: SlotRecord) -> SlotRecord:
        files = {p: f.name for p, f in record.files.items()}
        try:
            health_check(self.slots.path(record.slot), self.owner_key, self.device_key, files)
        except (HealthCheckError, IntegrityError, UpdateMismatchError):
            self.slots.set_health(record, "failed")
            raise
        return self.slots.set_health(record, "passed")

    def _recover(self) -> list[str]:
        """Bring ``current`` back to a verified model after whatever a crash left; returns what it did."""
        self.slots.remove_temporaries()
        for leftover in ("staged.tmp", "staged.new", "staged.old"):
            shutil.rmtree(self.dir / leftover, ignore_errors=True)
        actions: list[str] = []
        floor = self.floor.read()  # a missing or forged floor stops everything here
        cur = self.slots.current()
        record = self._usable(cur) if cur is not None else None
        if record is not None and record.health == "unchecked":
            try:
                record = self._health(record)
                actions.append(f"health-checked slot {record.slot} (version {record.model_version})")
            except (HealthCheckError, IntegrityError, UpdateMismatchError) as exc:
                actions.append(f"slot {record.slot} failed its health check: {exc}")
                record = None
        if record is None:
            fallback = self.slots.other(cur)
            other = self._usable(fallback)
            if other is not None and other.health == "unchecked":
                try:
                    other = self._health(other)
                except (HealthCheckError, IntegrityError, UpdateMismatchError):
                    other = None
            if other is not None:
                self.slots.switch(fallback)
                actions.append(f"current -> slot {fallback} (version {other.model_version})")
            elif cur is not None or self.slots.current_link.is_symlink():
                self.slots.switch(None)
                actions.append("no verified model at or above the floor: current removed")
        if actions:
            self._log("update.recovered", {"actions": actions, "floor": floor})
        return actions

    def recover(self) -> list[str]:
        """Run recovery now (every other step runs it first)."""
        with self._locked():
            return self._recover()

    # -- the steps --
    def pull(self, url: str | None = None, *, timeout_s: float = 30.0, deadline_s: float = 600.0,
             max_bundle_bytes: int | None = None) -> UpdateIndex | None:
        """Fetch the newest update for this device's model through TUF, verify it, and stage it for ``install``.

        Returns the staged update's index, or None when the device already runs (or has staged) that version."""
        from edgeshield.updates._fetch import fetch_update

        repo = url or self.config.url
        if not repo:
            raise UpdateConfigError("no repository URL: pass one, or give one to 'update init --url'")
        seen: list[int] = []

        def step() -> UpdateIndex | None:
            tmp = self.dir / "staged.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            fetched = fetch_update(self.dir / "tuf" / "metadata", tmp, repo, self.config.model,
                                   (self.dir / "tuf" / "root.json").read_bytes(), timeout_s=timeout_s,
                                   deadline_s=deadline_s, max_bundle_bytes=max_bundle_bytes)
            seen.append(fetched.index.model_version)
            cur = self.slots.current()
            running = self.slots.record(cur) if cur is not None else None
            staged = self.staged()
            for have in (running, staged):
                if have is not None and have.bundle_id == fetched.index.bundle_id:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return None
            self.verify(fetched.index, fetched.files)
            self._stage(tmp, fetched.index, fetched.files)
            self._log("update.staged", {"version": fetched.index.model_version, "bundle_id": fetched.index.bundle_id,
                                        "url": repo})
            return fetched.index

        return self._attempt("pull", step, lambda: seen[-1] if seen else None)

    def _stage(self, tmp: Path, index: UpdateIndex, files: dict[str, Path]) -> None:
        stage = tmp.with_name("staged.new")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        for part, src in files.items():
            os.replace(src, stage / PART_FILES[part])
        atomic_write_bytes(stage / "update.json", index.encode())
        self._discard_staged()
        os.replace(stage, self.dir / "staged")
        shutil.rmtree(tmp, ignore_errors=True)

    def _discard_staged(self) -> None:
        """Remove the staged update in one rename, so a crash never leaves half of one behind."""
        staged, old = self.dir / "staged", self.dir / "staged.old"
        shutil.rmtree(old, ignore_errors=True)
        if staged.exists():
            os.replace(staged, old)
            shutil.rmtree(old, ignore_errors=True)

    def staged(self) -> UpdateIndex | None:
        path = self.dir / "staged" / "update.json"
        try:
            return UpdateIndex.decode(path.read_bytes())
        except FileNotFoundError:
            return None

    def _staged_files(self, index: UpdateIndex) -> dict[str, Path]:
        return {part: self.dir / "staged" / PART_FILES[part] for part in index.targets}

    def install(self, *, commit: bool = False) -> SlotRecord:
        """Install the staged update into the inactive slot, switch ``current`` to it and health-check it there;
        a failed check switches back to the previous slot. With ``commit``, commit it once healthy."""
        staged_index = self.staged()

        def step() -> SlotRecord:
            index = self.staged()
            if index is None:
                raise NothingToDoError("no staged update: run 'edgeshield update pull' first")
            cur = self.slots.current()
            running = self._usable(cur) if cur is not None else None
            if running is not None and running.model_version > self.floor.read():
                raise UpdatePendingError(f"version {running.model_version} in slot {running.slot} is installed but "
                                         "not committed: commit it or roll it back first")
            files = self._staged_files(index)
            try:
                self.verify(index, files)  # again: the staged files are only files on disk
            except EdgeShieldError:
                self._discard_staged()
                raise
            target = self.slots.other(cur)
            record = self.slots.write(target, model=index.model, model_version=index.model_version,
                                      bundle_id=index.bundle_id, sources=files)
            self.slots.switch(target)
            try:
                record = self._health(record)
            except (HealthCheckError, IntegrityError, UpdateMismatchError):
                self.slots.switch(cur if running is not None else None)
                self._discard_staged()
                raise
            self._discard_staged()
            self._log("update.installed", {"version": record.model_version, "bundle_id": record.bundle_id,
                                           "slot": target, "previous": running.summary() if running else None})
            return record

        record = self._attempt("install", step, lambda: staged_index.model_version if staged_index else None)
        if commit and record.model_version > self.floor.read():  # at the floor already (a TPM counter starts
            self.commit()                                        # at 1): nothing to raise
        return record

    def commit(self) -> int:
        """Raise the floor to the running model's version (after its health check passed); returns the floor."""

        def step() -> int:
            cur = self.slots.current()
            record = self._usable(cur) if cur is not None else None
            if record is None or record.health != "passed":
                raise NothingToDoError("no healthy installed model to commit")
            floor = self.floor.read()
            if record.model_version <= floor:
                raise NothingToDoError(f"version {record.model_version} is already committed (floor {floor})")
            from edgeshield import bundles

            bundles.verify(self.slots.path(record.slot) / record.files["bundle"].name, self.owner_key)
            self.floor.raise_to(record.model_version)
            self._log("update.committed", {"version": record.model_version, "bundle_id": record.bundle_id,
                                           "previous_floor": floor, "floor": record.model_version})
            return record.model_version

        return self._attempt("commit", step)

    def rollback(self) -> SlotRecord:
        """Switch back to the previous slot, after it passes its health check; never to a version below the floor."""
        target_version: list[int] = []

        def step() -> SlotRecord:
            cur = self.slots.current()
            other = self.slots.other(cur)
            record = self.slots.valid(other)
            if record is None or record.model != self.config.model:
                raise NothingToDoError("there is no previous model to roll back to")
            if record.health == "failed":
                raise NothingToDoError(f"the previous slot ({other}) failed its health check: nothing to roll back "
                                       "to")
            target_version.append(record.model_version)
            floor = self.floor.read()
            if record.model_version < floor:
                raise FloorViolationError(f"the previous slot holds version {record.model_version}, below the "
                                          f"floor {floor} (raised when a newer version was committed)")
            record = self._health(record)
            self.slots.switch(other)
            running = self.slots.record(cur) if cur is not None else None
            self._log("update.rolled_back", {"version": record.model_version, "bundle_id": record.bundle_id,
                                             "slot": other,
                                             "from_version": running.model_version if running else None})
            return record

        return self._attempt("rollback", step, lambda: target_version[-1] if target_version else None)

    def status(self) -> dict[str, Any]:
        """Where the device stands: the floor, the current and previous slots, a staged update, what recovery did."""
        actions: list[str] = []

        def step() -> dict[str, Any]:
            cur = self.slots.current()
            floor = self.floor.describe()
            current = self.slots.record(cur) if cur is not None else None
            previous = self.slots.valid(self.slots.other(cur))
            staged = self.staged()
            return {
                "model": self.config.model, "url": self.config.url, "floor": floor,
                "current": current.summary() if current else None,
                "previous": previous.summary() if previous else None,
                "pending": bool(current and current.model_version > floor["floor"]),
                "rollback_possible": bool(previous and previous.model_version >= floor["floor"]),
                "staged": staged.to_dict() if staged else None,
                "recovered": actions,
                "serve": {"bundle": str(self.dir / "current" / PART_FILES["bundle"]),
                          "detector": str(self.dir / "current" / PART_FILES["detector"])
                          if current and "detector" in current.files else None},
            }

        return self._attempt("status", step, recovered=actions)
