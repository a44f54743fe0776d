"""A fleet-wide budget: distinct canonical inputs per group of identities per UTC day, as one HyperLogLog.

Per-identity budgets cap what one certificate learns; twelve certificates of one role (the issue's Sybil attack:
250 distinct inputs each, 3,000 in all) each stay under theirs. What a fleet of honest devices of one group (a role
by default, ``serve --fleet-group role``; a CA issuance batch where one is known) sends grows with the number of
devices and the days, and devices of one deployment see overlapping inputs; a thief's queries are distinct from one
another by design. :class:`FleetBudget` counts the *union* of a group's canonical keys each UTC day in a HyperLogLog
(``precision`` 12: 4 KiB per group and day, relative standard error 1.6 %, see :mod:`._sketch`) and alarms every
identity of the group that queries while the day's union is above ``per_group_day`` by more than ``margin_se``
standard errors (so that an honest fleet just at the limit is not alarmed by the sketch's own error).

``per_group_day`` is an operator setting: the distinct inputs a day the group's honest devices send, with a margin
(e.g. twelve devices of at most 100 a day: 1,200, and 1,800 with a 50 % margin — illustrative numbers).

What a Sybil attacker with unlimited fresh identities still gets: per group and per UTC day, ``per_group_day``
distinct answers less what the group's honest devices use, however many identities it spreads them over; across G
groups it can obtain identities in, G times that, every day, without bound over time. The fleet view turns "one
more certificate" into "one more group" — the real limit is how many enrolments (CA issuances, roles) an attacker
can get, which no query statistic can enforce. Alarming the whole group also means a thief inside a group makes its
honest members' next queries alarm too: the group is the unit of the decision (pick the action accordingly, e.g.
``flag`` rather than ``block`` for this detector).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction._budget import DAY_S
from edgeshield.extraction._signals import SignalState
from edgeshield.extraction._sketch import HyperLogLog, frame, unframe

__all__ = ["FleetBudget"]

_MAGIC = b"ESFB1"


class FleetBudget:
    """Alarm for the identities of a group whose union of distinct inputs today exceeds ``per_group_day``."""

    name = "fleet_budget"
    wants_group = True

    def __init__(self, per_group_day: int, *, clock: Callable[[], float] = time.time, precision: int = 12,
                 margin_se: float = 3.0, max_groups: int = 1024) -> None:
        if isinstance(per_group_day, bool) or not isinstance(per_group_day, int | np.integer) or per_group_day < 1:
            raise InvalidArgumentError(f"fleet budget per_group_day must be a positive integer, not {per_group_day!r}")
        if not (margin_se >= 0 and math.isfinite(margin_se)):
            raise InvalidArgumentError("fleet budget margin_se must be a finite number >= 0")
        if max_groups < 1:
            raise InvalidArgumentError("fleet budget max_groups must be at least 1")
        HyperLogLog(precision)  # checks the precision
        self.per_group_day, self.precision = int(per_group_day), int(precision)
        self.margin_se, self.max_groups = float(margin_se), int(max_groups)
        self._clock = clock
        self._groups: OrderedDict[str, tuple[int, HyperLogLog]] = OrderedDict()  # group -> (UTC day, sketch)
        self._dirty: set[str] = set()

    @property
    def limit(self) -> float:
        """The estimate above which a group alarms: ``per_group_day·(1 + margin_se·standard error)``."""
        return self.per_group_day * (1.0 + self.margin_se * 1.04 / math.sqrt(1 << self.precision))

    def _today(self, group: str) -> tuple[int, HyperLogLog]:
        day = int(self._clock() // DAY_S)
        held = self._groups.get(group)
        if held is None or held[0] != day:  # a new UTC day starts from an empty union
            held = (day, HyperLogLog(self.precision))
            self._groups[group] = held
        self._groups.move_to_end(group)
        while len(self._groups) > self.max_groups:  # bounded memory: the least recently active group goes
            old, _ = self._groups.popitem(last=False)
            self._dirty.discard(old)
        return held

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray | None = None,
                keys: Sequence[bytes] | None = None, group: str | None = None) -> SignalState:
        if keys is None:
            from edgeshield.extraction._monitor import default_keys

            keys = default_keys(x)
        group = group or "default"
        day, sketch = self._today(group)
        sketch.add([bytes(k) for k in keys])
        self._dirty.add(group)
        return self._signal(group, day, sketch)

    def state(self, group: str = "default") -> SignalState:
        day, sketch = self._today(group)
        return self._signal(group, day, sketch)

    def _signal(self, group: str, day: int, sketch: HyperLogLog) -> SignalState:
        estimate = sketch.estimate()
        stats: dict[str, Any] = {"group": group, "day": day, "estimate": round(estimate, 1),
                                 "standard_error": round(estimate * sketch.standard_error, 1),
                                 "per_group_day": self.per_group_day}
        return SignalState(self.name, estimate > self.limit, stats)

    def reset(self, client_id: str) -> None:
        """Nothing per client: the union is the group's (an identity's inputs stay counted for its group's day)."""

    # --- shared state for QueryMonitor's store: one row per group ---
    def export_shared(self, *, all_groups: bool = False) -> Iterator[tuple[str, bytes]]:
        """(group, blob) for each group changed since the last export (every group with ``all_groups``)."""
        for group in list(self._groups) if all_groups else sorted(self._dirty):
            held = self._groups.get(group)
            if held is None:
                continue
            day, sketch = held
            yield group, frame(_MAGIC, {"v": 1, "day": day}, sketch.to_bytes())
        self._dirty.clear()

    def import_shared(self, group: str, data: bytes) -> None:
        try:
            header, parts = unframe("fleet budget state", _MAGIC, data)
            day = int(header["day"])
            (blob,) = parts
            sketch = HyperLogLog.from_bytes(blob)
        except ExtractionStateError as exc:
            raise ExtractionStateError(f"fleet budget state of group {group!r}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ExtractionStateError(f"fleet budget state of group {group!r} is malformed: "
                                       f"{type(exc).__name__}: {exc}") from None
        if sketch.precision != self.precision:
            raise ExtractionStateError(f"fleet budget state of group {group!r} has precision {sketch.precision}, "
                                       f"this budget {self.precision}")
        if day == int(self._clock() // DAY_S):  # an earlier day's union no longer counts
            self._groups[group] = (day, sketch)
