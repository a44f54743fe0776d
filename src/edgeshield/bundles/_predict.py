"""Feeding .npy batches to a session: loading, shape/dtype checks, saving outputs."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import InputError, InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.bundles._ort import onnxruntime


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a .npy array without ever unpickling (allow_pickle=False)."""
    p = check_readable_file(path, what="input")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{p} is not a readable .npy array: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{p} holds an archive, not a single array")
    return arr


def save_npy(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(float16)": np.float16}


def run_batch(session: onnxruntime.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Run one batch through a single-input session and return its first output."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InvalidArgumentError(f"the model has {len(inputs)} inputs; `run` feeds single-input models")
    spec = inputs[0]
    want = _ORT_DTYPES.get(spec.type)
    if want is None:
        raise InvalidArgumentError(f"unsupported model input type {spec.type}")
    if x.dtype != want:
        if not np.can_cast(x.dtype, want, casting="same_kind"):
            raise InputError(f"input dtype {x.dtype} cannot be used for a model expecting {np.dtype(want)}")
        x = x.astype(want)
    if x.ndim != len(spec.shape):
        raise InputError(f"input has shape {x.shape}; the model expects rank {len(spec.shape)} {spec.shape}")
    for axis, (got, dim) in enumerate(zip(x.shape, spec.shape, strict=True)):  # the ranks are equal: checked above
        if isinstance(dim, int) and got != dim:
            raise InputError(f"input has shape {x.shape}; axis {axis} must be {dim} ({spec.shape})")
    if x.size == 0:
        raise InputError("input batch is empty")
    return np.asarray(session.run(None, {spec.name: x})[0])


def labels(outputs: np.ndarray) -> list[Any]:
    """Class labels for classifier logits/probabilities (argmax of the last axis), else the values themselves."""
    if outputs.ndim >= 2 and np.issubdtype(outputs.dtype, np.floating):
        outputs = outputs.argmax(axis=-1)
    values: list[Any] = outputs.tolist()
    return values
