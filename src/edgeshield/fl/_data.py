"""The federated digits data: a server-held root set, Dirichlet label-skewed client shards, the test split.

Everything is derived deterministically from the config's seed, so a simulated client recomputes its own shard
from the job it is given (the data never travels) and the server knows only the root set and the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeshield.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.fl._config import FLConfig

__all__ = ["FederatedData", "federated_data", "partition", "split_root"]


@dataclass(frozen=True)
class FederatedData:
    """What a simulation needs: one ``(x, y)`` per client, the server's root set, and the test split."""

    clients: list[tuple[np.ndarray, np.ndarray]]
    root: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def split_root(
    x: np.ndarray, y: np.ndarray, size: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``size`` examples for the server (stratified by label where possible), and the rest, disjoint."""
    if size >= len(y):
        raise InvalidArgumentError(f"fl config: fltrust_root: {size} leaves no training data for the clients")
    rng = np.random.default_rng([seed, 1])  # not privacy noise: a reproducible data split
    order = rng.permutation(len(y))
    # round-robin over labels so a 100-example root set covers every class
    by_label = [order[y[order] == c] for c in np.unique(y)]
    picked: list[int] = []
    i = 0
    while len(picked) < size:
        for idx in by_label:
            if i < len(idx) and len(picked) < size:
                picked.append(int(idx[i]))
        i += 1
    root_idx = np.sort(np.asarray(picked, dtype=np.int64))
    mask = np.ones(len(y), dtype=bool)
    mask[root_idx] = False
    return (x[root_idx], y[root_idx]), (x[mask], y[mask])


def partition(x: np.ndarray, y: np.ndarray, cfg: FLConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dirichlet label skew: each class is split across ``cfg.clients`` by proportions ~ Dir(alpha); clients under
    ``cfg.min_examples`` then take examples from the largest shards (deterministic given ``cfg.seed``)."""
    n, k = len(y), cfg.clients
    if k * cfg.min_examples > n:
        raise InvalidArgumentError(
            f"fl config: {k} clients × min_examples {cfg.min_examples} needs {k * cfg.min_examples} examples, "
            f"the clients' share of the data has {n}"
        )
    rng = np.random.default_rng([cfg.seed, 2])  # not privacy noise: a reproducible data split
    shards: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        props = rng.dirichlet(np.full(k, cfg.alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            shards[client].extend(int(i) for i in part)
    for s in shards:
        rng.shuffle(s)
    # top up small shards from the largest ones
    sizes = np.array([len(s) for s in shards])
    for small in np.flatnonzero(sizes < cfg.min_examples):
        while len(shards[int(small)]) < cfg.min_examples:
            donor = int(np.argmax(np.array([len(s) for s in shards])))
            shards[int(small)].append(shards[donor].pop())
    return [(x[np.asarray(s, dtype=np.int64)], y[np.asarray(s, dtype=np.int64)]) for s in shards]


_CACHE: dict[tuple[object, ...], FederatedData] = {}


def federated_data(cfg: FLConfig) -> FederatedData:
    """The digits split for ``cfg`` (cached per process: simulated clients call this for every message)."""
    key = (cfg.seed, cfg.clients, cfg.alpha, cfg.min_examples, cfg.fltrust_root)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    from edgeshield.models import load_digits_split

    split = load_digits_split()
    root, rest = (
        split_root(split.x_train, split.y_train, cfg.fltrust_root, cfg.seed)
        if cfg.fltrust_root
        else ((split.x_train[:0], split.y_train[:0]), (split.x_train, split.y_train))
    )
    data = FederatedData(clients=partition(rest[0], rest[1], cfg), root=root, test=(split.x_test, split.y_test))
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[key] = data
    return data
