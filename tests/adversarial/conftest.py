"""Fixtures the adversarial tests share: the shipped digits model's ONNX Runtime session and the digits split."""

from __future__ import annotations

from typing import Any

import pytest

from edgeshield.models import digits_model_path, load_digits_split


@pytest.fixture(scope="session")
def session() -> Any:
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def split() -> Any:
    return load_digits_split()
