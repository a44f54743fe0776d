"""Robust inference: validate, score, then accept, flag or reject — a rejected input never gets a prediction.

With randomized smoothing the label comes from Cohen et al.'s CERTIFY instead of one forward pass: an input whose
vote is not significant is answered "abstain" (no prediction), every other one carries its certified L2 radius.
The detector still scores the raw input, and a reject still wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield.adversarial._calibrate import DetectorFile, build_all
from edgeshield.adversarial._detectors import EnsembleDetector, OnnxClassifier, scores_with_probs
from edgeshield.adversarial._smoothing import SmoothedClassifier, SmoothingConfig

if TYPE_CHECKING:
    import torch

    from edgeshield.adversarial._composed import ComposedDetectors
    from edgeshield.bundles._ort import onnxruntime

Verdict = Literal["accept", "flag", "reject", "abstain"]


@dataclass(frozen=True)
class Decision:
    decision: Verdict
    score: float
    threshold: float  # the reject threshold
    flag_threshold: float
    detector: str
    prediction: int | None  # None when rejected or abstaining
    radius: float | None = None  # certified L2 radius with smoothing (0 when rejected or abstaining), else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"decision": self.decision, "score": self.score, "threshold": self.threshold,
                             "flag_threshold": self.flag_threshold, "detector": self.detector,
                             "prediction": self.prediction}
        if self.radius is not None:  # only with smoothing: answers without it keep their shape
            d["radius"] = self.radius
        return d


class RobustModel:
    """A session guarded by an input spec and a calibrated detector, optionally answering by randomized smoothing.

    With ``composed`` (the detector file's verified composed graph, ``open_composed``) the composed detectors'
    scores and the probabilities come from that one session run; members it lacks, and the ensemble/fisher
    combination, stay in numpy.
    """

    def __init__(self, session: onnxruntime.InferenceSession, detector_file: DetectorFile, *,
                 torch_model: torch.nn.Module | None = None, detector: str | None = None,
                 smoothing: SmoothingConfig | None = None, composed: ComposedDetectors | None = None) -> None:
        self.file = detector_file
        self.spec = detector_file.input_spec
        self.clf = OnnxClassifier(session)
        self.detector_name = detector or detector_file.decision
        self.calibrated = detector_file.get(self.detector_name)
        self.detector = build_all(detector_file, self.clf, torch_model, [self.detector_name])[self.detector_name]
        self.smoothing = smoothing
        self.smoothed = None if smoothing is None else SmoothedClassifier(session, smoothing)  # its own row batch
        wanted = {self.detector_name}
        if isinstance(self.detector, EnsembleDetector):
            wanted = {m.name for m in self.detector.members}
        self.composed = composed if composed is not None and wanted & set(composed.detectors) else None

    def _scores(self, x: np.ndarray, clf: OnnxClassifier | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The decision detector's scores, and the probabilities when they come for free."""
        if self.composed is None:
            return scores_with_probs(self.detector, x, clf)
        probs, scores = self.composed.run(x)
        return self._combined(scores, x), probs

    def _combined(self, scores: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """The decision detector's scores from the composed members' (and any member left in numpy)."""
        if self.detector_name in scores:
            return scores[self.detector_name]
        assert isinstance(self.detector, EnsembleDetector)  # noqa: S101 - else __init__ would have dropped the graph
        parts = [np.asarray(scores[m.name] if m.name in scores else scores_with_probs(m, x, None)[0],
                            dtype=np.float64) for m in self.detector.members]
        return self.detector.combined(parts)

    def decide(self, x: np.ndarray) -> BatchDecision:
        """Vectorised robust inference: one array per field, for high-throughput callers."""
        if self.composed is not None and self.smoothed is None:
            # One session run: the spec's value checks ride along in the graph; when it cannot vouch for every
            # value, numpy checks them (and raises the error naming the field) before anything is answered.
            x = self.spec.check_structure(x)
            composed_probs, member_scores, certain = self.composed.run_checked(x)
            if not certain:
                x = self.spec.check_values(x)
            return self._verdicts(self._combined(member_scores, x), composed_probs.argmax(axis=1))
        x = self.spec.validate(x)
        if self.smoothed is not None:
            return self._decide_smoothed(x, self.smoothed)
        scores, probs = self._scores(x, self.clf)
        return self._verdicts(scores, (probs if probs is not None else self.clf.probs(x)).argmax(axis=1))

    def _verdicts(self, scores: np.ndarray, labels: np.ndarray) -> BatchDecision:
        reject, flag = self.calibrated.reject_threshold, self.calibrated.flag_threshold
        verdicts = np.where(scores > reject, REJECT, np.where(scores > flag, FLAG, ACCEPT)).astype(np.int8)
        return BatchDecision(verdicts, scores, np.where(verdicts == REJECT, -1, labels), reject, flag,
                             self.detector_name)

    def _decide_smoothed(self, x: np.ndarray, smoothed: SmoothedClassifier) -> BatchDecision:
        scores, _ = self._scores(x, None)
        reject, flag = self.calibrated.reject_threshold, self.calibrated.flag_threshold
        verdicts = np.where(scores > reject, REJECT, np.where(scores > flag, FLAG, ACCEPT)).astype(np.int8)
        labels = np.full(len(x), -1, dtype=np.int64)
        radii = np.zeros(len(x), dtype=np.float64)
        kept = verdicts != REJECT  # a rejected input gets no prediction: it is not worth certifying
        if kept.any():
            labels[kept], radii[kept] = smoothed.certify(x[kept])
            verdicts[kept & (labels == -1)] = ABSTAIN
        return BatchDecision(verdicts, scores, labels, reject, flag, self.detector_name, radii)

    def predict(self, x: np.ndarray) -> list[Decision]:
        """One :class:`Decision` per input; a rejected or abstained input has ``prediction=None``."""
        return self.decide(x).decisions()


ACCEPT, FLAG, REJECT, ABSTAIN = 0, 1, 2, 3
_VERDICTS: tuple[Verdict, ...] = ("accept", "flag", "reject", "abstain")


@dataclass(frozen=True)
class BatchDecision:
    verdicts: np.ndarray  # int8: 0 accept, 1 flag, 2 reject, 3 abstain (smoothing only)
    scores: np.ndarray
    predictions: np.ndarray  # -1 where rejected or abstaining
    threshold: float
    flag_threshold: float
    detector: str
    radii: np.ndarray | None = None  # certified L2 radii with smoothing (0 where rejected or abstaining)

    def decisions(self) -> list[Decision]:
        radii: list[float | None] = [None] * len(self.verdicts) if self.radii is None else self.radii.tolist()
        return [
            Decision(_VERDICTS[v], float(s), self.threshold, self.flag_threshold, self.detector,
                     None if v in (REJECT, ABSTAIN) else int(p), r)
            for v, s, p, r in zip(self.verdicts.tolist(), self.scores.tolist(), self.predictions.tolist(), radii,
                                  strict=True)
        ]
