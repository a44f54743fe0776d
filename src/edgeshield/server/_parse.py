"""Request bodies to input arrays, with every limit checked before anything is allocated.

Two encodings are accepted on ``/v1/predict``: JSON ``{"inputs": [[...], ...]}`` and a NumPy ``.npy`` file
(``application/x-npy``). Both are checked against the served model's input spec *before* they are decoded into
memory:

- JSON may hold only numbers, brackets, commas and whitespace besides the one ``"inputs"`` key (no strings, no
  ``true``/``false``/``null``, no ``NaN``/``Infinity``), is nested no deeper than the model's input rank, and has no
  number longer than :data:`MAX_NUMBER_CHARS` characters (a float64 needs at most 24) — so Python's recursive JSON
  parser never meets 100,000 nested brackets and no 400-digit integer reaches NumPy.
- ``.npy`` headers are parsed on their own (NumPy's header reader, pickles refused); the claimed dtype, rank, fixed
  dimensions and batch size are compared with the spec, and the claimed shape × item size must be exactly the bytes
  that follow, so a header announcing a (400000000, 64) array is refused without allocating it.

Whatever fails raises :class:`BodyRejected` with the HTTP status and a one-line reason.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np

from edgeshield.adversarial import InputSpec

MAX_NUMBER_CHARS = 32
JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy",)

# Bytes a numeric JSON body may contain outside its one key: structure, whitespace and number characters.
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[list(b"{}[],: \t\r\n0123456789+-.eE")] = True
_NUMBER = np.zeros(256, dtype=bool)
_NUMBER[list(b"0123456789+-.eE")] = True
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[list(b"[{")] = 1
_OPEN[list(b"]}")] = -1


class BodyRejected(Exception):
    """A request body the server refuses: ``status`` is the HTTP answer, ``field`` what was wrong."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_inputs(body: bytes, content_type: str, spec: InputSpec, *, max_batch: int) -> np.ndarray:
    """The input batch in ``body``, decoded only once every limit is known to hold."""
    kind = media_type(content_type)
    if kind in NPY_TYPES:
        return _parse_npy(body, spec, max_batch)
    if kind in JSON_TYPES:
        return _parse_json(body, spec, max_batch)
    raise BodyRejected(415, f"content-type must be application/json or application/x-npy, not {kind or 'missing'!r}",
                       "content-type")


def _check_batch(n: int, max_batch: int) -> None:
    if not 1 <= n <= max_batch:
        raise BodyRejected(422, f"batch must have between 1 and {max_batch} inputs, got {n}", "batch")


def _check_shape(shape: tuple[int, ...], spec: InputSpec, max_batch: int) -> None:
    if len(shape) != len(spec.shape):
        raise BodyRejected(422, f"input has rank {len(shape)} {shape}, the model takes rank {len(spec.shape)}", "shape")
    _check_batch(shape[0], max_batch)
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):  # equal ranks: checked above
        if axis and want is not None and got != want:
            raise BodyRejected(422, f"input axis {axis} is {got}, the model takes {want}", f"shape[{axis}]")
        if axis and got == 0:
            raise BodyRejected(422, f"input axis {axis} is empty", f"shape[{axis}]")


# --- .npy ---------------------------------------------------------------------------------------------------------
def _parse_npy(body: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not accepted")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BodyRejected(422, f"body is not a .npy array: {' '.join(str(exc).split())[:160]}", "body") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise BodyRejected(422, f".npy dtype {dtype} is not a plain numeric type", "dtype")
    if dtype != np.dtype(spec.dtype):
        raise BodyRejected(422, f"got {dtype}, the model takes {spec.dtype}", "dtype")
    _check_shape(tuple(shape), spec, max_batch)
    offset = fp.tell()
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != len(body) - offset:
        raise BodyRejected(422, f"the .npy header claims {claimed} bytes of data, the body holds {len(body) - offset}",
                           "body")
    flat = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset)
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")  # a private, writable copy


# --- JSON ---------------------------------------------------------------------------------------------------------
def _parse_json(body: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    raw = np.frombuffer(body, dtype=np.uint8)
    quotes = np.flatnonzero(raw == ord('"'))
    if len(quotes) != 2:
        raise BodyRejected(422, 'JSON body must be {"inputs": [...]} holding numbers only', "body")
    outside = np.concatenate([raw[: quotes[0]], raw[quotes[1] + 1 :]])
    if not _ALLOWED[outside].all():
        bad = chr(int(outside[~_ALLOWED[outside]][0]))
        raise BodyRejected(422, f"inputs must be plain JSON numbers (found {bad!r}; use .npy for NaN or infinity)",
                           "inputs")
    depth = int(np.cumsum(_OPEN[outside]).max(initial=0))
    if depth > len(spec.shape) + 1:
        raise BodyRejected(422, f"JSON nested {depth} deep; the model's input has rank {len(spec.shape)}", "shape")
    longest = _longest_run(_NUMBER[outside])
    if longest > MAX_NUMBER_CHARS:
        raise BodyRejected(422, f"a number is {longest} characters long; at most {MAX_NUMBER_CHARS} are accepted",
                           "inputs")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BodyRejected(422, f"body is not JSON: {' '.join(str(exc).split())[:160]}", "body") from None
    if not isinstance(doc, dict) or set(doc) != {"inputs"}:
        raise BodyRejected(422, 'JSON body must be an object with exactly one key, "inputs"', "body")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise BodyRejected(422, '"inputs" must be a list of inputs', "inputs")
    _check_batch(len(inputs), max_batch)
    dtype = np.dtype(spec.dtype)
    try:  # integers go through float64 so that 1.5 is refused rather than truncated to 1
        with np.errstate(over="ignore"):  # 1e39 as float32 is inf, which the spec then refuses by name
            x = np.asarray(inputs, dtype=np.float64 if dtype.kind in "iu" else dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BodyRejected(422, f"inputs are not a numeric array of one shape: {str(exc)[:160]}", "inputs") from None
    _check_shape(x.shape, spec, max_batch)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not (np.isfinite(x).all() and (x == np.round(x)).all() and x.min() >= info.min and x.max() <= info.max):
            raise BodyRejected(422, f"inputs must be whole numbers within {spec.dtype}", "dtype")
        x = x.astype(dtype)
    return x


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D boolean array."""
    if not mask.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return int((edges[1::2] - edges[::2]).max())
