"""Output hardening: policies that reveal less of the model's probabilities, behind one protocol.

Every policy takes probabilities ``[N, K]`` (rows summing to 1). Those that return arrays return probability
vectors in which the original top-1 label still attains the row maximum; ``LabelOnly`` returns ``{"labels": ...}``
and so may only end a :class:`Chain`. :func:`from_config` builds any of them from plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgeshield.errors import InvalidArgumentError

__all__ = [
    "Chain",
    "LabelOnly",
    "OutputPolicy",
    "ReverseSigmoid",
    "Rounding",
    "TopK",
    "from_config",
    "top1_preserved",
]

_EPS = 1e-12


@runtime_checkable
class OutputPolicy(Protocol):
    terminal: bool  # True when the output is no longer a probability array (only the last link of a chain)

    def apply(self, probs: np.ndarray) -> dict[str, np.ndarray] | np.ndarray: ...


def _probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[1] < 1 or not np.isfinite(p).all() or (p < 0).any() or (p.sum(axis=1) <= 0).any():
        raise InvalidArgumentError("output hardening needs finite, non-negative, non-zero rows of shape [N, K]")
    return p


def _restore_top1(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Swap values back where a perturbation moved the top-1 label, so the label is never changed."""
    top = before.argmax(axis=1)
    rows = np.arange(len(after))
    new = after.argmax(axis=1)
    out = after.copy()
    out[rows, top], out[rows, new] = after[rows, new], after[rows, top]
    return out


def top1_preserved(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per row: the original top-1 label attains the maximum of the hardened row."""
    rows = np.arange(len(before))
    kept: np.ndarray = after[rows, before.argmax(axis=1)] >= after.max(axis=1)
    return kept


class LabelOnly:
    """Return only the predicted label."""

    terminal = True

    def apply(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        return {"labels": _probs(probs).argmax(axis=1)}


class TopK:
    """Keep the ``k`` largest probabilities, zero the rest, renormalise."""

    terminal = False

    def __init__(self, k: int = 1) -> None:
        if int(k) < 1:
            raise InvalidArgumentError("TopK needs k >= 1")
        self.k = int(k)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        p = _probs(probs)
        # Stable sort of -p keeps the lowest index first among ties, i.e. argmax's choice is always kept.
        drop = np.argsort(-p, axis=1, kind="stable")[:, self.k :]
        out = p.copy()
        np.put_along_axis(out, drop, 0.0, axis=1)
        renormalised: np.ndarray = out / np.maximum(out.sum(axis=1, keepdims=True), _EPS)
        return renormalised


class Rounding:
    """Round to ``decimals`` places on a grid that still sums to exactly 1 (largest-remainder rounding).

    Plain rounding can leave rows summing to anything (even 0); largest remainder keeps every value on the grid,
    the sum at 1 and, with ties broken towards the original top-1, that label at the row maximum.
    """

    terminal = False

    def __init__(self, decimals: int = 2) -> None:
        if not 0 <= int(decimals) <= 12:
            raise InvalidArgumentError("Rounding needs 0 <= decimals <= 12")
        self.decimals = int(decimals)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        p = _probs(probs)
        p = p / np.maximum(p.sum(axis=1, keepdims=True), _EPS)
        units = 10**self.decimals
        scaled = p * units
        base = np.floor(scaled)
        remainder = scaled - base
        remainder[np.arange(len(p)), p.argmax(axis=1)] += 0.5  # the top-1 wins every tie for a spare unit
        spare = (units - base.sum(axis=1)).round().astype(np.int64)
        order = np.argsort(-remainder, axis=1, kind="stable")
        bump = np.arange(p.shape[1])[None, :] < spare[:, None]
        np.put_along_axis(base, order, np.take_along_axis(base, order, axis=1) + bump, axis=1)
        rounded: np.ndarray = base / units
        return rounded


class ReverseSigmoid:
    """Reverse-sigmoid perturbation (Lee et al., IEEE S&P Workshops 2019).

    ``r = beta * (sigmoid(gamma * logit(y)) - 1/2)`` and ``y' = alpha * (y - r)`` with ``alpha`` renormalising
    each row. Negative entries (possible for large ``beta``) are clipped to 0 before renormalising, and the rare
    row whose arg-max the perturbation moves gets its top-1 value swapped back, so the label never changes.
    """

    terminal = False

    def __init__(self, beta: float = 0.7, gamma: float = 0.4) -> None:
        if not beta > 0 or not gamma > 0:
            raise InvalidArgumentError("ReverseSigmoid needs beta > 0 and gamma > 0")
        self.beta = float(beta)
        self.gamma = float(gamma)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        p = _probs(probs)
        y = np.clip(p, 1e-7, 1 - 1e-7)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * np.log(y / (1 - y)))) - 0.5)
        out = np.clip(p - r, 0.0, None)
        total = out.sum(axis=1, keepdims=True)
        # An all-zero row (only conceivable for extreme beta) falls back to the unperturbed row.
        out = np.where(total > _EPS, out / np.maximum(total, _EPS), p / np.maximum(p.sum(axis=1, keepdims=True), _EPS))
        out = _restore_top1(p, out)
        if not top1_preserved(p, out).all():  # pragma: no cover - guaranteed by _restore_top1
            raise AssertionError("reverse sigmoid changed a top-1 label")
        return out


class Chain:
    """Apply policies in order; only the last may be terminal (e.g. ``LabelOnly``)."""

    def __init__(self, policies: Sequence[OutputPolicy]) -> None:
        if not policies:
            raise InvalidArgumentError("a Chain needs at least one policy")
        if any(p.terminal for p in policies[:-1]):
            raise InvalidArgumentError("only the last policy of a Chain may return labels instead of probabilities")
        self.policies = list(policies)
        self.terminal = self.policies[-1].terminal

    def apply(self, probs: np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
        # Each policy keeps the top-1 of *its* input, but near-ties after one stage can let the next pick another
        # label (e.g. reverse sigmoid, then rounding): re-anchor to the original label after every stage.
        original = _probs(probs)
        out = original
        for policy in self.policies:
            if policy.terminal:
                # Every earlier stage keeps the original top-1 (ties included), so a label-only end answers the
                # original label; applying it to the perturbed rows could break a tie the other way.
                return policy.apply(original)
            step = policy.apply(out)
            if isinstance(step, dict):
                raise InvalidArgumentError(f"{type(policy).__name__} answered labels but is not terminal")
            out = _restore_top1(original, step)
        return out


_FACTORIES: Mapping[str, Callable[..., OutputPolicy]] = {
    "label_only": LabelOnly,
    "top_k": TopK,
    "rounding": Rounding,
    "reverse_sigmoid": ReverseSigmoid,
    "chain": lambda policies: Chain([from_config(p) for p in policies]),
}


def from_config(config: Mapping[str, Any]) -> OutputPolicy:
    """Build a policy from ``{"policy": name, **params}``; ``{"policy": "chain", "policies": [...]}`` composes."""
    params = dict(config)
    name = params.pop("policy", None)
    if name not in _FACTORIES:
        raise InvalidArgumentError(f"unknown output policy {name!r}; known: {sorted(_FACTORIES)}")
    try:
        return _FACTORIES[name](**params)
    except TypeError as exc:
        raise InvalidArgumentError(f"bad parameters for output policy {name!r}: {exc}") from exc
