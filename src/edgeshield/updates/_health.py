"""The health check after switching: open the slot's bundle as the server would and run one inference.

Opening verifies everything the device can (owner signature, this device's payload MAC, the data-key
commitment) and builds the ONNX Runtime session; one inference on a valid input (the input spec's lower bound, or
zeros) must return finite outputs. A detector file in the slot must load and name this model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeshield.errors import EdgeShieldError
from edgeshield.keys import DevicePrivateKey, OwnerPublicKey
from edgeshield.updates._errors import HealthCheckError, UpdateMismatchError

_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def health_check(slot_dir: Path, owner_key: OwnerPublicKey, device_key: DevicePrivateKey,
                 files: dict[str, str]) -> dict[str, Any]:
    """Raise ``HealthCheckError`` (or the bundle's own integrity/key error) unless the slot serves; returns what
    was checked. ``files`` maps part -> file name in ``slot_dir``."""
    import numpy as np

    from edgeshield import bundles
    from edgeshield.adversarial import DetectorFile, InputSpec

    opened = bundles.open_bundle(slot_dir / files["bundle"], owner_key, device_key)
    spec: InputSpec | None = None
    try:
        if "input_spec" in files:
            spec = InputSpec.load(slot_dir / files["input_spec"])
        if "detector" in files:
            detector = DetectorFile.load(slot_dir / files["detector"])
            detector.check_model(opened.manifest.model_sha256)
            spec = spec or detector.input_spec
        spec = spec or InputSpec.from_metadata(dict(opened.manifest.metadata))
    except UpdateMismatchError:
        raise
    except EdgeShieldError as exc:
        raise HealthCheckError(f"the slot's detector file or input spec does not load: {exc}") from None
    inputs = opened.session.get_inputs()
    feeds: dict[str, Any] = {}
    for inp in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (inp.shape or [])]
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise HealthCheckError(f"the health check cannot build an input of type {inp.type} for {inp.name}")
        fill = 0.0
        if spec is not None and len(inputs) == 1:
            shape = [d if d is not None else 1 for d in spec.shape]
            dtype = spec.dtype
            fill = spec.min if spec.min is not None else (min(0.0, spec.max) if spec.max is not None else 0.0)
        feeds[inp.name] = np.full(shape, fill, dtype=dtype)
    try:
        outputs = opened.session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped exceptions
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HealthCheckError(f"the model failed its health-check inference: {first}") from None
    for out in outputs:
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise HealthCheckError("the model's health-check inference returned NaN or infinity")
    return {"model_version": opened.manifest.model_version, "bundle_id": opened.manifest.bundle_id,
            "outputs": [list(np.asarray(o).shape) for o in outputs]}
