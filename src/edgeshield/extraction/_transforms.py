"""Declared benign transformations: the variation honest sensors add, for calibrating out-of-distribution tests.

A detector calibrated on clean reference data alone calls an honest device out of distribution when its camera sits
one pixel off or its ink is faded. :class:`BenignTransforms` is the operator's declaration of what honest inputs may
look like (small shifts, sensor noise, contrast); :meth:`BenignTransforms.expand` turns clean data into clean data
plus transformed copies, and :meth:`edgeshield.extraction.OodRateSignal.fit` calibrates on that. What is declared
benign is, by construction, not detected: declare what devices do, not more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeshield.errors import InvalidArgumentError

__all__ = ["BenignTransforms"]

_FIELDS = ("shifts", "noise", "contrast", "image_shape", "background", "value_range")


def _pair(value: Any, what: str, *, integer: bool = False) -> tuple[Any, Any]:
    try:
        a, b = value
        kind = int if integer else float
        if integer and (isinstance(a, bool) or isinstance(b, bool) or int(a) != a or int(b) != b):
            raise TypeError
        pair = (kind(a), kind(b))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"benign transforms: {what} must be a pair of numbers, not {value!r}") from None
    if not all(math.isfinite(v) for v in pair):
        raise InvalidArgumentError(f"benign transforms: {what} must be finite")
    return pair


@dataclass(frozen=True)
class BenignTransforms:
    """Pixel shifts up to ``shifts`` in each image axis (filled with ``background``), Gaussian noise of sigma up to
    ``noise`` (clipped to ``value_range``) and contrast scaling about the background by a factor in ``contrast``
    (below 1: faded ink). ``image_shape`` (rows, cols) is needed for shifts; None: a square image."""

    shifts: int = 1
    noise: float = 0.05
    contrast: tuple[float, float] = (0.7, 1.0)
    image_shape: tuple[int, int] | None = None
    background: float = 0.0
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.shifts, bool) or not isinstance(self.shifts, int) or not 0 <= self.shifts <= 8:
            raise InvalidArgumentError("benign transforms: shifts must be an integer in [0, 8]")
        if isinstance(self.noise, bool) or not isinstance(self.noise, int | float) or not 0.0 <= self.noise <= 1.0:
            raise InvalidArgumentError("benign transforms: noise must be a sigma in [0, 1]")
        lo, hi = _pair(self.contrast, "contrast")
        if not 0.0 < lo <= hi <= 10.0:
            raise InvalidArgumentError("benign transforms: contrast must be (low, high) with 0 < low <= high <= 10")
        vmin, vmax = _pair(self.value_range, "value_range")
        if not vmin < vmax:
            raise InvalidArgumentError("benign transforms: value_range must be (min, max) with min < max")
        if isinstance(self.background, bool) or not isinstance(self.background, int | float) \
                or not vmin <= self.background <= vmax:
            raise InvalidArgumentError("benign transforms: background must be a number within value_range")
        if self.image_shape is not None:
            rows, cols = _pair(self.image_shape, "image_shape", integer=True)
            if rows < 1 or cols < 1:
                raise InvalidArgumentError("benign transforms: image_shape must be positive")
            object.__setattr__(self, "image_shape", (rows, cols))
        object.__setattr__(self, "noise", float(self.noise))
        object.__setattr__(self, "background", float(self.background))
        object.__setattr__(self, "contrast", (lo, hi))
        object.__setattr__(self, "value_range", (vmin, vmax))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BenignTransforms:
        """From a JSON-able mapping with any of the fields (``serve --ood-transforms``); unknown keys are refused."""
        if not isinstance(config, Mapping):
            raise InvalidArgumentError("benign transforms config must be a mapping")
        unknown = sorted(set(config) - set(_FIELDS))
        if unknown:
            raise InvalidArgumentError(f"benign transforms: unknown keys {unknown}; known: {', '.join(_FIELDS)}")
        return cls(**dict(config))

    def to_config(self) -> dict[str, Any]:
        return {"shifts": self.shifts, "noise": self.noise, "contrast": list(self.contrast),
                "image_shape": None if self.image_shape is None else list(self.image_shape),
                "background": self.background, "value_range": list(self.value_range)}

    def _shape(self, d: int) -> tuple[int, int]:
        if self.image_shape is not None:
            if self.image_shape[0] * self.image_shape[1] != d:
                raise InvalidArgumentError(f"benign transforms: image_shape {self.image_shape} does not fit {d} values")
            return self.image_shape
        side = math.isqrt(d)
        if side * side != d:
            raise InvalidArgumentError(f"benign transforms: shifts need image_shape ({d} values is not a square)")
        return side, side

    def shift(self, x: np.ndarray, dy: int, dx: int) -> np.ndarray:
        """``x`` (rows of flattened images) moved ``dy`` rows down and ``dx`` columns right, background filled."""
        x = np.asarray(x)
        rows, cols = self._shape(int(np.prod(x.shape[1:])))
        img = x.reshape(len(x), rows, cols)
        out = np.full_like(img, self.background)
        ys, yd = (slice(0, rows - dy), slice(dy, rows)) if dy >= 0 else (slice(-dy, rows), slice(0, rows + dy))
        xs, xd = (slice(0, cols - dx), slice(dx, cols)) if dx >= 0 else (slice(-dx, cols), slice(0, cols + dx))
        out[:, yd, xd] = img[:, ys, xs]
        shifted: np.ndarray = out.reshape(x.shape)
        return shifted

    def _contrast(self, x: np.ndarray, factor: np.ndarray) -> np.ndarray:
        scaled: np.ndarray = self.background + (x - self.background) * factor.reshape(-1, *([1] * (x.ndim - 1)))
        return scaled

    def expand(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` followed by its transformed copies: every shift up to ``shifts`` in each axis, one noisy copy
        (sigma uniform in (0, noise]), one contrast-scaled copy and one copy with all three at random."""
        x = np.asarray(x)
        if x.ndim < 2 or len(x) == 0:
            raise InvalidArgumentError("benign transforms: expand needs a non-empty batch of rows")
        xf = x.astype(np.float64)
        n, (lo, hi), (vmin, vmax) = len(x), self.contrast, self.value_range
        parts = [xf]
        span = range(-self.shifts, self.shifts + 1)
        offsets = [(dy, dx) for dy in span for dx in span if (dy, dx) != (0, 0)]
        parts += [self.shift(xf, dy, dx) for dy, dx in offsets]
        if self.noise > 0:
            sigma = rng.uniform(0.0, self.noise, n).reshape(-1, *([1] * (x.ndim - 1)))
            parts.append(np.clip(xf + sigma * rng.standard_normal(xf.shape), vmin, vmax))
        if (lo, hi) != (1.0, 1.0):
            parts.append(np.clip(self._contrast(xf, rng.uniform(lo, hi, n)), vmin, vmax))
        if offsets or self.noise > 0 or (lo, hi) != (1.0, 1.0):
            mixed = xf.copy()
            if offsets:
                picks = rng.integers(len(offsets), size=n)
                for i, (dy, dx) in enumerate(offsets):
                    rows = picks == i
                    mixed[rows] = self.shift(xf[rows], dy, dx)
            mixed = self._contrast(mixed, rng.uniform(lo, hi, n))
            sigma = rng.uniform(0.0, self.noise, n).reshape(-1, *([1] * (x.ndim - 1)))
            parts.append(np.clip(mixed + sigma * rng.standard_normal(xf.shape), vmin, vmax))
        return np.concatenate(parts).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
