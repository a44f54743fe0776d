"""Adversarial-input defence: input specs, calibrated detectors and robust inference.

The runtime path (spec validation, ``squeeze``, ``noise``, ``reconstruction``, ``mahalanobis``, ``lid``, the
``ensemble`` and ``fisher`` combiners, robust inference and randomized smoothing) needs only numpy and ONNX Runtime.
``expose_hidden`` (owner side) needs ``edgeshield[owner]`` (onnx); the ``gradient`` detector and the ONNX→PyTorch
bridge need ``edgeshield[eval]``; both are imported lazily. The evaluation harnesses live in ``edgeshield.evaluation``.
"""

from edgeshield.adversarial._calibrate import (
    CalibratedDetector,
    DetectorFile,
    build_all,
    calibrate,
    threshold_at_fpr,
)
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
    "expose_hidden",
    "threshold_at_fpr",
]
