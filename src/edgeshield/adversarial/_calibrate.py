"""Calibrating detectors to a target false-positive rate, and the detector file that records the result.

Each detector's reject threshold is set from clean held-out inputs so that at most ``target_fpr`` of them score
above it (a flag threshold likewise at the looser ``flag_fpr``). The ensemble divides each member's score by that
member's reject threshold, takes the maximum, and is then calibrated the same way on its own scores; ``fisher``
combines the members' empirical p-values (leave-one-out on the calibration set) and is calibrated likewise. The
file is bound to one model (the bundle manifest's ``model_sha256``) so it cannot be applied to another by mistake.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.adversarial._composed import ComposedGraph
from edgeshield.adversarial._detectors import (
    Detector,
    EnsembleDetector,
    NoiseDetector,
    OnnxClassifier,
    ReconstructionDetector,
    SqueezeDetector,
    fisher_statistic,
    leave_one_out_p_values,
)
from edgeshield.adversarial._features import FEATURE_DETECTORS, LIDDetector, MahalanobisDetector
from edgeshield.adversarial._spec import InputSpec
from edgeshield.errors import DetectorMismatchError, InvalidArgumentError, MissingDependencyError

if TYPE_CHECKING:
    import torch

    from edgeshield.bundles._ort import onnxruntime

FORMAT = "edgeshield.detector"
VERSION = 1
RUNTIME_DETECTORS = ("squeeze", "noise", "reconstruction")
KNOWN_DETECTORS = (*RUNTIME_DETECTORS, *FEATURE_DETECTORS, "gradient")
COMBINED_DETECTORS = ("ensemble", "fisher")


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold t (from the data) such that at most ``fpr`` of clean scores are > t."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    k = math.floor(fpr * len(s) + 1e-9)  # clean inputs allowed above the threshold
    return float(s[k]) if k < len(s) else float(s[-1])


@dataclass(frozen=True)
class CalibratedDetector:
    name: str
    params: dict[str, Any]
    reject_threshold: float
    flag_threshold: float
    calibration: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "reject_threshold": self.reject_threshold,
                "flag_threshold": self.flag_threshold, "calibration": self.calibration}


@dataclass(frozen=True)
class DetectorFile:
    model_sha256: str
    input_spec: InputSpec
    target_fpr: float
    flag_fpr: float
    decision: str
    detectors: tuple[CalibratedDetector, ...]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    # The model and its runtime detectors in one graph, as a signed bundle bound to this file (``_composed.py``);
    # robust inference then scores with one session run. Files without one use the numpy detectors.
    composed: ComposedGraph | None = None

    def get(self, name: str) -> CalibratedDetector:
        for d in self.detectors:
            if d.name == name:
                return d
        raise InvalidArgumentError(f"detector file has no detector {name!r} (has: {[d.name for d in self.detectors]})")

    def decision_detectors(self) -> set[str]:
        """The detectors robust inference runs: the decision detector, and its members if it is an ensemble."""
        decision = self.get(self.decision)
        if decision.name in COMBINED_DETECTORS:
            return {decision.name, *decision.params.get("members", [])}
        return {decision.name}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model_sha256": self.model_sha256,
                "input_spec": self.input_spec.to_dict(), "target_fpr": self.target_fpr, "flag_fpr": self.flag_fpr,
                "decision": self.decision, "detectors": [d.to_dict() for d in self.detectors], "created": self.created,
                **({"composed": self.composed.to_dict()} if self.composed is not None else {})}

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DetectorFile:
        p = check_readable_file(path, what="detector file")
        try:
            d = json.loads(p.read_text())
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise InvalidArgumentError(f"{p} is not an EdgeShield detector file (version {VERSION})")
            dets = tuple(
                CalibratedDetector(x["name"], dict(x["params"]), float(x["reject_threshold"]),
                                   float(x["flag_threshold"]), dict(x["calibration"]))
                for x in d["detectors"]
            )
            out = cls(model_sha256=str(d["model_sha256"]), input_spec=InputSpec.from_dict(d["input_spec"]),
                      target_fpr=float(d["target_fpr"]), flag_fpr=float(d["flag_fpr"]), decision=str(d["decision"]),
                      detectors=dets, created=str(d["created"]),
                      composed=ComposedGraph.from_dict(d["composed"]) if d.get("composed") is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgumentError(f"{p} is not a valid detector file: {exc}") from None
        out.get(out.decision)
        return out

    def check_model(self, model_sha256: str) -> None:
        if model_sha256 != self.model_sha256:
            raise DetectorMismatchError(
                f"detector file was calibrated for model {self.model_sha256[:16]}…, "
                f"not this model ({model_sha256[:16]}…)"
            )


def build_detector(name: str, params: dict[str, Any], clf: OnnxClassifier,
                   torch_model: torch.nn.Module | None = None) -> Detector:
    if name == "squeeze":
        return SqueezeDetector(clf, bits=params.get("bits"), median=params.get("median"),
                               image_shape=params.get("image_shape"), value_range=tuple(params["value_range"]))
    if name == "noise":
        vr = params.get("value_range")
        return NoiseDetector(clf, sigma=params["sigma"], samples=params["samples"], seed=params.get("seed"),
                             value_range=tuple(vr) if vr else None)
    if name == "reconstruction":
        return ReconstructionDetector(np.array(params["mean"]), np.array(params["components"]), norm=params["norm"])
    if name == "mahalanobis":
        return MahalanobisDetector.from_params(clf, params)
    if name == "lid":
        return LIDDetector.from_params(clf, params)
    if name == "gradient":
        if torch_model is None:
            raise MissingDependencyError("the gradient detector needs the PyTorch model "
                                         "(pip install 'edgeshield[eval]')")
        from edgeshield.adversarial._torch import GradientDetector

        return GradientDetector(torch_model, **params)
    raise InvalidArgumentError(f"unknown detector {name!r}; known: {', '.join(KNOWN_DETECTORS)}, ensemble, fisher")


def build_all(file: DetectorFile, clf: OnnxClassifier, torch_model: torch.nn.Module | None = None,
              names: Sequence[str] | None = None) -> dict[str, Detector]:
    """Instantiate the named detectors of a file (all by default); an ensemble brings its members along (one
    instance each, shared by both combiners)."""
    wanted = list(names or [d.name for d in file.detectors])
    out: dict[str, Detector] = {}
    built: dict[str, Detector] = {}

    def member(m: str) -> Detector:
        if m not in built:
            built[m] = build_detector(m, file.get(m).params, clf, torch_model)
        return built[m]

    for name in wanted:
        if name in COMBINED_DETECTORS:
            cd = file.get(name)
            members = [member(m) for m in cd.params["members"]]
            out[name] = EnsembleDetector(members, cd.params["scales"], combine=cd.params.get("combine", "max"),
                                         clean_scores=cd.params.get("clean_scores"))
        else:
            out[name] = member(name)
    return out


def _calibrated(det: Detector, clean: np.ndarray, target_fpr: float, flag_fpr: float,
                params: dict[str, Any] | None = None, *,
                scores: np.ndarray | None = None) -> tuple[CalibratedDetector, np.ndarray]:
    scores = det.scores(clean) if scores is None else scores
    reject, flag = threshold_at_fpr(scores, target_fpr), threshold_at_fpr(scores, flag_fpr)
    cal = {"n": float(len(scores)), "fpr_reject": float((scores > reject).mean()),
           "fpr_flag": float((scores > flag).mean()), "score_median": float(np.median(scores))}
    return CalibratedDetector(det.name, params or det.params(), reject, flag, cal), scores


def calibrate(
    session: onnxruntime.InferenceSession,
    clean: np.ndarray,
    *,
    model_sha256: str,
    input_spec: InputSpec,
    target_fpr: float = 0.02,
    flag_fpr: float | None = None,
    detectors: Sequence[str] = RUNTIME_DETECTORS,
    torch_model: torch.nn.Module | None = None,
    squeeze: dict[str, Any] | None = None,
    noise: dict[str, Any] | None = None,
    reference: np.ndarray | None = None,
    reconstruction_components: int = 30,
    reference_labels: np.ndarray | None = None,
    hidden_layers: Sequence[str] | None = None,
    mahalanobis: dict[str, Any] | None = None,
    lid: dict[str, Any] | None = None,
    decision: str = "ensemble",
) -> DetectorFile:
    """Calibrate ``detectors`` and their two combinations (``ensemble``: max, ``fisher``) on clean held-out inputs.

    ``reference`` is clean data the reconstruction, Mahalanobis and LID detectors are fitted on (the training
    set; it must not be the calibration set, or thresholds come out too low); ``reference_labels`` its true labels
    for the Mahalanobis class means (else the model's predictions). ``hidden_layers`` picks the hidden outputs the
    feature-space detectors read (default: all). ``mahalanobis``/``lid`` pass options to their ``fit``
    (``shrinkage``; ``k``, ``max_samples``, ``seed``). ``decision`` names the detector robust inference uses.
    """
    if not 0 < target_fpr < 1:
        raise InvalidArgumentError("target FPR must be between 0 and 1")
    flag_fpr = min(0.5, 2.5 * target_fpr) if flag_fpr is None else flag_fpr
    if not target_fpr <= flag_fpr < 1:
        raise InvalidArgumentError("flag FPR must be at least the target FPR and below 1")
    clean = input_spec.validate(clean)
    if len(clean) * target_fpr < 1:
        raise InvalidArgumentError(
            f"{len(clean)} clean examples cannot calibrate an FPR of {target_fpr}: "
            f"need at least {math.ceil(1 / target_fpr)}"
        )
    unknown = [d for d in detectors if d not in KNOWN_DETECTORS]
    if unknown or not detectors:
        raise InvalidArgumentError(f"unknown detector(s) {unknown}; choose from {', '.join(KNOWN_DETECTORS)}")
    clf = OnnxClassifier(session)
    lo = input_spec.min if input_spec.min is not None else float(clean.min())
    hi = input_spec.max if input_spec.max is not None else float(clean.max())
    # Defaults chosen on the digits evaluation (benchmarks/adversarial.py): 3-bit squeezing; median smoothing
    # only for images of at least 16×16 (on 8×8 digits a 2×2 median changes clean predictions too often).
    image = list(input_spec.image_shape) if input_spec.image_shape else None
    big_image = image is not None and len(image) >= 2 and min(image[-2:]) >= 16
    defaults: dict[str, dict[str, Any]] = {
        "squeeze": {"bits": 3, "median": 2 if big_image else None, "image_shape": image,
                    "value_range": [lo, hi]} | (squeeze or {}),
        # A seed drawn per calibration: the noise is fixed for a deployment (stable, batch-independent scores)
        # but not known in advance; an attacker who reads the detector file learns it (see docs/adversarial.md).
        "noise": {"sigma": 0.05 * (hi - lo), "samples": 8, "seed": int.from_bytes(os.urandom(4), "big"),
                  "value_range": [lo, hi]} | (noise or {}),
        "gradient": {"norm": "l2"},
    }
    needs_reference = [d for d in ("reconstruction", *FEATURE_DETECTORS) if d in detectors]
    if needs_reference and reference is None:
        raise InvalidArgumentError(f"the {', '.join(needs_reference)} detector(s) need clean reference data "
                                   "(e.g. the training set)")
    ref = input_spec.validate(reference) if needs_reference and reference is not None else None
    if ref is not None and "reconstruction" in detectors:
        fitted = ReconstructionDetector.fit(ref, components=reconstruction_components)
        defaults["reconstruction"] = fitted.params()
    if ref is not None and "mahalanobis" in detectors:
        defaults["mahalanobis"] = MahalanobisDetector.fit(clf, ref, reference_labels, layers=hidden_layers,
                                                          **(mahalanobis or {})).params()
    if ref is not None and "lid" in detectors:
        defaults["lid"] = LIDDetector.fit(clf, ref, layers=hidden_layers, **(lid or {})).params()
    results, members, clean_scores = [], [], []
    for name in dict.fromkeys(detectors):
        det = build_detector(name, defaults[name], clf, torch_model)
        cal, scores = _calibrated(det, clean, target_fpr, flag_fpr, defaults[name])
        results.append(cal)
        members.append(det)
        clean_scores.append(scores)
    ensemble = EnsembleDetector(members, [c.reject_threshold for c in results])
    cal, _ = _calibrated(ensemble, clean, target_fpr, flag_fpr, scores=ensemble.combined(clean_scores))
    fisher = EnsembleDetector(members, [c.reject_threshold for c in results], combine="fisher",
                              clean_scores=clean_scores)
    # Calibrated on leave-one-out p-values: each clean input is scored against the other clean inputs, as a new
    # input would be, so the threshold is not biased by scoring the calibration set against itself.
    loo = fisher_statistic([leave_one_out_p_values(s) for s in clean_scores])
    fisher_cal, _ = _calibrated(fisher, clean, target_fpr, flag_fpr, scores=loo)
    results += [cal, fisher_cal]
    out = DetectorFile(model_sha256=model_sha256, input_spec=input_spec, target_fpr=target_fpr, flag_fpr=flag_fpr,
                       decision=decision, detectors=tuple(results))
    out.get(decision)
    return out
