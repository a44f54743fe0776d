"""Input specs, runtime detectors, calibration and robust inference (numpy + ONNX Runtime only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.adversarial import (
    DetectorFile,
    EnsembleDetector,
    InputSpec,
    NoiseDetector,
    OnnxClassifier,
    ReconstructionDetector,
    RobustModel,
    SqueezeDetector,
    calibrate,
    threshold_at_fpr,
)
from edgeshield.adversarial._detectors import bit_depth, median_smooth
from edgeshield.errors import (
    DetectorMismatchError,
    EmptyBatchError,
    InputDtypeError,
    InputNonFiniteError,
    InputQuantizationError,
    InputRangeError,
    InputShapeError,
    InvalidArgumentError,
)
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

SPEC = digits_input_spec()


@pytest.fixture(scope="module")
def session():  # type: ignore[no-untyped-def]
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return load_digits_split()


@pytest.fixture(scope="module")
def detector_file(session, split) -> DetectorFile:  # type: ignore[no-untyped-def]
    return calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, target_fpr=0.02,
                     reference=split.x_train, detectors=("squeeze", "noise", "reconstruction"))


# --- input specs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "error", "field"),
    [
        (np.zeros((2, 63), np.float32), InputShapeError, "shape[1]"),
        (np.zeros((2, 8, 8), np.float32), InputShapeError, "shape"),
        (np.zeros((0, 64), np.float32), EmptyBatchError, "batch"),
        (np.zeros((2, 64), np.float64), InputDtypeError, "dtype"),
        (np.full((2, 64), np.nan, np.float32), InputNonFiniteError, "nan"),
        (np.full((2, 64), np.inf, np.float32), InputNonFiniteError, "inf"),
        (np.full((2, 64), 1.5, np.float32), InputRangeError, "max"),
        (np.full((2, 64), -0.1, np.float32), InputRangeError, "min"),
        ([[0.0] * 64], InputDtypeError, "type"),
    ],
)
def test_spec_names_the_offending_field(x, error, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        SPEC.validate(x)
    assert info.value.field == field and info.value.exit_code == 2 and field in str(info.value)


def test_quantum_check() -> None:
    spec = InputSpec(shape=(None, 4), min=0.0, max=1.0, quantum=1 / 16)
    spec.validate(np.array([[0, 1 / 16, 0.5, 1.0]], np.float32))
    with pytest.raises(InputQuantizationError):
        spec.validate(np.array([[0, 0.03, 0.5, 1.0]], np.float32))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.floats(-10, 10), st.floats(0, 10))
def test_spec_round_trips_and_accepts_in_range_data(n: int, d: int, lo: float, width: float) -> None:
    spec = InputSpec(shape=(None, d), dtype="float32", min=lo, max=lo + width)
    assert InputSpec.from_json(spec.to_json()) == spec
    x = np.random.default_rng(n).uniform(lo, lo + width, size=(n, d)).astype(np.float32)
    x = np.clip(x, np.float32(lo), np.float32(lo + width))
    if x.min() >= lo and x.max() <= lo + width:  # float32 rounding can step outside by one ulp
        spec.validate(x)


@pytest.mark.parametrize(
    "bad",
    [{"shape": []}, {"shape": [None, 64], "dtype": "complex64"}, {"shape": [None, 64], "min": 2, "max": 1},
     {"shape": [None, 64], "image_shape": [7, 7]}, {"shape": [None, 64], "colour": "red"}, [1, 2],
     {"shape": [None, 64], "quantum": 0}],
)
def test_bad_specs_are_refused(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError):
        InputSpec.from_dict(bad)


# --- detectors ---------------------------------------------------------------------------------------------------
def test_squeezers_match_their_definitions() -> None:
    import scipy.ndimage as ndi

    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    assert np.array_equal(bit_depth(x, 1), (x >= 0.5).astype(np.float32))
    assert len(np.unique(bit_depth(x, 3))) <= 8
    for size in (2, 3):
        ref = np.stack([ndi.median_filter(i.reshape(8, 8), size=size, mode="reflect") for i in x]).reshape(4, 64)
        np.testing.assert_array_equal(median_smooth(x, size, (8, 8)), ref)


def test_detector_scores_have_the_right_shape_and_are_deterministic(session, split) -> None:  # type: ignore[no-untyped-def]
    clf = OnnxClassifier(session)
    x = split.x_test[:20]
    recon = ReconstructionDetector.fit(split.x_train, components=30)
    for det in (SqueezeDetector(clf, bits=3, median=2, image_shape=(8, 8)), NoiseDetector(clf, seed=1), recon):
        s1, s2 = det.scores(x), det.scores(x)
        assert s1.shape == (20,) and np.array_equal(s1, s2) and (s1 >= 0).all()
        np.testing.assert_allclose(det.scores(x[:1]), s1[:1], rtol=1e-6)  # independent of the rest of the batch
    fresh = NoiseDetector(clf)  # default: fresh noise each call, unknown to an attacker
    assert not np.array_equal(fresh.scores(x), fresh.scores(x))
    # a clean training digit is reconstructed far better than uniform noise
    noise = np.random.default_rng(0).random((20, 64)).astype(np.float32)
    assert recon.scores(noise).min() > np.median(recon.scores(split.x_train[:200]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=300), st.floats(0.001, 0.5))
def test_threshold_at_fpr_is_the_smallest_that_keeps_the_fpr(scores: list[float], fpr: float) -> None:
    s = np.array(scores)
    t = threshold_at_fpr(s, fpr)
    assert (s > t).mean() <= fpr + 1e-12
    if np.floor(fpr * len(s) + 1e-9) < len(s):
        assert (s >= t).mean() > fpr - 1e-12  # any lower data value would let more than fpr through


# --- calibration, detector files, robust inference ------------------------------------------------------------------
def test_calibration_meets_the_target_on_its_own_data(detector_file: DetectorFile) -> None:
    assert [d.name for d in detector_file.detectors] == ["squeeze", "noise", "reconstruction", "ensemble", "fisher"]
    for d in detector_file.detectors:
        assert d.calibration["fpr_reject"] <= 0.02 and d.calibration["fpr_flag"] <= 0.05
        assert d.flag_threshold <= d.reject_threshold
    assert detector_file.decision == "ensemble"


def test_detector_file_round_trip_and_model_binding(detector_file: DetectorFile, tmp_path: Path) -> None:
    detector_file.save(tmp_path / "d.json")
    loaded = DetectorFile.load(tmp_path / "d.json")
    assert loaded.to_dict() == json.loads(json.dumps(detector_file.to_dict()))
    loaded.check_model("ab" * 32)
    with pytest.raises(DetectorMismatchError):
        loaded.check_model("cd" * 32)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InvalidArgumentError):
        DetectorFile.load(tmp_path / "bad.json")


def test_median_smoothing_needs_a_two_dimensional_image_shape(session, split) -> None:  # type: ignore[no-untyped-def]
    # An empty or one-dimensional image_shape used to be accepted and then fail when scoring (AssertionError,
    # IndexError); calibrating with a spec whose image_shape is 1-D chose median smoothing and crashed the same way.
    clf = OnnxClassifier(session)
    for shape in ((), (64,)):
        with pytest.raises(InvalidArgumentError, match="image_shape"):
            SqueezeDetector(clf, median=2, image_shape=shape)
    flat = InputSpec.from_dict(SPEC.to_dict() | {"image_shape": [64]})
    file = calibrate(session, split.x_test[:200], model_sha256="ab" * 32, input_spec=flat, detectors=("squeeze",))
    assert file.get("squeeze").params["median"] is None


def test_calibration_argument_checks(session, split) -> None:  # type: ignore[no-untyped-def]
    kw = {"model_sha256": "ab" * 32, "input_spec": SPEC}
    for bad in ({"target_fpr": 0.0}, {"target_fpr": 0.02, "flag_fpr": 0.01}, {"detectors": ("magic",)},
                {"detectors": ("reconstruction",)}):
        with pytest.raises(InvalidArgumentError):
            calibrate(session, split.x_test[:200], **kw | bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="at least 50"):
        calibrate(session, split.x_test[:10], target_fpr=0.02, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputDtypeError):
        calibrate(session, split.x_test[:200].astype(np.float64), **kw)  # type: ignore[arg-type]


def test_robust_inference_decisions(session, split, detector_file: DetectorFile) -> None:  # type: ignore[no-untyped-def]
    robust = RobustModel(session, detector_file)
    x = split.x_test[225:]
    decisions = robust.predict(x)
    plain = OnnxClassifier(session).predict(x)
    ens = detector_file.get("ensemble")
    for d, p in zip(decisions, plain, strict=True):
        assert d.detector == "ensemble" and d.threshold == ens.reject_threshold
        expected = "reject" if d.score > ens.reject_threshold else "flag" if d.score > ens.flag_threshold else "accept"
        assert d.decision == expected
        assert (d.prediction is None) == (d.decision == "reject")
        if d.prediction is not None:
            assert d.prediction == p
    assert sum(d.decision == "reject" for d in decisions) / len(decisions) < 0.1  # clean data: mostly accepted
    noise = np.random.default_rng(0).random((10, 64)).astype(np.float32)
    assert all(d.decision == "reject" and d.prediction is None for d in robust.predict(noise))
    with pytest.raises(InputNonFiniteError):
        robust.predict(np.full((1, 64), np.nan, np.float32))


def test_ensemble_scales_members(session, split) -> None:  # type: ignore[no-untyped-def]
    clf = OnnxClassifier(session)
    a, b = SqueezeDetector(clf, bits=3, median=None), NoiseDetector(clf, seed=3)
    ens = EnsembleDetector([a, b], [2.0, 0.5])
    x = split.x_test[:10]
    np.testing.assert_allclose(ens.scores(x), np.maximum(a.scores(x) / 2.0, b.scores(x) / 0.5))


@pytest.mark.parametrize("q", [1 / 16, 1 / 255, 0.1, 0.25])
def test_quantum_accepts_every_float32_way_of_writing_a_grid_point_and_refuses_jitter(q: float) -> None:
    spec = InputSpec(shape=(None, None), min=0.0, max=1.0, quantum=q)
    k = np.arange(0, round(1 / q) + 1, dtype=np.float64)[None, :]
    for written in ((k * q).astype(np.float32), (k / (1 / q)).astype(np.float32), k.astype(np.float32) * np.float32(q)):
        x = np.minimum(written, np.float32(1.0))
        spec.validate(x)
        assert np.array_equal(spec.snap(x), (k * q).clip(0, 1).astype(np.float32))
    base = (k * q).astype(np.float32)[:, 1:-1]  # away from the range's ends
    for jitter in (1e-6, 5e-5, -1e-6):  # the jitter that defeated the served watermark and the budget
        with pytest.raises(InputQuantizationError):
            spec.validate(base + np.float32(jitter) * (np.arange(base.shape[1]) == 1))
    assert spec.snap(base + np.float32(1e-6)).tobytes() == base.tobytes()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 255), st.integers(0, 255), st.sampled_from(["float32", "float64", "float16"]))
def test_snapped_values_always_validate(levels: int, k: int, dtype: str) -> None:
    spec = InputSpec(shape=(None, 1), dtype=dtype, min=0.0, max=1.0, quantum=1 / levels)
    x = np.array([[min(k, levels) / levels]], dtype=np.float64).astype(dtype)
    snapped = spec.snap(x)
    assert snapped.dtype == x.dtype
    spec.validate(snapped)
