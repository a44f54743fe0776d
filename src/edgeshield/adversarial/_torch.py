"""PyTorch side of the adversarial defence: an ONNX→PyTorch bridge, the gradient detector and an ART adapter.

The loss-gradient detector and ART's attacks need gradients of the model's loss with respect to its input, but a
user may only have an ONNX model. ``onnx2torch`` cannot be used (it hard-depends on torchvision), so
``onnx_to_torch`` converts a well-defined subset of ONNX ops and refuses everything else with a typed error rather
than guessing. torch, onnx and ART are imported inside the functions that need them, so importing this module
stays light; they come with ``edgeshield[eval]``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.adversarial._hidden import UnknownTensorError
from edgeshield.errors import InvalidArgumentError, MissingDependencyError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import Tensor

    # A converted node: its input tensors (None for an omitted optional input) -> its output tensors.
    _Kernel = Callable[..., tuple[Tensor, ...]]

__all__ = ["SUPPORTED_OPS", "GradientDetector", "onnx_to_torch"]

_INSTALL_HINT = "pip install 'edgeshield[eval]'"
_MIN_OPSET = 7  # ONNX Runtime's own floor; older opsets had different broadcasting rules

SUPPORTED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv", "Div", "Dropout",
    "Flatten", "Gemm", "GlobalAveragePool", "Identity", "LeakyRelu", "LogSoftmax", "MatMul", "MaxPool", "Mul",
    "Relu", "Reshape", "Sigmoid", "Softmax", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})  # fmt: skip


def _import_torch() -> ModuleType:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"this needs PyTorch: {_INSTALL_HINT}") from None
    return torch


# --- ONNX → PyTorch ------------------------------------------------------------------------------------------------
def onnx_to_torch(model_bytes: bytes, *, strip_softmax: bool = True, keep: Sequence[str] = ()) -> torch.nn.Module:
    """Convert a self-contained, single-input ONNX classifier into an eval-mode ``torch.nn.Module``.

    The module's ``forward(x)`` evaluates the nodes the graph's first output depends on, in topological order,
    with torch ops, so it is differentiable with respect to ``x`` (float32). Floating-point initializers become
    float32 ``nn.Parameter``s (integer ones, such as shapes, become buffers). Nodes the first output does not
    depend on are dropped unchecked. Ops outside ``SUPPORTED_OPS``, non-default domains, subgraphs and external
    data raise ``UnsupportedModelError``.

    With ``strip_softmax`` (the default) a Softmax or LogSoftmax producing the output is dropped so that the module
    returns logits, which is what cross-entropy losses and ART's attacks expect.

    The module ignores ``train()``/``eval()``: BatchNormalization always uses its stored statistics and Dropout is
    the identity, so a caller (ART sets ``train(mode=...)`` on every call) cannot change what it computes.

    ``module.forward_with(x, names)`` returns the logits and named intermediate tensors from the same evaluation
    (the feature-space detectors' surrogates read hidden activations this way). Every tensor the kept nodes
    compute can be named; ``keep`` names further tensors whose nodes must be kept although the logits do not
    depend on them (the hidden outputs ``expose_hidden`` adds are ancestors of the logits and need no ``keep``).
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise MissingDependencyError(f"converting an ONNX model needs the onnx package: {_INSTALL_HINT}") from None
    torch = _import_torch()
    if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"onnx_to_torch takes the model's bytes, not {type(model_bytes).__name__}")
    try:
        model = onnx.load_model_from_string(bytes(model_bytes))
    except (DecodeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"not a valid ONNX model: {first}") from None
    graph = model.graph
    if not graph.node or not graph.output:
        raise UnsupportedModelError("not a valid ONNX model: the graph has no nodes or no outputs")

    opset = _default_opset(model)
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"the ONNX→PyTorch bridge needs a single-input model, this one has {len(inputs)}")
    input_name = inputs[0].name
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(
            f"the ONNX→PyTorch bridge needs a float32 input, {input_name!r} is "
            f"{onnx.TensorProto.DataType.Name(elem_type)}"
        )

    producers = {out: node for node in graph.node for out in node.output if out}
    output_name = graph.output[0].name
    if strip_softmax:
        last = producers.get(output_name)
        if last is not None and last.op_type in ("Softmax", "LogSoftmax") and last.domain in ("", "ai.onnx"):
            output_name = last.input[0]

    extra = list(dict.fromkeys(k for k in keep if k not in (output_name, input_name)))
    for name in extra:
        if name not in producers:
            raise UnknownTensorError(f"no node of the model produces a tensor named {name!r} (keep=)")
    nodes = _needed_nodes(graph.node, producers, [output_name, *extra], input_name, init_names)
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise UnsupportedModelError(f"op {op} is not supported by the ONNX→PyTorch bridge")

    used = {name for node in nodes for name in node.input if name} | {output_name}
    tensors: dict[str, Tensor] = {}
    for t in graph.initializer:
        if t.name in used:
            tensors[t.name] = _to_torch(t, onnx, torch)
    steps: list[tuple[_Kernel, list[str], list[str]]] = []
    for node in nodes:
        if node.op_type == "Constant":
            tensors[node.output[0]] = _constant_value(node, onnx, torch)
            continue
        steps.append((_kernel(node, opset, onnx, torch), list(node.input), list(node.output)))
    module = _graph_module_class()(input_name, output_name, tensors, steps)
    return module.eval()


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    opset = versions[0] if versions else 1
    if opset < _MIN_OPSET:
        raise UnsupportedModelError(
            f"the ONNX→PyTorch bridge needs opset {_MIN_OPSET} or newer, the model uses {opset}"
        )
    return opset


def _needed_nodes(
    all_nodes: Sequence[onnx.NodeProto],
    producers: dict[str, onnx.NodeProto],
    roots: Sequence[str],
    input_name: str,
    init_names: set[str],
) -> list[onnx.NodeProto]:
    """The nodes the ``roots`` depend on, in a topological order (ONNX requires one; we do not trust it)."""
    needed: dict[int, onnx.NodeProto] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name == input_name or name in init_names:
            continue
        node = producers.get(name)
        if node is None:
            raise UnsupportedModelError(f"not a valid ONNX model: nothing produces tensor {name!r}")
        if id(node) in needed:
            continue
        needed[id(node)] = node
        stack.extend(i for i in node.input if i)
    order: list[onnx.NodeProto] = []
    available = {input_name, *init_names}
    pending = [n for n in all_nodes if id(n) in needed]
    while pending:
        ready = [n for n in pending if all(not i or i in available for i in n.input)]
        if not ready:
            raise UnsupportedModelError("not a valid ONNX model: the graph has a cycle")
        for n in ready:
            order.append(n)
            available.update(o for o in n.output if o)
        pending = [n for n in pending if all(n is not r for r in ready)]
    return order


def _to_torch(tensor: onnx.TensorProto, onnx: ModuleType, torch: ModuleType) -> Tensor:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise UnsupportedModelError(
            f"initializer {tensor.name!r} refers to an external data file; give a self-contained ONNX model"
        )
    try:
        array = onnx.numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 - onnx raises assorted types for malformed tensors
        raise UnsupportedModelError(f"cannot read tensor {tensor.name!r}: {exc}") from None
    return _from_numpy(array, tensor.name, torch)


def _from_numpy(array: np.ndarray, name: str, torch: ModuleType) -> Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.array(array, dtype=np.float32))
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.array(array, dtype=np.int64))
    if array.dtype == np.bool_:
        return torch.from_numpy(np.array(array))
    raise UnsupportedModelError(f"tensor {name!r} has element type {array.dtype}, which the bridge does not support")


def _constant_value(node: onnx.NodeProto, onnx: ModuleType, torch: ModuleType) -> Tensor:
    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs:
        return _to_torch(attrs["value"].t, onnx, torch)
    scalar = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in scalar.items():
        if key in attrs:
            return _from_numpy(np.asarray(onnx.helper.get_attribute_value(attrs[key]), dtype=dtype), key, torch)
    raise UnsupportedModelError(
        f"op Constant with attribute {sorted(attrs)} is not supported by the ONNX→PyTorch bridge"
    )


@functools.cache
def _graph_module_class() -> type[torch.nn.Module]:
    """Defined on first use so that importing this module does not import torch."""
    _import_torch()  # a typed error when PyTorch is missing
    import torch

    class OnnxGraphModule(torch.nn.Module):
        """Evaluates a converted ONNX graph; ``forward`` takes the single input and returns the chosen output,
        ``forward_with`` also named intermediate tensors of the same evaluation."""

        def __init__(self, input_name: str, output_name: str, tensors: dict[str, Tensor],
                     steps: list[tuple[_Kernel, list[str], list[str]]]) -> None:
            super().__init__()
            self.input_name, self.output_name = input_name, output_name
            self._steps = steps
            self._slots: dict[str, str] = {}  # ONNX tensor name -> attribute name (ONNX names may hold dots)
            for i, (name, value) in enumerate(tensors.items()):
                slot = f"t{i}_" + re.sub(r"\W", "_", name)[:48]
                self._slots[name] = slot
                if value.is_floating_point():
                    self.register_parameter(slot, torch.nn.Parameter(value))
                else:
                    self.register_buffer(slot, value)
            # What forward_with may name: the input and every tensor a kept node computes (not initializers).
            self.computed: frozenset[str] = frozenset({input_name, *(o for _, _, outs in steps for o in outs if o)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._evaluate(x)[self.output_name]

        def forward_with(self, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """The output and the named intermediate tensors, all from one evaluation of the graph."""
            unknown = [n for n in names if n not in self.computed]
            if unknown:
                raise UnknownTensorError(f"the converted graph computes no tensor named {unknown[0]!r}; name a tensor "
                                         "a kept node produces (or convert with onnx_to_torch(..., keep=[...]))")
            env = self._evaluate(x)
            missing = [n for n in names if n not in env]  # an optional output a kernel does not produce
            if missing:
                raise UnknownTensorError(f"the converted graph does not produce tensor {missing[0]!r}")
            return env[self.output_name], {n: env[n] for n in names}

        def _evaluate(self, x: torch.Tensor) -> dict[str, Any]:
            if x.is_floating_point() and x.dtype != torch.float32:
                x = x.to(torch.float32)
            env: dict[str, Any] = {name: getattr(self, slot) for name, slot in self._slots.items()}
            env[self.input_name] = x
            for fn, ins, outs in self._steps:
                results = fn(*[env[i] if i else None for i in ins])
                # A kernel may answer fewer outputs than the node declares (Dropout's mask): those stay unset.
                for name, value in zip(outs, results, strict=False):
                    if name:
                        env[name] = value
            return env

        def extra_repr(self) -> str:
            return f"input={self.input_name!r}, output={self.output_name!r}, nodes={len(self._steps)}"

    return OnnxGraphModule


# --- kernels: one builder per op, attributes read once at conversion time ----------------------------------------
def _kernel(node: onnx.NodeProto, opset: int, onnx: ModuleType, torch: ModuleType) -> _Kernel:
    F = torch.nn.functional
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type

    def unsupported(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"op {op} with {what} is not supported by the ONNX→PyTorch bridge")

    def ints(t: Tensor) -> list[int]:
        return [int(v) for v in t.reshape(-1).tolist()]

    simple = {
        "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Identity": lambda x: x,
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "MatMul": torch.matmul,
    }  # fmt: skip
    if op in simple:
        f = simple[op]
        return lambda *xs: (f(*xs),)
    if op == "Div":
        def div(a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
            if a.is_floating_point() or b.is_floating_point():
                return (a / b,)
            return (torch.div(a, b, rounding_mode="trunc"),)  # ONNX integer division truncates
        return div
    if op == "LeakyRelu":
        alpha = float(attrs.get("alpha", 0.01))
        return lambda x: (F.leaky_relu(x, alpha),)
    if op in ("Softmax", "LogSoftmax"):
        f = torch.softmax if op == "Softmax" else torch.log_softmax
        if opset >= 13:
            axis = int(attrs.get("axis", -1))
            return lambda x: (f(x, dim=axis),)
        axis = int(attrs.get("axis", 1))  # before opset 13: coerce to 2-D at axis, normalise each row

        def coerced(x: Tensor) -> tuple[Tensor, ...]:
            a = axis % x.dim() if x.dim() else 0
            return (f(x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), -1), dim=1).reshape(x.shape),)
        return coerced
    if op == "Gemm":
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

        def gemm(a: Tensor, b: Tensor, c: Tensor | None = None) -> tuple[Tensor, ...]:
            y = (a.t() if ta else a) @ (b.t() if tb else b)
            if alpha != 1.0:
                y = alpha * y
            if c is not None:
                y = y + (c if beta == 1.0 else beta * c)
            return (y,)
        return gemm
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))

        def flatten(x: Tensor) -> tuple[Tensor, ...]:
            a = axis % x.dim() if axis < 0 else axis
            return (x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), -1),)
        return flatten
    if op == "Reshape":
        if opset < 5:
            raise unsupported("a shape attribute (opset < 5)")
        allowzero = int(attrs.get("allowzero", 0))

        def reshape(x: Tensor, shape: Tensor) -> tuple[Tensor, ...]:
            dims = ints(shape)
            if not allowzero:
                dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
            return (x.reshape(dims),)
        return reshape
    if op == "Transpose":
        perm = attrs.get("perm")
        return lambda x: (x.permute(*(perm if perm is not None else range(x.dim() - 1, -1, -1))),)
    if op == "Concat":
        axis = int(attrs["axis"])
        return lambda *xs: (torch.cat([x for x in xs if x is not None], dim=axis),)
    if op in ("Squeeze", "Unsqueeze"):
        attr_axes = attrs.get("axes")

        def squeeze(x: Tensor, axes_t: Tensor | None = None) -> tuple[Tensor, ...]:
            axes = ints(axes_t) if axes_t is not None else attr_axes
            if op == "Squeeze":
                if axes is None:
                    return (torch.squeeze(x),)
                return (x.squeeze(tuple(a % x.dim() for a in axes)),)
            if axes is None:  # not valid ONNX: Unsqueeze has axes, as an attribute or (opset 13+) an input
                raise unsupported("no axes")
            rank = x.dim() + len(axes)
            for a in sorted(a % rank for a in axes):
                x = x.unsqueeze(a)
            return (x,)
        return squeeze
    if op == "Clip":
        lo_attr, hi_attr = attrs.get("min"), attrs.get("max")

        def clip(x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> tuple[Tensor, ...]:
            lo = lo if lo is not None else lo_attr
            hi = hi if hi is not None else hi_attr
            if lo is None and hi is None:
                return (x,)
            return (torch.clamp(x, min=lo, max=hi),)
        return clip
    if op == "Dropout":
        if int(attrs.get("training_mode", 0)):
            raise unsupported("training_mode=1")

        def dropout(x: Tensor, ratio: Tensor | None = None, training: Tensor | None = None) -> tuple[Tensor, ...]:
            if training is not None and bool(training):
                raise UnsupportedModelError("op Dropout in training mode is not supported by the ONNX→PyTorch bridge")
            return (x, torch.ones_like(x, dtype=torch.bool))
        return dropout
    if op == "BatchNormalization":
        if int(attrs.get("training_mode", 0)) or len([o for o in node.output if o]) > 1:
            raise unsupported("training mode")
        if not int(attrs.get("spatial", 1)):
            raise unsupported("spatial=0")
        eps = float(attrs.get("epsilon", 1e-5))

        # Written out rather than F.batch_norm, which refuses running statistics that require grad (ours are
        # parameters like every other float initializer).
        def batch_norm(x: Tensor, s: Tensor, b: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, ...]:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = s * torch.rsqrt(v + eps)
            return (x * scale.reshape(shape) + (b - m * scale).reshape(shape),)
        return batch_norm
    if op == "GlobalAveragePool":
        return lambda x: (x.mean(dim=tuple(range(2, x.dim())), keepdim=True),)
    if op in ("Conv", "MaxPool", "AveragePool"):
        return _spatial_kernel(op, node, attrs, unsupported, torch)
    raise unsupported("this configuration")  # pragma: no cover - SUPPORTED_OPS and the builders agree


def _spatial_kernel(op: str, node: onnx.NodeProto, attrs: dict[str, Any],
                    unsupported: Callable[[str], UnsupportedModelError], torch: ModuleType) -> _Kernel:
    """Conv, MaxPool and AveragePool over 2-D images (NCHW)."""
    F = torch.nn.functional
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    kernel = attrs.get("kernel_shape")
    if kernel is not None and len(kernel) != 2:
        raise unsupported(f"a {len(kernel)}-D kernel (only 2-D)")
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad != "NOTSET" and op != "Conv":
        raise unsupported(f"auto_pad={auto_pad}")
    if len(pads) != 4 or len(strides) != 2 or len(dilations) != 2:
        raise unsupported("strides, pads or dilations that are not 2-D")
    # torch pads both sides alike and by at most half a pooling window; anything else is padded explicitly.
    symmetric = pads[0] == pads[2] and pads[1] == pads[3]
    if kernel is not None and op != "Conv":
        symmetric = symmetric and pads[0] <= kernel[0] // 2 and pads[1] <= kernel[1] // 2
    # F.pad order is (left, right, top, bottom); ONNX pads are (top, left, bottom, right).
    explicit = (pads[1], pads[3], pads[0], pads[2])

    if op == "Conv":
        group = int(attrs.get("group", 1))

        def conv(x: Tensor, w: Tensor, b: Tensor | None = None) -> tuple[Tensor, ...]:
            if x.dim() != 4:
                raise UnsupportedModelError(f"op Conv on a {x.dim()}-D input is not supported (only 2-D images)")
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                extra = []
                for size, s, d, k in zip(x.shape[2:], strides, dilations, w.shape[2:], strict=True):
                    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                    small, big = total // 2, total - total // 2
                    extra.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
                x = F.pad(x, (*extra[1], *extra[0]))
                padding: int | tuple[int, int] = 0
            elif symmetric:
                padding = (pads[0], pads[1])
            else:
                x, padding = F.pad(x, explicit), 0
            return (F.conv2d(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group),)
        return conv

    if kernel is None:
        raise unsupported("no kernel_shape")
    ceil_mode = bool(int(attrs.get("ceil_mode", 0)))
    if op == "MaxPool":
        if len([o for o in node.output if o]) > 1:
            raise unsupported("an Indices output")

        def maxpool(x: Tensor) -> tuple[Tensor, ...]:
            padding: int | tuple[int, int] = (pads[0], pads[1])
            if not symmetric:
                x, padding = F.pad(x, explicit, value=float("-inf")), 0
            return (F.max_pool2d(x, kernel, strides, padding, dilations, ceil_mode=ceil_mode),)
        return maxpool

    if dilations != [1, 1]:
        raise unsupported("dilations")
    if not symmetric:
        raise unsupported("asymmetric pads or pads over half the window")
    count_include_pad = bool(int(attrs.get("count_include_pad", 0)))
    return lambda x: (
        F.avg_pool2d(x, kernel, strides, (pads[0], pads[1]), ceil_mode=ceil_mode, count_include_pad=count_include_pad),
    )


# --- the gradient detector -----------------------------------------------------------------------------------------
_NORMS = ("l1", "l2", "linf")


class GradientDetector:
    """Scores each input by the norm of ∇ₓ CrossEntropy(logits(x), argmax logits(x)).

    The loss is taken at the model's *own* predicted label, because at run time there is no true label. A clean
    input usually sits well inside its class region, where the model is confident and the loss surface is flat,
    so the gradient is small; an adversarial input is pushed just across a decision boundary, where the loss at
    the predicted label is steep, so the gradient is large. Higher scores mean more likely adversarial.

    ``model`` must return logits ``(N, classes)`` (use ``onnx_to_torch(..., strip_softmax=True)``) and treat the
    examples of a batch independently, which any classifier does in eval mode: the loss is *summed* over a batch,
    so the gradient for each example is exactly its own. ``scores`` runs the model in eval mode and restores the
    mode it found.
    """

    name = "gradient"

    def __init__(self, model: torch.nn.Module, *, norm: str = "l2", batch_size: int = 256) -> None:
        if norm not in _NORMS:
            raise InvalidArgumentError(f"gradient norm must be one of {', '.join(_NORMS)}, not {norm!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.model, self.norm, self.batch_size = model, norm, batch_size

    def scores(self, x: np.ndarray) -> np.ndarray:
        torch = _import_torch()
        x = np.asarray(x)
        if x.ndim < 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InvalidArgumentError("gradient scores need a numeric batch of shape (N, ...)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(len(x), dtype=np.float64)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                for start in range(0, len(x), self.batch_size):
                    xb = torch.from_numpy(x[start : start + self.batch_size]).requires_grad_(True)
                    out[start : start + len(xb)] = self._batch_scores(torch, xb)
        finally:
            self.model.train(was_training)
        return out

    def _batch_scores(self, torch: ModuleType, xb: Tensor) -> np.ndarray:
        logits = self.model(xb)
        if logits.dim() != 2 or logits.shape[0] != xb.shape[0]:
            raise UnsupportedModelError(
                f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}"
            )
        # The label is read off a detached copy of the same forward pass: it is a constant of the loss, so no
        # gradient flows through the argmax, and the model runs once per batch rather than twice.
        labels = logits.detach().argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        g = grad.detach().reshape(len(xb), -1).to(torch.float64)
        if self.norm == "l1":
            return g.abs().sum(dim=1).numpy()
        if self.norm == "l2":
            return torch.linalg.vector_norm(g, dim=1).numpy()
        return g.abs().amax(dim=1).numpy() if g.shape[1] else np.zeros(len(g))

    def params(self) -> dict[str, Any]:
        return {"norm": self.norm}


# --- ART -----------------------------------------------------------------------------------------------------------
