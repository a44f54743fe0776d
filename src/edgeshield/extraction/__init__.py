"""Model-extraction defence: per-client query monitoring (PRADA, OOD rate, query budget), rate limits and output
hardening.

The runtime path needs only numpy: PRADA's Shapiro–Wilk test is edgeshield._stats.shapiro, not scipy's.
"""

from edgeshield.extraction._harden import (
    Chain,
    LabelOnly,
    OutputPolicy,
    ReverseSigmoid,
    Rounding,
    TopK,
    from_config,
    top1_preserved,
)
from edgeshield.extraction._monitor import ACTIONS, Detector, QueryMonitor, ResponsePolicy, Signal, Verdict
from edgeshield.extraction._prada import PradaDetector, PradaState, calibrate_delta, shapiro_w
from edgeshield.extraction._ratelimit import RateLimiter, TokenBucket
from edgeshield.extraction._signals import OodRateSignal, QueryBudget, SignalState
from edgeshield.extraction._transforms import BenignTransforms

__all__ = [
    "ACTIONS",
    "BenignTransforms",
    "Chain",
    "Detector",
    "LabelOnly",
    "OodRateSignal",
    "OutputPolicy",
    "PradaDetector",
    "PradaState",
    "QueryBudget",
    "QueryMonitor",
    "RateLimiter",
    "ResponsePolicy",
    "ReverseSigmoid",
    "Rounding",
    "Signal",
    "SignalState",
    "TokenBucket",
    "TopK",
    "Verdict",
    "calibrate_delta",
    "from_config",
    "shapiro_w",
    "top1_preserved",
]
