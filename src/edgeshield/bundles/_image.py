"""Turn an ONNX model into the plaintext image a bundle encrypts: the graph, then its weights.

Large initializers are moved out of the protobuf into one weights section, each tensor 64-byte aligned, and the
graph refers to them with standard ONNX external-data entries (location ``edgeshield.weights``). On the device
ONNX Runtime receives the graph bytes plus the weights as an in-memory external-data file, which lets it build the
session without a second full copy of the protobuf: that is what keeps opening a bundle close to opening the plain
file in time and memory. An independent reader can rebuild an ordinary ONNX model by writing the weights section
to a file named ``edgeshield.weights`` next to the graph.

Models over 2 GB cannot be one protobuf: ONNX keeps their tensors in *external data* files beside the model.
``build_image`` reads those (only from the model's own directory) straight into the weights section, so such a
model becomes an ordinary bundle and the device side needs nothing new. Tensors outside the main graph's
initializers (node attributes, subgraphs) are read back into the graph instead.

Only the owner side (``protect``) needs the ``onnx`` package; the device never imports this module.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeshield._onnx import first_line, parse_onnx
from edgeshield._progress import ProgressCallback, report
from edgeshield.bundles._format import WEIGHTS_LOCATION, Image
from edgeshield.bundles._modelio import ModelIO, from_onnx_graph
from edgeshield.errors import ExternalDataError, MissingDependencyError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np
    import onnx

ALIGNMENT = 64
EXTERNALIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inside the graph


@dataclass(frozen=True)
class PlainImage:
    graph: bytes
    weights: bytes | bytearray
    layout: Image
    io: ModelIO  # the graph's inputs and outputs, recorded in the manifest's metadata

    @property
    def size(self) -> int:
        return self.layout.weights_offset + self.layout.weights_size

    def read_at(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+length)`` of graph || zero padding || weights, without building that string."""
        g, w0 = self.layout.graph_size, self.layout.weights_offset
        if offset >= w0:
            return memoryview(self.weights)[offset - w0 : offset - w0 + length]
        parts: list[bytes | memoryview] = []
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


def build_image(model_bytes: bytes, *, model_path: str | os.PathLike[str] | None = None, from_file: bool = True,
                progress: ProgressCallback | None = None, inline_weights: bool = False) -> PlainImage:
    """Validate ``model_bytes`` as an ONNX model and split it into graph and weights.

    A model whose tensors live in external data files (how ONNX stores models over 2 GB) needs ``model_path``, the
    file the bytes came from: the data files are read from its directory, and a location outside it is refused.
    ``from_file`` says the bytes are that file's (not, say, a watermarked copy): the ONNX checker then reads the
    file itself, which costs one transient copy of the model instead of two. With ``inline_weights`` (format
    version 2) a model without external data keeps its weights inside the graph (no weights section), which the
    device streams straight into ONNX Runtime's own loader; a model with external data (over 2 GB) cannot be one
    protobuf and gets its weights section as before.
    """
    model = parse_onnx(model_bytes, "protecting a model")
    import onnx
    from google.protobuf.message import DecodeError
    external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and model_path is None:
        raise ExternalDataError(f"tensor {external[0].name!r} refers to an external data file: protect the model "
                                "from its file, so that the data files beside it can be read")
    data = _ExternalData(Path(model_path).parent if model_path is not None else Path("."))
    try:
        sources = {id(t): data.locate(t) for t in external}  # every location checked before anything is read
        # Checking the file, not the bytes, lets the checker find the external data where the model keeps it (and
        # spares a serialised copy of the whole model next to the checker's own).
        onnx.checker.check_model(os.fspath(model_path) if model_path is not None and (external or from_file)
                                 else model)
    except (DecodeError, onnx.checker.ValidationError, RuntimeWarning, ValueError) as exc:
        data.close()
        raise UnsupportedModelError(f"not a valid ONNX model: {first_line(exc)}") from None
    except BaseException:
        data.close()
        raise
    if not model.graph.node:
        data.close()
        raise UnsupportedModelError("not a valid ONNX model: the graph has no nodes")
    io = from_onnx_graph(model.graph)

    with data:
        # Tensors outside the main graph's initializers (node attributes, subgraphs) stay inside the graph: read
        # their external data inline. They are small in practice; the 2 GB limit of a graph applies to them.
        main = {id(t) for t in model.graph.initializer}
        for tensor in external:
            if id(tensor) not in main:
                buf = bytearray(sources[id(tensor)].length)
                data.read_into(sources[id(tensor)], memoryview(buf))
                tensor.raw_data = bytes(buf)
                _clear_external(tensor)
        # Lay out the weights section first and allocate it once: no reallocation, so no transient second copy.
        placements: list[tuple[onnx.TensorProto, int, int]] = []
        size = 0
        for tensor in model.graph.initializer:
            if inline_weights and not external:
                break
            if id(tensor) in sources:
                length = sources[id(tensor)].length
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNALIZE_THRESHOLD:
                length = len(tensor.raw_data)
            else:
                continue
            offset = _align(size)
            placements.append((tensor, offset, length))
            size = offset + length
        weights = bytearray(size)
        view = memoryview(weights)
        done = 0
        for tensor, offset, length in placements:
            if id(tensor) in sources:
                data.read_into(sources[id(tensor)], view[offset : offset + length])
            else:
                view[offset : offset + length] = tensor.raw_data
                tensor.ClearField("raw_data")
            _clear_external(tensor)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_LOCATION), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            done += length
            report(progress, "read weights", done, size, unit="B")
        if not placements:
            report(progress, "read weights", 0, 0, unit="B")  # nothing to move: the weights stay in the graph
        del view
    graph = model.SerializeToString()
    layout = Image(graph_size=len(graph), weights_offset=_align(len(graph)), weights_size=len(weights))
    return PlainImage(graph=graph, weights=weights, layout=layout, io=io)


def has_external_data(model_bytes: bytes) -> bool:
    """Whether any tensor of the (parseable) model refers to an external data file."""
    import onnx

    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception:  # noqa: BLE001 - unparseable, whatever onnx raises: build_image reports it properly
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, sparse initializers, node attributes, and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _clear_external(tensor: onnx.TensorProto) -> None:
    tensor.ClearField("data_location")
    del tensor.external_data[:]


@dataclass(frozen=True)
class _Source:
    """Where one tensor's bytes are: a checked, opened file, an offset and a length."""

    path: Path
    offset: int
    length: int


class _ExternalData:
    """The external data files of one model, read only from the model's own directory.

    A location must be a relative path that stays inside that directory once every ``..`` and symbolic link is
    resolved, and name a regular file (not a symbolic link, which ONNX refuses too) holding at least
    ``offset + length`` bytes; each tensor's length must be what its type and shape need. Anything else is an
    ``ExternalDataError`` naming the tensor, before any byte is read.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._root: Path | None = None
        self._files: dict[Path, io.BufferedReader] = {}

    def __enter__(self) -> _ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def locate(self, tensor: onnx.TensorProto) -> _Source:
        entries = {e.key: e.value for e in tensor.external_data}
        name = tensor.name
        location = entries.get("location", "")
        if not location or "\x00" in location:
            raise ExternalDataError(f"tensor {name!r} has external data without a file location")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ExternalDataError(f"tensor {name!r}: external data location {location!r} is an absolute path; "
                                    "it must be a file in the model's directory")
        if self._root is None:
            self._root = self.directory.resolve()
        candidate = self._root / location
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError:
            if ".." in Path(location).parts:
                raise ExternalDataError(f"tensor {name!r}: external data location {location!r} leaves the "
                                        "model's directory") from None
            raise ExternalDataError(f"tensor {name!r}: external data file {location!r} not found in "
                                    f"{self.directory}") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError), a component that is not a directory
            reason = (exc.strerror if isinstance(exc, OSError) else None) or exc
            raise ExternalDataError(f"tensor {name!r}: external data file {location!r} cannot be opened: "
                                    f"{reason}") from None
        if not resolved.is_relative_to(self._root):
            raise ExternalDataError(f"tensor {name!r}: external data location {location!r} leaves the model's "
                                    "directory (through '..' or a symbolic link)")
        if candidate.is_symlink():  # ONNX's own checker refuses these too, wherever they point
            raise ExternalDataError(f"tensor {name!r}: external data file {location!r} is a symbolic link; put the "
                                    "file itself in the model's directory")
        fh = self._open(resolved, name, location)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ExternalDataError(f"tensor {name!r}: external data offset/length must be integers") from None
        size = os.fstat(fh.fileno()).st_size
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ExternalDataError(f"tensor {name!r}: external data file {location!r} is too short ({size} bytes; "
                                    f"the tensor needs bytes {offset} to {offset + length})")
        expected = _tensor_nbytes(tensor)
        if expected is not None and expected != length:
            raise ExternalDataError(f"tensor {name!r}: its external data has {length} bytes, its type and shape "
                                    f"need {expected}")
        return _Source(resolved, offset, length)

    def _open(self, resolved: Path, name: str, location: str) -> io.BufferedReader:
        if resolved not in self._files:
            if not resolved.is_file():  # before opening: a FIFO would block the open
                raise ExternalDataError(f"tensor {name!r}: external data location {location!r} is not a regular "
                                        "file")
            try:
                fh = open(resolved, "rb")  # noqa: SIM115 - kept open for the reads, closed by close()
            except OSError as exc:
                raise ExternalDataError(f"tensor {name!r}: external data file {location!r} cannot be opened: "
                                        f"{exc.strerror or exc}") from None
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                fh.close()
                raise ExternalDataError(f"tensor {name!r}: external data location {location!r} is not a regular "
                                        "file")
            self._files[resolved] = fh
        return self._files[resolved]

    def read_into(self, source: _Source, out: memoryview) -> None:
        fh = self._files[source.path]
        fh.seek(source.offset)
        got = 0
        while got < source.length:
            n = fh.readinto(out[got:])
            if not n:  # the file shrank since it was checked
                raise ExternalDataError(f"external data file {source.path.name!r} ended early")
            got += n


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor of this type and shape holds as raw data (None where that is not a fixed multiple)."""
    import onnx

    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    name = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in onnx.TensorProto.DataType.values() \
        else ""
    bits = 4 if name in ("INT4", "UINT4", "FLOAT4E2M1") else 2 if name in ("INT2", "UINT2") else None
    count: int = math.prod(tensor.dims)
    if bits is not None:
        return -(-count * bits // 8)  # packed, rounded up to whole bytes
    if name.startswith("FLOAT6"):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def rebuild_model(plaintext: np.ndarray[tuple[int], np.dtype[np.uint8]], layout: Image) -> bytes:
    """Inverse of :func:`build_image`: put the weights back inline and return self-contained ONNX bytes."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("rebuilding the model needs the onnx package: "
                                     "pip install 'edgeshield[owner]'") from None
    buf = plaintext.data
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
    rebuilt: bytes = model.SerializeToString()  # protobuf ships no type information
    return rebuilt
