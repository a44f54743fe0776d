"""Render the library's progress steps (``edgeshield._progress``) as rich progress bars on stderr.

One bar per task, in the order the tasks first report; bytes are shown as sizes and a transfer rate, counted steps
as ``done/total``, a task of unknown length as a pulsing bar. The bars go to stderr and vanish when the operation
ends, so stdout (``--json`` included) carries only the result. Nothing is drawn when stderr is not a terminal: a
log file gets no control sequences.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from edgeshield._progress import ProgressCallback, Step


class _Amount(ProgressColumn):
    """``12.1/40.0 MB 310 MB/s`` for bytes, ``3/5`` for steps."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed, self._count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        if task.fields.get("unit") == "B":
            return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
        return self._count.render(task)


class ProgressBars:
    """A progress callback that draws what it is told. Use it through :func:`progress_bars`."""

    def __init__(self, progress: Progress, *, refresh_every: float | None) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._refresh_every = refresh_every
        self._last_refresh = 0.0

    def __call__(self, step: Step) -> None:
        description = step.task + (f": {step.note}" if step.note else "")
        task = self._tasks.get(step.task)
        if task is None:
            task = self._tasks[step.task] = self._progress.add_task(description, total=step.total, unit=step.unit)
        self._progress.update(task, completed=step.done, total=step.total, description=description)
        if self._refresh_every is not None:  # no refresh thread: draw here, at most this often (and at the end)
            now = time.monotonic()
            if now - self._last_refresh >= self._refresh_every or step.done == step.total:
                self._last_refresh = now
                self._progress.refresh()


def _ignore(step: Step) -> None:
    pass


@contextlib.contextmanager
def progress_bars(console: Console | None = None, *, background: bool = True) -> Iterator[ProgressCallback]:
    """A callback that draws bars on ``console`` (default: the CLI's stderr console) while the block runs.

    ``background=False`` draws only inside the callback, never from a refresh thread: a benchmark that reports
    between its measurements then knows that nothing draws while it measures.
    """
    if console is None:
        from edgeshield.cli._common import err_console

        console = err_console
    if not console.is_terminal:
        yield _ignore
        return
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Amount(), TimeElapsedColumn(),
        console=console, transient=True, auto_refresh=background,
    )
    with progress:
        yield ProgressBars(progress, refresh_every=None if background else 0.1)
