"""Model-extraction defence: per-client query monitoring (PRADA, OOD rate, query budget), rate limits and output
hardening.

The runtime path needs only numpy: PRADA's Shapiro–Wilk test is edgeshield._stats.shapiro, not scipy's.
"""

from edgeshield.extraction._budget import DecayingBudget
from edgeshield.extraction._fleet import FleetBudget
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
from edgeshield.extraction._keys import GridKeys, InputKeys, LeaderKeys, collision_rate, digest_keys, keys_for
from edgeshield.extraction._monitor import ACTIONS, Detector, QueryMonitor, ResponsePolicy, Signal, Verdict
from edgeshield.extraction._prada import (
    PradaDetector,
    PradaState,
    calibrate_delta,
    calibrate_dup_distance,
    shapiro_w,
)
from edgeshield.extraction._ratelimit import RateLimiter, TokenBucket
from edgeshield.extraction._signals import OodRateSignal, QueryBudget, SignalState
from edgeshield.extraction._sketch import BloomFilter, HyperLogLog
from edgeshield.extraction._store import MonitorStore
from edgeshield.extraction._transforms import BenignTransforms

__all__ = [
    "ACTIONS",
    "BenignTransforms",
    "BloomFilter",
    "Chain",
    "DecayingBudget",
    "Detector",
    "FleetBudget",
    "GridKeys",
    "HyperLogLog",
    "InputKeys",
    "LabelOnly",
    "LeaderKeys",
    "MonitorStore",
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
    "calibrate_dup_distance",
    "collision_rate",
    "digest_keys",
    "from_config",
    "keys_for",
    "shapiro_w",
    "top1_preserved",
]
