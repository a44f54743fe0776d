"""Canonical per-row bytes and digests of model inputs, shared by the query budget and the served watermark."""

from __future__ import annotations

import hashlib

import numpy as np

from edgeshield.errors import InvalidArgumentError

__all__ = ["CANONICAL_DTYPE", "canonical", "row_digests"]

CANONICAL_DTYPE = "<f4"


def canonical(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous little-endian float32 batch: ``canonical(x)[i].tobytes()`` is row i's identity."""
    if np.ndim(x) < 1:  # (ascontiguousarray would silently make a scalar a batch of one)
        raise InvalidArgumentError("inputs must be a batch: an array with a leading row axis")
    try:
        return np.ascontiguousarray(x, dtype=CANONICAL_DTYPE)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"inputs must be numeric arrays: {exc}") from None


def row_digests(x: np.ndarray) -> list[str]:
    """SHA-256 (hex) of each row's canonical bytes: the same input always has the same digest."""
    c = canonical(x)
    return [hashlib.sha256(c[i].tobytes()).hexdigest() for i in range(c.shape[0])]
