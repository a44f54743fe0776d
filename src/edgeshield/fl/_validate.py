"""Check a device's local training data before it trains: schema first, then label consistency (numpy only).

Two stages, each holding rows back with a named reason instead of failing the whole data set:

1. **Schema** — every row against the model's own :class:`~edgeshield.adversarial.InputSpec` (shape, dtype,
   NaN/Inf, range, quantum) and every label against ``[0, num_classes)`` (integral, finite). Whole-array faults (a
   wrong rank, feature shape or dtype) hold back every row with that reason.
2. **Label consistency** (``method="knn"``) — a nearest-neighbour distance ratio: for row *i* with label *y*,
   ``score = d(x_i, nearest example labelled y) / d(x_i, nearest example labelled otherwise)``; rows with
   ``score > threshold`` are held back as ``label_inconsistent``. The neighbours come from the server's small
   *clean reference set* when one is given (e.g. the FLTrust root set: its labels are trusted, so a whole class
   relabelled on the device cannot vouch for itself), and from the device's other rows (leave-one-out) when not,
   or for a label the reference lacks.

Why this detector: it catches label flips and *dirty-label* backdoors (a trigger patch on images of other classes,
relabelled to the target) alike, because both put an image next to reference examples of a different class. ART's
activation clustering and spectral signatures need a trained model's activations and tens of poisoned samples per
class to separate clusters; a client holds 60-130 examples, and spectral signatures on raw digits pixels caught few
backdoor samples in ``benchmarks/_poison_data.py`` (printed there as a baseline). cleanlab's confident learning
needs out-of-sample probabilities from a model cross-validated on the device's own data (too little of it, with
label skew) and pulls scikit-learn and pandas onto the device; the FL client carries ``[fl]``, not ``[eval]``.
Limits: without a reference a backdoor that is consistent within the device's data (same trigger, same target) is
mostly kept; clean-label poisoning (correct labels, a perturbation only) is not what this check sees; an attacker
who knows the reference can choose poisons that sit near it. Distances are Euclidean on the raw features, so the
features must share a scale (as they do under one InputSpec range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeshield.adversarial import InputSpec
from edgeshield.errors import InputDtypeError, InputShapeError, InvalidArgumentError

__all__ = ["METHODS", "REASONS", "DataReport", "check_local_data"]

METHODS = ("knn", "schema")
# Each held-back row carries exactly one reason: the first that applies, in this order.
REASONS = ("shape", "dtype", "nan", "inf", "range", "quantum", "label", "label_inconsistent")
THRESHOLD_WITH_REFERENCE = 1.1  # measured by benchmarks/_poison_data.py (detection vs false positives)
THRESHOLD_SELF = 1.25  # without trusted labels the device's own neighbours are noisier: a stricter ratio
_BLOCK = 1024  # rows per distance block: memory stays O(_BLOCK x pool) however large the data set


@dataclass(frozen=True)
class DataReport:
    """What the device may train on (``kept``, row indices) and what it holds back, by reason."""

    kept: np.ndarray
    held_back: dict[str, np.ndarray]
    scores: np.ndarray  # the label-consistency ratio per row; NaN where not scored (schema failures, "schema")
    method: str
    threshold: float | None = None
    reference_size: int = 0
    n: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "reference_size": self.reference_size,
            "n": self.n,
            "kept": int(self.kept.size),
            "held_back": {reason: int(idx.size) for reason, idx in self.held_back.items()},
        }


def check_local_data(
    x: np.ndarray,
    y: np.ndarray,
    spec: InputSpec,
    *,
    num_classes: int,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
    method: str = "knn",
    threshold: float | None = None,
) -> DataReport:
    """Validate ``(x, y)`` against ``spec`` and the labels' consistency; never raises for a bad row, only for
    unusable arguments (not arrays, labels not one per row, a reference that breaks the spec)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgumentError("num_classes must be an integer of at least 2")
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {list(METHODS)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold) or threshold <= 0):
        raise InvalidArgumentError("threshold must be a positive finite number")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise InputDtypeError("type", "local data and labels must be numpy arrays")
    if x.ndim < 1:
        raise InputShapeError("shape", "local data must be a batch: an array with a leading row axis")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InputShapeError("labels", f"expected one label per row ({x.shape[0]}), got shape {tuple(y.shape)}")

    n = int(x.shape[0])
    reason = np.full(n, -1, dtype=np.int8)  # index into REASONS, -1 = no fault found yet
    _schema_reasons(x, spec, reason)
    labels = _label_values(y, num_classes, reason)

    scores = np.full(n, np.nan)
    used_threshold: float | None = None
    ref_size = 0
    if method == "knn":
        ref = _check_reference(reference, spec, num_classes) if reference is not None else None
        ref_size = 0 if ref is None else int(ref[1].size)
        used_threshold = float(threshold) if threshold is not None else (
            THRESHOLD_WITH_REFERENCE if ref is not None else THRESHOLD_SELF)
        ok = np.flatnonzero(reason < 0)
        flat = x.reshape(n, -1) if ok.size else x
        if ok.size:  # rows the spec lets hold NaN/Inf stay kept but unscored: a distance to them means nothing
            ok = ok[np.isfinite(flat[ok]).all(axis=1)]
        if ok.size:
            feats = flat[ok].astype(np.float64)
            scores[ok] = _consistency(feats, labels[ok], ref)
            bad = ok[scores[ok] > used_threshold]
            reason[bad] = REASONS.index("label_inconsistent")

    held = {r: np.flatnonzero(reason == i) for i, r in enumerate(REASONS) if (reason == i).any()}
    return DataReport(kept=np.flatnonzero(reason < 0), held_back=held, scores=scores, method=method,
                      threshold=used_threshold, reference_size=ref_size, n=n)


# --- stage 1: schema --------------------------------------------------------------------------------------------
def _mark(reason: np.ndarray, rows: np.ndarray | np.bool_, name: str) -> None:
    """Give ``rows`` (a boolean mask) the reason ``name`` unless they already have an earlier one."""
    reason[np.asarray(rows, dtype=bool) & (reason < 0)] = REASONS.index(name)


def _schema_reasons(x: np.ndarray, spec: InputSpec, reason: np.ndarray) -> None:
    n = x.shape[0]
    every = np.ones(n, dtype=bool)
    want = spec.shape[1:]
    if x.ndim != len(spec.shape) or any(w is not None and g != w for g, w in zip(x.shape[1:], want, strict=True)):
        _mark(reason, every, "shape")
        return
    if x.dtype != np.dtype(spec.dtype):
        _mark(reason, every, "dtype")
        return
    if n == 0:
        return
    flat = x.reshape(n, -1)
    if flat.shape[1] == 0:  # free feature dimensions of size 0: nothing to learn from
        _mark(reason, every, "shape")
        return
    if x.dtype.kind == "f":
        nan = np.isnan(flat)
        inf = np.isinf(flat)
        if not spec.allow_nan:
            _mark(reason, nan.any(axis=1), "nan")
        if not spec.allow_inf:
            _mark(reason, inf.any(axis=1), "inf")
        finite = ~(nan | inf)
    else:
        finite = np.ones(flat.shape, dtype=bool)
    values = flat.astype(np.float64)
    out: np.ndarray = np.zeros(flat.shape, dtype=bool)
    if spec.min is not None:
        out |= finite & (values < spec.min)
    if spec.max is not None:
        out |= finite & (values > spec.max)
    _mark(reason, out.any(axis=1), "range")
    if spec.quantum is not None:
        _mark(reason, (finite & ~spec.on_grid(flat)).any(axis=1), "quantum")  # InputSpec.validate's own test


def _label_values(y: np.ndarray, num_classes: int, reason: np.ndarray) -> np.ndarray:
    """Labels as int64 (0 where invalid); rows with a non-integral, non-finite or out-of-range label get "label"."""
    n = y.shape[0]
    labels = np.zeros(n, dtype=np.int64)
    if y.dtype.kind in "iu":
        valid = (y >= 0) & (y < num_classes)
    elif y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(y) & (y == np.round(y)) & (y >= 0) & (y < num_classes)
    else:  # bool, complex, strings, objects: not class indices
        valid = np.zeros(n, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    labels[valid] = y[valid].astype(np.int64)
    _mark(reason, ~valid, "label")
    return labels


def _check_reference(reference: object, spec: InputSpec,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference set is trusted: it must satisfy the spec entirely, or the check refuses to use it."""
    if not isinstance(reference, tuple) or len(reference) != 2:
        raise InvalidArgumentError("reference must be a (features, labels) pair of numpy arrays")
    rx, ry = reference
    if not isinstance(rx, np.ndarray) or not isinstance(ry, np.ndarray) or rx.ndim < 1:
        raise InvalidArgumentError("reference must be a (features, labels) pair of numpy arrays")
    if ry.ndim != 1 or ry.shape[0] != rx.shape[0]:
        raise InvalidArgumentError("reference labels must be one per reference row")
    if rx.shape[0] == 0:
        return None
    reason = np.full(rx.shape[0], -1, dtype=np.int8)
    _schema_reasons(rx, spec, reason)
    labels = _label_values(ry, num_classes, reason)
    if (reason >= 0).any():
        first = REASONS[int(reason[reason >= 0][0])]
        raise InvalidArgumentError(f"the reference set breaks the input spec or the labels ({first}): "
                                   f"{int((reason >= 0).sum())} of {rx.shape[0]} rows")
    flat = rx.reshape(rx.shape[0], -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.any():
        return None
    return flat[finite].astype(np.float64), labels[finite]


# --- stage 2: label consistency ---------------------------------------------------------------------------------
def _ratio(qx: np.ndarray, qy: np.ndarray, px: np.ndarray, py: np.ndarray, *, self_offset: int | None) -> np.ndarray:
    """Nearest same-label distance ÷ nearest other-label distance for each query row (blocked).

    ``self_offset`` is the position of the query block inside the pool when the pool is the queries themselves, so
    each row skips itself. A label with no example in the pool scores +inf; a pool with no other label scores 0.
    """
    out = np.empty(qx.shape[0])
    with np.errstate(all="ignore"):
        pool_sq = np.einsum("ij,ij->i", px, px)
    for start in range(0, qx.shape[0], _BLOCK):
        q = qx[start:start + _BLOCK]
        with np.errstate(all="ignore"):  # huge values (a spec without a range) overflow to inf: "far away"
            d2 = np.einsum("ij,ij->i", q, q)[:, None] + pool_sq[None, :] - 2.0 * (q @ px.T)
            d = np.sqrt(np.maximum(d2, 0.0))
        d[np.isnan(d)] = np.inf
        if self_offset is not None:
            rows = np.arange(q.shape[0])
            d[rows, self_offset + start + rows] = np.inf
        same = py[None, :] == qy[start:start + _BLOCK, None]
        d_same = np.where(same, d, np.inf).min(axis=1)
        d_other = np.where(same, np.inf, d).min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = d_same / d_other
        r[(d_same == 0) & (d_other == 0)] = 1.0  # an identical row under both labels: ambiguous, not damning
        r[np.isinf(d_other) & ~np.isinf(d_same)] = 0.0
        r[np.isinf(d_other) & np.isinf(d_same)] = 0.0  # alone in the pool: nothing to compare with
        out[start:start + _BLOCK] = r
    return out


def _consistency(feats: np.ndarray, labels: np.ndarray,
                 ref: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    scores = np.empty(labels.shape[0])
    covered = np.zeros(labels.shape[0], dtype=bool) if ref is None else np.isin(labels, ref[1])
    if covered.any() and ref is not None:
        scores[covered] = _ratio(feats[covered], labels[covered], ref[0], ref[1], self_offset=None)
    if (~covered).any():  # no trusted example of these labels: their neighbours are the device's other rows
        own = _ratio(feats, labels, feats, labels, self_offset=0)
        scores[~covered] = own[~covered]
    return scores
