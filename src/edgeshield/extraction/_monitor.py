"""Per-client query monitoring: detectors feed a response policy that picks one action per observation.

Actions, in increasing severity: ``allow`` < ``flag`` < ``throttle`` < ``degrade`` < ``block``. The server carries
them out: ``throttle`` → a stricter rate-limit role, ``degrade`` → the stronger output policy from
:meth:`ResponsePolicy.output_for`, ``block`` → refuse the client. ``on_alert`` hooks (audit log, metrics) are called
with ``(client_id, verdict)`` for every verdict other than ``allow``; a failing hook propagates, so that an audit
failure is never silent.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeshield.errors import ExtractionStateError, InvalidArgumentError
from edgeshield.extraction._harden import OutputPolicy

if TYPE_CHECKING:
    from edgeshield.extraction._keys import InputKeys
    from edgeshield.extraction._store import MonitorStore

__all__ = ["ACTIONS", "Detector", "QueryMonitor", "ResponsePolicy", "Signal", "Verdict", "default_keys"]

log = logging.getLogger("edgeshield.extraction")
ACTION_COMPONENT = "action"  # the store component of a client's action
STATE_REASON = "extraction_state"  # the verdict's reason when a client's stored state did not read back

ACTIONS = ("allow", "flag", "throttle", "degrade", "block")
_SEVERITY = {action: rank for rank, action in enumerate(ACTIONS)}


class Signal(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def alarm(self) -> bool: ...

    @property
    def stats(self) -> dict[str, Any]: ...


class Detector(Protocol):
    """A per-client signal. ``keys`` are the batch's canonical input keys (one 32-byte key per row; None: the
    detector uses :func:`default_keys`). Optional, used when present: ``export_state(client_id) -> bytes | None``
    and ``import_state(client_id, data)`` (per-client persistence; ``import_state`` raises ExtractionStateError on
    a malformed blob), ``export_shared() -> Iterable[(id, bytes)]`` and ``import_shared(id, data)`` (state shared by
    clients, e.g. a group's union), and ``wants_group = True`` with a ``group=`` keyword in ``observe``."""

    name: str

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray,
                keys: Sequence[bytes] | None = None) -> Signal: ...

    def reset(self, client_id: str) -> None: ...


def default_keys(x: np.ndarray) -> list[bytes]:
    """The keys used where none are given: SHA-256 of each row's exact float32 bytes (``digest_keys``)."""
    from edgeshield.extraction._keys import digest_keys

    return digest_keys(x)


def _takes(detector: object, name: str) -> bool:
    """Whether ``detector.observe`` accepts the keyword ``name`` (detectors written before keys existed do not)."""
    try:
        params = inspect.signature(detector.observe).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class Verdict:
    action: str
    reasons: tuple[str, ...]
    stats: dict[str, dict[str, Any]]


def _check(action: str) -> str:
    if action not in _SEVERITY:
        raise InvalidArgumentError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    return action


@dataclass(frozen=True)
class ResponsePolicy:
    """Maps alarms to an action.

    ``on_alarm`` gives each detector's action when it alarms (``default`` for detectors not named);
    ``escalate`` maps a number of simultaneous alarms to a minimum action (e.g. ``{2: "block"}``);
    ``sticky`` keeps a client at its worst action so far until :meth:`QueryMonitor.reset`;
    ``outputs`` maps actions to the output policy the server should apply (see :meth:`output_for`).
    """

    on_alarm: Mapping[str, str] = field(default_factory=dict)
    default: str = "flag"
    escalate: Mapping[int, str] = field(default_factory=dict)
    sticky: bool = True
    outputs: Mapping[str, OutputPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for action in [*self.on_alarm.values(), self.default, *self.escalate.values(), *self.outputs]:
            _check(action)
        if any(int(n) < 1 for n in self.escalate):
            raise InvalidArgumentError("escalate counts must be >= 1")

    def decide(self, alarming: Sequence[str], previous: str = "allow") -> str:
        actions = [self.on_alarm.get(name, self.default) for name in alarming]
        actions += [a for n, a in self.escalate.items() if len(alarming) >= int(n)]
        actions += [previous] if self.sticky else []
        return max(actions, key=_SEVERITY.__getitem__, default="allow")

    def output_for(self, action: str) -> OutputPolicy | None:
        """The output policy for ``action``: the one configured for the most severe action not above it."""
        eligible = [a for a in self.outputs if _SEVERITY[a] <= _SEVERITY[_check(action)]]
        return self.outputs[max(eligible, key=_SEVERITY.__getitem__)] if eligible else None


class QueryMonitor:
    """Feeds every detector each client batch and turns their alarms into a :class:`Verdict`.

    Canonical keys are computed once per batch (``input_keys.keys(x)``, default :func:`default_keys`) and given to
    every detector; detectors that declare ``wants_group`` also get the identity's group.

    Memory: at most ``max_clients`` clients are held (least recently seen first out). With a ``store``
    (:class:`~edgeshield.extraction.MonitorStore`) an evicted client's detector states and action are written there
    and read back when it returns, so nothing is lost, and :meth:`flush` writes every client changed since the last
    flush (the server calls it periodically and at shutdown): a restart from the same file keeps every budget, PRADA
    set and block. A new block is written at once; a killed process loses at most the changes since the last flush.
    Without a store eviction forgets the client's detector state (its budgets start afresh) — except a ``block``,
    which is kept in a set of blocked ids (a few bytes each) so that eviction never unblocks anyone.

    A stored row that does not read back (ExtractionStateError, naming the component and the client) fails closed:
    the client is blocked (sticky, written back on the next flush), :attr:`unreadable` says why, and one error line
    is logged; an operator clears it with :meth:`reset`. ``fail_closed=False`` raises instead.
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        response: ResponsePolicy | None = None,
        on_alert: Sequence[Callable[[str, Verdict], None]] = (),
        *,
        input_keys: InputKeys | None = None,
        store: MonitorStore | None = None,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.time,
        fail_closed: bool = True,
    ) -> None:
        names = [d.name for d in detectors]
        if not detectors or len(set(names)) != len(names):
            raise InvalidArgumentError("a QueryMonitor needs at least one detector, each with a distinct name")
        if ACTION_COMPONENT in names:
            raise InvalidArgumentError(f"{ACTION_COMPONENT!r} is reserved: no detector may be named so")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise InvalidArgumentError(f"max_clients must be a positive integer, not {max_clients!r}")
        for d in detectors:
            if hasattr(d, "export_state") and hasattr(d, "export_shared"):
                raise InvalidArgumentError(f"detector {d.name!r}: per-client or shared state, not both")
        self.detectors = list(detectors)
        self.response = response or ResponsePolicy()
        self.on_alert = list(on_alert)
        self.input_keys = input_keys
        self.store = store
        self.max_clients = int(max_clients)
        self.clock = clock
        self.fail_closed = fail_closed
        self.unreadable: dict[str, str] = {}  # client -> why its stored state was refused (it is blocked)
        self._takes_keys = [_takes(d, "keys") for d in self.detectors]
        self._takes_group = [bool(getattr(d, "wants_group", False)) and _takes(d, "group") for d in self.detectors]
        self._actions: dict[str, str] = {}
        self._clients: OrderedDict[str, bool] = OrderedDict()  # in memory, least recent first; value: dirty
        self._blocked: set[str] = set()  # evicted blocked clients, without a store
        self._lock = threading.RLock()  # the server observes from worker threads
        if store is not None:
            self._load_shared(store)

    # --- observing ---
    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray, keys: Sequence[bytes] | None = None,
                group: str | None = None) -> Verdict:
        if keys is None:
            keys = self.input_keys.keys(x) if self.input_keys is not None else default_keys(x)
        keys = list(keys)
        if len(keys) != len(x):
            raise InvalidArgumentError(f"one key per input row: {len(keys)} keys for {len(x)} rows")
        with self._lock:
            previous = self._load(client_id)
            signals = []
            for d, with_keys, with_group in zip(self.detectors, self._takes_keys, self._takes_group, strict=True):
                kwargs: dict[str, Any] = {"keys": keys} if with_keys else {}
                if with_group:
                    kwargs["group"] = group
                signals.append(d.observe(client_id, x, predicted, **kwargs))
            alarming = [s.name for s in signals if s.alarm]
            action = self.response.decide(alarming, previous)
            if client_id in self.unreadable:  # fail closed, whatever the policy's stickiness
                action, alarming = "block", [*alarming, STATE_REASON]
            self._actions[client_id] = action
            self._clients[client_id] = True
            if action == "block" and previous != "block" and self.store is not None:
                self.store.put_many(self._rows(client_id))  # a new block is durable at once, not at the next flush
                self._clients[client_id] = False
        verdict = Verdict(action, tuple(alarming), {s.name: dict(s.stats) for s in signals})
        for hook in self.on_alert if action != "allow" else ():
            hook(client_id, verdict)
        return verdict

    def action(self, client_id: str) -> str:
        """The client's current action (read from the store if it is not in memory)."""
        with self._lock:
            return self._load(client_id)

    def cached_action(self, client_id: str) -> str | None:
        """The action of a client held in memory, without waiting for the lock (the server's event loop asks this
        first); None when it is not in memory (ask :meth:`action`, off the loop: it may read the store)."""
        if client_id not in self._clients:
            return None
        return self._actions.get(client_id, "allow")

    def reset(self, client_id: str) -> None:
        """Forget a client (e.g. after an operator cleared it), in memory and in the store."""
        with self._lock:
            self._actions.pop(client_id, None)
            self._clients.pop(client_id, None)
            self._blocked.discard(client_id)
            self.unreadable.pop(client_id, None)
            for detector in self.detectors:
                detector.reset(client_id)
            if self.store is not None:
                self.store.delete_id(client_id, [ACTION_COMPONENT, *(d.name for d in self.detectors)])

    @property
    def clients_in_memory(self) -> int:
        return len(self._clients)

    # --- persistence ---
    def flush(self) -> int:
        """Write every client changed since the last flush, and shared detector state, in one transaction;
        returns how many clients were written (0 without a store)."""
        if self.store is None:
            return 0
        with self._lock:
            dirty = [c for c, changed in self._clients.items() if changed]
            rows = [row for c in dirty for row in self._rows(c)]
            for d in self.detectors:
                export = getattr(d, "export_shared", None)
                if export is not None:
                    rows += [(d.name, group, data) for group, data in export()]
            self.store.put_many(rows)
            for c in dirty:
                self._clients[c] = False
        return len(dirty)

    def close(self) -> None:
        """Flush, then close the store."""
        if self.store is not None:
            self.flush()
            self.store.close()

    def _rows(self, client_id: str) -> list[tuple[str, str, bytes]]:
        action = self._actions.get(client_id, "allow")
        rows = [(ACTION_COMPONENT, client_id, json.dumps({"action": action, "updated": self.clock()}).encode())]
        for d in self.detectors:
            export = getattr(d, "export_state", None)
            data = export(client_id) if export is not None else None
            if data is not None:
                rows.append((d.name, client_id, data))
        return rows

    def _load(self, client_id: str) -> str:
        """Bring ``client_id`` into memory (most recent), evicting the least recent beyond ``max_clients``;
        returns its action. Call with the lock held."""
        if client_id in self._clients:
            self._clients.move_to_end(client_id)
            return self._actions.get(client_id, "allow")
        self._clients[client_id] = False
        if client_id in self._blocked:
            self._blocked.discard(client_id)
            self._actions[client_id] = "block"
            self._clients[client_id] = True
        elif self.store is not None:
            try:
                self._read(self.store, client_id)
            except ExtractionStateError as exc:
                if not self.fail_closed:
                    self._clients.pop(client_id, None)
                    raise
                log.error("extraction state unreadable, client %r blocked until reset: %s", client_id, exc)
                self.unreadable[client_id] = str(exc)
                self._actions[client_id] = "block"
                self._clients[client_id] = True
        while len(self._clients) > self.max_clients:
            self._evict(next(iter(self._clients)))
        return self._actions.get(client_id, "allow")

    def _read(self, store: MonitorStore, client_id: str) -> None:
        data = store.get(ACTION_COMPONENT, client_id)
        if data is not None:
            try:
                action = json.loads(data)["action"]
                _check(action)
            except (ValueError, KeyError, TypeError, InvalidArgumentError):
                raise ExtractionStateError(f"{store.path}: component {ACTION_COMPONENT!r} id {client_id!r} is "
                                           "malformed") from None
            if action != "allow":
                self._actions[client_id] = action
        for d in self.detectors:
            load = getattr(d, "import_state", None)
            blob = store.get(d.name, client_id) if load is not None else None
            if load is None or blob is None:
                continue
            try:
                load(client_id, blob)
            except ExtractionStateError as exc:
                d.reset(client_id)
                raise ExtractionStateError(f"{store.path}: component {d.name!r} id {client_id!r}: {exc}") from None

    def _evict(self, client_id: str) -> None:
        dirty = self._clients.pop(client_id)
        if self.store is not None:
            if dirty:
                self.store.put_many(self._rows(client_id))
        elif self._actions.get(client_id) == "block":
            self._blocked.add(client_id)
        self._actions.pop(client_id, None)
        self.unreadable.pop(client_id, None)
        for d in self.detectors:
            d.reset(client_id)

    def _load_shared(self, store: MonitorStore) -> None:
        """Shared detector state (a group's union) back from the store; a malformed row stops the start-up."""
        for d in self.detectors:
            load = getattr(d, "import_shared", None)
            if load is None:
                continue
            for id_, blob in store.items(d.name):
                try:
                    load(id_, blob)
                except ExtractionStateError as exc:
                    raise ExtractionStateError(f"{store.path}: component {d.name!r} id {id_!r}: {exc}") from None
