"""Malicious clients for evaluation: what a compromised device does to its data or to the update it sends.

An attack is named ``kind`` or ``kind:strength``:

- ``sign_flip[:k]`` sends −k × its honest update (k = 4 by default, as in Fang et al. 2020);
- ``scale[:k]`` sends k × its honest update (a boosted update, k = 10);
- ``label_flip`` trains on labels y → 9 − y;
- ``backdoor[:fraction]`` stamps the trigger (a 2×2 patch of full-intensity pixels in the bottom-right corner) on
  a fraction (0.5) of its examples and labels them :data:`BACKDOOR_TARGET`;
- ``nan`` and ``stale_round`` (bad input, not an attack strategy): a NaN in the update, or the previous round's
  number on it.

The aggregators never see these names: the server learns only what arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeshield.errors import InvalidArgumentError

__all__ = [
    "ATTACKS",
    "BACKDOOR_TARGET",
    "TRIGGER_PIXELS",
    "Attack",
    "add_trigger",
    "backdoor_success",
    "parse_attack",
]

ATTACKS = ("sign_flip", "scale", "label_flip", "backdoor", "nan", "stale_round")
_DEFAULT_STRENGTH = {"sign_flip": 4.0, "scale": 10.0, "backdoor": 0.5}
BACKDOOR_TARGET = 0
#: flat indices of the trigger in an 8×8 image: rows 6–7, columns 6–7
TRIGGER_PIXELS = (54, 55, 62, 63)


@dataclass(frozen=True)
class Attack:
    kind: str
    strength: float

    @property
    def poisons_data(self) -> bool:
        return self.kind in ("label_flip", "backdoor")

    def poison_data(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "label_flip":
            return x, (9 - y).astype(y.dtype)
        if self.kind == "backdoor":
            rng = np.random.default_rng([seed, 3])  # not privacy noise: the attacker's own choices
            count = max(1, round(self.strength * len(y))) if len(y) else 0
            idx = rng.choice(len(y), size=count, replace=False)
            x2, y2 = x.copy(), y.copy()
            x2[idx] = add_trigger(x2[idx])
            y2[idx] = BACKDOOR_TARGET
            return x2, y2
        return x, y

    def poison_update(self, update: list[np.ndarray]) -> list[np.ndarray]:
        if self.kind == "sign_flip":
            return [(-self.strength * u).astype(u.dtype) for u in update]
        if self.kind == "scale":
            return [(self.strength * u).astype(u.dtype) for u in update]
        if self.kind == "nan":
            out = [u.copy() for u in update]
            out[0].flat[0] = np.nan
            return out
        return update

    def round_sent(self, server_round: int) -> int:
        return server_round - 1 if self.kind == "stale_round" else server_round


def parse_attack(spec: str) -> Attack:
    """``"kind"`` or ``"kind:strength"`` → :class:`Attack`; a typed error for anything else."""
    kind, _, strength = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in ATTACKS:
        raise InvalidArgumentError(f"unknown attack {spec!r}; known: {', '.join(ATTACKS)}")
    if not strength:
        return Attack(kind, _DEFAULT_STRENGTH.get(kind, 1.0))
    try:
        value = float(strength)
    except ValueError:
        raise InvalidArgumentError(f"attack {spec!r}: strength must be a number") from None
    if not np.isfinite(value) or value <= 0 or (kind == "backdoor" and value > 1):
        raise InvalidArgumentError(f"attack {spec!r}: strength out of range")
    return Attack(kind, value)


def add_trigger(x: np.ndarray) -> np.ndarray:
    """``x`` (N × 64, pixels in [0, 1]) with the backdoor trigger stamped on."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, list(TRIGGER_PIXELS)] = 1.0
    return out


def backdoor_success(predict: object, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Fraction of triggered test inputs whose true label is not the target that ``predict`` (x → labels)
    classifies as :data:`BACKDOOR_TARGET`."""
    if not callable(predict):
        raise InvalidArgumentError("predict must be callable")
    keep = y_test != BACKDOOR_TARGET
    if not np.any(keep):
        return 0.0
    labels = np.asarray(predict(add_trigger(x_test[keep])))
    return float(np.mean(labels == BACKDOOR_TARGET))
