"""Owner side: the model and its runtime detectors as ONE ONNX graph, so one ``session.run`` scores and predicts.

The graph takes the model's input ``x`` and builds, in ONNX ops, exactly what the numpy detectors build: the
squeezed copies (bit-depth reduction, median smoothing), the noisy copies of a seeded noise detector (its fixed
patterns become a constant), then runs the model once on ``[x, copies...]``, takes the softmax and the L1
distances, and outputs ``edgeshield.probs`` (the probabilities on ``x``) and one ``edgeshield.score.<name>`` per
composed detector; ``reconstruction`` (PCA residual, in float64 as numpy computes it) needs no model run.

What stays in numpy: ``noise`` with fresh noise per call (a constant cannot be fresh), the feature-space detectors
(``mahalanobis``, ``lid``: k-NN and per-class distances over hidden outputs), ``gradient`` (PyTorch), and the
ensemble/fisher combination of the members' scores (a few vector operations on N numbers).

Needs ``onnx`` (``edgeshield[owner]``), imported on first use; the device only ever loads the result, signed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._onnx import first_line, parse_onnx
from edgeshield.adversarial._composed import PROBS_OUTPUT, SCORE_PREFIX, VALID_OUTPUT, ComposedDetectors
from edgeshield.errors import InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx

    from edgeshield.adversarial._calibrate import DetectorFile
    from edgeshield.adversarial._spec import InputSpec
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.keys import DevicePublicKey, OwnerPrivateKey

COMPOSABLE = ("squeeze", "noise", "reconstruction")
MIN_OPSET = 13  # ReduceSum's axes as an input, Clip's bounds as inputs, Slice with steps
_ELEM: dict[str, type[np.generic]] = {"float32": np.float32, "float64": np.float64}


def composable(name: str, params: dict[str, Any]) -> bool:
    """Whether a detector can run inside the graph (a noise detector only with its per-calibration seed)."""
    return name in COMPOSABLE and not (name == "noise" and params.get("seed") is None)


class _Builder:
    """Appends nodes with unique ``edgeshield/…`` tensor names to a graph, with the model's opset in mind."""

    def __init__(self, graph: onnx.GraphProto, opset: int, dtype: type[np.generic]) -> None:
        self.graph, self.opset, self.dtype = graph, opset, dtype
        self.nodes: list[onnx.NodeProto] = []  # where new nodes go (the caller orders them around the model's)
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"edgeshield/{hint}_{self._n}"

    def const(self, value: Any, dtype: Any = None, hint: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype if dtype is not None else self.dtype)
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64, "i")

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        """One node; its output is ``out`` (a graph output's name) or a fresh name."""
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0, out: str | None = None) -> str:
        # ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(axes)], out, keepdims=keepdims)
        return self.op(op_type, [x], out, axes=list(axes), keepdims=keepdims)


def _bit_depth(b: _Builder, x: str, bits: int, lo: float, hi: float) -> str:
    # The numpy squeezer's operations in its order and dtype (clip, -lo, *scale, round half to even, /scale, +lo).
    # Subtracting and adding lo = 0 are exact no-ops, so they are left out then (four nodes instead of six).
    scale = (2**bits - 1) / (hi - lo)
    y = b.op("Clip", [x, b.const(lo), b.const(hi)])
    y = b.op("Sub", [y, b.const(lo)]) if lo != 0.0 else y
    y = b.op("Div", [b.op("Round", [b.op("Mul", [y, b.const(scale)])]), b.const(scale)])
    return b.op("Add", [y, b.const(lo)]) if lo != 0.0 else y


def _symmetric_index(n: int, before: int, after: int) -> list[int]:
    """numpy's ``mode="symmetric"`` padding as gather indices (the edge sample repeated, then mirrored)."""
    idx = list(range(n))
    return [idx[i] for i in range(before - 1, -1, -1)] + idx + [idx[n - 1 - i] for i in range(after)]


def _median(b: _Builder, x: str, size: int, image_shape: Sequence[int]) -> str:
    """The rank filter ``median_smooth`` computes: gather-padded images, size² shifted views, the rank-th value."""
    h, w = int(image_shape[-2]), int(image_shape[-1])
    before, after = size // 2, (size - 1) // 2
    imgs = b.op("Reshape", [x, b.ints([-1, h, w])])
    padded = b.op("Gather", [imgs, b.ints(_symmetric_index(h, before, after))], axis=1)
    padded = b.op("Gather", [padded, b.ints(_symmetric_index(w, before, after))], axis=2)
    views = []
    for di in range(size):
        for dj in range(size):
            v = b.op("Slice", [padded, b.ints([di, dj]), b.ints([di + h, dj + w]), b.ints([1, 2])])
            views.append(b.op("Unsqueeze", [v, b.ints([3])]))
    rank = (size * size) // 2  # as median_smooth: the element np.partition puts at this rank
    if size == 2:  # the rank-2 of 4 is the second largest: a 6-op min/max network, cheaper than TopK
        hi1, lo1 = b.op("Max", views[0:2]), b.op("Min", views[0:2])
        hi2, lo2 = b.op("Max", views[2:4]), b.op("Min", views[2:4])
        med = b.op("Max", [b.op("Min", [hi1, hi2]), b.op("Max", [lo1, lo2])])
    else:
        stacked = b.op("Concat", views, axis=3)
        top, _ = _topk(b, stacked, size * size - rank)
        med = b.reduce("ReduceMin", top, [3], keepdims=1)
    return b.op("Reshape", [med, b.op("Shape", [x])])


def _topk(b: _Builder, x: str, k: int) -> tuple[str, str]:
    from onnx import helper

    values, indices = b.name("topk"), b.name("topk_idx")
    b.nodes.append(helper.make_node("TopK", [x, b.ints([k])], [values, indices], name=values, axis=-1,
                                         largest=1, sorted=0))
    return values, indices


def _spec_check(b: _Builder, x: str, spec: InputSpec, out: str) -> None:
    """1 when every value of ``x`` passes the spec's value checks for certain, else 0 (then numpy decides).

    Conservative by construction, so a 1 never lets through what ``InputSpec.check_values`` refuses: the range
    compares in x's dtype against the bounds in x's dtype, as numpy does; the grid check computes the same grid
    point in float64 as ``on_grid`` and allows |v - grid| <= |grid|·2⁻²³, never more than its 2 ulps of float32
    (a float32 ulp at g is at least |g|·2⁻²⁴). NaN and infinity fail every comparison, so they also give 0 (an
    input the spec allows them in is then accepted by numpy). Integer-only specs never reach here.
    """
    from onnx import TensorProto

    checks: list[str] = []
    if spec.min is not None or spec.max is not None:
        lo = b.const(spec.min if spec.min is not None else -np.inf)
        hi = b.const(spec.max if spec.max is not None else np.inf)
        checks.append(b.op("Equal", [b.op("Clip", [x, lo, hi]), x]))  # NaN != NaN
    if spec.quantum is not None:
        v = b.op("Cast", [x], to=TensorProto.DOUBLE)
        q = b.const(float(spec.quantum), np.float64)
        grid = b.op("Mul", [b.op("Round", [b.op("Div", [v, q])]), q])
        tol = b.op("Mul", [b.op("Abs", [grid]), b.const(2.0**-23, np.float64)])
        checks.append(b.op("LessOrEqual", [b.op("Abs", [b.op("Sub", [v, grid])]), tol]))
    if spec.quantum is None and (spec.min is None or spec.max is None):  # else the checks above exclude both
        checks.append(b.op("Equal", [b.op("Sub", [x, x]), b.const(0.0)]))  # finite: inf - inf and NaN are NaN
    ok = checks[0]
    for more in checks[1:]:
        ok = b.op("And", [ok, more])
    b.reduce("ReduceMin", b.op("Cast", [ok], to=TensorProto.FLOAT), list(range(len(spec.shape))), out=out)


def _reconstruction(b: _Builder, x: str, params: dict[str, Any], out: str) -> str:
    from onnx import TensorProto

    mean = np.asarray(params["mean"], dtype=np.float64)
    comps = np.asarray(params["components"], dtype=np.float64)
    flat = b.op("Reshape", [b.op("Cast", [x], to=TensorProto.DOUBLE), b.ints([0, -1])])
    centred = b.op("Sub", [flat, b.const(mean, np.float64)])
    proj = b.op("MatMul", [b.op("MatMul", [centred, b.const(comps.T.copy(), np.float64)]),
                           b.const(comps, np.float64)])
    residual = b.op("Sub", [centred, proj])
    if params["norm"] == "l1":
        return b.reduce("ReduceSum", b.op("Abs", [residual]), [1], out=out)
    return b.op("Sqrt", [b.reduce("ReduceSum", b.op("Mul", [residual, residual]), [1])], out)


def _noise_patterns(params: dict[str, Any], feature_shape: Sequence[int], dtype: type[np.generic]) -> np.ndarray:
    """The seeded detector's ``samples`` noise patterns, drawn exactly as ``NoiseDetector._noise`` draws them."""
    rng = np.random.default_rng(int(params["seed"]))
    pattern = rng.normal(0.0, float(params["sigma"]), size=(int(params["samples"]), 1, *feature_shape))
    return pattern.astype(dtype)


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node (subgraphs included) that read ``old`` reads ``new`` instead."""
    from onnx import AttributeProto

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _rename_input(attr.g, old, new)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_input(g, old, new)


def compose_graph(model_bytes: bytes, detectors: Sequence[tuple[str, dict[str, Any]]], spec: InputSpec, *,
                  softmax: bool, spec_check: bool = True) -> bytes:
    """The model with ``detectors`` (name, params; each :func:`composable`) composed into one serialized graph.

    ``softmax``: whether the model's output 0 is logits (as ``OnnxClassifier`` decided on clean data) rather than
    probabilities. ``spec_check=False`` leaves the spec's value checks to numpy (a design alternative the benchmark
    times). An input that is not float32/float64 or an opset below 13 is an :class:`UnsupportedModelError`.
    """
    import onnx
    from onnx import TensorProto, helper

    model = parse_onnx(model_bytes, "composing detectors into the model")
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"composing detectors needs a model of opset {MIN_OPSET} or later, not {opset}")
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or not graph.output:
        raise UnsupportedModelError("composing detectors needs a single-input model with its logits as output 0")
    if spec.dtype not in _ELEM:
        raise UnsupportedModelError(f"composing detectors needs a float input, not {spec.dtype}")
    bad = [n for n, p in detectors if not composable(n, p)]
    if bad or not detectors:
        raise UnsupportedModelError(f"detector(s) {bad or '[]'} cannot be composed into the graph")
    dtype = _ELEM[spec.dtype]
    x = inputs[0].name
    logits_name = graph.output[0].name
    batch = "edgeshield/batch"
    _rename_input(graph, x, batch)
    # The model's shape annotations tie its tensors' batch dimension to x's (a shared dim_param); the model now
    # runs on [x, copies...], so they would be wrong: ONNX Runtime infers the shapes again.
    del graph.value_info[:]
    b = _Builder(graph, opset, dtype)

    copies: list[str] = []  # each [N, ...], in the order the groups of the batch follow
    groups: dict[str, tuple[int, int]] = {}  # detector -> (first group, number of groups); group 0 is x itself
    feature_shape = list(spec.shape[1:])
    for name, params in detectors:
        if name == "squeeze":
            first = 1 + len(copies)
            if params.get("bits") is not None:
                lo, hi = params["value_range"]
                copies.append(_bit_depth(b, x, int(params["bits"]), float(lo), float(hi)))
            if params.get("median") is not None:
                copies.append(_median(b, x, int(params["median"]), params["image_shape"]))
            groups[name] = (first, len(copies) + 1 - first)
        elif name == "noise":
            if any(d is None for d in feature_shape):
                raise UnsupportedModelError("the composed noise detector needs the input's fixed feature shape")
            first, samples = 1 + len(copies), int(params["samples"])
            fixed = [int(d) for d in feature_shape if d is not None]
            pattern = b.const(_noise_patterns(params, fixed, dtype), hint="noise")
            noisy = b.op("Add", [b.op("Unsqueeze", [x, b.ints([0])]), pattern])  # [S, N, ...]
            if params.get("value_range") is not None:
                lo, hi = params["value_range"]
                noisy = b.op("Clip", [noisy, b.const(float(lo)), b.const(float(hi))])
            copies.append(b.op("Reshape", [noisy, b.ints([-1, *fixed])]))  # samples major, as numpy reshapes
            groups[name] = (first, samples)
    n_groups = 1 + sum(n for _, n in groups.values())
    if copies:
        b.op("Concat", [x, *copies], batch, axis=0)
    else:
        b.op("Identity", [x], batch)
    model_nodes = list(graph.node)
    pre, b.nodes = b.nodes, []  # the copies before the model's nodes, the scores after them

    p = b.op("Softmax", [logits_name], axis=1) if softmax else logits_name
    # [G*N, C] -> [G, N, C]: group g holds rows g*N .. (g+1)*N of the batch, as the numpy detectors slice them;
    # then one Split into x's group and each detector's groups. Every score's last node writes its output itself.
    dims = graph.output[0].type.tensor_type.shape.dim
    c = dims[-1].dim_value if len(dims) == 2 and dims[-1].dim_value > 0 else None
    if c:
        grouped = b.op("Reshape", [p, b.ints([n_groups, -1, c])])
    else:
        classes = b.op("Gather", [b.op("Shape", [p]), b.ints([1])], axis=0)
        grouped = b.op("Reshape", [p, b.op("Concat", [b.ints([n_groups, -1]), classes], axis=0)])
    scored = [(n, prm) for n, prm in detectors if n in groups]
    parts = [grouped]
    if scored:
        parts = [b.name("group") for _ in range(1 + len(scored))]
        b.nodes.append(helper.make_node("Split", [grouped, b.ints([1, *(groups[n][1] for n, _ in scored)])], parts,
                                        name=parts[0], axis=0))
    base = parts[0]  # [1, N, C]
    b.op("Reshape", [base, b.op("Shape", [logits_name]) if not c else b.ints([-1, c])], PROBS_OUTPUT)
    outputs: list[tuple[str, Any]] = [(PROBS_OUTPUT, dtype)]
    if spec_check:
        _spec_check(b, x, spec, VALID_OUTPUT)
    for name, params in detectors:
        out = SCORE_PREFIX + name
        if name == "reconstruction":
            _reconstruction(b, x, params, out)
            outputs.append((out, np.float64))
            continue
        count = groups[name][1]
        diff = b.op("Abs", [b.op("Sub", [parts[1 + [n for n, _ in scored].index(name)], base])])  # [count, N, C]
        if count == 1:  # the one copy's L1 distance is the score
            b.reduce("ReduceSum", diff, [0, 2], out=out)
        else:
            b.reduce("ReduceMax" if name == "squeeze" else "ReduceMean", b.reduce("ReduceSum", diff, [2]), [0],
                     out=out)
        outputs.append((out, dtype))

    del graph.output[:]
    elem = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}
    for out_name, out_dtype in outputs:
        rank = 2 if out_name == PROBS_OUTPUT else 1
        graph.output.append(helper.make_tensor_value_info(out_name, elem[out_dtype], [None] * rank))
    if spec_check:
        graph.output.append(helper.make_tensor_value_info(VALID_OUTPUT, TensorProto.FLOAT, []))
    del graph.node[:]
    graph.node.extend([*pre, *model_nodes, *b.nodes])
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"the composed graph does not validate: {first_line(exc)}") from None
    serialized: bytes = model.SerializeToString()
    return serialized


def composed_session(graph: bytes, options: onnxruntime.SessionOptions | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session over composed graph bytes (owner-side checks and benchmarks; the device opens the
    signed bundle with :func:`~edgeshield.adversarial._composed.open_composed` instead)."""
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def composed_graph_for(file: DetectorFile, model_bytes: bytes, clean: np.ndarray) -> tuple[bytes, tuple[str, ...],
                                                                                             bool]:
    """The composed graph of ``file``'s composable decision detectors, checked against the numpy detectors.

    Returns the graph, the detectors it scores and whether it applies a softmax. The graph's scores must equal the
    numpy detectors' on ``clean`` (to 1e-6 relative, 1e-6 absolute) and its predictions must be the same, or it
    is refused (:class:`UnsupportedModelError`): what the device runs is what was calibrated.
    """
    from edgeshield.adversarial._calibrate import build_all
    from edgeshield.adversarial._detectors import OnnxClassifier, looks_like_probabilities, scores_with_probs

    names = tuple(n for n in file.decision_detectors() if composable(n, file.get(n).params))
    names = tuple(sorted(names, key=[d.name for d in file.detectors].index))  # the file's order
    if not names:
        raise InvalidArgumentError(f"none of the detectors {sorted(file.decision_detectors())} can run inside the "
                                   f"graph (composable: {', '.join(COMPOSABLE)}; noise only with its seed)")
    clean = file.input_spec.validate(clean)
    model_session = composed_session(model_bytes)
    clf = OnnxClassifier(model_session)
    softmax = not looks_like_probabilities(clf.logits(clean[:256]))
    graph = compose_graph(model_bytes, [(n, file.get(n).params) for n in names], file.input_spec, softmax=softmax)
    ours = ComposedDetectors(composed_session(graph), names)
    numpy_dets = build_all(file, clf, names=names)
    for batch in (clean[:1], clean):
        probs, scores = ours.run(batch)
        want_probs = clf.probs(batch)
        if not np.array_equal(probs.argmax(axis=1), want_probs.argmax(axis=1)):
            raise UnsupportedModelError("the composed graph's predictions differ from the model's")
        for n in names:
            want, _ = scores_with_probs(numpy_dets[n], batch, None)
            if not np.allclose(scores[n], want, rtol=1e-6, atol=1e-6):
                worst = float(np.abs(scores[n] - want).max())
                raise UnsupportedModelError(f"the composed graph's {n} scores differ from the numpy detector's by "
                                            f"{worst:.3g}")
    return graph, names, softmax


def compose(file: DetectorFile, model_bytes: bytes, clean: np.ndarray, *, signing_key: OwnerPrivateKey,
            recipients: Sequence[DevicePublicKey], model_version: int = 0) -> DetectorFile:
    """``file`` carrying the composed graph of its runtime detectors, protected as a bundle: signed with the
    owner's ``signing_key``, encrypted to ``recipients`` and bound (signed metadata) to ``file.model_sha256`` and
    the detectors' parameters. ``model_bytes`` is the plain model the file was calibrated for (``decrypt_model``
    of its bundle); the graph is checked against the numpy detectors on ``clean`` before it is sealed."""
    import dataclasses

    from edgeshield import bundles
    from edgeshield.adversarial._composed import META_BINDING, META_MODEL, ComposedGraph, binding_digest, bytes_as_file

    graph, names, softmax = composed_graph_for(file, model_bytes, clean)
    meta = {META_MODEL: file.model_sha256, META_BINDING: binding_digest(file, names, softmax)}
    with bytes_as_file(graph, "composed.onnx") as plain, tempfile.TemporaryDirectory(prefix="edgeshield-") as d:
        out = Path(d) / "composed.esb"
        bundles.protect(plain, out, signing_key=signing_key, recipients=recipients, model_version=model_version,
                        metadata=meta)
        sealed = out.read_bytes()
    return dataclasses.replace(file, composed=ComposedGraph(sealed, names, softmax))
