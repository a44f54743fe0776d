"""The ONNX→PyTorch bridge, the gradient detector and the ART adapter, checked against ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import edgeshield  # noqa: F401 - sets ORT_DISABLE_TELEMETRY before onnxruntime is imported
from edgeshield.errors import InvalidArgumentError, UnsupportedModelError
from edgeshield.models import DIGITS_INPUT_NAME, DIGITS_OUTPUT_NAME, digits_model_path, load_digits_split

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeshield.adversarial._torch import GradientDetector, onnx_to_torch  # noqa: E402
from edgeshield.evaluation._adversarial import art_classifier  # noqa: E402


# --- helpers -------------------------------------------------------------------------------------------------------
def _ort_run(model_bytes: bytes, x: np.ndarray, output: str | None = None) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run([output] if output else None, {name: x})[0]


def _torch_run(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _model(nodes, x_shape, inits=(), opset: int = 17, output: str = "y") -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


@pytest.fixture(scope="module")
def digits_bytes() -> bytes:
    return digits_model_path().read_bytes()


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return load_digits_split().x_test


@pytest.fixture(scope="module")
def digits_module(digits_bytes: bytes) -> torch.nn.Module:
    return onnx_to_torch(digits_bytes)


# --- the bridge ----------------------------------------------------------------------------------------------------
def test_importing_the_module_stays_light() -> None:
    code = (
        "import sys, edgeshield.adversarial._torch; "
        "bad = [n for n in ('torch', 'onnx', 'art') if n in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_digits_model_matches_onnxruntime(digits_bytes, digits_module, x_test) -> None:
    expected = _ort_run(digits_bytes, x_test, DIGITS_OUTPUT_NAME)
    got = _torch_run(digits_module, x_test)
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(x_test), 10)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert not digits_module.training
    assert all(p.dtype == torch.float32 for p in digits_module.parameters())
    assert digits_module.input_name == DIGITS_INPUT_NAME


def test_converted_module_is_differentiable(digits_module, x_test) -> None:
    x = torch.from_numpy(x_test[:4].copy()).requires_grad_(True)
    digits_module(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0


def _cnn(seed: int = 0) -> tuple[bytes, bytes]:
    """Conv→BatchNorm→Relu→MaxPool→Flatten→Gemm→Softmax on 1×8×8 images, and the graph ending at the logits."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [
        _init("w", (rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(f32)),
        _init("b", rng.standard_normal(4).astype(f32) * 0.1),
        _init("bn_s", rng.uniform(0.5, 1.5, 4).astype(f32)),
        _init("bn_b", rng.standard_normal(4).astype(f32) * 0.1),
        _init("bn_m", rng.standard_normal(4).astype(f32) * 0.1),
        _init("bn_v", rng.uniform(0.5, 2.0, 4).astype(f32)),
        _init("fc_w", (rng.standard_normal((10, 64)) * 0.2).astype(f32)),
        _init("fc_b", rng.standard_normal(10).astype(f32) * 0.1),
    ]
    body = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    with_softmax = _model([*body, helper.make_node("Softmax", ["logits"], ["y"], axis=1)], ["N", 1, 8, 8], inits)
    logits_only = _model(body, ["N", 1, 8, 8], inits, output="logits")
    return with_softmax, logits_only


def test_cnn_matches_onnxruntime_with_and_without_softmax(x_test) -> None:
    with_softmax, logits_only = _cnn()
    x = x_test[:64].reshape(-1, 1, 8, 8)
    probs = _torch_run(onnx_to_torch(with_softmax, strip_softmax=False), x)
    np.testing.assert_allclose(probs, _ort_run(with_softmax, x), atol=1e-5, rtol=0)
    logits = _torch_run(onnx_to_torch(with_softmax, strip_softmax=True), x)
    np.testing.assert_allclose(logits, _ort_run(logits_only, x), atol=1e-5, rtol=0)
    assert not np.allclose(logits.sum(axis=1), 1.0)  # really the pre-softmax values


def _f(shape, seed=1, lo=-1.0, hi=1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


_i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731

# (id, nodes, input shape, initializers, opset): each graph maps "x" to "y"; results must match ONNX Runtime.
OP_CASES = [
    ("gemm-trans-alpha-beta", [helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transA=1,
                                                transB=1)], (5, 3), [_init("w", _f((4, 5))), _init("c", _f((4,)))], 17),
    ("matmul-add", [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
     (3, 5), [_init("w", _f((5, 4))), _init("b", _f((4,)))], 17),
    ("sub-mul-div", [helper.make_node("Sub", ["x", "a"], ["s"]), helper.make_node("Mul", ["s", "a"], ["m"]),
                     helper.make_node("Div", ["m", "d"], ["y"])], (3, 4),
     [_init("a", _f((4,), 2)), _init("d", _f((1, 4), 3, 1.0, 2.0))], 17),
    ("activations", [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.2), helper.make_node("Sigmoid", ["a"], ["b"]),
                     helper.make_node("Tanh", ["b"], ["c"]), helper.make_node("Identity", ["c"], ["y"])],
     (3, 4), [], 17),
    ("softmax-axis", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], (2, 3, 4), [], 17),
    ("softmax-opset11-coerce", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], (2, 3, 4), [], 11),
    ("logsoftmax-opset11-coerce", [helper.make_node("LogSoftmax", ["x"], ["y"])], (2, 3, 4), [], 11),
    ("flatten-axis2", [helper.make_node("Flatten", ["x"], ["y"], axis=2)], (2, 3, 4, 5), [], 17),
    ("reshape-0-and-minus1", [helper.make_node("Reshape", ["x", "s"], ["y"])], (2, 3, 4),
     [_init("s", _i64([0, -1, 2]))], 17),
    ("constant-reshape", [helper.make_node("Constant", [], ["s"], value=_init("sv", _i64([-1, 6]))),
                          helper.make_node("Reshape", ["x", "s"], ["y"])], (2, 3, 4), [], 17),
    ("constant-value-float", [helper.make_node("Constant", [], ["k"], value_float=1.5),
                              helper.make_node("Mul", ["x", "k"], ["y"])], (2, 3), [], 17),
    ("transpose-concat", [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
                          helper.make_node("Transpose", ["x"], ["u"]),
                          helper.make_node("Transpose", ["u"], ["v"]),
                          helper.make_node("Concat", ["t", "v"], ["y"], axis=1)], (2, 3, 3), [], 17),
    ("squeeze-unsqueeze-inputs", [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
                                  helper.make_node("Squeeze", ["u", "sq"], ["y"])], (2, 3),
     [_init("ax", _i64([0, -1])), _init("sq", _i64([0]))], 17),
    ("squeeze-unsqueeze-attrs", [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1, 3]),
                                 helper.make_node("Squeeze", ["u"], ["y"], axes=[1])], (2, 3), [], 11),
    ("squeeze-all", [helper.make_node("Squeeze", ["x"], ["y"])], (1, 3, 1, 2), [], 17),
    ("clip-inputs", [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], (3, 4),
     [_init("lo", np.float32(-0.3)), _init("hi", np.float32(0.4))], 17),
    ("clip-max-only", [helper.make_node("Clip", ["x", "", "hi"], ["y"])], (3, 4), [_init("hi", np.float32(0.2))], 17),
    ("clip-attrs", [helper.make_node("Clip", ["x"], ["y"], min=-0.1, max=0.3)], (3, 4), [], 9),
    ("dropout", [helper.make_node("Dropout", ["x"], ["y"], ratio=0.7)], (3, 4), [], 10),
    ("dropout-opset13", [helper.make_node("Dropout", ["x", "r"], ["y"])], (3, 4), [_init("r", np.float32(0.5))], 13),
    ("conv-group-dilation-stride", [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, dilations=[2, 1],
                                                     strides=[2, 1], pads=[1, 0, 1, 2])], (2, 4, 9, 7),
     [_init("w", _f((6, 2, 3, 2))), _init("b", _f((6,)))], 17),
    ("conv-same-upper", [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
     (1, 2, 7, 6), [_init("w", _f((3, 2, 4, 3)))], 17),
    ("maxpool-pads", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1])], (2, 3, 7, 7), [], 17),
    ("maxpool-asymmetric", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1])],
     (1, 2, 5, 5), [], 17),
    ("avgpool-exclude-pad", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
     (2, 3, 6, 6), [], 17),
    ("avgpool-include-pad", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 1],
                                              pads=[1, 1, 1, 1], count_include_pad=1)], (2, 3, 6, 6), [], 17),
    ("global-avgpool", [helper.make_node("GlobalAveragePool", ["x"], ["y"])], (2, 3, 5, 4), [], 17),
    ("batchnorm-opset9", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])], (2, 3, 4, 4),
     [_init("s", _f((3,))), _init("b", _f((3,))), _init("m", _f((3,))), _init("v", _f((3,), 4, 0.5, 2.0))], 9),
]


@pytest.mark.parametrize(("nodes", "shape", "inits", "opset"), [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_ops_match_onnxruntime(nodes, shape, inits, opset) -> None:
    model_bytes = _model(nodes, shape, inits, opset)
    x = _f(shape, seed=7)
    got = _torch_run(onnx_to_torch(model_bytes, strip_softmax=False), x)
    expected = _ort_run(model_bytes, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("node", "op"),
    [
        (helper.make_node("Erf", ["x"], ["y"]), "Erf"),
        (helper.make_node("Abs", ["x"], ["y"]), "Abs"),
        (helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"), "com.microsoft.Gelu"),
    ],
)
def test_unsupported_op_is_refused(node, op) -> None:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    with pytest.raises(UnsupportedModelError, match=f"op {op} is not supported by the ONNX→PyTorch bridge"):
        onnx_to_torch(model.SerializeToString())


def test_topk_is_refused() -> None:
    model_bytes = _model([helper.make_node("TopK", ["x", "k"], ["y", "idx"])], (2, 5), [_init("k", _i64([2]))])
    with pytest.raises(UnsupportedModelError, match="op TopK is not supported"):
        onnx_to_torch(model_bytes)


def test_unsupported_attributes_are_refused() -> None:
    pool3d = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2, 2])
    with pytest.raises(UnsupportedModelError, match="MaxPool"):
        onnx_to_torch(_model([pool3d], (1, 1, 4, 4, 4)))
    bn_train = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)
    inits = [_init(n, np.ones(3, np.float32)) for n in "sbmv"]
    with pytest.raises(UnsupportedModelError, match="BatchNormalization"):
        onnx_to_torch(_model([bn_train], (2, 3, 4, 4), inits, opset=15))


def test_unused_branches_are_not_converted() -> None:
    """Only what the first output depends on is converted, so an unsupported op elsewhere does no harm."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Erf", ["x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    module = onnx_to_torch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    x = _f((2, 3))
    np.testing.assert_array_equal(_torch_run(module, x), np.maximum(x, 0))


def test_bad_models_are_refused() -> None:
    with pytest.raises(UnsupportedModelError):
        onnx_to_torch(b"\x00 definitely not protobuf \xff" * 3)
    with pytest.raises(InvalidArgumentError):
        onnx_to_torch(str(digits_model_path()))  # type: ignore[arg-type]
    two_inputs = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(UnsupportedModelError, match="single-input"):
        onnx_to_torch(helper.make_model(two_inputs).SerializeToString())


def test_converted_module_ignores_train_mode(digits_module, x_test) -> None:
    """ART flips train()/eval() on every call; the converted graph must compute the same either way."""
    with_softmax, _ = _cnn()
    module = onnx_to_torch(with_softmax)
    x = x_test[:16].reshape(-1, 1, 8, 8)
    before = _torch_run(module, x)
    module.train()
    try:
        np.testing.assert_array_equal(_torch_run(module, x), before)
    finally:
        module.eval()


# --- the gradient detector -----------------------------------------------------------------------------------------
def _direct_grad(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """∇ₓ CE(logits, argmax logits) for one example, straight from autograd."""
    xt = torch.from_numpy(x[None].copy()).requires_grad_(True)
    logits = module(xt)
    loss = torch.nn.functional.cross_entropy(logits, logits.argmax(dim=1).detach())
    loss.backward()
    return xt.grad[0].numpy().astype(np.float64)


def test_gradient_detector_shapes_and_determinism(digits_module, x_test) -> None:
    det = GradientDetector(digits_module, batch_size=64)
    s = det.scores(x_test)
    assert s.dtype == np.float64 and s.shape == (len(x_test),)
    assert np.isfinite(s).all() and (s >= 0).all()
    np.testing.assert_array_equal(det.scores(x_test), s)
    np.testing.assert_allclose(GradientDetector(digits_module, batch_size=7).scores(x_test), s, rtol=1e-5, atol=1e-9)
    assert det.scores(x_test[:0]).shape == (0,)
    assert det.name == "gradient" and det.params() == {"norm": "l2"}


@pytest.mark.parametrize(
    ("norm", "fn"),
    [("l1", lambda g: np.abs(g).sum()), ("l2", lambda g: np.sqrt((g**2).sum())), ("linf", lambda g: np.abs(g).max())],
)
def test_gradient_detector_matches_autograd(digits_module, x_test, norm, fn) -> None:
    x = x_test[:5]
    scores = GradientDetector(digits_module, norm=norm).scores(x)
    expected = [fn(_direct_grad(digits_module, xi)) for xi in x]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-9)


def test_gradient_detector_works_on_images_and_restores_mode(x_test) -> None:
    module = onnx_to_torch(_cnn()[0])
    x = x_test[:8].reshape(-1, 1, 8, 8)
    module.train()
    scores = GradientDetector(module, norm="linf").scores(x)
    assert module.training  # the mode it found
    module.eval()
    np.testing.assert_allclose(scores, [np.abs(_direct_grad(module, xi)).max() for xi in x], rtol=1e-4, atol=1e-9)


def test_gradient_detector_rejects_bad_arguments(digits_module) -> None:
    with pytest.raises(InvalidArgumentError):
        GradientDetector(digits_module, norm="l3")
    with pytest.raises(InvalidArgumentError):
        GradientDetector(digits_module, batch_size=0)
    with pytest.raises(InvalidArgumentError):
        GradientDetector(digits_module).scores(np.zeros(64, np.float32))


def test_fgsm_inputs_have_larger_gradients(digits_module, x_test) -> None:
    """A sanity property of the score, not a tuned threshold: FGSM (eps 0.1) raises the mean gradient norm."""
    y = torch.from_numpy(load_digits_split().y_test)
    x = torch.from_numpy(x_test.copy()).requires_grad_(True)
    torch.nn.functional.cross_entropy(digits_module(x), y).backward()
    x_adv = (x + 0.1 * x.grad.sign()).clamp(0.0, 1.0).detach().numpy()
    det = GradientDetector(digits_module)
    clean, adv = det.scores(x_test), det.scores(x_adv)
    assert adv.mean() > clean.mean()


# --- ART -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_art(digits_module, tmp_path_factory):
    # ART writes ~/.art/config.json when first imported; keep that out of the real home directory.
    if "art" not in sys.modules:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
            pytest.importorskip("art.estimators.classification")
    return art_classifier(digits_module, input_shape=(64,), nb_classes=10)


def test_art_predictions_match_onnxruntime(digits_art, digits_bytes, x_test) -> None:
    preds = digits_art.predict(x_test)
    assert preds.shape == (len(x_test), 10)
    expected = _ort_run(digits_bytes, x_test, DIGITS_OUTPUT_NAME).argmax(axis=1)
    np.testing.assert_array_equal(preds.argmax(axis=1), expected)


def test_art_fgsm_attack_runs_and_hurts_accuracy(digits_art, x_test) -> None:
    from art.attacks.evasion import FastGradientMethod

    y = load_digits_split().y_test
    x_adv = FastGradientMethod(digits_art, eps=0.1).generate(x=x_test[:200])
    assert x_adv.shape == x_test[:200].shape and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean_acc = (digits_art.predict(x_test[:200]).argmax(1) == y[:200]).mean()
    adv_acc = (digits_art.predict(x_adv).argmax(1) == y[:200]).mean()
    assert adv_acc < clean_acc


def test_art_classifier_rejects_bad_arguments(digits_module) -> None:
    with pytest.raises(InvalidArgumentError):
        art_classifier(digits_module, input_shape=(), nb_classes=10)
    with pytest.raises(InvalidArgumentError):
        art_classifier(digits_module, input_shape=(64,), nb_classes=1)
    with pytest.raises(InvalidArgumentError):
        art_classifier(digits_module, input_shape=(64,), nb_classes=10, clip_values=(1.0, 0.0))
