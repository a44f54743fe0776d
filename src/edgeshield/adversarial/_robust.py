"""Robust inference: validate, score, then accept, flag or reject — a rejected input never gets a prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield.adversarial._calibrate import DetectorFile, build_all
from edgeshield.adversarial._detectors import OnnxClassifier, scores_with_probs

if TYPE_CHECKING:
    import torch

    from edgeshield.bundles._ort import onnxruntime

Verdict = Literal["accept", "flag", "reject"]


@dataclass(frozen=True)
class Decision:
    decision: Verdict
    score: float
    threshold: float  # the reject threshold
    flag_threshold: float
    detector: str
    prediction: int | None  # None when rejected

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "score": self.score, "threshold": self.threshold,
                "flag_threshold": self.flag_threshold, "detector": self.detector, "prediction": self.prediction}


class RobustModel:
    """A session guarded by an input spec and a calibrated detector."""

    def __init__(self, session: onnxruntime.InferenceSession, detector_file: DetectorFile, *,
                 torch_model: torch.nn.Module | None = None, detector: str | None = None) -> None:
        self.file = detector_file
        self.spec = detector_file.input_spec
        self.clf = OnnxClassifier(session)
        self.detector_name = detector or detector_file.decision
        self.calibrated = detector_file.get(self.detector_name)
        self.detector = build_all(detector_file, self.clf, torch_model, [self.detector_name])[self.detector_name]

    def decide(self, x: np.ndarray) -> BatchDecision:
        """Vectorised robust inference: one array per field, for high-throughput callers."""
        x = self.spec.validate(x)
        scores, probs = scores_with_probs(self.detector, x, self.clf)
        labels = (probs if probs is not None else self.clf.probs(x)).argmax(axis=1)
        reject, flag = self.calibrated.reject_threshold, self.calibrated.flag_threshold
        verdicts = np.where(scores > reject, REJECT, np.where(scores > flag, FLAG, ACCEPT)).astype(np.int8)
        return BatchDecision(verdicts, scores, np.where(verdicts == REJECT, -1, labels), reject, flag,
                             self.detector_name)

    def predict(self, x: np.ndarray) -> list[Decision]:
        """One :class:`Decision` per input; a rejected input has ``prediction=None``."""
        return self.decide(x).decisions()


ACCEPT, FLAG, REJECT = 0, 1, 2
_VERDICTS: tuple[Verdict, ...] = ("accept", "flag", "reject")


@dataclass(frozen=True)
class BatchDecision:
    verdicts: np.ndarray  # int8: 0 accept, 1 flag, 2 reject
    scores: np.ndarray
    predictions: np.ndarray  # -1 where rejected
    threshold: float
    flag_threshold: float
    detector: str

    def decisions(self) -> list[Decision]:
        return [
            Decision(_VERDICTS[v], float(s), self.threshold, self.flag_threshold, self.detector,
                     None if v == REJECT else int(p))
            for v, s, p in zip(self.verdicts.tolist(), self.scores.tolist(), self.predictions.tolist(), strict=True)
        ]
