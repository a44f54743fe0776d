"""Per-client query monitoring: detectors feed a response policy that picks one action per observation.

Actions, in increasing severity: ``allow`` < ``flag`` < ``throttle`` < ``degrade`` < ``block``. The server carries
them out: ``throttle`` → a stricter rate-limit role, ``degrade`` → the stronger output policy from
:meth:`ResponsePolicy.output_for`, ``block`` → refuse the client. ``on_alert`` hooks (audit log, metrics) are called
with ``(client_id, verdict)`` for every verdict other than ``allow``; a failing hook propagates, so that an audit
failure is never silent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction._harden import OutputPolicy

__all__ = ["ACTIONS", "Detector", "QueryMonitor", "ResponsePolicy", "Signal", "Verdict"]

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
    name: str

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray) -> Signal: ...

    def reset(self, client_id: str) -> None: ...


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
    """Feeds every detector each client batch and turns their alarms into a :class:`Verdict`."""

    def __init__(
        self,
        detectors: Sequence[Detector],
        response: ResponsePolicy | None = None,
        on_alert: Sequence[Callable[[str, Verdict], None]] = (),
    ) -> None:
        names = [d.name for d in detectors]
        if not detectors or len(set(names)) != len(names):
            raise InvalidArgumentError("a QueryMonitor needs at least one detector, each with a distinct name")
        self.detectors = list(detectors)
        self.response = response or ResponsePolicy()
        self.on_alert = list(on_alert)
        self._actions: dict[str, str] = {}

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray) -> Verdict:
        signals = [d.observe(client_id, x, predicted) for d in self.detectors]
        alarming = [s.name for s in signals if s.alarm]
        action = self.response.decide(alarming, self._actions.get(client_id, "allow"))
        self._actions[client_id] = action
        verdict = Verdict(action, tuple(alarming), {s.name: dict(s.stats) for s in signals})
        for hook in self.on_alert if action != "allow" else ():
            hook(client_id, verdict)
        return verdict

    def action(self, client_id: str) -> str:
        return self._actions.get(client_id, "allow")

    def reset(self, client_id: str) -> None:
        """Forget a client (e.g. after an operator cleared it)."""
        self._actions.pop(client_id, None)
        for detector in self.detectors:
            detector.reset(client_id)
