"""The model and its runtime detectors composed into one ONNX graph: same scores as numpy, signed, bound, refused
when foreign or altered."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeshield import bundles, keys
from edgeshield.adversarial import DetectorFile, InputSpec, OnnxClassifier, RobustModel, calibrate
from edgeshield.adversarial._calibrate import build_all
from edgeshield.adversarial._compose import composable, compose, compose_graph, composed_session
from edgeshield.adversarial._composed import ComposedDetectors, open_composed
from edgeshield.adversarial._detectors import scores_with_probs
from edgeshield.errors import (
    ComposedGraphError,
    DetectorMismatchError,
    InputNonFiniteError,
    InputQuantizationError,
    InputRangeError,
    InputShapeError,
    IntegrityError,
    InvalidArgumentError,
    SignatureError,
)
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

RUNTIME = ("squeeze", "noise", "reconstruction")


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return load_digits_split()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, split: Any) -> dict[str, Any]:
    """The digits model protected for one device, calibrated, and its composed graph sealed by the owner."""
    d = tmp_path_factory.mktemp("composed")
    keys.init_keys(d / "k")
    owner = keys.load_owner_private_key(d / "k" / "owner.key")
    device = keys.load_device_private_key(d / "k" / "device.key")
    manifest = bundles.protect(digits_model_path(), d / "m.esb", signing_key=owner, recipients=[device.public_key()])
    opened = bundles.open_bundle(d / "m.esb", owner.public_key(), device)
    plain = calibrate(opened.session, split.x_test[:225], model_sha256=manifest.model_sha256,
                      input_spec=digits_input_spec(), reference=split.x_train, detectors=RUNTIME,
                      noise={"seed": 20261202})
    file = compose(plain, bundles.decrypt_model(d / "m.esb", owner.public_key(), device), split.x_test[:225],
                   signing_key=owner, recipients=[device.public_key()])
    file.save(d / "detector.json")
    return {"dir": d, "owner": owner, "device": device, "manifest": manifest, "session": opened.session,
            "file": DetectorFile.load(d / "detector.json")}


@pytest.mark.parametrize("batch", [1, 64])
def test_composed_scores_equal_numpy_scores(world: dict[str, Any], split: Any, batch: int) -> None:
    file: DetectorFile = world["file"]
    composed = open_composed(file, world["owner"].public_key(), world["device"],
                             model_sha256=world["manifest"].model_sha256)
    assert composed.detectors == RUNTIME
    x = split.x_test[300 : 300 + batch]
    clf = OnnxClassifier(world["session"])
    probs, scores = composed.run(x)
    np.testing.assert_array_equal(probs.argmax(axis=1), clf.predict(x))
    np.testing.assert_allclose(probs, clf.probs(x), rtol=0, atol=1e-6)
    numpy_dets = build_all(file, clf, names=RUNTIME)
    for name in RUNTIME:
        want, _ = scores_with_probs(numpy_dets[name], x, None)
        np.testing.assert_allclose(scores[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    # Fisher's p-values are step functions of the member scores: a member score within 1e-6 of one of its clean
    # calibration scores may land on the other side of that step, so those inputs are exempt for fisher only.
    fisher = file.get("fisher").params["clean_scores"]
    on_step = np.zeros(len(x), dtype=bool)
    for k, name in enumerate(RUNTIME):
        want, _ = scores_with_probs(numpy_dets[name], x, None)
        on_step |= (np.abs(np.asarray(want)[:, None] - np.asarray(fisher[k])[None, :]) <= 1e-6).any(axis=1)
    for decision in ("ensemble", "fisher", "squeeze"):  # combiners stay in numpy over the composed members
        ours = RobustModel(world["session"], file, detector=decision, composed=composed).decide(x)
        ref = RobustModel(world["session"], file, detector=decision).decide(x)
        keep = ~on_step if decision == "fisher" else np.ones(len(x), dtype=bool)
        np.testing.assert_allclose(ours.scores[keep], ref.scores[keep], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ours.verdicts[keep], ref.verdicts[keep])
        np.testing.assert_array_equal(ours.predictions[keep], ref.predictions[keep])


def _image_model() -> bytes:
    """A small classifier on 1×16×16 images (a fixed random Gemm on the flattened image), made with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.3, (256, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["logits"])], "img",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(("median", "value_range"), [(2, (0.0, 1.0)), (3, (-1.0, 2.0)), (4, (0.0, 1.0))])
def test_composed_median_and_bit_depth_equal_numpy(median: int, value_range: tuple[float, float]) -> None:
    model = _image_model()
    spec = InputSpec(shape=(None, 1, 16, 16), min=value_range[0], max=value_range[1], image_shape=(1, 16, 16))
    x = np.random.default_rng(1).uniform(*value_range, (5, 1, 16, 16)).astype(np.float32)
    params = {"bits": 3, "median": median, "image_shape": [1, 16, 16], "value_range": list(value_range)}
    session = composed_session(model)
    file = DetectorFile("00" * 32, spec, 0.02, 0.05, "squeeze", ())
    numpy_det = build_all(dataclasses.replace(file, detectors=(_cd("squeeze", params),)), OnnxClassifier(session))
    composed = ComposedDetectors(composed_session(compose_graph(model, [("squeeze", params)], spec, softmax=True)),
                                 ["squeeze"])
    for batch in (x[:1], x):
        _, scores = composed.run(batch)
        want, _ = scores_with_probs(numpy_det["squeeze"], batch, None)
        np.testing.assert_allclose(scores["squeeze"], want, rtol=1e-6, atol=1e-6)


def _cd(name: str, params: dict[str, Any]) -> Any:
    from edgeshield.adversarial import CalibratedDetector

    return CalibratedDetector(name, params, 1.0, 0.5, {})


def test_fresh_noise_and_feature_detectors_stay_in_numpy(world: dict[str, Any]) -> None:
    assert not composable("noise", {"sigma": 0.05, "samples": 8, "seed": None})
    assert composable("noise", {"sigma": 0.05, "samples": 8, "seed": 7})
    assert not composable("mahalanobis", {})
    file: DetectorFile = world["file"]
    fresh = dataclasses.replace(file, decision="noise", composed=None, detectors=tuple(
        dataclasses.replace(d, params={**d.params, "seed": None}) if d.name == "noise" else d for d in file.detectors))
    with pytest.raises(InvalidArgumentError, match="can run inside the graph"):
        compose(fresh, digits_model_path().read_bytes(), load_digits_split().x_test[:50],
                signing_key=world["owner"], recipients=[world["device"].public_key()])


def test_a_graph_bound_to_other_parameters_or_another_model_is_refused(world: dict[str, Any]) -> None:
    file: DetectorFile = world["file"]
    owner, device, sha = world["owner"].public_key(), world["device"], world["manifest"].model_sha256
    reseeded = dataclasses.replace(file, detectors=tuple(
        dataclasses.replace(d, params={**d.params, "seed": d.params["seed"] + 1}) if d.name == "noise" else d
        for d in file.detectors))
    with pytest.raises(ComposedGraphError, match="parameters"):
        open_composed(reseeded, owner, device, model_sha256=sha)
    other_model = dataclasses.replace(file, model_sha256="cd" * 32)
    with pytest.raises(ComposedGraphError, match="built for model"):
        open_composed(other_model, owner, device, model_sha256="cd" * 32)
    with pytest.raises(DetectorMismatchError):
        open_composed(file, owner, device, model_sha256="cd" * 32)


def test_a_foreign_or_altered_graph_is_refused_before_onnx_runtime_sees_it(world: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    file: DetectorFile = world["file"]
    assert file.composed is not None
    keys.init_keys(tmp_path / "other")
    mallory = keys.load_owner_private_key(tmp_path / "other" / "owner.key")
    foreign = compose(dataclasses.replace(file, composed=None), digits_model_path().read_bytes(),
                      load_digits_split().x_test[:225], signing_key=mallory,
                      recipients=[world["device"].public_key()])
    with pytest.raises(SignatureError):  # WrongOwnerKeyError: signed, but not by this model's owner
        open_composed(foreign, world["owner"].public_key(), world["device"],
                      model_sha256=world["manifest"].model_sha256)
    raw = bytearray(file.composed.bundle)
    raw[len(raw) // 2] ^= 1  # one bit of the sealed graph
    altered = dataclasses.replace(file, composed=dataclasses.replace(file.composed, bundle=bytes(raw)))
    with pytest.raises(IntegrityError):
        open_composed(altered, world["owner"].public_key(), world["device"],
                      model_sha256=world["manifest"].model_sha256)
    d = json.loads((world["dir"] / "detector.json").read_text())
    d["composed"]["bundle"] = d["composed"]["bundle"][:-8] + "AAAAAAA="
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(InvalidArgumentError, match="digest"):
        DetectorFile.load(tmp_path / "bad.json")


def test_the_device_path_needs_no_onnx(world: dict[str, Any], split: Any) -> None:
    d: Path = world["dir"]
    np.save(d / "x.npy", split.x_test[:3])
    code = f"""
import sys, numpy as np
sys.modules["onnx"] = None  # importing onnx now fails
from edgeshield import bundles, keys
from edgeshield.adversarial import DetectorFile, RobustModel
from edgeshield.adversarial._composed import open_composed
owner, device = keys.load_owner_public_key({str(d / 'k' / 'owner.pub')!r}), \\
    keys.load_device_private_key({str(d / 'k' / 'device.key')!r})
opened = bundles.open_bundle({str(d / 'm.esb')!r}, owner, device)
file = DetectorFile.load({str(d / 'detector.json')!r})
composed = open_composed(file, owner, device, model_sha256=opened.manifest.model_sha256)
print(RobustModel(opened.session, file, composed=composed).decide(np.load({str(d / 'x.npy')!r})).verdicts.tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout.strip())) == 3


@pytest.mark.parametrize(("value", "error"), [(np.nan, InputNonFiniteError), (np.inf, InputNonFiniteError),
                                              (1.0625, InputRangeError), (-0.0625, InputRangeError),
                                              (0.5 + 2e-6, InputQuantizationError)])
def test_the_graph_never_vouches_for_an_input_the_spec_refuses(world: dict[str, Any], split: Any, value: float,
                                                               error: type[Exception]) -> None:
    """The in-graph value check is conservative: where it cannot vouch, numpy checks and names the field."""
    file: DetectorFile = world["file"]
    spec = dataclasses.replace(file.input_spec, quantum=1 / 16)
    graph = compose_graph(digits_model_path().read_bytes(), [("squeeze", file.get("squeeze").params)], spec,
                          softmax=True)
    composed = ComposedDetectors(composed_session(graph), ["squeeze"])
    x = split.x_test[300:302].copy()
    assert composed.run_checked(x)[2]  # the digits are on the 1/16 grid and in [0, 1]
    x[1, 5] = value
    assert not composed.run_checked(x)[2]
    robust = RobustModel(world["session"], dataclasses.replace(file, input_spec=spec, composed=None),
                         detector="squeeze", composed=composed)
    with pytest.raises(error):
        robust.decide(x)
    with pytest.raises(InputShapeError):
        robust.decide(x[:, :63].copy())


@pytest.mark.parametrize(("bounds", "value"), [((0.0, None), np.inf), ((None, 1.0), -np.inf), ((None, None), np.nan)])
def test_without_a_grid_or_both_bounds_non_finite_values_are_still_caught(split: Any, bounds: tuple[Any, Any],
                                                                          value: float) -> None:
    spec = InputSpec(shape=(None, 64), min=bounds[0], max=bounds[1])
    params = {"bits": 3, "median": None, "image_shape": None, "value_range": [0.0, 1.0]}
    graph = compose_graph(digits_model_path().read_bytes(), [("squeeze", params)], spec, softmax=True)
    composed = ComposedDetectors(composed_session(graph), ["squeeze"])
    x = split.x_test[:2].copy()
    assert composed.run_checked(x)[2]
    x[0, 0] = value
    assert not composed.run_checked(x)[2]


def test_detect_calibrate_signing_key_writes_the_composed_graph(world: dict[str, Any], split: Any,
                                                                tmp_path: Path) -> None:
    d: Path = world["dir"]
    np.save(tmp_path / "clean.npy", split.x_test[:225])
    proc = subprocess.run([sys.executable, "-m", "edgeshield", "detect", "calibrate", str(d / "m.esb"),
                           "--owner-key", str(d / "k" / "owner.pub"), "--device-key", str(d / "k" / "device.key"),
                           "--clean", str(tmp_path / "clean.npy"), "--detectors", "squeeze,noise", "--out",
                           str(tmp_path / "det.json"), "--signing-key", str(d / "k" / "owner.key"), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["composed"]["detectors"] == ["squeeze", "noise"]
    file = DetectorFile.load(tmp_path / "det.json")
    composed = open_composed(file, world["owner"].public_key(), world["device"],
                             model_sha256=world["manifest"].model_sha256)
    assert composed.detectors == ("squeeze", "noise")
    # `edgeshield run --detector` opens the composed graph too, and decides as the numpy path does
    np.save(tmp_path / "x.npy", split.x_test[:16])
    proc = subprocess.run([sys.executable, "-m", "edgeshield", "run", str(d / "m.esb"),
                           "--owner-key", str(d / "k" / "owner.pub"), "--device-key", str(d / "k" / "device.key"),
                           "--input", str(tmp_path / "x.npy"), "--detector", str(tmp_path / "det.json"), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)["decisions"]
    ref = RobustModel(world["session"], dataclasses.replace(file, composed=None)).predict(split.x_test[:16])
    assert [r["decision"] for r in ran] == [r.decision for r in ref]
    assert [r["prediction"] for r in ran] == [r.prediction for r in ref]
    np.testing.assert_allclose([r["score"] for r in ran], [r.score for r in ref], rtol=0, atol=1e-6)
