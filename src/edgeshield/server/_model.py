"""The served model as one object, and how ``serve`` finds, verifies and opens it (at start and on every reload).

Everything bound to one model — the ONNX Runtime session, the bundle's manifest, the input spec, the robust model
with its detectors, the served watermark (its class count), the licence of a released key — lives in one frozen
:class:`ServedModel`. ``ServerState.model`` holds the current one; a request takes it once when it starts and uses
only that, so a reload (``_reload``) that swaps ``state.model`` never makes a request mix two models.

:class:`ModelLoader` resolves where the model comes from (the configured files, or the current slot of an update
directory) and opens it with every check ``open_bundle`` makes, before anything is swapped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshield._io import sha256_file
from edgeshield.errors import InputError, InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec, RobustModel
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.keys import DevicePrivateKey, OwnerPublicKey
    from edgeshield.server._app import ModelSummary
    from edgeshield.server._licence import LicenceState
    from edgeshield.server._serve import ServeConfig
    from edgeshield.updates import DeviceUpdater
    from edgeshield.watermark import ServedWatermark

log = logging.getLogger("edgeshield.server")


class NoCurrentModelError(InputError):
    """An update directory has no current slot to serve (nothing installed, or recovery removed it)."""


class SlotFailedError(InputError):
    """The update directory's current slot failed its health check: it is not served."""


@dataclass(frozen=True)
class ServedModel:
    """One model and everything bound to it; replaced whole, never edited in place."""

    session: onnxruntime.InferenceSession
    manifest: ModelSummary  # the bundle's Manifest
    spec: InputSpec | None = None  # None: derived from the model's declared input (create_app fills it in)
    robust: RobustModel | None = None
    served_watermark: ServedWatermark | None = None
    licence: LicenceState | None = None  # only for a model opened from a released key
    files: Mapping[str, Path] = field(default_factory=dict)  # watched role -> the file it was opened from
    digests: Mapping[str, str] = field(default_factory=dict)  # role -> SHA-256 of that file when it was opened
    slot: str | None = None  # the update slot it came from (``--update-dir``)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "model_version": m.model_version,
                "slot": self.slot}


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's parts are on disk (and, from an update directory, the slot and the floor then)."""

    bundle: Path
    detector: Path | None = None
    input_spec: Path | None = None
    slot: str | None = None
    floor: int | None = None


class ModelLoader:
    """Finds and opens the served model for a ``ServeConfig``; holds the keys that open it for the server's life.

    With a device key (a PEM file or ``tpm:…``, unsealed once at start) it opens bundles as ``open_bundle`` does;
    with a released key it unwraps ``cfg.released_key`` inside the TPM again on every load (a new release file for
    a new bundle is picked up by a reload) and checks its licence first.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        from edgeshield import keys

        self.cfg = cfg
        self.owner: OwnerPublicKey = keys.load_owner_public_key(cfg.owner_key)
        self.device: DevicePrivateKey | None = None
        if cfg.device_key is not None:
            from edgeshield.hardware._tpm import load_device_key

            # A PEM file, or tpm:HANDLE / tpm:FILE unsealed from the TPM now (the key then lives only in this process).
            self.device = load_device_key(cfg.device_key, cfg.passphrase, tcti=cfg.tcti)
        self._updater: DeviceUpdater | None = None

    @property
    def updater(self) -> DeviceUpdater:
        if self._updater is None:
            from edgeshield.updates import DeviceUpdater

            if self.cfg.update_dir is None or self.device is None:
                raise InvalidArgumentError("serving from an update directory needs --update-dir and --device-key")
            self._updater = DeviceUpdater(self.cfg.update_dir, device_key=self.device, owner_key=self.owner,
                                          tcti=self.cfg.tcti)
        return self._updater

    # -- where --
    def resolve(self) -> ModelFiles:
        """The files to serve now: the update directory's current slot (complete, not failed, not below the
        floor), else the configured bundle and detector."""
        cfg = self.cfg
        if cfg.update_dir is None:
            if cfg.bundle is None:
                raise InvalidArgumentError("serve needs a BUNDLE or --update-dir")
            return ModelFiles(cfg.bundle, cfg.detector)
        from edgeshield.updates import FloorViolationError, SlotIntegrityError

        updater = self.updater
        floor = updater.floor.read()  # a missing or forged floor refuses the load (FloorStateError)
        slot = updater.slots.current()
        if slot is None:
            raise NoCurrentModelError(f"{cfg.update_dir} has no current slot: install an update first "
                                      "(edgeshield update install)")
        record = updater.slots.valid(slot)
        if record is None:
            raise SlotIntegrityError(f"slot {slot} of {cfg.update_dir} is incomplete or not the files it installed")
        if record.health == "failed":
            raise SlotFailedError(f"slot {slot} of {cfg.update_dir} failed its health check")
        if record.model_version < floor:
            raise FloorViolationError(f"slot {slot} holds version {record.model_version}, below the device's floor "
                                      f"{floor}")
        d = updater.slots.path(slot)
        parts = {p: d / f.name for p, f in record.files.items()}
        return ModelFiles(parts["bundle"], parts.get("detector"), parts.get("input_spec"), slot, floor)

    # -- open --
    def load(self) -> ServedModel:
        """Resolve, verify and open the model completely (nothing is served from it yet)."""
        from edgeshield import bundles
        from edgeshield.adversarial import DetectorFile, InputSpec, RobustModel
        from edgeshield.errors import IntegrityError

        cfg, files = self.cfg, self.resolve()
        digests = {"bundle": sha256_file(files.bundle)}
        licence: LicenceState | None = None
        if cfg.released_key is not None:
            opened, licence = self._open_released(files.bundle)
        else:
            if self.device is None:
                raise InvalidArgumentError("serve needs --device-key or --released-key")
            opened = bundles.open_bundle(files.bundle, self.owner, self.device)
        m = opened.manifest
        if files.slot is not None:
            record = self.updater.slots.record(files.slot)
            if record is None or (record.model_version, record.bundle_id) != (m.model_version, m.bundle_id):
                raise IntegrityError(f"slot {files.slot}'s bundle is not the one its record names")
        spec = InputSpec.from_metadata(m.metadata)
        if files.input_spec is not None:
            spec = InputSpec.load(files.input_spec)
        robust = None
        if files.detector is not None:
            digests["detector"] = sha256_file(files.detector)
            detector = DetectorFile.load(files.detector)
            detector.check_model(m.model_sha256)
            torch_model = None
            if "gradient" in detector.decision_detectors():  # the one detector that needs PyTorch ([eval])
                if self.device is None:
                    raise InvalidArgumentError("the gradient detector needs the plaintext model: it cannot run "
                                               "from a released key")
                from edgeshield.adversarial._torch import onnx_to_torch

                torch_model = onnx_to_torch(bundles.decrypt_model(files.bundle, self.owner, self.device))
            composed = None
            if detector.composed is not None:  # the model and its detectors in one signed graph: one session run
                if self.device is None:
                    log.warning("the detector file's composed graph is sealed to device keys; from a released key "
                                "the detectors run in numpy")
                else:
                    from edgeshield.adversarial._composed import open_composed

                    composed = open_composed(detector, self.owner, self.device, model_sha256=m.model_sha256)
            robust = RobustModel(opened.session, detector, torch_model=torch_model, composed=composed)
            spec = detector.input_spec
        watched = {"bundle": files.bundle, **({"detector": files.detector} if files.detector else {})}
        return ServedModel(session=opened.session, manifest=m, spec=spec, robust=robust,
                           served_watermark=served_watermark_for(cfg, opened.session), licence=licence,
                           files=watched, digests=digests, slot=files.slot)

    def _open_released(self, bundle: Path) -> tuple[Any, LicenceState | None]:
        """Unwrap the released key in the TPM (its licence checked first) and open ``bundle`` with it."""
        cfg = self.cfg
        if cfg.released_key is None or cfg.tpm_keys is None:
            raise InvalidArgumentError("--released-key needs --tpm-keys (the key file `attest keys` wrote)")
        from edgeshield.hardware import _attest as at
        from edgeshield.hardware import _release
        from edgeshield.server._licence import LicenceState

        file = _release.ReleasedKeyFile.load(cfg.released_key)
        device_keys = at.DeviceKeys.load(cfg.tpm_keys)
        with at.DeviceTpm(cfg.tcti) as tpm:
            released = _release.unwrap_released(file, tpm, device_keys)  # LicenceExpiredError when already expired
            guard = _release.LicenceGuard(file.licence, tpm)
            guard.check()  # once more, so the guard's last check (status page) is filled in
        opened = _release.open_released(bundle, self.owner, released)
        return opened, (LicenceState(guard, cfg.tcti, guard.bundle_id) if file.licence is not None else None)


def served_watermark_for(cfg: ServeConfig, session: onnxruntime.InferenceSession) -> ServedWatermark | None:
    """The DAWN watermark for this model's class count (the key and rate are the configuration's), if configured."""
    if cfg.served_watermark_key is None:
        return None
    from edgeshield.watermark import ServedWatermark, load_key

    shape = session.get_outputs()[0].shape
    classes = shape[-1] if shape and isinstance(shape[-1], int) else None
    if classes is None or classes < 2:
        raise InvalidArgumentError("a served watermark needs a classifier with a fixed number of classes")
    return ServedWatermark(load_key(cfg.served_watermark_key), cfg.served_watermark_rate, classes=classes)
