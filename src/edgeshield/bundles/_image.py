"""Turn an ONNX model into the plaintext image a bundle encrypts: the graph, then its weights.

Large initializers are moved out of the protobuf into one weights section, each tensor 64-byte aligned, and the
graph refers to them with standard ONNX external-data entries (location ``edgeshield.weights``). On the device
ONNX Runtime receives the graph bytes plus the weights as an in-memory external-data file, which lets it build the
session without a second full copy of the protobuf: that is what keeps opening a bundle close to opening the plain
file in time and memory. An independent reader can rebuild an ordinary ONNX model by writing the weights section
to a file named ``edgeshield.weights`` next to the graph.

Only the owner side (``protect``) needs the ``onnx`` package; the device never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeshield.bundles._format import WEIGHTS_LOCATION, Image
from edgeshield.errors import MissingDependencyError, UnsupportedModelError

ALIGNMENT = 64
EXTERNALIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inside the graph


@dataclass(frozen=True)
class PlainImage:
    graph: bytes
    weights: bytes | bytearray
    layout: Image

    @property
    def size(self) -> int:
        return self.layout.weights_offset + self.layout.weights_size

    def read_at(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+length)`` of graph || zero padding || weights, without building that string."""
        g, w0 = self.layout.graph_size, self.layout.weights_offset
        if offset >= w0:
            return memoryview(self.weights)[offset - w0 : offset - w0 + length]
        parts = []
        end = offset + length
        if offset < g:
            parts.append(self.graph[offset : min(end, g)])
        if end > g:
            parts.append(bytes(min(end, w0) - max(offset, g)))
        if end > w0:
            parts.append(memoryview(self.weights)[: end - w0])
        return b"".join(parts)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def build_image(model_bytes: bytes) -> PlainImage:
    """Validate ``model_bytes`` as a self-contained ONNX model and split it into graph and weights."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise MissingDependencyError("protecting a model needs the onnx package: pip install 'edgeshield[owner]'") from None
    try:
        model = onnx.load_model_from_string(model_bytes)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise UnsupportedModelError(
                    f"initializer {tensor.name!r} refers to an external data file; give a self-contained ONNX model"
                )
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, RuntimeWarning, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"not a valid ONNX model: {first}") from None
    if not model.graph.node:
        raise UnsupportedModelError("not a valid ONNX model: the graph has no nodes")

    weights = bytearray()
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNALIZE_THRESHOLD:
            continue
        offset = _align(len(weights))
        weights.extend(bytes(offset - len(weights)))
        raw = tensor.raw_data
        weights.extend(raw)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", WEIGHTS_LOCATION), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    graph = model.SerializeToString()
    layout = Image(graph_size=len(graph), weights_offset=_align(len(graph)), weights_size=len(weights))
    return PlainImage(graph=graph, weights=weights, layout=layout)


def rebuild_model(plaintext: Any, layout: Image) -> bytes:
    """Inverse of :func:`build_image`: put the weights back inline and return self-contained ONNX bytes."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("rebuilding the model needs the onnx package: pip install 'edgeshield[owner]'") from None
    buf = memoryview(plaintext)
    model = onnx.load_model_from_string(bytes(buf[: layout.graph_size]))
    base = layout.weights_offset
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        offset, length = int(entry["offset"]), int(entry["length"])
        tensor.raw_data = bytes(buf[base + offset : base + offset + length])
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    return model.SerializeToString()
