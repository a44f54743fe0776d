"""Evaluation harnesses: the defences measured against real attacks, above the runtime packages.

``_adversarial`` attacks a calibrated detector file with ART (FGSM, PGD, Carlini–Wagner, DeepFool, HopSkipJump) and
measures detection, FPR and cost; ``_adaptive`` is the white-box attack that knows every layer; ``_extraction``
steals the served digits model through the real server app. Data flows one way: this package imports the runtime
(adversarial, extraction, server, watermark), never the reverse, and it is meant to be the only package importing ART
(tests/test_layering.py checks both and lists the two exceptions left). torch, ART, scikit-learn and matplotlib are
imported inside the functions that need them (``edgeshield[eval]``), so importing this package stays light.
"""

from edgeshield.evaluation._adaptive import AdaptiveResult, adaptive_attack
from edgeshield.evaluation._adversarial import evaluate as evaluate_adversarial
from edgeshield.evaluation._autoattack import AutoAttackCheckError, AutoAttackResult, autoattack_accuracy
from edgeshield.evaluation._extraction import EvaluationConfig as ExtractionEvaluationConfig
from edgeshield.evaluation._extraction import evaluate as evaluate_extraction

__all__ = [
    "AdaptiveResult",
    "AutoAttackCheckError",
    "AutoAttackResult",
    "ExtractionEvaluationConfig",
    "adaptive_attack",
    "autoattack_accuracy",
    "evaluate_adversarial",
    "evaluate_extraction",
]
