"""Adversarial-input defence: input specs, calibrated detectors and robust inference.

The runtime path (spec validation, ``squeeze``, ``noise``, ``ensemble``, robust inference) needs only numpy and
ONNX Runtime. The ``gradient`` detector, the ONNX→PyTorch bridge and the ART evaluation need
``edgeshield[eval]`` and are imported lazily.
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
from edgeshield.adversarial._robust import BatchDecision, Decision, RobustModel
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
    "NoiseDetector",
    "OnnxClassifier",
    "ReconstructionDetector",
    "RobustModel",
    "SqueezeDetector",
    "build_all",
    "calibrate",
    "threshold_at_fpr",
]
