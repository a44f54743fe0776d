"""The model's inputs and outputs (names, element types, shapes), recorded in the signed manifest's metadata.

``protect`` reads them from the ONNX graph and stores them under the reserved metadata key ``edgeshield.model_io``,
so ``inspect`` can show what a bundle expects and returns without a device key, and without a format change. The
value is compact JSON (sorted keys, no spaces)::

    {"inputs":[{"dtype":"float32","name":"input","shape":["N",64]}],
     "outputs":[{"dtype":"float32","name":"logits","shape":["N",10]}]}

A dimension is an integer (fixed), a string (symbolic, ONNX ``dim_param``) or ``null`` (unknown); ``shape`` is
``null`` when the graph declares no shape, and a non-tensor value (sequence, map, optional) has ``"shape": null``
and a ``dtype`` naming its kind. A metadata value holds at most 1024 characters, so a longer JSON text (a model
with many inputs) is cut into consecutive pieces stored under ``edgeshield.model_io``, ``edgeshield.model_io.1``,
``edgeshield.model_io.2``, …, which a reader concatenates. Bundles made before this key existed simply lack it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeshield.errors import MalformedBundleError

if TYPE_CHECKING:
    import onnx

METADATA_KEY = "edgeshield.model_io"
_PIECE = 1024  # = the format's largest metadata value

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class ModelIO:
    """What a model takes and gives, in graph order."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: object) -> ModelIO:
        if not isinstance(d, dict) or set(d) != {"inputs", "outputs"}:
            raise MalformedBundleError(f"metadata {METADATA_KEY} must hold exactly 'inputs' and 'outputs'")
        return cls(_tensors(d["inputs"], "inputs"), _tensors(d["outputs"], "outputs"))

    def to_metadata(self) -> dict[str, str]:
        """The metadata entries that record this description (one per 1024-character piece)."""
        text = self.to_json()
        pieces = [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)] or [""]
        return {_piece_key(i): piece for i, piece in enumerate(pieces)}


def _piece_key(i: int) -> str:
    return METADATA_KEY if i == 0 else f"{METADATA_KEY}.{i}"


def is_reserved(key: str) -> bool:
    """Whether ``key`` belongs to the recorded model description (owners cannot set it by hand)."""
    return key == METADATA_KEY or key.startswith(METADATA_KEY + ".")


def _tensors(items: object, where: str) -> tuple[TensorInfo, ...]:
    if not isinstance(items, list):
        raise MalformedBundleError(f"metadata {METADATA_KEY}: {where} must be a list")
    out = []
    for item in items:
        if (not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"} or not isinstance(item["name"], str)
                or not isinstance(item["dtype"], str)):
            raise MalformedBundleError(f"metadata {METADATA_KEY}: every entry of {where} needs a name, dtype and shape")
        shape = item["shape"]
        if shape is not None and (not isinstance(shape, list) or not all(
                d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                for d in shape)):
            raise MalformedBundleError(f"metadata {METADATA_KEY}: the shape of {item['name']!r} is malformed")
        out.append(TensorInfo(item["name"], item["dtype"], None if shape is None else tuple(shape)))
    return tuple(out)


def from_metadata(metadata: Mapping[str, str]) -> ModelIO | None:
    """The recorded description, or None for a bundle that has none (made before it was recorded)."""
    if METADATA_KEY not in metadata:
        return None
    parts, i = [], 0
    while _piece_key(i) in metadata:
        parts.append(metadata[_piece_key(i)])
        i += 1
    try:
        d = json.loads("".join(parts))
    except (json.JSONDecodeError, RecursionError):
        raise MalformedBundleError(f"metadata {METADATA_KEY} is not valid JSON") from None
    return ModelIO.from_dict(d)


# --- owner side: read it from an ONNX graph (the caller has imported onnx) -----------------------------------------
_NUMPY_NAMES = {"FLOAT": "float32", "DOUBLE": "float64"}


def from_onnx_graph(graph: onnx.GraphProto) -> ModelIO:
    """Inputs (other than initializers, which old IR versions also list as inputs) and outputs of ``graph``."""
    initializers = {t.name for t in graph.initializer}
    return ModelIO(tuple(_info(v) for v in graph.input if v.name not in initializers),
                   tuple(_info(v) for v in graph.output))


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    import onnx

    kind = value.type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        t = getattr(value.type, kind)
        name = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type else "UNDEFINED"
        dtype = _NUMPY_NAMES.get(name, name.lower()) + (" (sparse)" if kind == "sparse_tensor_type" else "")
        shape = None
        if t.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                          for d in t.shape.dim)
        return TensorInfo(value.name, dtype, shape)
    return TensorInfo(value.name, (kind or "unknown").removesuffix("_type"), None)
