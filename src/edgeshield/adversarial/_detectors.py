"""Detectors: each scores a batch of inputs, higher meaning more likely adversarial.

Runtime detectors need only numpy and an ONNX Runtime session:

* ``squeeze`` — feature squeezing (Xu, Evans, Qi, NDSS 2018): the largest L1 distance between the model's
  softmax on the input and on squeezed copies (bit-depth reduction, median smoothing). Adversarial
  perturbations are fragile to squeezing; the model's answer on natural inputs is not.
* ``noise`` — prediction inconsistency under random noise: the mean L1 distance between the softmax on the
  input and on copies with small Gaussian noise. Minimal-perturbation attacks (CW, DeepFool) leave inputs just
  across a decision boundary, where noise flips the answer; squeezing can miss those.
* ``reconstruction`` — distance to the clean-data manifold, as MagNet's detector (Meng & Chen, CCS 2017) with a
  linear auto-encoder: the L1 norm of what a PCA basis fitted on clean reference data cannot reconstruct.
  Dense L∞ perturbations (FGSM, PGD) leave that subspace; squeezing and noise are weakest exactly there.
* ``ensemble`` — the maximum of its members' scores, each divided by its own calibrated threshold; ``fisher`` —
  Fisher's combination of the members' empirical p-values against their clean calibration scores.

``mahalanobis`` and ``lid`` read hidden activations and live in ``_features.py``.
``gradient`` (the loss-gradient norm) needs PyTorch and lives in ``_torch.py`` behind ``edgeshield[eval]``.
All detectors run the original and the transformed copies through the model in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.bundles._ort import onnxruntime


class Detector(Protocol):
    name: str

    def scores(self, x: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, Any]: ...


class OnnxClassifier:
    """Softmax probabilities from a single-input ONNX Runtime session whose output 0 is the logits.

    Further outputs are hidden activations exposed for the feature-space detectors (``detect expose-hidden``):
    ``logits``/``probs``/``predict`` never return them, ``logits_and_hidden`` does.
    """

    def __init__(self, session: onnxruntime.InferenceSession, *, batch_size: int = 4096) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise InvalidArgumentError("detectors need a single-input classifier")
        self.session = session
        self.input_name = inputs[0].name
        outputs = [o.name for o in session.get_outputs()]
        self.output_names = outputs[:1]
        self.hidden_names: list[str] = outputs[1:]
        self.batch_size = batch_size
        self._outputs_probs: bool | None = None  # decided on the first batch: logits or probabilities?

    def logits(self, x: np.ndarray) -> np.ndarray:
        if len(x) <= self.batch_size:
            out: np.ndarray = self.session.run(self.output_names, {self.input_name: x})[0]
            return out
        return np.concatenate([
            self.session.run(self.output_names, {self.input_name: x[i : i + self.batch_size]})[0]
            for i in range(0, len(x), self.batch_size)
        ])

    def logits_and_hidden(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The logits and every hidden output, from one session run (per batch of ``batch_size``)."""
        names = self.output_names + self.hidden_names
        parts = [self.session.run(names, {self.input_name: x[i : i + self.batch_size]})
                 for i in range(0, max(len(x), 1), self.batch_size)]
        outs = parts[0] if len(parts) == 1 else [np.concatenate(col) for col in zip(*parts, strict=True)]
        return outs[0], dict(zip(self.hidden_names, outs[1:], strict=True))

    def probs_and_hidden(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        z, hidden = self.logits_and_hidden(x)
        return self._to_probs(z), hidden

    def probs(self, x: np.ndarray) -> np.ndarray:
        return self._to_probs(self.logits(x))

    def _to_probs(self, z: np.ndarray) -> np.ndarray:
        if self._outputs_probs is None:
            self._outputs_probs = looks_like_probabilities(z)
        return z if self._outputs_probs else softmax(z)

    def predict(self, x: np.ndarray) -> np.ndarray:
        labels: np.ndarray = self.logits(x).argmax(axis=1)
        return labels


def looks_like_probabilities(z: np.ndarray) -> bool:
    """Whether a model's outputs already are probabilities (rows non-negative and summing to 1)."""
    return bool(z.min() >= 0 and np.abs(z.sum(axis=1) - 1.0).max() < 1e-4)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax of logits."""
    e: np.ndarray = np.exp(z - z.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def _l1(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    dist: np.ndarray = np.abs(p - q).sum(axis=1)
    return dist


# --- squeezers -------------------------------------------------------------------------------------------------
def bit_depth(x: np.ndarray, bits: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Quantise values in [lo, hi] to 2**bits levels."""
    scale = (2**bits - 1) / (hi - lo)
    y: np.ndarray = np.clip(x, lo, hi)  # a fresh array, then everything in place: this runs on every robust inference
    y -= lo
    y *= scale
    np.round(y, out=y)
    y /= scale
    y += lo
    return y


def median_smooth(x: np.ndarray, size: int, image_shape: Sequence[int]) -> np.ndarray:
    """Median filter of a ``size``×``size`` window over each image, as Xu et al. (scipy.ndimage.median_filter,
    mode="reflect": the edge sample is repeated; even windows reach one further up-left than down-right)."""
    n = len(x)
    h, w = image_shape[-2], image_shape[-1]
    channels = int(np.prod(image_shape[:-2])) if len(image_shape) > 2 else 1
    imgs = x.reshape(n * channels, h, w)
    before, after = size // 2, (size - 1) // 2
    padded = np.pad(imgs, ((0, 0), (before, after), (before, after)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    flat = windows.reshape(*windows.shape[:3], size * size)
    rank = (size * size) // 2  # scipy's rank filter picks this element; for even windows, the upper median
    return np.partition(flat, rank, axis=-1)[..., rank].astype(x.dtype).reshape(x.shape)


class SqueezeDetector:
    name = "squeeze"

    def __init__(
        self,
        clf: OnnxClassifier,
        *,
        bits: int | None = 4,
        median: int | None = 2,
        image_shape: Sequence[int] | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if bits is None and median is None:
            raise InvalidArgumentError("feature squeezing needs at least one squeezer (bits or median)")
        if bits is not None and not 1 <= bits <= 16:
            raise InvalidArgumentError("bit depth must be between 1 and 16")
        if median is not None and (median < 2 or image_shape is None or len(image_shape) < 2):
            raise InvalidArgumentError("median smoothing needs a window of at least 2 and the input's image_shape "
                                       "(height and width at least)")
        self.clf, self.bits, self.median = clf, bits, median
        self.image_shape = tuple(image_shape) if image_shape else None
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def squeezed(self, x: np.ndarray) -> list[np.ndarray]:
        out = []
        if self.bits is not None:
            out.append(bit_depth(x, self.bits, *self.value_range))
        if self.median is not None and self.image_shape is not None:  # the constructor sets both or no median
            out.append(median_smooth(x, self.median, self.image_shape))
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.scores_with_probs(x)[0]

    def scores_with_probs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and the model's probabilities on ``x`` itself, from the same single batched call."""
        copies = self.squeezed(x)
        p = self.clf.probs(np.concatenate([x, *copies]))
        n = len(x)
        dist = [_l1(p[:n], p[(k + 1) * n : (k + 2) * n]) for k in range(len(copies))]
        return (dist[0] if len(dist) == 1 else np.max(dist, axis=0)), p[:n]

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "median": self.median, "image_shape": list(self.image_shape or []) or None,
                "value_range": list(self.value_range)}


class NoiseDetector:
    name = "noise"

    def __init__(self, clf: OnnxClassifier, *, sigma: float = 0.1, samples: int = 8, seed: int | None = None,
                 value_range: tuple[float, float] | None = (0.0, 1.0)) -> None:
        if not sigma > 0 or samples < 1:
            raise InvalidArgumentError("noise detector needs sigma > 0 and at least one sample")
        self.clf, self.sigma, self.samples = clf, float(sigma), int(samples)
        self.seed = None if seed is None else int(seed)
        self.value_range = value_range

    def _noise(self, x: np.ndarray) -> np.ndarray:
        """Fresh noise per call and per input by default, so an attacker cannot know it in advance.

        With a seed (for reproducible tests) every input gets the same ``samples`` noise patterns, so a score
        never depends on what else is in the batch.
        """
        if self.seed is None:
            return np.random.default_rng().normal(0.0, self.sigma, size=(self.samples, *x.shape)).astype(x.dtype)
        pattern = np.random.default_rng(self.seed).normal(0.0, self.sigma, size=(self.samples, 1, *x.shape[1:]))
        return np.broadcast_to(pattern.astype(x.dtype), (self.samples, *x.shape))

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.scores_with_probs(x)[0]

    def scores_with_probs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        noisy = x[None] + self._noise(x)
        if self.value_range is not None:
            noisy = np.clip(noisy, *self.value_range)
        p = self.clf.probs(np.concatenate([x, noisy.reshape(-1, *x.shape[1:])]))
        n = len(x)
        base = p[:n]
        return np.mean([_l1(base, p[(k + 1) * n : (k + 2) * n]) for k in range(self.samples)], axis=0), base

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "samples": self.samples, "seed": self.seed,
                "value_range": list(self.value_range) if self.value_range else None}


class ReconstructionDetector:
    name = "reconstruction"

    def __init__(self, mean: np.ndarray, components: np.ndarray, *, norm: str = "l1") -> None:
        if norm not in ("l1", "l2"):
            raise InvalidArgumentError("reconstruction norm must be l1 or l2")
        self.mean = np.asarray(mean, dtype=np.float64).ravel()
        self.components = np.asarray(components, dtype=np.float64)
        if self.components.ndim != 2 or self.components.shape[1] != self.mean.size:
            raise InvalidArgumentError("reconstruction components must be a k×d matrix matching the mean")
        self.norm = norm

    @classmethod
    def fit(cls, reference: np.ndarray, *, components: int = 30, norm: str = "l1") -> ReconstructionDetector:
        """PCA of clean reference inputs (e.g. the training set), keeping ``components`` directions."""
        x = reference.reshape(len(reference), -1).astype(np.float64)
        if not 1 <= components < min(x.shape):
            raise InvalidArgumentError(f"reconstruction needs 1 <= components < {min(x.shape)} for this reference set")
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, vt[:components], norm=norm)

    def scores(self, x: np.ndarray) -> np.ndarray:
        centred = x.reshape(len(x), -1).astype(np.float64) - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        dist: np.ndarray = np.abs(residual).sum(axis=1) if self.norm == "l1" else np.linalg.norm(residual, axis=1)
        return dist

    def params(self) -> dict[str, Any]:
        return {"norm": self.norm, "mean": self.mean.tolist(), "components": self.components.tolist()}


Combine = Literal["max", "fisher"]


class EnsembleDetector:
    """Members' scores combined into one, calibrated again on clean data like any detector.

    ``combine="max"`` (named ``ensemble``): the max over members of score / scale, each scale that member's reject
    threshold. It adds the members' false positives. ``combine="fisher"`` (named ``fisher``): each member's score
    becomes an empirical p-value against that member's clean calibration scores, ``(1 + #{clean >= s}) / (n + 1)``,
    and the statistic is Fisher's ``-2 sum log p``. The members are not independent, so the chi-square law does not
    apply: the threshold comes from clean data like every other.
    """

    def __init__(self, members: Sequence[Detector], scales: Sequence[float], *, combine: Combine = "max",
                 clean_scores: Sequence[Sequence[float] | np.ndarray] | None = None) -> None:
        if not members or len(members) != len(scales):
            raise InvalidArgumentError("an ensemble needs members and one scale per member")
        if combine not in ("max", "fisher"):
            raise InvalidArgumentError(f"ensemble combine must be max or fisher, not {combine!r}")
        self.members = list(members)
        self.scales = [max(float(s), 1e-12) for s in scales]
        self.combine: Combine = combine
        self.name = "ensemble" if combine == "max" else "fisher"
        self.clean_scores: list[np.ndarray] = []
        if combine == "fisher":
            if clean_scores is None or len(clean_scores) != len(self.members) or any(len(c) == 0 for c in clean_scores):
                raise InvalidArgumentError("a fisher ensemble needs clean calibration scores for every member")
            self.clean_scores = [np.sort(np.asarray(c, dtype=np.float64)) for c in clean_scores]
            if not all(np.isfinite(c).all() for c in self.clean_scores):
                raise InvalidArgumentError("a fisher ensemble's clean scores must be finite")

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.scores_with_probs(x, None)[0]

    def member_scores(self, x: np.ndarray, clf: OnnxClassifier | None = None) -> tuple[list[np.ndarray],
                                                                                          np.ndarray | None]:
        """Each member's raw scores on ``x``, and the model's probabilities when a member computed them."""
        parts, probs = [], None
        for member in self.members:
            score, member_probs = scores_with_probs(member, x, clf if probs is None else None)
            probs = member_probs if probs is None else probs
            parts.append(np.asarray(score, dtype=np.float64))
        return parts, probs

    def combined(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        if self.combine == "max":
            return np.asarray(np.max([p / s for p, s in zip(parts, self.scales, strict=True)], axis=0))
        return fisher_statistic([empirical_p_values(p, c) for p, c in zip(parts, self.clean_scores, strict=True)])

    def scores_with_probs(self, x: np.ndarray,
                          clf: OnnxClassifier | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        parts, probs = self.member_scores(x, clf)
        return self.combined(parts), probs

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"members": [m.name for m in self.members], "scales": self.scales}
        if self.combine == "fisher":
            out |= {"combine": "fisher", "clean_scores": [c.tolist() for c in self.clean_scores]}
        return out


def empirical_p_values(scores: np.ndarray, clean_sorted: np.ndarray) -> np.ndarray:
    """``(1 + #{clean >= s}) / (n + 1)`` for each score: the conformal p-value of a new input, in (0, 1]."""
    n = len(clean_sorted)
    above = n - np.searchsorted(clean_sorted, np.asarray(scores, dtype=np.float64), side="left")
    p: np.ndarray = (1.0 + above) / (n + 1.0)
    return p


def leave_one_out_p_values(clean: np.ndarray) -> np.ndarray:
    """Each clean score's p-value against the other clean scores, ``#{clean >= s_i} / n`` (self included in the
    count, i.e. ``(1 + #{j != i: s_j >= s_i}) / ((n - 1) + 1)``): distributed as a new clean input's would be, so a
    threshold calibrated on these statistics holds for held-out data."""
    c = np.asarray(clean, dtype=np.float64)
    srt = np.sort(c)
    p: np.ndarray = (len(c) - np.searchsorted(srt, c, side="left")) / len(c)
    return p


def fisher_statistic(p_values: Sequence[np.ndarray]) -> np.ndarray:
    """Fisher's combination ``-2 sum log p`` (higher: less likely clean under every member at once)."""
    stat: np.ndarray = -2.0 * np.sum(np.log(np.stack(p_values)), axis=0)
    return stat


def scores_with_probs(
    detector: Detector, x: np.ndarray, clf: OnnxClassifier | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores plus the model's probabilities on ``x`` when the detector computes them anyway (else from ``clf``)."""
    # Not part of the Detector protocol: squeeze, noise and the ensemble compute the probabilities anyway.
    fused: Callable[..., tuple[np.ndarray, np.ndarray | None]] | None = getattr(detector, "scores_with_probs", None)
    if fused is not None:
        return fused(x) if not isinstance(detector, EnsembleDetector) else fused(x, clf)
    return detector.scores(x), (clf.probs(x) if clf is not None else None)
