"""Certified inference by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier g(x) answers the class the base model f most often gives to x + N(0, sigma^2 I).
``predict`` is Cohen et al.'s PREDICT (a two-sided binomial test between the top two vote counts; abstain unless
significant at alpha) and ``certify`` their CERTIFY: guess the top class from n0 noisy copies, count its votes in n
fresh copies, take the one-sided Clopper-Pearson lower bound pA of its probability at alpha and, when pA >= 1/2,
certify g's answer within the L2 radius sigma * Phi^-1(pA); otherwise abstain. With probability at least 1 - alpha
per call the answer equals g(x) and g is constant within the radius.

Runtime only: numpy, ONNX Runtime and the standard library (the binomial tail is a continued fraction, Phi^-1 is
``statistics.NormalDist``). Noise comes from a generator seeded afresh on every call with 256 bits of
``os.urandom``, so an attacker can neither predict nor replay the draws.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from edgeshield.adversarial._detectors import OnnxClassifier
from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.bundles._ort import onnxruntime

ABSTAIN = -1


class SmoothingConfigError(InvalidArgumentError):
    """A smoothing configuration that is malformed or cannot certify anything."""


# --- statistics without scipy ------------------------------------------------------------------------------------
_FPMIN = 1e-300
_EPS = 1e-16


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes, 6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
    h = d
    for m in range(1, 100_000):  # converges in O(sqrt(max(a, b))) steps
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
            c = 1.0 + aa / c
            c = c if abs(c) > _FPMIN else _FPMIN
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _check_counts(k: int, n: int) -> None:
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int | np.integer) \
            or not isinstance(n, int | np.integer):
        raise InvalidArgumentError("k and n must be integers")
    if not 0 <= k <= n or n < 1:
        raise InvalidArgumentError(f"need 0 <= k <= n and n >= 1 (got k={k}, n={n})")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and 0.0 < alpha < 1.0):
        raise InvalidArgumentError(f"alpha must be a probability strictly between 0 and 1 (got {alpha!r})")


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n trials.

    The Beta(k, n - k + 1) quantile at alpha: Cohen et al.'s ``proportion_confint(k, n, 2 * alpha, "beta")[0]``.
    """
    _check_counts(k, n)
    _check_alpha(alpha)
    return _cp_lower(int(k), int(n), float(alpha))


@lru_cache(maxsize=8192)  # k takes at most n + 1 values: certifying a batch repeats them
def _cp_lower(k: int, n: int, alpha: float) -> float:
    if k == 0:
        return 0.0
    if k == n:
        return float(alpha ** (1.0 / n))  # closed form: I_p(n, 1) = p^n
    a, b = float(k), float(n - k + 1)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    # I_p(a, b) = P(Bin(n, p) >= k) rises with p: solve I_p = alpha by Newton's method inside a shrinking bracket,
    # bisecting whenever a step would leave it (d/dp I_p = p^(a-1) (1-p)^(b-1) / B(a, b)).
    lo, hi, p = 0.0, 1.0, k / n
    for _ in range(200):
        f = _betainc(a, b, p) - alpha
        if f < 0:
            lo = p
        else:
            hi = p
        slope = math.exp((a - 1.0) * math.log(p) + (b - 1.0) * math.log1p(-p) - log_beta)
        step = f / slope if slope > 0 else math.inf
        nxt = p - step
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if nxt in (lo, hi) or abs(nxt - p) <= 1e-15 * p:
            return nxt
        p = nxt
    return p


@lru_cache(maxsize=8192)
def binomial_test_half(k: int, m: int) -> float:
    """Two-sided exact binomial test of k successes in m trials against p = 1/2 (scipy's ``binomtest`` p-value)."""
    if 2 * k == m:
        return 1.0
    k = max(k, m - k)  # symmetric: the p-value is twice the upper tail of the larger count
    return min(1.0, 2.0 * _betainc(float(k), float(m - k + 1), 0.5))


# --- configuration -----------------------------------------------------------------------------------------------
def _min_samples(alpha: float) -> int:
    """Fewest samples whose unanimous vote still has a Clopper-Pearson lower bound of at least 1/2."""
    n = max(1, math.ceil(math.log2(1.0 / alpha)) - 1)
    while _cp_lower(n, n, alpha) < 0.5:
        n += 1
    return n


@dataclass(frozen=True)
class SmoothingConfig:
    """Randomized-smoothing parameters: the noise, the sample counts traded against latency, the failure rate."""

    sigma: float  # Gaussian noise standard deviation, in input units
    n0: int = 100  # selection samples (CERTIFY)
    n: int = 1000  # estimation samples (CERTIFY; PREDICT's sample count)
    alpha: float = 0.001  # failure probability per answer
    batch: int = 4096  # rows per ONNX Runtime call; copies of several inputs share a call

    def __post_init__(self) -> None:
        for name in ("n0", "n", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise SmoothingConfigError(f"smoothing {name} must be a whole number >= 1 (got {value!r})")
            object.__setattr__(self, name, int(value))
        for name in ("sigma", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating) \
                    or not math.isfinite(value):
                raise SmoothingConfigError(f"smoothing {name} must be a finite number (got {value!r})")
            object.__setattr__(self, name, float(value))
        if self.sigma <= 0:
            raise SmoothingConfigError(f"smoothing sigma must be > 0 (got {self.sigma})")
        if not 0 < self.alpha < 1:
            raise SmoothingConfigError(f"smoothing alpha must be strictly between 0 and 1 (got {self.alpha})")
        if _cp_lower(self.n, self.n, self.alpha) < 0.5:
            raise SmoothingConfigError(
                f"n={self.n} samples cannot certify anything at alpha={self.alpha}: even a unanimous vote has a "
                f"Clopper-Pearson lower bound below 1/2; use n >= {_min_samples(self.alpha)}")

    @classmethod
    def parse(cls, text: str) -> SmoothingConfig:
        """The CLI form: comma-separated ``key=value`` pairs, e.g. ``sigma=0.25,n=1000,alpha=0.001``."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, int | float] = {}
        for part in text.split(","):
            key, sep, raw = (s.strip() for s in part.partition("="))
            if not sep or not key:
                raise SmoothingConfigError(f"smoothing: expected key=value pairs such as sigma=0.25,n=1000 "
                                           f"(got {part.strip()!r})")
            if key not in known:
                raise SmoothingConfigError(f"smoothing: unknown key {key!r} (known: {', '.join(known)})")
            if key in values:
                raise SmoothingConfigError(f"smoothing: {key} given twice")
            if known[key] == "int":
                if not re.fullmatch(r"[0-9]{1,12}", raw):
                    raise SmoothingConfigError(f"smoothing: {key} must be a whole number (got {raw!r})")
                values[key] = int(raw)
            else:
                if not re.fullmatch(r"[-+]?(?:[0-9]*\.?[0-9]+|[0-9]+\.)(?:[eE][-+]?[0-9]+)?", raw):
                    raise SmoothingConfigError(f"smoothing: {key} must be a number (got {raw!r})")
                values[key] = float(raw)
        if "sigma" not in values:
            raise SmoothingConfigError("smoothing: sigma is required (e.g. sigma=0.25)")
        return cls(**values)  # type: ignore[arg-type]  # keys checked against the fields above

    def to_text(self) -> str:
        """The CLI form of this configuration (``parse`` reads it back)."""
        return f"sigma={self.sigma!r},n0={self.n0},n={self.n},alpha={self.alpha!r},batch={self.batch}"


# --- the smoothed classifier -------------------------------------------------------------------------------------
def _fresh_rng() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG, new on every call: no one can predict or replay it."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(os.urandom(32), "big"))))


class SmoothedClassifier:
    """Cohen et al.'s smoothed classifier over an ONNX Runtime session (or an :class:`OnnxClassifier`)."""

    ABSTAIN = ABSTAIN

    def __init__(self, session_or_clf: onnxruntime.InferenceSession | OnnxClassifier,
                 config: SmoothingConfig) -> None:
        self.clf = (session_or_clf if isinstance(session_or_clf, OnnxClassifier)
                    else OnnxClassifier(session_or_clf, batch_size=config.batch))
        self.config = config

    def predict(self, x: np.ndarray) -> np.ndarray:
        """PREDICT: g's label per input from n noisy copies, -1 (abstain) unless the top-two test is significant."""
        counts = self._vote_counts(x, (self.config.n,))[0]
        labels = np.full(len(counts), ABSTAIN, dtype=np.int64)
        for i, row in enumerate(counts):
            top = np.argsort(row, kind="stable")[::-1][:2]
            c1 = int(row[top[0]])
            c2 = int(row[top[1]]) if len(top) > 1 else 0
            if binomial_test_half(c1, c1 + c2) <= self.config.alpha:
                labels[i] = int(top[0])
        return labels

    def certify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CERTIFY: labels (-1 = abstain) and certified L2 radii sigma * Phi^-1(pA) (0 where abstaining)."""
        cfg = self.config
        selection, estimation = self._vote_counts(x, (cfg.n0, cfg.n))
        guess = selection.argmax(axis=1)  # ties go to the lowest label, as torch/numpy argmax in the reference
        votes = estimation[np.arange(len(guess)), guess]
        labels = np.full(len(guess), ABSTAIN, dtype=np.int64)
        radii = np.zeros(len(guess), dtype=np.float64)
        phi_inv = NormalDist().inv_cdf
        for i, (label, k) in enumerate(zip(guess.tolist(), votes.tolist(), strict=True)):
            p_lower = _cp_lower(int(k), cfg.n, cfg.alpha)
            if p_lower >= 0.5:
                labels[i], radii[i] = label, cfg.sigma * phi_inv(p_lower)
        return labels, radii

    def _vote_counts(self, x: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
        """Votes of the base model on ``sum(sizes)`` noisy copies of each input, split into independent groups.

        Returns counts shaped [len(sizes), len(x), classes]. Copies of consecutive inputs are packed into calls of
        ``config.batch`` rows, so a batch of inputs costs ceil(len(x) * sum(sizes) / batch) ONNX Runtime calls.
        """
        if not isinstance(x, np.ndarray) or x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
            raise InvalidArgumentError("smoothing needs a floating-point batch of inputs ([batch, ...])")
        per, total, batch = sum(sizes), len(x) * sum(sizes), self.config.batch
        bounds = np.cumsum(sizes)[:-1]
        noise_dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
        rng = _fresh_rng()
        counts: np.ndarray | None = None
        for start in range(0, total, batch):
            stop = min(start + batch, total)
            owner, copy = np.divmod(np.arange(start, stop), per)
            noisy = rng.standard_normal((stop - start, *x.shape[1:]), dtype=noise_dtype)
            noisy *= self.config.sigma
            noisy = (noisy + x[owner]).astype(x.dtype, copy=False)
            logits = self.clf.logits(noisy)
            if logits.ndim != 2:
                raise InvalidArgumentError("smoothing needs a classifier whose first output is [batch, classes]")
            if counts is None:
                counts = np.zeros((len(sizes), len(x), logits.shape[1]), dtype=np.int64)
            classes = counts.shape[2]
            group = np.searchsorted(bounds, copy, side="right")
            first = int(owner[0])
            span = int(owner[-1]) - first + 1
            flat = (group * span + (owner - first)) * classes + logits.argmax(axis=1)
            counts[:, first : first + span] += np.bincount(flat, minlength=len(sizes) * span * classes).reshape(
                len(sizes), span, classes)
        if counts is None:  # an empty batch
            return np.zeros((len(sizes), 0, 1), dtype=np.int64)
        return counts
