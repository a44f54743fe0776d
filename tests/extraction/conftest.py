"""Real digits and predictions of the shipped model, shared by the extraction tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

import edgeshield  # noqa: F401  (before onnxruntime, as the package sets up its environment)
from edgeshield.models import DIGITS_INPUT_NAME, digits_model_path, load_digits_split


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray
    x_test: np.ndarray
    predict: Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="session")
def digits() -> Digits:
    import onnxruntime as ort

    split = load_digits_split()
    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {DIGITS_INPUT_NAME: np.asarray(x, dtype=np.float32)})[0].argmax(axis=1)

    return Digits(split.x_train, split.x_test, predict)
