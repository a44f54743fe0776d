"""The bundled default model: a small MLP classifier for scikit-learn's ``load_digits``.

``digits.onnx`` ships inside this package (rebuilt by ``scripts/train_digits.py``), and beside it its robust sibling
``digits_robust.onnx`` (``--robust``, same signature and spec); the input is ``"input"``,
float32 ``[N, 64]`` (8x8 pixel values scaled to [0, 1]), and its output is ``"logits"``, float32 ``[N, 10]``.

This module stays light: it imports neither torch nor scikit-learn at import time. ``load_digits_split`` imports
scikit-learn lazily (the ``demo`` extra); the data set ships with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeshield.errors import MissingDependencyError

if TYPE_CHECKING:
    import numpy as np

    from edgeshield.adversarial import InputSpec

__all__ = [
    "DIGITS_INPUT_NAME",
    "DIGITS_NUM_CLASSES",
    "DIGITS_NUM_FEATURES",
    "DIGITS_OUTPUT_NAME",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "DigitsSplit",
    "digits_input_spec",
    "digits_model_path",
    "digits_robust_model_path",
    "load_digits_split",
]

DIGITS_INPUT_NAME = "input"
DIGITS_OUTPUT_NAME = "logits"
DIGITS_NUM_FEATURES = 64
DIGITS_NUM_CLASSES = 10
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0

_MODEL_FILE = "digits.onnx"
_ROBUST_MODEL_FILE = "digits_robust.onnx"


def digits_model_path() -> Path:
    """Path of the ``digits.onnx`` shipped inside the package."""
    return Path(str(importlib.resources.files(__name__).joinpath(_MODEL_FILE)))


def digits_robust_model_path() -> Path:
    """Path of ``digits_robust.onnx``: the same MLP, signature and input spec, adversarially trained (TRADES, L∞
    eps 2/16, ``scripts/train_digits.py --robust``)."""
    return Path(str(importlib.resources.files(__name__).joinpath(_ROBUST_MODEL_FILE)))


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic, stratified train/test split of ``load_digits``.

    Features are float32 ``(N, 64)`` in [0, 1] (raw pixel values divided by 16); labels are int64 ``(N,)``.
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def load_digits_split(*, test_size: float = DIGITS_TEST_SIZE, seed: int = DIGITS_SPLIT_SEED) -> DigitsSplit:
    """Load scikit-learn's digits and split them the way the bundled model was trained and evaluated."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "the digits data set needs scikit-learn: pip install 'edgeshield[demo]'"
        ) from exc
    import numpy as np

    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32, copy=False)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return DigitsSplit(
        x_train=np.ascontiguousarray(x_train),
        x_test=np.ascontiguousarray(x_test),
        y_train=np.ascontiguousarray(y_train),
        y_test=np.ascontiguousarray(y_test),
    )


def digits_input_spec() -> InputSpec:
    """The digits model's input spec: a batch of 64 float32 pixels in [0, 1], an 8×8 image each."""
    from edgeshield.adversarial import InputSpec

    return InputSpec(shape=(None, 64), dtype="float32", min=0.0, max=1.0, image_shape=(8, 8))
