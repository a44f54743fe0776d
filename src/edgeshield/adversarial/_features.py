"""Feature-space detectors: they read the model's hidden activations (extra graph outputs, see ``_hidden.py``).

* ``mahalanobis`` — Lee, Lee, Lee, Shin (NeurIPS 2018): class-conditional Gaussians with one tied covariance per
  layer, fitted on clean reference data (the training split); a layer's score is the smallest squared Mahalanobis
  distance to any class mean. Lee et al. also nudge the input against the gradient of that distance before
  scoring (an FGSM-style step); that needs gradients on the device and is left out here.
* ``lid`` — Ma et al. (ICLR 2018): the maximum-likelihood local intrinsic dimensionality of an activation among
  its k nearest neighbours in a fixed sample of clean activations, ``-k / sum_i log(r_i / r_k)``. Adversarial
  regions have higher LID than the clean data manifold.

Neither paper's logistic regression over layers is used: it is trained on adversarial examples, and EdgeShield
calibrates on clean data only. Each layer's score is standardised by the mean and standard deviation of the
clean reference scores, and the layers are summed. Activations with spatial axes ([N, C, H, W]) are averaged over
them first, as in Lee et al.'s code. Runtime: numpy + ONNX Runtime; logits and activations come from one run.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.adversarial._detectors import OnnxClassifier

FEATURE_DETECTORS = ("mahalanobis", "lid")


class MissingHiddenOutputsError(InvalidArgumentError):
    """A feature-space detector was asked of a model whose session does not output the activations it reads."""


# --- arrays in the (JSON) detector file ---------------------------------------------------------------------------
_DTYPES = {"float32": np.float32, "float64": np.float64}


def encode_array(a: np.ndarray, dtype: str = "float64") -> dict[str, Any]:
    """A numeric array as JSON: dtype, shape and the little-endian bytes in base64 (exact and compact)."""
    arr = np.ascontiguousarray(a, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(arr.shape), "base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(d: Any, what: str) -> np.ndarray:
    """The array :func:`encode_array` wrote; a malformed or non-finite one is an :class:`InvalidArgumentError`."""
    try:
        dtype = np.dtype(_DTYPES[d["dtype"]]).newbyteorder("<")
        shape = tuple(int(s) for s in d["shape"])
        raw = base64.b64decode(d["base64"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"detector file: {what} is not an encoded array ({exc})") from None
    if any(s < 0 for s in shape) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise InvalidArgumentError(f"detector file: {what} holds {len(raw)} bytes, not a {dtype.name} array of "
                                   f"shape {list(shape)}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float64)
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"detector file: {what} holds NaN or infinite values")
    return arr


# --- activations -------------------------------------------------------------------------------------------------
def require_hidden(clf: OnnxClassifier, layers: Sequence[str] | None, detector: str) -> list[str]:
    """The layers a feature-space detector reads (default: every hidden output), checked against the session."""
    if not clf.hidden_names:
        raise MissingHiddenOutputsError(
            f"the {detector} detector needs the model's hidden activations, and this model has none as outputs: "
            "run `edgeshield detect expose-hidden model.onnx --out model-hidden.onnx` and protect that model")
    chosen = list(layers) if layers else list(clf.hidden_names)
    missing = [n for n in chosen if n not in clf.hidden_names]
    if missing or not chosen:
        raise MissingHiddenOutputsError(f"the {detector} detector reads {missing or chosen}, which this model does "
                                        f"not output (it outputs {clf.hidden_names}; see `edgeshield detect "
                                        "expose-hidden`)")
    return chosen


def pooled(a: np.ndarray) -> np.ndarray:
    """[N, D] as float64; [N, C, spatial...] averaged over the spatial axes (Lee et al.), giving [N, C]."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return a[:, None]
    return a.reshape(len(a), a.shape[1], -1).mean(axis=2) if a.ndim > 2 else a


def _standardise(raw: np.ndarray) -> tuple[list[float], list[float]]:
    centre = raw.mean(axis=0)
    scale = raw.std(axis=0)
    return centre.tolist(), [float(s) if s > 1e-12 else 1.0 for s in scale]


class _FeatureDetector:
    """Shared plumbing: one session run for logits and activations, per-layer scores, standardised and summed."""

    name = "feature"

    def __init__(self, clf: OnnxClassifier, layers: Sequence[str], centre: Sequence[float],
                 scale: Sequence[float]) -> None:
        self.clf = clf
        self.layers = require_hidden(clf, layers, self.name)
        if len(centre) != len(self.layers) or len(scale) != len(self.layers) or min(scale) <= 0:
            raise InvalidArgumentError(f"{self.name} detector: one centre and one positive scale per layer")
        self.centre = np.asarray(centre, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)

    def layer_scores(self, hidden: Mapping[str, np.ndarray]) -> np.ndarray:  # [N, layers]
        raise NotImplementedError

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.scores_with_probs(x)[0]

    def scores_with_probs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, hidden = self.clf.probs_and_hidden(x)
        z: np.ndarray = ((self.layer_scores(hidden) - self.centre) / self.scale).sum(axis=1)
        return z, probs


# --- Mahalanobis --------------------------------------------------------------------------------------------------
class MahalanobisDetector(_FeatureDetector):
    name = "mahalanobis"

    def __init__(self, clf: OnnxClassifier, layers: Sequence[str], means: Sequence[np.ndarray],
                 precisions: Sequence[np.ndarray], centre: Sequence[float], scale: Sequence[float]) -> None:
        super().__init__(clf, layers, centre, scale)
        self.means = [np.asarray(m, dtype=np.float64) for m in means]
        self.precisions = [np.asarray(p, dtype=np.float64) for p in precisions]
        if len(self.means) != len(self.layers) or len(self.precisions) != len(self.layers):
            raise InvalidArgumentError("mahalanobis detector: one set of class means and one precision per layer")
        for m, p in zip(self.means, self.precisions, strict=True):
            if m.ndim != 2 or p.shape != (m.shape[1], m.shape[1]):
                raise InvalidArgumentError("mahalanobis detector: class means C×D and a D×D precision per layer")
        self._mean_terms = [np.einsum("cd,de,ce->c", m, p, m) for m, p in zip(self.means, self.precisions,
                                                                               strict=True)]

    @classmethod
    def fit(cls, clf: OnnxClassifier, reference: np.ndarray, labels: np.ndarray | None = None, *,
            layers: Sequence[str] | None = None, shrinkage: float = 0.01) -> MahalanobisDetector:
        """Class means and one tied covariance per layer from clean ``reference`` inputs (the training split).

        ``labels`` are the reference's true labels; without them the model's own predictions are used. The
        covariance is shrunk towards ``shrinkage`` × its average variance on the diagonal, so units that never
        fire on clean data (dead ReLUs) stay invertible and weigh heavily when an input makes them fire.
        """
        if not 0 < shrinkage < 1:
            raise InvalidArgumentError("mahalanobis shrinkage must be between 0 and 1")
        chosen = require_hidden(clf, layers, cls.name)
        probs, hidden = clf.probs_and_hidden(reference)
        y = probs.argmax(axis=1) if labels is None else np.asarray(labels).ravel()
        if len(y) != len(reference):
            raise InvalidArgumentError(f"{len(reference)} reference inputs but {len(y)} labels")
        classes = np.unique(y)
        means, precisions = [], []
        for name in chosen:
            f = pooled(hidden[name])
            mu = np.stack([f[y == c].mean(axis=0) for c in classes])
            centred = f - mu[np.searchsorted(classes, y)]
            cov = centred.T @ centred / len(f)
            ridge = shrinkage * float(np.trace(cov)) / len(cov)
            if not ridge > 0:
                raise InvalidArgumentError(f"layer {name!r} is constant on the reference data")
            precisions.append(np.linalg.inv(cov + ridge * np.eye(len(cov))))
            means.append(mu)
        unscaled = cls(clf, chosen, means, precisions, [0.0] * len(chosen), [1.0] * len(chosen))
        centre, scale = _standardise(unscaled.layer_scores(hidden))
        return cls(clf, chosen, means, precisions, centre, scale)

    def layer_scores(self, hidden: Mapping[str, np.ndarray]) -> np.ndarray:
        out = []
        for name, mu, prec, mterm in zip(self.layers, self.means, self.precisions, self._mean_terms, strict=True):
            f = pooled(hidden[name])
            fp = f @ prec
            # (f - mu_c)' P (f - mu_c) for every class at once, then the nearest class
            d2 = (fp * f).sum(axis=1)[:, None] - 2.0 * fp @ mu.T + mterm[None, :]
            out.append(np.maximum(d2.min(axis=1), 0.0))
        return np.stack(out, axis=1)

    def params(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "means": [encode_array(m) for m in self.means],
                "precisions": [encode_array(p) for p in self.precisions], "centre": self.centre.tolist(),
                "scale": self.scale.tolist()}

    @classmethod
    def from_params(cls, clf: OnnxClassifier, params: Mapping[str, Any]) -> MahalanobisDetector:
        try:
            layers = [str(n) for n in params["layers"]]
            means = [decode_array(m, f"mahalanobis means[{i}]") for i, m in enumerate(params["means"])]
            precs = [decode_array(p, f"mahalanobis precisions[{i}]") for i, p in enumerate(params["precisions"])]
            centre, scale = [float(c) for c in params["centre"]], [float(s) for s in params["scale"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"detector file: malformed mahalanobis parameters ({exc})") from None
        return cls(clf, layers, means, precs, centre, scale)


# --- LID ----------------------------------------------------------------------------------------------------------
def lid_mle(query: np.ndarray, sample: np.ndarray, k: int) -> np.ndarray:
    """Maximum-likelihood LID of each query row among its ``k`` nearest rows of ``sample`` (Euclidean).

    A nearest sample row at distance zero is the query itself and is skipped, as the reference code skips the
    query's own entry, so the estimate for a row of the sample is leave-one-out. Further exact duplicates stay:
    a query on top of several clean activations gets LID 0 (as clean as it gets).
    """
    q, s = np.asarray(query, dtype=np.float64), np.asarray(sample, dtype=np.float64)
    if len(s) <= k:
        raise InvalidArgumentError(f"LID needs more than k = {k} reference activations, not {len(s)}")
    qq, ss = (q * q).sum(axis=1)[:, None], (s * s).sum(axis=1)[None, :]
    d2 = np.maximum(qq + ss - 2.0 * q @ s.T, 0.0)
    d2[d2 <= 1e-12 * (qq + ss)] = 0.0  # round-off around exact matches
    near = np.sqrt(np.sort(np.partition(d2, k, axis=1)[:, : k + 1], axis=1))
    near = np.where((near[:, 0] == 0.0)[:, None], near[:, 1:], near[:, :k])  # skip the query itself
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(near / near[:, -1:]).sum(axis=1)  # <= 0; -inf with duplicates, nan when r_k = 0
        lid = k / -log_ratio
    lid = np.where(np.isfinite(lid), lid, np.where(np.isnan(lid), 0.0, 1e12))  # all k equidistant: unbounded
    return np.asarray(np.minimum(lid, 1e12))


class LIDDetector(_FeatureDetector):
    name = "lid"

    def __init__(self, clf: OnnxClassifier, layers: Sequence[str], samples: Sequence[np.ndarray],
                 centre: Sequence[float], scale: Sequence[float], *, k: int = 20) -> None:
        super().__init__(clf, layers, centre, scale)
        self.samples = [np.asarray(s, dtype=np.float64) for s in samples]
        if not k >= 1:
            raise InvalidArgumentError("LID needs k >= 1 neighbours")
        if len(self.samples) != len(self.layers) or any(s.ndim != 2 or len(s) <= k for s in self.samples):
            raise InvalidArgumentError(f"lid detector: one reference sample of more than k = {k} rows per layer")
        self.k = int(k)

    @classmethod
    def fit(cls, clf: OnnxClassifier, reference: np.ndarray, *, layers: Sequence[str] | None = None, k: int = 20,
            max_samples: int = 1000, seed: int = 0) -> LIDDetector:
        """Keep at most ``max_samples`` clean reference activations per layer (a fixed random subset)."""
        if not 1 <= k < max_samples:
            raise InvalidArgumentError("LID needs 1 <= k < max_samples")
        chosen = require_hidden(clf, layers, cls.name)
        if len(reference) <= k:
            raise InvalidArgumentError(f"LID needs more than k = {k} reference inputs, not {len(reference)}")
        rows = np.sort(np.random.default_rng(seed).permutation(len(reference))[:max_samples])
        _, hidden = clf.probs_and_hidden(reference[rows])
        samples = [pooled(hidden[n]).astype(np.float32).astype(np.float64) for n in chosen]  # as stored
        unscaled = cls(clf, chosen, samples, [0.0] * len(chosen), [1.0] * len(chosen), k=k)
        centre, scale = _standardise(unscaled.layer_scores(hidden))  # leave-one-out on the sample itself
        return cls(clf, chosen, samples, centre, scale, k=k)

    def layer_scores(self, hidden: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.stack([lid_mle(pooled(hidden[n]), s, self.k) for n, s in zip(self.layers, self.samples,
                                                                                 strict=True)], axis=1)

    def params(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "k": self.k,
                "samples": [encode_array(s, "float32") for s in self.samples],
                "centre": self.centre.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_params(cls, clf: OnnxClassifier, params: Mapping[str, Any]) -> LIDDetector:
        try:
            layers = [str(n) for n in params["layers"]]
            samples = [decode_array(s, f"lid samples[{i}]") for i, s in enumerate(params["samples"])]
            centre, scale = [float(c) for c in params["centre"]], [float(s) for s in params["scale"]]
            k = int(params["k"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"detector file: malformed lid parameters ({exc})") from None
        return cls(clf, layers, samples, centre, scale, k=k)
