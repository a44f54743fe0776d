"""Declarative input specs, checked before any inference (runtime path: numpy only).

A spec names the input's shape (``None`` for a free dimension such as the batch), dtype, value range and whether
NaN or infinity may appear (never, by default). It travels inside the bundle manifest's metadata under
``edgeshield.input_spec`` (canonical JSON) or as a side file, and optionally names the image shape behind a flat
input, which image-aware detectors (median smoothing) need.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._io import check_readable_file
from edgeshield.errors import (
    EmptyBatchError,
    InputDtypeError,
    InputNonFiniteError,
    InputQuantizationError,
    InputRangeError,
    InputShapeError,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    from edgeshield.bundles._ort import onnxruntime

METADATA_KEY = "edgeshield.input_spec"
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8"}


QUANTUM_TOLERANCE_ULPS = 2  # how far (in units in the last place) a value may sit from its grid point


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None
    allow_nan: bool = False
    allow_inf: bool = False
    image_shape: tuple[int, ...] | None = None  # e.g. (8, 8) behind a flat 64-feature input
    quantum: float | None = None  # values must be whole multiples of this step (e.g. 1/255 for 8-bit sensors)

    def __post_init__(self) -> None:
        if not self.shape or any(d is not None and (not isinstance(d, int) or d <= 0) for d in self.shape):
            raise InvalidArgumentError("input spec shape must be a non-empty list of positive integers or null")
        if self.dtype not in _DTYPES:
            raise InvalidArgumentError(f"input spec dtype must be one of {sorted(_DTYPES)}")
        for name in ("min", "max"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise InvalidArgumentError(f"input spec {name} must be a finite number")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidArgumentError("input spec min is larger than max")
        if self.quantum is not None and (
            isinstance(self.quantum, bool) or not isinstance(self.quantum, (int, float)) or not self.quantum > 0
        ):
            raise InvalidArgumentError("input spec quantum must be a positive number")
        if self.image_shape is not None:
            fixed = [d for d in self.shape[1:] if d is not None]
            if any(d <= 0 for d in self.image_shape) or math.prod(self.image_shape) != math.prod(fixed or [0]):
                raise InvalidArgumentError("input spec image_shape must hold exactly the per-example features")

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["image_shape"] = list(self.image_shape) if self.image_shape else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: object) -> InputSpec:
        if not isinstance(d, dict) or "shape" not in d:
            raise InvalidArgumentError("input spec must be a JSON object with at least a 'shape'")
        unknown = set(d) - {"shape", "dtype", "min", "max", "allow_nan", "allow_inf", "image_shape", "quantum"}
        if unknown:
            raise InvalidArgumentError(f"input spec has unknown fields: {sorted(unknown)}")
        try:
            return cls(
                shape=tuple(d["shape"]),
                dtype=d.get("dtype", "float32"),
                min=d.get("min"),
                max=d.get("max"),
                allow_nan=bool(d.get("allow_nan", False)),
                allow_inf=bool(d.get("allow_inf", False)),
                image_shape=tuple(d["image_shape"]) if d.get("image_shape") else None,
                quantum=d.get("quantum"),
            )
        except TypeError as exc:
            raise InvalidArgumentError(f"input spec is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"input spec is not valid JSON: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InputSpec:
        return cls.from_json(check_readable_file(path, what="input spec").read_text())

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> InputSpec | None:
        text = metadata.get(METADATA_KEY)
        return None if text is None else cls.from_json(text)

    @classmethod
    def from_session(cls, session: onnxruntime.InferenceSession, *,
                     min: float | None = None, max: float | None = None) -> InputSpec:  # noqa: A002 - public keywords
        """Shape and dtype from a single-input ONNX Runtime session (symbolic dimensions become free)."""
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise InvalidArgumentError("input specs describe single-input models")
        dtype = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
                 "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}.get(inputs[0].type)
        if dtype is None:
            raise InvalidArgumentError(f"unsupported model input type {inputs[0].type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape)
        return cls(shape=shape, dtype=dtype, min=min, max=max)

    # --- checking ----------------------------------------------------------------------------------------------
    def validate(self, x: object) -> np.ndarray:
        """Return ``x`` as an array if it satisfies the spec, else raise the error naming the offending field."""
        return self.check_values(self.check_structure(x))

    def check_structure(self, x: object) -> np.ndarray:
        """The checks on the array itself (type, rank, shape, an empty batch, dtype), not on its values."""
        if not isinstance(x, np.ndarray):
            raise InputDtypeError("type", f"expected a numpy array, got {type(x).__name__}")
        if x.ndim != len(self.shape):
            raise InputShapeError("shape", f"rank {x.ndim} {tuple(x.shape)}, "
                                           f"expected rank {len(self.shape)} {self._shape_text()}")
        for axis, (got, want) in enumerate(zip(x.shape, self.shape, strict=True)):  # equal ranks: checked above
            if want is not None and got != want:
                raise InputShapeError(f"shape[{axis}]", f"got {got}, expected {want} (spec {self._shape_text()})")
        if x.shape[0] == 0:
            raise EmptyBatchError("batch", "the batch is empty")
        if x.dtype != np.dtype(self.dtype):
            raise InputDtypeError("dtype", f"got {x.dtype}, expected {self.dtype}")
        return x

    def check_values(self, x: np.ndarray) -> np.ndarray:
        """The checks on the values (finite, range, grid) of an array that passed :meth:`check_structure`."""
        finite = x
        if x.dtype.kind == "f" and not np.isfinite(x).all():  # the common, all-finite case costs one pass
            if not self.allow_nan and np.isnan(x).any():
                raise InputNonFiniteError("nan", f"{int(np.isnan(x).sum())} NaN value(s); the spec allows none")
            if not self.allow_inf and np.isinf(x).any():
                raise InputNonFiniteError("inf", f"{int(np.isinf(x).sum())} infinite value(s); the spec allows none")
            finite = x[np.isfinite(x)]
        if finite.size:
            if self.min is not None and finite.min() < self.min:
                raise InputRangeError("min", f"value {float(finite.min()):g} is below the minimum {self.min:g}")
            if self.max is not None and finite.max() > self.max:
                raise InputRangeError("max", f"value {float(finite.max()):g} is above the maximum {self.max:g}")
            if self.quantum is not None:
                bad = int((~self.on_grid(finite)).sum())
                if bad:
                    raise InputQuantizationError(
                        "quantum", f"{bad} value(s) are not multiples of {self.quantum:g} (within "
                                   f"{QUANTUM_TOLERANCE_ULPS} units in the last place)")
        return x

    def on_grid(self, values: np.ndarray) -> np.ndarray:
        """Per value (any shape; all True without a quantum; non-finite values False): within
        ``QUANTUM_TOLERANCE_ULPS`` ulps (of the value's own dtype) of the nearest k·quantum.

        Any honest way of computing k·q in float32 lands within 1.5 ulp of it (``float32(k / 255)``: 0.5;
        ``k * float32(1 / 255)``: two roundings), while a jitter as small as 1e-6 on [0, 1] is more than 8 ulps
        (ulp ≤ 1.2e-7 there): the old tolerance of 1e-3 of a step let 6e-5 of jitter through at q = 1/16, which made
        every per-input decision (budgets, served marks) see a new input. Integers must be exact multiples.
        """
        if self.quantum is None:
            return np.ones(values.shape, dtype=bool)
        v = values.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            grid = np.rint(v / self.quantum) * self.quantum
            if values.dtype.kind == "f":
                tol = QUANTUM_TOLERANCE_ULPS * np.spacing(np.abs(grid.astype(values.dtype))).astype(np.float64)
            else:
                tol = 1e-9 * np.maximum(1.0, np.abs(grid))
            return np.asarray(np.abs(v - grid) <= tol)

    def snap(self, x: np.ndarray) -> np.ndarray:
        """``x`` with every value replaced by the nearest multiple of the quantum, correctly rounded to ``x``'s dtype
        (one value per grid point, whichever way a client computed it); ``x`` itself without a quantum."""
        if self.quantum is None:
            return x
        return np.asarray((np.rint(x.astype(np.float64) / self.quantum) * self.quantum).astype(x.dtype))

    def _shape_text(self) -> str:
        return "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
