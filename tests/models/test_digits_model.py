"""The bundled digits model, its data split and the script that rebuilds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from edgeshield.models import (
    DIGITS_INPUT_NAME,
    DIGITS_OUTPUT_NAME,
    DigitsSplit,
    digits_model_path,
    load_digits_split,
)

pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train_digits.py"


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _test_accuracy(path: Path, split: DigitsSplit) -> float:
    logits = _session(path).run([DIGITS_OUTPUT_NAME], {DIGITS_INPUT_NAME: split.x_test})[0]
    assert logits.shape == (len(split.x_test), 10)
    return float((logits.argmax(axis=1) == split.y_test).mean())


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def test_models_module_is_light() -> None:
    code = (
        "import sys, edgeshield.models as m; m.digits_model_path(); "
        "bad = [n for n in ('torch', 'sklearn', 'onnxruntime', 'onnx') if n in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_split_is_deterministic_and_scaled(split: DigitsSplit) -> None:
    again = load_digits_split()
    for name in ("x_train", "x_test", "y_train", "y_test"):
        np.testing.assert_array_equal(getattr(split, name), getattr(again, name))
    assert split.x_train.dtype == np.float32 and split.x_test.dtype == np.float32
    assert split.y_train.dtype == np.int64 and split.y_test.dtype == np.int64
    assert split.x_train.shape[1] == split.x_test.shape[1] == 64
    assert len(split.x_train) + len(split.x_test) == 1797
    assert len(split.x_test) == 450  # ceil(0.25 * 1797)
    for x in (split.x_train, split.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(split.y_test)) == set(range(10))


def test_shipped_model_is_self_contained_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import uses_external_data

    path = digits_model_path()
    assert path.is_file() and path.name == "digits.onnx"
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    assert not any(uses_external_data(t) for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == [DIGITS_INPUT_NAME]
    assert [o.name for o in model.graph.output] == [DIGITS_OUTPUT_NAME]


def test_shipped_model_accuracy(split: DigitsSplit) -> None:
    assert _test_accuracy(digits_model_path(), split) >= 0.95


@pytest.mark.parametrize("batch", [1, 37])
def test_shipped_model_dynamic_batch(split: DigitsSplit, batch: int) -> None:
    sess = _session(digits_model_path())
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == DIGITS_INPUT_NAME and inp.type == "tensor(float)" and inp.shape[1] == 64
    assert out.name == DIGITS_OUTPUT_NAME and out.shape[1] == 10
    logits = sess.run([DIGITS_OUTPUT_NAME], {DIGITS_INPUT_NAME: split.x_test[:batch]})[0]
    assert logits.shape == (batch, 10) and logits.dtype == np.float32


def test_train_script_end_to_end(tmp_path: Path, split: DigitsSplit) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    out = tmp_path / "digits.onnx"
    state = tmp_path / "digits.pt"
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--epochs", "8", "--out", str(out), "--state-dict", str(state)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test accuracy" in proc.stdout
    assert out.is_file() and state.is_file()
    assert _test_accuracy(out, split) > 0.8
