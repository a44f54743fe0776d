"""Evaluation harnesses: the defences measured against real attacks, above the runtime packages.

``_adversarial`` attacks a calibrated detector file with ART (FGSM, PGD, Carlini–Wagner, DeepFool, HopSkipJump) and
measures detection, FPR and cost; ``_adaptive`` is the white-box attack that knows every layer; ``_autoattack`` runs
the standard AutoAttack (torchattacks); ``_system`` attacks the whole defended system per input with both, at
several budgets; ``_extraction`` steals the served digits model through the real server app. Data flows one way:
this package imports the runtime (adversarial, extraction, server, watermark), never the reverse, and it is meant to
be the only package importing ART (tests/test_layering.py checks both and lists the two exceptions left). torch,
ART, scikit-learn and matplotlib are imported inside the functions that need them (``edgeshield[eval]``), so
importing this package stays light.
"""

from edgeshield.evaluation._adaptive import AdaptiveResult, adaptive_attack, project_to_grid
from edgeshield.evaluation._adversarial import evaluate as evaluate_adversarial
from edgeshield.evaluation._autoattack import (
    REFERENCE_ITERATIONS,
    AutoAttackCheckError,
    AutoAttackResult,
    AutoAttackRun,
    autoattack_accuracy,
    autoattack_examples,
)
from edgeshield.evaluation._extraction import EvaluationConfig as ExtractionEvaluationConfig
from edgeshield.evaluation._extraction import evaluate as evaluate_extraction
from edgeshield.evaluation._system import (
    BUDGETS,
    Budget,
    DefendedSystem,
    SuiteConfig,
    SystemResult,
    evaluate_system,
)

__all__ = [
    "BUDGETS",
    "REFERENCE_ITERATIONS",
    "AdaptiveResult",
    "AutoAttackCheckError",
    "AutoAttackResult",
    "AutoAttackRun",
    "Budget",
    "DefendedSystem",
    "ExtractionEvaluationConfig",
    "SuiteConfig",
    "SystemResult",
    "adaptive_attack",
    "autoattack_accuracy",
    "autoattack_examples",
    "evaluate_adversarial",
    "evaluate_extraction",
    "evaluate_system",
    "project_to_grid",
]
