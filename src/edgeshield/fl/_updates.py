"""Client updates as flat float64 vectors: validation at the server's door, flatten and unflatten.

Every update a client sends passes :func:`validate_update` before any aggregator sees it, so the aggregators in
``_robust`` work on trusted shapes: one finite float64 vector per client. A bad update is never averaged in: it
raises :class:`UpdateRejected`, whose ``reason`` is one of :data:`REASONS`, and the caller reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeshield.errors import InputError, InvalidArgumentError

__all__ = ["REASONS", "Template", "UpdateRejected", "flatten", "template_of", "unflatten", "validate_update"]

#: One entry per array: its shape and its dtype name (``"float32"``), in the order the model lists its parameters.
Template = Sequence[tuple[tuple[int, ...], str]]

#: The reasons an update is rejected, in the order they are checked.
REASONS = ("round", "type", "count", "dtype", "shape", "nonfinite", "norm")

_NUMERIC_KINDS = frozenset("fiu")  # float, signed and unsigned integers: no bool, complex, object, str or void


class UpdateRejected(InputError):
    """A client update that must not be aggregated; ``reason`` is one of :data:`REASONS`, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"update rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


def _template_dtypes(template: Template) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
    """The template checked once (it is the server's own, so a bad one is the caller's error, not the client's)."""
    out: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
    for i, entry in enumerate(template):
        try:
            shape, name = entry
            dtype = np.dtype(name)
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"update template entry {i} is not (shape, dtype): {exc}") from None
        if dtype.kind not in _NUMERIC_KINDS or any(d < 0 for d in dims):
            raise InvalidArgumentError(f"update template entry {i} must be a numeric dtype and a shape: {entry!r}")
        out.append((dims, dtype))
    return out


def template_of(arrays: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], str]]:
    """The template of a list of arrays (the global model's parameters): what every update must match."""
    return [(tuple(int(d) for d in a.shape), np.dtype(a.dtype).name) for a in arrays]


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All arrays, raveled in order, as one float64 vector (empty for no arrays).

    float64 holds every float32/float16 value and integers up to 2**53 exactly: larger integers would round.
    """
    if len(arrays) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, template: Template) -> list[np.ndarray]:
    """The arrays of ``template`` cut from ``vector`` (inverse of :func:`flatten`); integer dtypes are rounded."""
    entries = _template_dtypes(template)
    v = np.asarray(vector, dtype=np.float64)
    sizes = [math.prod(shape) for shape, _ in entries]
    if v.ndim != 1 or v.size != sum(sizes):
        raise InvalidArgumentError(f"vector of shape {v.shape} does not fit the template ({sum(sizes)} values)")
    out: list[np.ndarray] = []
    start = 0
    for (shape, dtype), size in zip(entries, sizes, strict=True):
        chunk = v[start : start + size].reshape(shape)
        start += size
        out.append((np.rint(chunk) if dtype.kind in "iu" else chunk).astype(dtype))
    return out


def validate_update(
    arrays: object,
    template: Template,
    *,
    round: int,  # noqa: A002 - the protocol's own word, as the interface names it
    expected_round: int,
    max_norm: float | None,
) -> np.ndarray:
    """``arrays`` as one flat float64 vector if it is a well-formed update for ``expected_round``.

    Raises :class:`UpdateRejected` for a wrong or replayed round number, something that is not a list of numpy
    arrays, the wrong number of arrays, a dtype or shape other than the template's, NaN or Inf, or an L2 norm above
    ``max_norm`` (``None``: no bound, but a norm that overflows float64 is still refused). Anything a client can send
    ends here or in a vector: no other exception escapes for client-controlled input.
    """
    if max_norm is not None and not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise InvalidArgumentError(f"max_norm must be a positive finite number or None, not {max_norm!r}")
    if not isinstance(expected_round, int | np.integer) or isinstance(expected_round, bool):
        raise InvalidArgumentError(f"expected_round must be an integer, not {expected_round!r}")
    entries = _template_dtypes(template)
    if not isinstance(round, int | np.integer) or isinstance(round, bool):
        raise UpdateRejected("round", f"round number is not an integer: {type(round).__name__}")
    if int(round) != int(expected_round):
        raise UpdateRejected("round", f"update is for round {int(round)}, this is round {int(expected_round)}")
    if not isinstance(arrays, list | tuple):
        raise UpdateRejected("type", f"update is a {type(arrays).__name__}, not a list of arrays")
    if len(arrays) != len(entries):
        raise UpdateRejected("count", f"{len(arrays)} arrays, the model has {len(entries)}")
    for i, (a, (shape, dtype)) in enumerate(zip(arrays, entries, strict=True)):
        if not isinstance(a, np.ndarray):
            raise UpdateRejected("type", f"array {i} is a {type(a).__name__}, not a numpy array")
        if a.dtype != dtype:
            raise UpdateRejected("dtype", f"array {i} is {a.dtype}, the model's is {dtype}")
        if a.shape != shape:
            raise UpdateRejected("shape", f"array {i} has shape {a.shape}, the model's is {shape}")
    vector = flatten(arrays)
    bad = int(vector.size - np.count_nonzero(np.isfinite(vector)))
    if bad:
        raise UpdateRejected("nonfinite", f"{bad} NaN or infinite values")
    # the norm of x / scale times scale: no overflow to inf for finite values up to float64's largest
    scale = float(np.max(np.abs(vector))) if vector.size else 0.0
    norm = scale * float(np.linalg.norm(vector / scale)) if scale > 0 else 0.0
    if not math.isfinite(norm):
        raise UpdateRejected("norm", "the update's L2 norm overflows float64")
    if max_norm is not None and norm > max_norm:
        raise UpdateRejected("norm", f"L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}")
    return vector
