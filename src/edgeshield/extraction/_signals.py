"""Out-of-distribution rate: a signal complementary to PRADA.

PRADA looks at the *spacing* of a client's queries; random or synthetic probes that are evenly spread (uniform noise,
for instance) can pass it. Such probes are far from the data manifold, so the fraction of a client's recent queries
whose PCA reconstruction residual (:class:`edgeshield.adversarial.ReconstructionDetector`, fitted on clean data)
exceeds the clean ``quantile`` is a cheap second signal. Benign clients sit near ``1 - quantile``; extraction with
synthetic data sits far above it.

Memory per client: one boolean per query in a window of the last ``window`` queries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeshield.adversarial import ReconstructionDetector
from edgeshield.errors import InvalidArgumentError

__all__ = ["OodRateSignal", "SignalState"]


@dataclass(frozen=True)
class SignalState:
    """One signal's view of one client: alarm plus the numbers behind it."""

    name: str
    alarm: bool
    stats: dict[str, Any]


class OodRateSignal:
    """Alarm when more than ``alarm_rate`` of a client's last ``window`` queries are out of distribution."""

    name = "ood_rate"

    def __init__(
        self,
        detector: ReconstructionDetector,
        threshold: float,
        *,
        window: int = 200,
        min_samples: int = 50,
        alarm_rate: float = 0.2,
    ) -> None:
        if not 1 <= min_samples <= window:
            raise InvalidArgumentError("ood_rate needs 1 <= min_samples <= window")
        if not 0.0 < alarm_rate < 1.0:
            raise InvalidArgumentError("ood_rate alarm_rate must lie in (0, 1)")
        self.detector = detector
        self.threshold = float(threshold)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.alarm_rate = float(alarm_rate)
        self._flags: dict[str, deque[bool]] = {}

    @classmethod
    def fit(
        cls,
        reference: np.ndarray,
        held_out: np.ndarray,
        *,
        components: int = 20,
        quantile: float = 0.99,
        **kwargs: Any,
    ) -> OodRateSignal:
        """PCA on clean ``reference``; the OOD threshold is the ``quantile`` of residuals on clean ``held_out``."""
        if not 0.0 < quantile < 1.0:
            raise InvalidArgumentError("ood_rate quantile must lie in (0, 1)")
        detector = ReconstructionDetector.fit(reference, components=components)
        return cls(detector, float(np.quantile(detector.scores(held_out), quantile)), **kwargs)

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None) -> SignalState:
        flags = self._flags.setdefault(client_id, deque(maxlen=self.window))
        flags.extend((self.detector.scores(np.asarray(x)) > self.threshold).tolist())
        return self.state(client_id)

    def state(self, client_id: str) -> SignalState:
        flags = self._flags.get(client_id, ())
        rate = float(np.mean(flags)) if flags else 0.0
        alarm = len(flags) >= self.min_samples and rate > self.alarm_rate
        return SignalState(self.name, alarm, {"ood_rate": rate, "window": len(flags)})

    def reset(self, client_id: str) -> None:
        self._flags.pop(client_id, None)
