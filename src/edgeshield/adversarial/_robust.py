"""Robust inference: validate, score, then accept, flag or reject — a rejected input never gets a prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgeshield.adversarial._calibrate import DetectorFile, build_all
from edgeshield.adversarial._detectors import OnnxClassifier, scores_with_probs

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

    def __init__(self, session: Any, detector_file: DetectorFile, *, torch_model: Any = None,
                 detector: str | None = None) -> None:
        self.file = detector_file
        self.spec = detector_file.input_spec
        self.clf = OnnxClassifier(session)
        self.detector_name = detector or detector_file.decision
        self.calibrated = detector_file.get(self.detector_name)
        self.detector = build_all(detector_file, self.clf, torch_model, [self.detector_name])[self.detector_name]

    def predict(self, x: np.ndarray) -> list[Decision]:
        x = self.spec.validate(x)
        scores, probs = scores_with_probs(self.detector, x, self.clf)
        labels = (probs if probs is not None else self.clf.probs(x)).argmax(axis=1)
        reject, flag = self.calibrated.reject_threshold, self.calibrated.flag_threshold
        out = []
        for score, label in zip(scores.tolist(), labels.tolist()):
            verdict: Verdict = "reject" if score > reject else "flag" if score > flag else "accept"
            out.append(Decision(verdict, float(score), reject, flag, self.detector_name,
                                None if verdict == "reject" else int(label)))
        return out
