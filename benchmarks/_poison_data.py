"""Data poisoning on the device: how much of a poisoned client's local data ``check_local_data`` holds back.

A client's local data is drawn from the digits training split the way federated clients hold it: Dirichlet label
skew (alpha = 0.5) and 60–130 examples per client (``examples=None``), or one size (e.g. 400) for a larger client. The
server's clean reference set is 100 examples drawn at random from the training split and disjoint from the
clients' data (the FLTrust root set plays this part). Poisons, applied to ``rate`` of a client's examples:

- ``label_flip``: a uniformly random wrong label;
- ``class_flip``: examples of the client's most common class a relabelled a+1 (a targeted a→b flip);
- ``backdoor``: a 2×2 patch (4 pixels) in the bottom-right corner set to the maximum, relabelled to class 0
  (dirty-label trigger; examples already of class 0 are never chosen).

``measure`` pools the counts over several clients: detection rate = poisoned examples held back ÷ poisoned,
false-positive rate = clean examples held back ÷ clean. Detectors: ``knn`` (the shipped check with the reference
set), ``knn_self`` (the shipped check without one) and ``spectral`` (a baseline, not shipped: spectral signatures on
raw pixels per class, Tran et al. 2018, removing the top 1.5·rate of each class's scores, i.e. told the true rate).
Run alone: ``python benchmarks/_poison_data.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import cache
from typing import Any

import numpy as np

from edgeshield.fl._validate import THRESHOLD_SELF, THRESHOLD_WITH_REFERENCE, check_local_data
from edgeshield.models import DIGITS_NUM_CLASSES, digits_input_spec, load_digits_split

POISONS = ("none", "label_flip", "class_flip", "backdoor")
DETECTORS = ("knn", "knn_self", "spectral")
ALPHA = 0.5
SMALL_CLIENT = (60, 130)
LARGE_CLIENT = 400
REFERENCE_SIZE = 100
BACKDOOR_TARGET = 0
SPECTRAL_REMOVE = 1.5  # Tran et al.: remove 1.5 x the poison rate of each class's highest scores


@cache
def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(client pool x, y, reference x, y): the reference is a random 100 of the training split, the pool the rest."""
    split = load_digits_split()
    rng = np.random.default_rng([seed, 1])
    ref = rng.choice(split.y_train.size, REFERENCE_SIZE, replace=False)
    rest = np.setdiff1d(np.arange(split.y_train.size), ref)
    return split.x_train[rest], split.y_train[rest], split.x_train[ref], split.y_train[ref]


def client_data(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples (fewer if a class runs out) with Dirichlet(alpha) label proportions, copied."""
    counts = rng.multinomial(n, rng.dirichlet([ALPHA] * DIGITS_NUM_CLASSES))
    idx = np.concatenate([
        rng.choice(pool, min(int(k), pool.size), replace=False)
        for c, k in enumerate(counts) if k for pool in [np.flatnonzero(y == c)]
    ])
    return x[idx].copy(), y[idx].copy()


def poison_data(kind: str, rate: float, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poison ``rate`` of the examples in place; returns the boolean mask of poisoned rows."""
    n = y.size
    m = round(rate * n)
    mask = np.zeros(n, dtype=bool)
    if kind == "none":
        return mask
    if kind == "label_flip":
        rows = rng.choice(n, m, replace=False)
        y[rows] = (y[rows] + rng.integers(1, DIGITS_NUM_CLASSES, rows.size)) % DIGITS_NUM_CLASSES
    elif kind == "class_flip":
        source = int(np.bincount(y, minlength=DIGITS_NUM_CLASSES).argmax())
        cand = np.flatnonzero(y == source)
        rows = rng.choice(cand, min(m, cand.size), replace=False)
        y[rows] = (source + 1) % DIGITS_NUM_CLASSES
    elif kind == "backdoor":
        cand = np.flatnonzero(y != BACKDOOR_TARGET)
        rows = rng.choice(cand, min(m, cand.size), replace=False)
        img = x[rows].reshape(-1, 8, 8)
        img[:, 6:, 6:] = 1.0  # the spec's maximum: the patch stays inside the input range
        x[rows] = img.reshape(rows.size, -1)
        y[rows] = BACKDOOR_TARGET
    else:
        raise ValueError(f"unknown poison {kind!r}; one of {POISONS}")
    mask[rows] = True
    return mask


def spectral_held_back(x: np.ndarray, y: np.ndarray, rate: float) -> np.ndarray:
    """Baseline: per class, the top 1.5·rate of squared projections on the top singular vector of centred rows."""
    held = np.zeros(y.size, dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        remove = math.ceil(SPECTRAL_REMOVE * rate * rows.size)
        if rows.size < 2 or remove == 0:
            continue
        centred = x[rows].astype(np.float64) - x[rows].mean(axis=0)
        top = np.linalg.svd(centred, full_matrices=False)[2][0]
        score = (centred @ top) ** 2
        held[rows[np.argsort(score)[::-1][:remove]]] = True
    return held


def measure(poison: str, rate: float, *, seed: int = 0, quick: bool = False, examples: int | None = None,
            detector: str = "knn") -> dict[str, Any]:
    """Poison ``rate`` of several clients' data, run a detector, pool the counts (see the module docstring)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; one of {DETECTORS}")
    pool_x, pool_y, ref_x, ref_y = _data(seed)
    clients = (4 if quick else 12) if examples is not None and examples >= 200 else (10 if quick else 40)
    spec = digits_input_spec()
    rng = np.random.default_rng([seed, 2, POISONS.index(poison), round(rate * 1000), examples or 0])
    poisoned = held_poisoned = clean = held_clean = total = 0
    threshold: float | None = None
    for _ in range(clients):
        n = examples if examples is not None else int(rng.integers(SMALL_CLIENT[0], SMALL_CLIENT[1] + 1))
        x, y = client_data(rng, n, pool_x, pool_y)
        mask = poison_data(poison, rate, x, y, rng)
        if detector == "spectral":
            held = spectral_held_back(x, y, rate)
        else:
            report = check_local_data(x, y, spec, num_classes=DIGITS_NUM_CLASSES,
                                      reference=(ref_x, ref_y) if detector == "knn" else None)
            threshold = report.threshold
            held = np.ones(y.size, dtype=bool)
            held[report.kept] = False
        total += y.size
        poisoned += int(mask.sum())
        held_poisoned += int((held & mask).sum())
        clean += int((~mask).sum())
        held_clean += int((held & ~mask).sum())
    return {
        "poison": poison, "rate": rate, "detector": detector, "threshold": threshold,
        "reference_size": REFERENCE_SIZE if detector == "knn" else 0,
        "clients": clients, "examples": examples if examples is not None else f"{SMALL_CLIENT[0]}-{SMALL_CLIENT[1]}",
        "n": total, "poisoned": poisoned, "held_back": held_poisoned + held_clean,
        "detection_rate": held_poisoned / poisoned if poisoned else None,
        "false_positive_rate": held_clean / clean if clean else None,
    }


def measure_all(*, seed: int = 0, quick: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every poison at 10 % and 20 %, small and large clients, each detector; and the flat figures for the JSON."""
    rows = [measure("none", 0.0, seed=seed, quick=quick, examples=examples, detector=detector)
            for examples in (None, LARGE_CLIENT) for detector in ("knn", "knn_self")]
    for poison in POISONS[1:]:
        for rate in (0.1, 0.2):
            for examples in (None, LARGE_CLIENT):
                for detector in DETECTORS:
                    rows.append(measure(poison, rate, seed=seed, quick=quick, examples=examples, detector=detector))
    figures: dict[str, Any] = {}
    for r in rows:
        size = "small" if r["examples"] != LARGE_CLIENT else "large"
        if r["poison"] == "none":
            figures[f"data_clean_{size}_{r['detector']}_fpr"] = r["false_positive_rate"]
            continue
        key = f"data_{r['poison']}{round(r['rate'] * 100)}_{size}_{r['detector']}"
        figures[f"{key}_detection"] = r["detection_rate"]
        figures[f"{key}_fpr"] = r["false_positive_rate"]
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer clients per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the flat figures as JSON")
    args = parser.parse_args(argv)
    rows, figures = measure_all(seed=args.seed, quick=args.quick)
    print(f"{'poison':<11} {'rate':>4} {'client':>7} {'detector':<9} {'clients':>7} {'n':>6} {'poisoned':>8} "
          f"{'detection':>9} {'FPR':>6}")
    for r in rows:
        det = "-" if r["detection_rate"] is None else f"{r['detection_rate']:.1%}"
        print(f"{r['poison']:<11} {r['rate']:>4.0%} {r['examples']!s:>7} {r['detector']:<9} {r['clients']:>7} "
              f"{r['n']:>6} {r['poisoned']:>8} {det:>9} {r['false_positive_rate']:>6.1%}")
    print(f"knn: held back when the distance ratio exceeds {THRESHOLD_WITH_REFERENCE} (reference of "
          f"{REFERENCE_SIZE} random training examples); knn_self: {THRESHOLD_SELF}, no reference; "
          f"clients: Dirichlet alpha = {ALPHA}; backdoor target {BACKDOOR_TARGET}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
