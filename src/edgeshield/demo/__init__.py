"""`edgeshield demo`: the whole product, end to end, on the bundled digits model.

The demo is a list of stages sharing one context; each capability adds its stage. A stage returns a one-line
result for the progress display and records its figures in ``ctx.summary``. A stage that sees the product
misbehave (a tampered bundle accepted, accuracy lost) raises, so the demo doubles as a smoke test.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeshield.errors import EdgeShieldError


class DemoFailure(EdgeShieldError):
    """The demo saw the product misbehave."""


@dataclass
class DemoContext:
    workdir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    tables: list[Any] = field(default_factory=list)  # extra rich tables a stage wants shown


@dataclass(frozen=True)
class Stage:
    title: str
    run: Callable[[DemoContext], str]


def _stages() -> list[Stage]:
    from edgeshield.demo import _adversarial, _bundles, _extraction, _server

    return [*_bundles.STAGES, *_adversarial.STAGES, *_server.STAGES, *_extraction.STAGES]


def run_demo(*, as_json: bool = False, workdir: str | None = None) -> dict[str, Any]:
    out = Console(stderr=as_json, highlight=False)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="edgeshield-demo-")
        root = Path(tmp)
    else:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(workdir=root)
    rows: list[tuple[str, str, float]] = []
    try:
        stages = _stages()
        out.print(f"[bold]EdgeShield demo[/] — {len(stages)} stages, working in {root}")
        for n, stage in enumerate(stages, 1):
            t0 = time.perf_counter()
            with out.status(f"[{n}/{len(stages)}] {stage.title} …"):
                result = stage.run(ctx)
            dt = time.perf_counter() - t0
            rows.append((stage.title, result, dt))
            out.print(f"[green]✓[/] [{n}/{len(stages)}] {stage.title}: {result} [dim]({dt:.2f} s)[/]")
            for table in ctx.tables:
                out.print(table)
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
        out.print(table)
    return ctx.summary
