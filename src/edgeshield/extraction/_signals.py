"""Signals complementary to PRADA: out-of-distribution rate and a per-client budget of distinct queries.

``OodRateSignal``: PRADA looks at the *spacing* of a client's queries; random or synthetic probes that are evenly
spread (uniform noise, Jacobian-augmented seeds) can pass it. Such probes are far from the data manifold, so the
number of a client's recent queries whose PCA reconstruction residual
(:class:`edgeshield.adversarial.ReconstructionDetector`, fitted on clean data) exceeds the clean ``quantile`` is a
cheap second signal. The alarm is a one-sided binomial test: with ``k`` out-of-distribution queries among the last
``n``, it fires when ``P(Binomial(n, null_rate) >= k) < alpha``. ``null_rate`` is the rate an honest client is
assumed not to exceed (by default twice the calibrated ``1 - quantile``, for the quantile's estimation error), and
``alpha`` is small (1e-6) because the test is repeated after every batch. A burst of a handful of synthetic queries
already crosses it (5 of 10 at the defaults), where a fixed rate threshold needs a full window.

Calibrated on clean data alone, the residual calls honest sensors out of distribution: a camera one pixel off
moves every stroke out of the clean PCA subspace. ``fit(..., transforms=BenignTransforms(...))`` fits the PCA on
the reference data *and* its declared benign transforms (shifts, sensor noise, contrast) and sets the threshold on
held-out data and its transforms, so what the operator declares benign is in distribution; what is far from every
declared variation (uniform noise, gradient-sign steps) still is not.

``QueryBudget``: a client's number of *distinct* inputs (repeats are free) in a sliding time window. Distinct means
distinct canonical key (:mod:`edgeshield.extraction._keys`): with keys that absorb small perturbations, jittered
copies of one input are counted once. Extraction needs many distinct answers; an honest device sees a bounded
stream. Natural-data extraction (an attacker with real inputs of the task) is statistically indistinguishable from
an honest client query by query, so the budget is the one brake that works on it: it caps what one identity can
learn per window. It is an operator setting (the most distinct inputs an honest device of this deployment sends per
window, with a margin), not something to learn from the attacker. Memory per client: at most ``budget + 1`` 32-byte
keys. It has no memory beyond its window: :class:`edgeshield.extraction.DecayingBudget` is the long-horizon brake.

Both signals export and import one client's state as bytes (``np.savez``, no pickle) for the monitor's store.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._io import check_readable_file
from edgeshield._stats import binomial_sf
from edgeshield.adversarial import ReconstructionDetector
from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction._keys import digest_keys

if TYPE_CHECKING:
    from edgeshield.extraction._transforms import BenignTransforms

__all__ = ["OodRateSignal", "QueryBudget", "SignalState"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class SignalState:
    """One signal's view of one client: alarm plus the numbers behind it."""

    name: str
    alarm: bool
    stats: dict[str, Any]


def _pack(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, version=np.asarray(_STATE_VERSION), **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(data: bytes, what: str, names: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """The arrays ``names`` (name -> (dtype kind, ndim)) of a state blob; anything else is ExtractionStateError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ExtractionStateError(f"{what} state must be bytes")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as blob:
            if int(blob["version"]) != _STATE_VERSION:
                raise ExtractionStateError(f"{what} state version {int(blob['version'])} is not {_STATE_VERSION}")
            out = {name: np.asarray(blob[name]) for name in names}
    except ExtractionStateError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise ExtractionStateError(f"{what} state is malformed: {' '.join(str(exc).split())[:160]}") from None
    for name, (kind, ndim) in names.items():
        if out[name].dtype.kind != kind or out[name].ndim != ndim:
            raise ExtractionStateError(f"{what} state: {name} has the wrong type or shape")
    return out


class OodRateSignal:
    """Alarm when a client's recent out-of-distribution count is implausible for an honest client."""

    name = "ood_rate"

    def __init__(
        self,
        detector: ReconstructionDetector,
        threshold: float,
        *,
        null_rate: float = 0.02,
        alpha: float = 1e-6,
        window: int = 200,
        min_samples: int = 10,
        transforms: BenignTransforms | None = None,
    ) -> None:
        if not 1 <= min_samples <= window:
            raise InvalidArgumentError("ood_rate needs 1 <= min_samples <= window")
        if not 0.0 < null_rate < 1.0:
            raise InvalidArgumentError("ood_rate null_rate must lie in (0, 1)")
        if not 0.0 < alpha < 1.0:
            raise InvalidArgumentError("ood_rate alpha must lie in (0, 1)")
        self.detector = detector
        self.threshold = float(threshold)
        self.null_rate = float(null_rate)
        self.alpha = float(alpha)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.transforms = transforms  # what it was calibrated to accept (for describe and the docs), or None
        self._flags: dict[str, deque[bool]] = {}

    @classmethod
    def fit(
        cls,
        reference: np.ndarray,
        held_out: np.ndarray,
        *,
        transforms: BenignTransforms | None = None,
        components: int = 20,
        quantile: float = 0.99,
        seed: int = 0,
        **kwargs: Any,
    ) -> OodRateSignal:
        """PCA on clean ``reference``; the OOD threshold is the ``quantile`` of residuals on clean ``held_out``.

        With ``transforms``, both sets are first expanded by them (:meth:`BenignTransforms.expand`, random draws
        from ``seed``): the PCA is fitted on reference + transforms(reference) and the threshold set on
        held_out + transforms(held_out), so inputs the declared transforms produce are in distribution."""
        if not 0.0 < quantile < 1.0:
            raise InvalidArgumentError("ood_rate quantile must lie in (0, 1)")
        reference, held_out = np.asarray(reference), np.asarray(held_out)
        if held_out.ndim < 2 or len(held_out) == 0:
            raise InvalidArgumentError("ood_rate needs a non-empty held-out set")
        if transforms is not None:
            rng = np.random.default_rng(seed)
            reference, held_out = transforms.expand(reference, rng), transforms.expand(held_out, rng)
        detector = ReconstructionDetector.fit(reference, components=components)
        kwargs.setdefault("null_rate", min(0.5, 2.0 * (1.0 - quantile)))
        threshold = float(np.quantile(detector.scores(held_out), quantile))
        return cls(detector, threshold, transforms=transforms, **kwargs)

    @classmethod
    def from_reference_file(
        cls,
        path: str | os.PathLike[str],
        *,
        transforms: BenignTransforms | None = None,
        held_out_fraction: float = 0.25,
        seed: int = 0,
        **kwargs: Any,
    ) -> OodRateSignal:
        """Fit from an ``.npz`` with array ``x`` (rows of clean inputs of the task; ``serve --ood-reference``).

        A seeded random ``held_out_fraction`` of the rows sets the threshold, the rest fits the PCA."""
        if not 0.0 < held_out_fraction < 1.0:
            raise InvalidArgumentError("ood_rate held_out_fraction must lie in (0, 1)")
        p = check_readable_file(path, what="OOD reference file")
        try:
            data = np.load(p, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise InvalidArgumentError(f"{p}: an OOD reference file is an .npz archive with array 'x'")
            with data:
                if "x" not in data.files:
                    raise InvalidArgumentError(f"{p}: the OOD reference file has no array 'x' ({data.files})")
                x = np.asarray(data["x"])
        except InvalidArgumentError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InvalidArgumentError(f"{p} is not a readable .npz file: {' '.join(str(exc).split())[:160]}") from None
        if x.ndim < 2 or x.dtype.kind not in "fiu" or not np.isfinite(x).all():
            raise InvalidArgumentError(f"{p}: 'x' must be a finite numeric array of rows [N, ...]")
        x = x.reshape(len(x), -1).astype(np.float32)
        components = int(kwargs.get("components", 20))
        n_held = round(len(x) * held_out_fraction)
        if n_held < 10 or len(x) - n_held <= components:
            raise InvalidArgumentError(f"{p}: {len(x)} rows are too few for {components} components and a "
                                       f"held-out {held_out_fraction:.0%} of at least 10")
        order = np.random.default_rng(seed).permutation(len(x))
        return cls.fit(x[order[n_held:]], x[order[:n_held]], transforms=transforms, seed=seed, **kwargs)

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None,
                keys: Sequence[bytes] | None = None) -> SignalState:
        flags = self._flags.setdefault(client_id, deque(maxlen=self.window))
        flags.extend((self.detector.scores(np.asarray(x)) > self.threshold).tolist())
        return self.state(client_id)

    def state(self, client_id: str) -> SignalState:
        flags = self._flags.get(client_id, ())
        n, k = len(flags), int(sum(flags))
        p = binomial_sf(k, n, self.null_rate) if n else 1.0
        alarm = n >= self.min_samples and p < self.alpha
        return SignalState(self.name, alarm, {"ood_rate": k / n if n else 0.0, "window": n, "p_value": p})

    def reset(self, client_id: str) -> None:
        self._flags.pop(client_id, None)

    def export_state(self, client_id: str) -> bytes | None:
        flags = self._flags.get(client_id)
        return None if flags is None else _pack(flags=np.asarray(list(flags), dtype=bool))

    def import_state(self, client_id: str, data: bytes) -> None:
        flags = _unpack(data, self.name, {"flags": ("b", 1)})["flags"]
        self._flags[client_id] = deque(flags.tolist(), maxlen=self.window)  # the most recent ``window`` kept

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "components": int(self.detector.components.shape[0]),
                "threshold": self.threshold, "null_rate": self.null_rate, "alpha": self.alpha,
                "window": self.window, "transforms": None if self.transforms is None else self.transforms.to_config()}


class QueryBudget:
    """Alarm when a client sent more than ``budget`` distinct inputs (keys) within the last ``window_s`` seconds."""

    name = "query_budget"

    def __init__(self, budget: int, *, window_s: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        if budget < 1:
            raise InvalidArgumentError("query budget must be at least 1 distinct input")
        if not window_s > 0:
            raise InvalidArgumentError("query budget window must be positive")
        self.budget = int(budget)
        self.window_s = float(window_s)
        self._clock = clock
        self._seen: dict[str, OrderedDict[bytes, float]] = {}

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None,
                keys: Sequence[bytes] | None = None) -> SignalState:
        """Count ``x``'s rows by ``keys`` (one per row; None: exact digests of the rows)."""
        keys = digest_keys(x) if keys is None else list(keys)
        if len(keys) != len(x):
            raise InvalidArgumentError(f"query budget: {len(keys)} keys for {len(x)} inputs")
        seen = self._seen.setdefault(client_id, OrderedDict())
        now = self._clock()
        for key in keys:
            seen[key] = now
            seen.move_to_end(key)
            if len(seen) > self.budget + 1:  # over budget already: the oldest keys no longer matter
                seen.popitem(last=False)
        return self.state(client_id)

    def state(self, client_id: str) -> SignalState:
        seen = self._seen.get(client_id)
        if seen is None:
            return SignalState(self.name, False, {"distinct": 0, "budget": self.budget})
        horizon = self._clock() - self.window_s
        while seen and next(iter(seen.values())) < horizon:
            seen.popitem(last=False)
        return SignalState(self.name, len(seen) > self.budget, {"distinct": len(seen), "budget": self.budget})

    def reset(self, client_id: str) -> None:
        self._seen.pop(client_id, None)

    def export_state(self, client_id: str) -> bytes | None:
        seen = self._seen.get(client_id)
        if seen is None:
            return None
        keys = np.frombuffer(b"".join(seen), dtype=np.uint8).reshape(len(seen), 32) if seen else \
            np.zeros((0, 32), np.uint8)
        return _pack(keys=keys, times=np.fromiter(seen.values(), dtype=np.float64, count=len(seen)))

    def import_state(self, client_id: str, data: bytes) -> None:
        arrays = _unpack(data, self.name, {"keys": ("u", 2), "times": ("f", 1)})
        keys, times = arrays["keys"], arrays["times"]
        if keys.dtype != np.uint8 or keys.shape[1:] != (32,) or len(keys) != len(times) \
                or not np.isfinite(times).all() or (np.diff(times) < 0).any():
            raise ExtractionStateError("query_budget state: keys must be [N, 32] bytes with N ordered times")
        self._seen[client_id] = OrderedDict((keys[i].tobytes(), float(times[i])) for i in range(len(keys)))
