"""Hidden outputs (owner side) and the feature-space detectors (Mahalanobis, LID) on the real digits model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeshield.adversarial import DetectorFile, OnnxClassifier, RobustModel, build_all, calibrate
from edgeshield.adversarial._features import (
    LIDDetector,
    MahalanobisDetector,
    MissingHiddenOutputsError,
    decode_array,
    encode_array,
    lid_mle,
    pooled,
)
from edgeshield.adversarial._hidden import UnknownTensorError, auto_hidden_names, expose_hidden
from edgeshield.errors import InvalidArgumentError, UnsupportedModelError
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

onnx = pytest.importorskip("onnx")
SPEC = digits_input_spec()
DETECTORS = ("squeeze", "noise", "reconstruction", "mahalanobis", "lid")


def _session(model: bytes | Path) -> Any:
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def hidden_model() -> bytes:
    return expose_hidden(digits_model_path().read_bytes())[0]


@pytest.fixture(scope="module")
def split() -> Any:
    return load_digits_split()


@pytest.fixture(scope="module")
def hidden_file(hidden_model: bytes, split: Any) -> DetectorFile:
    return calibrate(_session(hidden_model), split.x_test[:225], model_sha256="cd" * 32, input_spec=SPEC,
                     reference=split.x_train, reference_labels=split.y_train, detectors=DETECTORS)


# --- expose_hidden -----------------------------------------------------------------------------------------------
def test_auto_exposes_the_hidden_relus_and_keeps_the_logits_bit_identical(hidden_model: bytes, split: Any) -> None:
    plain, hidden = _session(digits_model_path()), _session(hidden_model)
    assert [o.name for o in hidden.get_outputs()] == ["logits", "relu", "relu_1"]
    x = np.concatenate([split.x_test, np.random.default_rng(0).random((300, 64), dtype=np.float32)])
    want = plain.run(None, {"input": x})[0]
    got = hidden.run(None, {"input": x})
    assert np.array_equal(got[0], want)
    assert got[1].shape == (len(x), 128) and got[2].shape == (len(x), 64)
    assert (got[1] >= 0).all()  # ReLU outputs


def test_named_tensors_and_bad_names(split: Any) -> None:
    model = digits_model_path().read_bytes()
    out, names = expose_hidden(model, ["linear_1"])
    assert names == ["linear_1"] and [o.name for o in _session(out).get_outputs()] == ["logits", "linear_1"]
    with pytest.raises(UnknownTensorError, match="nope"):
        expose_hidden(model, ["relu", "nope"])
    with pytest.raises(InvalidArgumentError, match="already is an output"):
        expose_hidden(model, ["logits"])
    with pytest.raises(UnknownTensorError):
        expose_hidden(model, ["inner.0.weight"])  # an initializer, not an activation
    with pytest.raises(UnsupportedModelError):
        expose_hidden(b"not a model")
    with pytest.raises(InvalidArgumentError, match="already is an output"):  # exposing twice is refused, not doubled
        expose_hidden(out, ["linear_1"])


def _tiny_cnn() -> bytes:
    """Conv(2 channels, 3x3) -> Relu -> Flatten -> Gemm(10) on a [N, 1, 4, 4] input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "w")
    g = numpy_helper.from_array(rng.normal(size=(8, 10)).astype(np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"]), helper.make_node("Relu", ["conv"], ["act"]),
             helper.make_node("Flatten", ["act"], ["flat"]), helper.make_node("Gemm", ["flat", "g"], ["logits"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], [w, g])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def test_a_cnn_exposes_its_feature_maps_and_the_penultimate_input() -> None:
    model = _tiny_cnn()
    assert auto_hidden_names(onnx.load_model_from_string(model).graph) == ["act", "flat"]
    out, names = expose_hidden(model)
    clf = OnnxClassifier(_session(out))
    assert clf.hidden_names == names == ["act", "flat"]
    x = np.random.default_rng(1).random((50, 1, 4, 4), dtype=np.float32)
    logits, hidden = clf.logits_and_hidden(x)
    assert np.array_equal(logits, _session(model).run(None, {"x": x})[0])
    assert hidden["act"].shape == (50, 2, 2, 2) and pooled(hidden["act"]).shape == (50, 2)  # spatial mean
    det = MahalanobisDetector.fit(clf, x, layers=["act", "flat"])
    assert det.scores(x).shape == (50,)


# --- OnnxClassifier: logits only, unless asked --------------------------------------------------------------------
def test_the_classifier_answers_from_the_logits_only(hidden_model: bytes, split: Any) -> None:
    clf = OnnxClassifier(_session(hidden_model), batch_size=100)
    assert clf.output_names == ["logits"] and clf.hidden_names == ["relu", "relu_1"]
    x = split.x_test
    assert clf.logits(x).shape == (len(x), 10) and clf.probs(x).shape == (len(x), 10)
    logits, hidden = clf.logits_and_hidden(x)  # four batches of 100 and one of 50, joined
    whole_logits, whole_hidden = OnnxClassifier(_session(hidden_model)).logits_and_hidden(x)
    assert np.array_equal(logits, whole_logits) and np.array_equal(hidden["relu"], whole_hidden["relu"])
    assert OnnxClassifier(_session(digits_model_path())).hidden_names == []


def test_run_and_the_server_never_return_hidden_tensors(tmp_path: Path, hidden_model: bytes,
                                                        hidden_file: DetectorFile, split: Any) -> None:
    from edgeshield import audit, bundles, keys, transport
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.bundles._predict import run_batch
    from edgeshield.server import ServeConfig, running

    k = tmp_path / "keys"
    keys.init_keys(k)
    model = tmp_path / "digits-hidden.onnx"
    model.write_bytes(hidden_model)
    bundle = tmp_path / "digits-hidden.esb"
    bundles.protect(model, bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")],
                    metadata={METADATA_KEY: SPEC.to_json()})
    opened = bundles.open_bundle(bundle, keys.load_owner_public_key(k / "owner.pub"),
                                 keys.load_device_private_key(k / "device.key"))
    x = split.x_test[:5]
    out = run_batch(opened.session, x)  # what `edgeshield run` prints from
    assert out.shape == (5, 10)
    det = tmp_path / "detector.json"
    dataclasses.replace(hidden_file, model_sha256=opened.manifest.model_sha256, decision="mahalanobis").save(det)
    ca = tmp_path / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    client = transport.issue(ca, name="alice", role="client")
    audit.generate_signing_key(tmp_path / "audit.key")
    for detector in (None, det):
        cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                          cert=server.cert_path, key=server.key_path, audit_db=tmp_path / "audit.db",
                          audit_key=tmp_path / "audit.key", port=0, detector=detector, log_level="warning")
        with running(cfg) as (_srv, _watcher, port):
            import httpx

            ctx = transport.client_context(ca / "ca.crt", client.cert_path, client.key_path)
            with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as http:
                r = http.post("/v1/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        text = json.dumps(body)
        assert "relu" not in text
        if detector is None:
            assert body["predictions"] == out.argmax(axis=1).tolist()
        else:
            assert [d["detector"] for d in body["decisions"]] == ["mahalanobis"] * 5
            assert all(d["prediction"] is None or isinstance(d["prediction"], int) for d in body["decisions"])
            assert set(body["decisions"][0]) <= {"decision", "score", "threshold", "flag_threshold", "detector",
                                                 "prediction", "radius"}


# --- the estimators against their definitions ---------------------------------------------------------------------
def test_lid_matches_the_reference_estimator_and_recovers_a_known_dimension() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 6))
    k = 20
    ref = []  # Ma et al.'s mle_batch(data, data, k): sort each row's distances, drop the first (self), k next
    for row in data:
        d = np.sort(np.linalg.norm(data - row, axis=1))[1 : k + 1]
        ref.append(-k / np.sum(np.log(d / d[-1])))
    assert np.allclose(lid_mle(data, data, k), ref, rtol=1e-9)
    plane = np.zeros((2000, 10))
    plane[:, :2] = rng.random((2000, 2))  # a 2-D square embedded in 10-D
    est = lid_mle(plane[:200] + [0.0] * 10, plane, k)
    assert 1.6 < float(np.median(est)) < 2.6
    with pytest.raises(InvalidArgumentError):
        lid_mle(data, data[:k], k)


def test_mahalanobis_is_the_nearest_class_quadratic_form(hidden_model: bytes, split: Any) -> None:
    clf = OnnxClassifier(_session(hidden_model))
    det = MahalanobisDetector.fit(clf, split.x_train, split.y_train, layers=["relu_1"])
    _, hidden = clf.logits_and_hidden(split.x_test[:20])
    f = hidden["relu_1"].astype(np.float64)
    mu, p = det.means[0], det.precisions[0]
    want = [min(float((r - m) @ p @ (r - m)) for m in mu) for r in f]
    assert np.allclose(det.layer_scores(hidden)[:, 0], want, rtol=1e-8, atol=1e-8)
    assert mu.shape == (10, 64) and np.allclose(p, p.T)


def test_the_detectors_separate_noise_and_fgsm_from_clean_digits(hidden_model: bytes, hidden_file: DetectorFile,
                                                                split: Any) -> None:
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod

    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.evaluation._adversarial import art_classifier

    clean, labels = split.x_test[225:], split.y_test[225:]
    est = art_classifier(onnx_to_torch(digits_model_path().read_bytes()), input_shape=(64,), nb_classes=10)
    adv = FastGradientMethod(est, eps=0.1).generate(clean).astype(np.float32)
    adv = adv[est.predict(adv).argmax(axis=1) != labels]
    noise = np.random.default_rng(7).random((200, 64), dtype=np.float32)
    dets = build_all(hidden_file, OnnxClassifier(_session(hidden_model)), names=["mahalanobis", "lid"])
    for name, det in dets.items():
        threshold = hidden_file.get(name).reject_threshold
        s_clean, s_adv = det.scores(clean), det.scores(adv)
        auroc = float((s_clean[:, None] < s_adv[None, :]).mean())
        assert (det.scores(noise) > threshold).mean() > 0.8, name
        assert (s_clean > threshold).mean() <= 0.06, name  # held-out clean: near the 2 % target
        assert auroc > 0.65, (name, auroc)


# --- the detector file ----------------------------------------------------------------------------------------------
def test_detector_file_round_trip(tmp_path: Path, hidden_model: bytes, hidden_file: DetectorFile, split: Any) -> None:
    path = tmp_path / "d.json"
    hidden_file.save(path)
    loaded = DetectorFile.load(path)
    assert json.loads(path.read_text())["detectors"][3]["name"] == "mahalanobis"
    assert loaded.to_dict() == hidden_file.to_dict()
    clf = OnnxClassifier(_session(hidden_model))
    a, b = build_all(hidden_file, clf), build_all(loaded, clf)
    x = split.x_test[225:260]
    for name in ("mahalanobis", "lid", "fisher"):
        assert np.array_equal(a[name].scores(x), b[name].scores(x)), name
    lid = loaded.get("lid").params
    assert decode_array(lid["samples"][0], "s").shape == (1000, 128) and lid["k"] == 20
    model = RobustModel(_session(hidden_model), loaded, detector="lid")
    assert len(model.predict(x)) == len(x)


def test_encoded_arrays_are_checked() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert np.array_equal(decode_array(json.loads(json.dumps(encode_array(a))), "a"), a)
    bad = encode_array(a) | {"shape": [4, 3]}
    with pytest.raises(InvalidArgumentError, match="bytes"):
        decode_array(bad, "a")
    with pytest.raises(InvalidArgumentError, match="NaN"):
        decode_array(encode_array(np.array([np.nan])), "a")
    with pytest.raises(InvalidArgumentError):
        decode_array({"dtype": "int8", "shape": [1], "base64": "AA=="}, "a")
    with pytest.raises(InvalidArgumentError):
        decode_array({"dtype": "float32", "shape": [1], "base64": "!!"}, "a")


def test_a_model_without_hidden_outputs_is_a_typed_error(hidden_file: DetectorFile, split: Any) -> None:
    plain = _session(digits_model_path())
    for name in ("mahalanobis", "lid"):
        with pytest.raises(MissingHiddenOutputsError, match="detect expose-hidden"):
            calibrate(plain, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, reference=split.x_train,
                      detectors=(name,))
    with pytest.raises(MissingHiddenOutputsError, match="expose-hidden"):
        RobustModel(plain, hidden_file, detector="mahalanobis")
    with pytest.raises(InvalidArgumentError, match="reference"):
        calibrate(plain, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, detectors=("lid",))
    other = _session(expose_hidden(digits_model_path().read_bytes(), ["linear"])[0])
    with pytest.raises(MissingHiddenOutputsError, match="relu"):
        build_all(hidden_file, OnnxClassifier(other), names=["lid"])
    with pytest.raises(InvalidArgumentError):
        LIDDetector.fit(OnnxClassifier(other), split.x_train[:10])


# --- CLI: expose-hidden, protect, calibrate, run --------------------------------------------------------------------
def _cli(*args: object) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def _one_line_error(proc: Any, needle: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeshield: error: ") and needle in lines[0], proc.stderr


def test_cli_expose_hidden_protect_calibrate_run(tmp_path: Path, split: Any) -> None:
    k = tmp_path / "keys"
    assert _cli("keys", "init", k).returncode == 0
    hidden = tmp_path / "digits-hidden.onnx"
    proc = _cli("detect", "expose-hidden", digits_model_path(), "--out", hidden, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hidden_outputs"] == ["relu", "relu_1"]
    _one_line_error(_cli("detect", "expose-hidden", digits_model_path(), "--out", hidden), "exists")
    _one_line_error(_cli("detect", "expose-hidden", digits_model_path(), "--out", tmp_path / "x.onnx",
                         "--tensor", "nope"), "nope")
    (tmp_path / "spec.json").write_text(SPEC.to_json())
    np.save(tmp_path / "clean.npy", split.x_test[:225])
    np.save(tmp_path / "train.npy", split.x_train)
    np.save(tmp_path / "labels.npy", split.y_train)
    np.save(tmp_path / "x.npy", split.x_test[225:235])
    for model, name in ((hidden, "hidden"), (digits_model_path(), "plain")):
        proc = _cli("protect", model, "--out", tmp_path / f"{name}.esb", "--signing-key", k / "owner.key",
                    "--recipient", k / "device.pub", "--input-spec", tmp_path / "spec.json")
        assert proc.returncode == 0, proc.stderr
    keys_ = ("--owner-key", k / "owner.pub", "--device-key", k / "device.key")
    calib = ("--clean", tmp_path / "clean.npy", "--reference", tmp_path / "train.npy",
             "--detectors", "squeeze,mahalanobis,lid")
    _one_line_error(_cli("detect", "calibrate", tmp_path / "plain.esb", *keys_, *calib, "--out", tmp_path / "p.json"),
                    "detect expose-hidden")
    proc = _cli("detect", "calibrate", tmp_path / "hidden.esb", *keys_, *calib, "--reference-labels",
                tmp_path / "labels.npy", "--decision", "fisher", "--out", tmp_path / "d.json", "--json")
    assert proc.returncode == 0, proc.stderr
    cal = json.loads(proc.stdout)
    assert cal["decision"] == "fisher"
    assert [d["name"] for d in cal["detectors"]] == ["squeeze", "mahalanobis", "lid", "ensemble", "fisher"]
    proc = _cli("run", tmp_path / "hidden.esb", *keys_, "--input", tmp_path / "x.npy", "--detector",
                tmp_path / "d.json", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["decisions"]) == 10 and {d["detector"] for d in out["decisions"]} == {"fisher"}
    assert "relu" not in proc.stdout
