"""measure_cost_ratios: every runtime option (each detector, both combiners, smoothing at its sample counts) timed
against plain ONNX Runtime on the shipped digits MLP with its hidden activations exposed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import edgeshield  # noqa: F401 - sets ORT_DISABLE_TELEMETRY before onnxruntime is imported
from edgeshield.adversarial import calibrate
from edgeshield.adversarial._calibrate import DetectorFile
from edgeshield.adversarial._smoothing import SmoothingConfig
from edgeshield.errors import InvalidArgumentError
from edgeshield.evaluation._adversarial import COST_DETECTORS, SMOOTHING_REPS_QUICK, measure_cost_ratios
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

pytest.importorskip("onnx")
from edgeshield.adversarial._hidden import expose_hidden

RUNTIME = ("squeeze", "noise", "reconstruction", "mahalanobis", "lid")
KEYS = {"latency_plain_us", "latency_robust_us", "latency_ratio", "throughput_plain_per_s", "throughput_robust_per_s",
        "throughput_ratio", "batch", "reps_single", "reps_batch"}
SMALL, LARGE = SmoothingConfig(sigma=0.25, n0=10, n=100), SmoothingConfig(sigma=0.25, n0=100, n=1000)


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    from edgeshield.bundles._ort import onnxruntime as ort

    model, names = expose_hidden(digits_model_path().read_bytes())
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    split = load_digits_split()
    file = calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=digits_input_spec(),
                     reference=split.x_train, reference_labels=split.y_train, detectors=RUNTIME)
    return {"session": session, "file": file, "x": split.x_test[225:289], "hidden": names}


@pytest.fixture(scope="module")
def cost(setup: dict[str, Any]) -> dict[str, dict[str, float]]:
    return measure_cost_ratios(setup["session"], setup["file"], None, setup["x"], quick=True,
                               smoothing=(SMALL, LARGE))


def test_every_runtime_option_has_a_row(cost: dict[str, dict[str, float]], setup: dict[str, Any]) -> None:
    assert setup["hidden"]  # the feature-space detectors read real hidden outputs
    assert set(COST_DETECTORS) == {*RUNTIME, "ensemble", "fisher"}
    assert list(cost) == [*COST_DETECTORS, "smoothing_n100", "smoothing_n1000"]
    for label, row in cost.items():
        assert set(row) >= KEYS, label
        assert row["batch"] == len(setup["x"])
        assert row["latency_ratio"] > 0 and row["throughput_ratio"] > 0, label
        assert row["latency_robust_us"] > 0 and row["throughput_robust_per_s"] > 0, label
        assert np.isclose(row["latency_ratio"], row["latency_robust_us"] / row["latency_plain_us"])
        assert np.isclose(row["throughput_ratio"], row["throughput_plain_per_s"] / row["throughput_robust_per_s"])


def test_smoothing_rows(cost: dict[str, dict[str, float]]) -> None:
    small, large = cost["smoothing_n100"], cost["smoothing_n1000"]
    assert (small["samples_per_input"], large["samples_per_input"]) == (110, 1100)
    assert small["sigma"] == large["sigma"] == 0.25
    assert (small["reps_single"], small["reps_batch"]) == SMOOTHING_REPS_QUICK
    # CERTIFY runs n0 + n copies of each input through the model, on top of the decision detector
    assert small["latency_ratio"] > 1 and small["throughput_ratio"] > 1
    assert large["throughput_ratio"] > small["throughput_ratio"]  # ten times the copies
    assert "samples_per_input" not in cost["squeeze"]


def test_only_the_options_a_file_has(setup: dict[str, Any]) -> None:
    file: DetectorFile = setup["file"]
    plain = calibrate(setup["session"], load_digits_split().x_test[:225], model_sha256=file.model_sha256,
                      input_spec=file.input_spec, detectors=("squeeze",))
    out = measure_cost_ratios(setup["session"], plain, None, setup["x"][:8], quick=True)
    assert list(out) == ["squeeze", "ensemble", "fisher"]  # no mahalanobis/lid rows for a file without them
    out = measure_cost_ratios(setup["session"], file, None, setup["x"][:8], names=("lid", "gradient"), quick=True,
                              extra={"plain": plain})
    assert list(out) == ["lid", "plain"]  # gradient is not in the file (nor a runtime option)


@pytest.mark.parametrize(("smoothing", "match"), [
    ((SMALL, SmoothingConfig(sigma=0.5, n=100)), "share a sample count"),
    (({"sigma": 0.25},), "SmoothingConfig"),
])
def test_bad_smoothing_is_typed(setup: dict[str, Any], smoothing: tuple[Any, ...], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        measure_cost_ratios(setup["session"], setup["file"], None, setup["x"][:4], quick=True, smoothing=smoothing)
