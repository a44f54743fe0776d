"""A per-identity budget of distinct inputs over the identity's whole life, refilled by the day.

The window budget (:class:`~edgeshield.extraction.QueryBudget`) forgets everything older than its window, so an
attacker who waits a window between rounds is never seen (the issue's slow attacker: 290 distinct queries a day
for four days). :class:`DecayingBudget` is a leaky bucket instead: an identity starts with ``burst`` tokens, each
input *new to that identity* (a canonical key it never sent before, over its whole life) costs one, and tokens
come back at ``per_day`` a day up to ``burst``. Repeats are free, whenever they come.

Honest traffic model (an operator setting, stated, not learnt): a device sends at most ``burst + per_day·T``
distinct inputs in any T days (any T, from minutes to years). Such a device never finds the bucket empty — that is
exactly the condition under which a token bucket of rate ``per_day`` and depth ``burst`` never runs dry — so a
long-lived honest device is never blocked, however long it lives. A client sending more than that, at any pace,
finds the bucket empty after at most ``burst + per_day·T`` distinct answers in T days: that is the most one
identity learns, and the alarm (``alarm`` while the bucket is overdrawn) comes at the first input beyond it.
With ``burst >= 2·per_day`` the model covers every device that sends at most ``per_day`` new inputs per calendar
day, whatever the hours (any T-day interval touches at most T + 2 calendar days).

Memory: "seen before" is a scalable Bloom filter (stages of doubling capacity from 1,024 inputs, each new stage
given half of the false-positive budget the earlier ones left, so that the total stays below ``bloom_fp``): a
client costs a few bytes per distinct input it sent (``1.44·log2(1/rate)`` bits per input of a stage's capacity,
the newest stage allocated whole), up to ``bloom_capacity`` inputs; beyond that the oldest stage is dropped (its
inputs, if sent again, are charged again — the error goes against the client, never for it). The monitor holds at
most ``max_clients`` clients in memory, the rest in its store. A false positive is a new input taken for a repeat
and not charged: at most a ``bloom_fp`` share of new inputs go free (and the filter's secret keeps a client from
choosing which).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction._signals import SignalState
from edgeshield.extraction._sketch import BloomFilter, frame, unframe

__all__ = ["DAY_S", "DecayingBudget"]

DAY_S = 86400.0
_FIRST_STAGE = 1024  # capacity of a client's first Bloom stage; each next one doubles
_MAGIC = b"ESDB1"
_EPS = 1e-9  # float slack: a stream exactly at burst + per_day·T must not alarm on rounding


@dataclass
class _Client:
    tokens: float
    stamp: float
    stages: list[BloomFilter] = field(default_factory=list)
    distinct: int = 0  # inputs charged (new to this identity) over its life

    def seen_before(self, keys: Sequence[bytes]) -> np.ndarray:
        seen = np.zeros(len(keys), dtype=bool)
        for stage in self.stages:
            seen |= stage.contains(keys)
        return seen


class DecayingBudget:
    """Leaky bucket of distinct inputs per identity: ``burst`` deep, refilled at ``per_day`` a day."""

    name = "decaying_budget"

    def __init__(self, burst: int, per_day: float, *, clock: Callable[[], float] = time.time,
                 bloom_capacity: int = 100_000, bloom_fp: float = 1e-3) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int | np.integer) or burst < 1:
            raise InvalidArgumentError(f"decaying budget burst must be a positive integer, not {burst!r}")
        if isinstance(per_day, bool) or not isinstance(per_day, int | float) or not (
                per_day > 0 and math.isfinite(per_day)):
            raise InvalidArgumentError(f"decaying budget per_day must be a positive number, not {per_day!r}")
        if isinstance(bloom_capacity, bool) or not isinstance(bloom_capacity, int) or bloom_capacity < _FIRST_STAGE:
            raise InvalidArgumentError(f"bloom_capacity must be an integer of at least {_FIRST_STAGE}")
        if not 0.0 < bloom_fp < 0.5:
            raise InvalidArgumentError("bloom_fp must lie in (0, 0.5)")
        self.burst, self.per_day = int(burst), float(per_day)
        self.bloom_capacity, self.bloom_fp = int(bloom_capacity), float(bloom_fp)
        self._clock = clock
        self._clients: dict[str, _Client] = {}

    # --- the bucket ---
    def _refill(self, client: _Client, now: float) -> None:
        # per_day * dt / DAY_S (multiplication first): one day gives exactly per_day; a clock stepping back mints none
        client.tokens = min(float(self.burst), client.tokens + self.per_day * max(0.0, now - client.stamp) / DAY_S)
        client.stamp = max(client.stamp, now)

    def _stage_for_new(self, client: _Client) -> BloomFilter:
        if not client.stages or client.stages[-1].full:
            size = min(_FIRST_STAGE << len(client.stages), self.bloom_capacity)
            while client.stages and sum(s.capacity for s in client.stages) + size > self.bloom_capacity:
                client.stages.pop(0)  # bounded: forget the oldest inputs (charged again if they come back)
            # half of what the stages held leave of the total false-positive budget: their rates sum below it
            spare = self.bloom_fp - sum(s.fp_rate for s in client.stages)
            client.stages.append(BloomFilter(size, spare / 2))
        return client.stages[-1]

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None,
                keys: Sequence[bytes] | None = None) -> SignalState:
        if keys is None:
            from edgeshield.extraction._monitor import default_keys

            keys = default_keys(x)
        now = self._clock()
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(float(self.burst), now)
        self._refill(client, now)
        unique = list(dict.fromkeys(bytes(k) for k in keys))
        new = [k for k, seen in zip(unique, client.seen_before(unique), strict=True) if not seen]
        while new:  # stage by stage: a stage takes keys until it is full
            stage = self._stage_for_new(client)
            room = stage.capacity - stage.count
            added = stage.add(new[:room])
            client.distinct += int(added.sum())
            client.tokens -= float(added.sum())
            new = new[room:]
        return self._signal(client)

    def _signal(self, client: _Client | None) -> SignalState:
        tokens = float(self.burst) if client is None else client.tokens
        stats: dict[str, Any] = {"tokens": max(tokens, 0.0), "overdrawn": max(-tokens, 0.0), "burst": self.burst,
                                 "per_day": self.per_day, "distinct": client.distinct if client else 0,
                                 "bloom_fp": self.bloom_fp}
        return SignalState(self.name, tokens < -_EPS, stats)

    def state(self, client_id: str) -> SignalState:
        client = self._clients.get(client_id)
        if client is not None:
            self._refill(client, self._clock())
        return self._signal(client)

    def reset(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    # --- persistence (QueryMonitor's store) ---
    def export_state(self, client_id: str) -> bytes | None:
        client = self._clients.get(client_id)
        if client is None:
            return None
        header = {"v": 1, "tokens": client.tokens, "stamp": client.stamp, "distinct": client.distinct}
        return frame(_MAGIC, header, *(s.to_bytes() for s in client.stages))

    def import_state(self, client_id: str, data: bytes) -> None:
        try:
            header, parts = unframe("decaying budget state", _MAGIC, data)
            client = _Client(float(header["tokens"]), float(header["stamp"]),
                             [BloomFilter.from_bytes(p) for p in parts], int(header["distinct"]))
        except ExtractionStateError as exc:
            raise ExtractionStateError(f"decaying budget state of {client_id!r}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ExtractionStateError(f"decaying budget state of {client_id!r} is malformed: "
                                       f"{type(exc).__name__}: {exc}") from None
        if not (math.isfinite(client.tokens) and client.tokens <= self.burst and math.isfinite(client.stamp)
                and client.distinct >= 0):
            raise ExtractionStateError(f"decaying budget state of {client_id!r} is out of range")
        self._clients[client_id] = client
