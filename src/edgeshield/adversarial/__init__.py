"""Adversarial-input defence: input specs, calibrated detectors and robust inference.

The runtime path (spec validation, ``squeeze``, ``noise``, ``reconstruction``, ``mahalanobis``, ``lid``, the
``ensemble`` and ``fisher`` combiners, robust inference and randomized smoothing) needs only numpy and ONNX Runtime.
``expose_hidden`` and ``compose`` (owner side) need ``edgeshield[owner]`` (onnx); the ``gradient`` detector and the
ONNX→PyTorch bridge need ``edgeshield[eval]``; both are imported lazily. ``compose`` seals the model and its runtime
detectors as one signed graph bound to the model; ``open_composed`` verifies and opens it on the device (ORT only).
The evaluation harnesses live in ``edgeshield.evaluation``.
"""

from edgeshield.adversarial._calibrate import (
    CalibratedDetector,
    DetectorFile,
    build_all,
    calibrate,
    threshold_at_fpr,
)
from edgeshield.adversarial._compose import compose
from edgeshield.adversarial._composed import ComposedDetectors, ComposedGraph, open_composed
from edgeshield.adversarial._detectors import (
    Detector,
    EnsembleDetector,
    NoiseDetector,
    OnnxClassifier,
    ReconstructionDetector,
    SqueezeDetector,
)
from edgeshield.adversarial._features import LIDDetector, MahalanobisDetector, MissingHiddenOutputsError
from edgeshield.adversarial._hidden import UnknownTensorError, expose_hidden
from edgeshield.adversarial._robust import BatchDecision, Decision, RobustModel
from edgeshield.adversarial._smoothing import (
    SmoothedClassifier,
    SmoothingConfig,
    SmoothingConfigError,
    clopper_pearson_lower,
)
from edgeshield.adversarial._spec import METADATA_KEY, InputSpec

__all__ = [
    "METADATA_KEY",
    "BatchDecision",
    "CalibratedDetector",
    "ComposedDetectors",
    "ComposedGraph",
    "Decision",
    "Detector",
    "DetectorFile",
    "EnsembleDetector",
    "InputSpec",
    "LIDDetector",
    "MahalanobisDetector",
    "MissingHiddenOutputsError",
    "NoiseDetector",
    "OnnxClassifier",
    "ReconstructionDetector",
    "RobustModel",
    "SmoothedClassifier",
    "SmoothingConfig",
    "SmoothingConfigError",
    "SqueezeDetector",
    "UnknownTensorError",
    "build_all",
    "calibrate",
    "clopper_pearson_lower",
    "compose",
    "expose_hidden",
    "open_composed",
    "threshold_at_fpr",
]
