"""Randomized smoothing (Cohen et al. 2019): the statistics against scipy, PREDICT/CERTIFY on real ONNX models,
RobustModel's smoothing option, `run --smoothing`, and the configuration's typed errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.adversarial import RobustModel, calibrate
from edgeshield.adversarial._detectors import OnnxClassifier
from edgeshield.adversarial._smoothing import (
    SmoothedClassifier,
    SmoothingConfig,
    SmoothingConfigError,
    _fresh_rng,
    binomial_test_half,
    clopper_pearson_lower,
)
from edgeshield.errors import InvalidArgumentError
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split


@pytest.fixture(scope="module")
def session():  # type: ignore[no-untyped-def]
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return load_digits_split()


def _linear_session(tmp_path: Path, w: np.ndarray):  # type: ignore[no-untyped-def]
    """A two-class linear model: logits [0, w.x], so class 1 exactly when w.x > 0."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgeshield.bundles._ort import onnxruntime as ort

    weights = np.stack([np.zeros_like(w), w], axis=1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, len(w)])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "linear.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- statistics without scipy, checked against scipy ---------------------------------------------------------------
CP_VECTORS = [(k, n, a) for n in (1, 2, 7, 10, 100, 1000, 10_000, 100_000)
              for k in sorted({0, 1, n // 2, (9 * n) // 10, n - 1, n}) for a in (1e-6, 0.001, 0.01, 0.05, 0.5)]


def test_clopper_pearson_matches_scipy() -> None:
    beta = pytest.importorskip("scipy.stats").beta
    for k, n, a in CP_VECTORS:
        expected = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
        assert clopper_pearson_lower(k, n, a) == pytest.approx(expected, rel=1e-8, abs=1e-300), (k, n, a)


def test_binomial_test_matches_scipy() -> None:
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for m in (1, 2, 3, 10, 11, 100, 1000, 4000):
        for k in range(0, m + 1, max(1, m // 41)):
            assert binomial_test_half(k, m) == pytest.approx(binomtest(k, m, 0.5).pvalue, rel=1e-9), (k, m)


def test_clopper_pearson_bad_arguments() -> None:
    for k, n, a in ((-1, 10, 0.01), (11, 10, 0.01), (0, 0, 0.01), (1, 10, 0.0), (1, 10, 1.0), (1, 10, math.nan),
                    (True, 10, 0.01), (1.5, 10, 0.01)):
        with pytest.raises(InvalidArgumentError):
            clopper_pearson_lower(k, n, a)  # type: ignore[arg-type]


def test_runtime_does_not_import_scipy() -> None:
    code = ("import sys, edgeshield.adversarial._smoothing as s, edgeshield.adversarial._robust;"
            "s.clopper_pearson_lower(5, 10, 0.01); assert 'scipy' not in sys.modules, 'scipy imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_each_call_draws_fresh_noise() -> None:
    a, b = _fresh_rng().standard_normal(8), _fresh_rng().standard_normal(8)
    assert not np.array_equal(a, b)


# --- CERTIFY and PREDICT ------------------------------------------------------------------------------------------
def test_unanimous_vote_known_answer(tmp_path: Path) -> None:
    """Inputs far from a linear boundary get every vote: pA = alpha^(1/n), radius = sigma * Phi^-1(pA)."""
    w = np.zeros(64, np.float32)
    w[0] = 1.0
    clf = SmoothedClassifier(_linear_session(tmp_path, w), SmoothingConfig(0.25, n0=20, n=1000, alpha=0.001))
    x = np.zeros((3, 64), np.float32)
    x[:, 0] = [100.0, -100.0, 50.0]
    labels, radii = clf.certify(x)
    expected = 0.25 * NormalDist().inv_cdf(0.001 ** (1 / 1000))
    assert labels.tolist() == [1, 0, 1]
    assert radii == pytest.approx([expected] * 3, rel=1e-12)
    norm = pytest.importorskip("scipy.stats").norm
    assert expected == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)), rel=1e-12)
    assert clf.predict(x).tolist() == [1, 0, 1]


def test_radius_is_a_lower_bound_of_the_distance_to_a_linear_boundary(tmp_path: Path) -> None:
    """For a linear base model the smoothed classifier's exact radius is the distance to the hyperplane (Cohen et
    al., Prop. 4): the certified radius must not exceed it, and with n = 4000 it gets close."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=64).astype(np.float32)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    x *= (np.array([0.05, 0.1, 0.2, -0.1, -0.3, 0.4], np.float32) / (x @ w / np.linalg.norm(w)))[:, None]
    distance = np.abs(x @ w) / np.linalg.norm(w)
    clf = SmoothedClassifier(_linear_session(tmp_path, w), SmoothingConfig(0.25, n0=100, n=4000, alpha=1e-6))
    labels, radii = clf.certify(x)
    certified = labels != -1
    assert certified.sum() >= 4
    assert (labels[certified] == (x @ w > 0)[certified]).all()
    assert (radii[certified] <= distance[certified] + 1e-6).all()
    assert (radii[certified] >= distance[certified] - 0.15).all()
    assert (radii[~certified] == 0).all()


def test_certify_on_digits_agrees_with_the_noisy_majority(session, split) -> None:  # type: ignore[no-untyped-def]
    x = split.x_test[:40]
    cfg = SmoothingConfig(0.25, n0=30, n=200, alpha=0.001, batch=1500)
    labels, radii = SmoothedClassifier(session, cfg).certify(x)
    # the base model's majority under the same noise, estimated independently with many more draws
    base = OnnxClassifier(session)
    rng = np.random.default_rng(7)
    noisy = x[:, None] + rng.normal(0.0, 0.25, size=(len(x), 2000, 64)).astype(np.float32)
    votes = base.predict(noisy.reshape(-1, 64)).reshape(len(x), 2000)
    majority = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    certified = labels != -1
    assert certified.mean() > 0.5
    assert (labels[certified] == majority[certified]).all()
    assert (radii[certified] > 0).all() and (radii[~certified] == 0).all()
    assert radii.max() <= 0.25 * NormalDist().inv_cdf(0.001 ** (1 / 200)) + 1e-12  # the largest n=200 can give
    predicted = SmoothedClassifier(session, cfg).predict(x)
    assert (predicted[predicted != -1] == majority[predicted != -1]).all()


def test_copies_share_onnx_runtime_calls(session, split) -> None:  # type: ignore[no-untyped-def]
    class Counting(OnnxClassifier):
        calls = 0

        def logits(self, x: np.ndarray) -> np.ndarray:
            Counting.calls += 1
            return super().logits(x)

    cfg = SmoothingConfig(0.25, n0=10, n=100, batch=1000)
    SmoothedClassifier(Counting(session), cfg).certify(split.x_test[:25])
    assert Counting.calls == math.ceil(25 * 110 / 1000)


def test_bad_batches(session) -> None:  # type: ignore[no-untyped-def]
    clf = SmoothedClassifier(session, SmoothingConfig(0.25, n=100))
    for bad in (np.zeros(64, np.float32), np.zeros((2, 64), np.int64)):
        with pytest.raises(InvalidArgumentError):
            clf.certify(bad)
    labels, radii = clf.certify(np.zeros((0, 64), np.float32))
    assert labels.shape == radii.shape == (0,)


# --- RobustModel ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_file(session, split):  # type: ignore[no-untyped-def]
    return calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=digits_input_spec(),
                     target_fpr=0.02, reference=split.x_train, detectors=("squeeze", "reconstruction"))


def test_robust_model_with_smoothing(session, split, detector_file) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = np.concatenate([split.x_test[225:265], rng.random((5, 64)).astype(np.float32)])
    plain = RobustModel(session, detector_file).predict(x)
    assert all(d.radius is None and "radius" not in d.to_dict() for d in plain)  # the server's JSON is unchanged
    smoothed = RobustModel(session, detector_file, smoothing=SmoothingConfig(0.25, n0=30, n=200))
    batch = smoothed.decide(x)
    decisions = batch.decisions()
    assert batch.radii is not None and len(decisions) == len(x)
    for p, d in zip(plain, decisions, strict=True):
        assert d.score == pytest.approx(p.score, rel=1e-5)  # the detector scores the raw input
        assert d.radius is not None and d.to_dict()["radius"] == d.radius
        if p.decision == "reject":  # a reject still wins
            assert d.decision == "reject" and d.prediction is None and d.radius == 0.0
        elif d.decision == "abstain":
            assert d.prediction is None and d.radius == 0.0
        else:
            assert d.decision == p.decision and d.prediction is not None and d.radius >= 0.0
    assert all(d.decision == "reject" for d in decisions[-5:])  # uniform noise
    answered = [d for d in decisions if d.prediction is not None]
    assert len(answered) > 25 and all(d.radius and d.radius > 0 for d in answered)
    assert {d.decision for d in decisions} <= {"accept", "flag", "reject", "abstain"}


# --- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": -0.25}, "sigma must be > 0"),
        ({"sigma": math.nan}, "finite"),
        ({"sigma": math.inf}, "finite"),
        ({"sigma": 0.25, "n": 5}, "n >= 10"),
        ({"sigma": 0.25, "n": 9, "alpha": 0.001}, "cannot certify anything"),
        ({"sigma": 0.25, "n": 4, "alpha": 0.05}, "n >= 5"),
        ({"sigma": 0.25, "n": 0}, "n must be"),
        ({"sigma": 0.25, "n0": 0}, "n0 must be"),
        ({"sigma": 0.25, "batch": 0}, "batch must be"),
        ({"sigma": 0.25, "n": 100.5}, "whole number"),
        ({"sigma": 0.25, "n": True}, "whole number"),
        ({"sigma": 0.25, "alpha": 0.0}, "alpha must be"),
        ({"sigma": 0.25, "alpha": 1.0}, "alpha must be"),
        ({"sigma": "0.25"}, "finite number"),
    ],
)
def test_config_errors(kwargs, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SmoothingConfigError) as info:
        SmoothingConfig(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value) and info.value.exit_code == 2


def test_smallest_certifying_n_is_accepted() -> None:
    assert SmoothingConfig(0.25, n=10, alpha=0.001).n == 10  # 0.001 ** (1/10) = 0.501 >= 1/2
    assert SmoothingConfig.parse("sigma=0.5,n=1000,alpha=0.001") == SmoothingConfig(0.5, n=1000, alpha=0.001)
    assert SmoothingConfig.parse(" sigma = 0.25 , n0=50 , batch=512 ") == SmoothingConfig(0.25, n0=50, batch=512)


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "key=value"), ("sigma", "key=value"), ("=0.25", "key=value"), ("n=1000", "sigma is required"),
     ("sigma=0.25,sigma=0.5", "given twice"), ("sigma=0.25,samples=10", "unknown key"), ("sigma=abc", "a number"),
     ("sigma=0.25,n=1e3", "whole number"), ("sigma=0.25,n=-5", "whole number"), ("sigma=0.25,", "key=value"),
     ("sigma=nan", "a number"), ("sigma=1e999", "finite"), ("sigma=0.25,n=3", "cannot certify")],
)
def test_parse_errors(text: str, needle: str) -> None:
    with pytest.raises(SmoothingConfigError) as info:
        SmoothingConfig.parse(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


configs = st.builds(SmoothingConfig, sigma=st.floats(1e-6, 1e3), n0=st.integers(1, 10**6),
                    n=st.integers(20, 10**6), alpha=st.floats(1e-4, 0.99), batch=st.integers(1, 10**6))


@given(configs)
@settings(max_examples=100, deadline=None)
def test_parse_reads_back_to_text(cfg: SmoothingConfig) -> None:
    assert SmoothingConfig.parse(cfg.to_text()) == cfg


@given(st.text(alphabet=st.sampled_from("sigman0alphbtc=,.+-e 0123456789\t"), max_size=60) | st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_parse_never_fails_untyped(text: str) -> None:
    error = ""
    try:
        cfg = SmoothingConfig.parse(text)
    except SmoothingConfigError as exc:
        error = str(exc)
    else:
        assert cfg.sigma > 0 and cfg.n >= 1 and 0 < cfg.alpha < 1
    assert "\n" not in error


# --- edgeshield run --smoothing -----------------------------------------------------------------------------------
def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ), check=False)


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("edgeshield: error: ") and needle in lines[0]


def test_cli_run_smoothing(tmp_path: Path, session, split) -> None:  # type: ignore[no-untyped-def]
    k = tmp_path / "keys"
    assert _cli("keys", "init", k).returncode == 0
    (tmp_path / "spec.json").write_text(digits_input_spec().to_json())
    bundle = tmp_path / "digits.esb"
    proc = _cli("protect", digits_model_path(), "--out", bundle, "--signing-key", k / "owner.key", "--recipient",
                k / "device.pub", "--input-spec", tmp_path / "spec.json", "--json")
    assert proc.returncode == 0, proc.stderr
    sha = json.loads(proc.stdout)["manifest"]["model_sha256"]
    calibrate(session, split.x_test[:225], model_sha256=sha, input_spec=digits_input_spec(), target_fpr=0.02,
              reference=split.x_train, detectors=("squeeze", "reconstruction")).save(tmp_path / "detector.json")
    np.save(tmp_path / "x.npy", split.x_test[225:245])
    base = ("run", bundle, "--owner-key", k / "owner.pub", "--device-key", k / "device.key", "--input",
            tmp_path / "x.npy", "--detector", tmp_path / "detector.json")
    out = _cli(*base, "--smoothing", "sigma=0.25,n0=30,n=200", "--json", "--output", tmp_path / "pred.npy")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["counts"]) == {"accept", "flag", "reject", "abstain"} and sum(result["counts"].values()) == 20
    preds = np.load(tmp_path / "pred.npy")
    for d, p in zip(result["decisions"], preds.tolist(), strict=True):
        assert isinstance(d["radius"], float)
        assert (d["prediction"] is None) == (d["decision"] in ("reject", "abstain")) == (p == -1)
    assert any(d["radius"] > 0 for d in result["decisions"])
    table = _cli(*base, "--smoothing", "sigma=0.25,n=100")
    assert table.returncode == 0 and "certified L2 radius" in table.stdout and "abstained" in table.stdout
    _one_line_error(_cli(*base, "--smoothing", "sigma=0.25,n=5"), "n >= 10")
    _one_line_error(_cli(*base[:-2], "--smoothing", "sigma=0.25"), "--smoothing needs --detector")
