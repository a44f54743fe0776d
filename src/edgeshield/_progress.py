"""Progress of long operations, for whoever wants to show it: the library reports, it never prints.

A long-running function takes an optional ``progress`` callback and calls it with a :class:`Step` as work
advances; with no callback nothing happens (``report`` is a no-op). The CLI renders steps as rich progress bars on
stderr (``edgeshield.cli._progress``), so ``--json`` output on stdout stays one clean document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` units of ``task`` are finished.

    ``task`` names what advances and stays the same from call to call ("ART attacks", "encrypt"); ``total`` is
    None while unknown; ``unit`` is "B" for bytes, "" for counted steps; ``note`` says what is being done now
    ("pgd"). A task is complete when ``done == total``.
    """

    task: str
    done: int
    total: int | None = None
    unit: str = ""
    note: str = ""


ProgressCallback = Callable[[Step], None]


def report(progress: ProgressCallback | None, task: str, done: int, total: int | None = None, *, unit: str = "",
           note: str = "") -> None:
    """Call ``progress`` with one step, if there is a callback."""
    if progress is not None:
        progress(Step(task, done, total, unit, note))
