"""`edgeshield demo`: the whole product, end to end, on the bundled digits model.

The demo is a list of stages sharing one context; each capability adds its stage. A stage returns a one-line
result for the progress display and records its figures in ``ctx.summary``. A stage that sees the product
misbehave (a tampered bundle accepted, accuracy lost) raises, so the demo doubles as a smoke test.

While a stage runs the display shows a spinner; a long stage also reports how far it is with
``ctx.step(done, total, note)``, which turns the spinner's line into a progress bar (``ctx.progress`` is the same
as a library progress callback, for passing to library functions that take one).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeshield._progress import ProgressCallback, Step
from edgeshield.errors import EdgeShieldError


class DemoFailure(EdgeShieldError):
    """The demo saw the product misbehave."""


@dataclass
class DemoContext:
    workdir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)  # extra rich tables a stage wants shown
    progress: ProgressCallback | None = None  # set by run_demo while a stage runs
    keep_files: bool = False  # --workdir given: the files a stage writes outlive the demo

    def step(self, done: int, total: int | None, note: str = "") -> None:
        """Tell the display how far the running stage is (``done`` of ``total`` steps; ``note``: what now)."""
        if self.progress is not None:
            self.progress(Step("stage", done, total, note=note))


@dataclass(frozen=True)
class Stage:
    title: str
    run: Callable[[DemoContext], str]


def _stages() -> list[Stage]:
    from edgeshield.demo import (
        _adversarial,
        _bundles,
        _extraction,
        _hardening,
        _hardware,
        _operations,
        _privacy,
        _server,
        _transport,
    )

    return [*_bundles.STAGES, *_adversarial.STAGES, *_server.STAGES, *_transport.STAGES, *_hardening.STAGES,
            *_extraction.STAGES, *_operations.STAGES, *_privacy.STAGES, *_hardware.STAGES]


@contextlib.contextmanager
def _stage_display(out: Console, title: str) -> Iterator[ProgressCallback]:
    """A spinner with the stage's title; a bar and a step counter once the stage reports a total."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    count = TextColumn("{task.fields[count]}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                  console=out, transient=True) as display:
        task = display.add_task(f"{title} …", total=None, count="")

        def show(step: Step) -> None:
            display.update(task, completed=step.done, total=step.total,
                           count="" if step.total is None else f"{step.done}/{step.total}",
                           description=f"{title}: {_what(step)} …" if _what(step) else f"{title} …")

        yield show


def _what(step: Step) -> str:
    """What a step says it is doing: its note, else the library task it belongs to (stages report as "stage")."""
    return step.note or ("" if step.task == "stage" else step.task)


def _folded(table: Table) -> Table:
    """Long ids and results wrap onto the next line instead of ending in an ellipsis."""
    for column in table.columns:
        column.overflow = "fold"
    return table


def run_demo(*, as_json: bool = False, workdir: str | None = None) -> dict[str, Any]:
    out = Console(stderr=as_json, highlight=False)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="edgeshield-demo-")
        root = Path(tmp)
    else:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(workdir=root, keep_files=tmp is None)
    rows: list[tuple[str, str, float]] = []
    try:
        stages = _stages()
        out.print(f"[bold]EdgeShield demo[/] — {len(stages)} stages, working in {root}")
        for n, stage in enumerate(stages, 1):
            t0 = time.perf_counter()
            with _stage_display(out, f"[{n}/{len(stages)}] {stage.title}") as ctx.progress:
                result = stage.run(ctx)
            ctx.progress = None
            dt = time.perf_counter() - t0
            rows.append((stage.title, result, dt))
            out.print(f"[green]✓[/] [{n}/{len(stages)}] {stage.title}: {result} [dim]({dt:.2f} s)[/]")
            for table in ctx.tables:
                out.print(_folded(table))
            ctx.tables.clear()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.summary["stages"] = [{"stage": t, "result": r, "seconds": round(s, 3)} for t, r, s in rows]
    if as_json:
        import json
        import sys

        sys.stdout.write(json.dumps(ctx.summary, indent=2, sort_keys=True) + "\n")
    else:
        table = Table(title="EdgeShield demo summary")
        table.add_column("stage")
        table.add_column("result")
        for title, result, _ in rows:
            table.add_row(title, result)
        out.print(_folded(table))
    return ctx.summary
