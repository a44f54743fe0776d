"""Owner side: expose a model's hidden activations as extra graph outputs, for the feature-space detectors.

The device needs numpy and ONNX Runtime only, so the tensors the Mahalanobis and LID detectors read are made
graph outputs before ``protect``: the signed bundle then carries them and nothing on the device edits a graph.
The logits stay output 0 and are computed by the same nodes, so they do not change; callers that read output 0
(``run``, the server) never see the hidden tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from edgeshield._onnx import first_line, parse_onnx
from edgeshield.errors import InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx


class UnknownTensorError(InvalidArgumentError):
    """A tensor named for exposure is not produced by any node of the model's main graph."""


_LINEAR_OPS = ("Gemm", "MatMul")


def auto_hidden_names(graph: onnx.GraphProto) -> list[str]:
    """The penultimate activation (the data input of the last Gemm/MatMul) and the output of each hidden ReLU,
    in graph order."""
    outputs = {o.name for o in graph.output}
    relus = [n.output[0] for n in graph.node if n.op_type == "Relu" and n.output and n.output[0] not in outputs]
    linear = [n for n in graph.node if n.op_type in _LINEAR_OPS]
    penultimate = [linear[-1].input[0]] if linear and linear[-1].input[0] not in outputs else []
    produced = {o for n in graph.node for o in n.output}
    names = [t for t in [*relus, *penultimate] if t in produced]  # a graph input is not an activation
    if not names:
        raise InvalidArgumentError("found no hidden ReLU or final Gemm/MatMul to expose; name the tensors "
                                   "(--tensor NAME)")
    order = {o: i for i, n in enumerate(graph.node) for o in n.output}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def expose_hidden(model: bytes, names: Sequence[str] | Literal["auto"] = "auto") -> tuple[bytes, list[str]]:
    """The same model with the named intermediate tensors appended as graph outputs after the existing ones.

    Returns the serialized model and the exposed names. ``"auto"`` picks :func:`auto_hidden_names`. A name no
    node produces is an :class:`UnknownTensorError`; the model's own outputs cannot be named.
    """
    m = parse_onnx(model, "exposing hidden outputs")
    import onnx
    graph = m.graph
    if not graph.output:
        raise UnsupportedModelError("the model has no outputs")
    existing = [o.name for o in graph.output]
    wanted = auto_hidden_names(graph) if names == "auto" else list(dict.fromkeys(names))
    if not wanted:
        raise InvalidArgumentError("name at least one tensor to expose")
    produced = {o for n in graph.node for o in n.output if o}
    for name in wanted:
        if name in existing:
            raise InvalidArgumentError(f"{name!r} already is an output of the model")
        if name not in produced:
            raise UnknownTensorError(f"no node of the model produces a tensor named {name!r}")
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a best effort; types then come from the value_info we have
        inferred = m
    known = {v.name: v for v in [*inferred.graph.value_info, *graph.value_info]}
    for name in wanted:
        info = known.get(name)
        if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.elem_type:
            raise UnsupportedModelError(f"cannot work out the type of tensor {name!r} (shape inference failed)")
        out = graph.output.add()
        out.CopyFrom(info)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"the model with hidden outputs does not validate: {first_line(exc)}") from None
    return m.SerializeToString(), wanted
