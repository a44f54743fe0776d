"""`--help` that never cuts a word: Typer's rich help panels, with option names kept whole and long words folded.

Typer builds each help panel as a rich table whose columns all default to ``overflow="ellipsis"`` and may all
shrink. At 80 columns rich's width collapse shrinks the widest columns together, so a long option such as
``--served-watermark-evidence`` ended up as ``--served-watermark-e…``, and a help text naming a long option lost
its tail the same way. Here, just before a panel is printed:

* the columns of an options panel that hold the required marker and the option names become ``no_wrap``, so rich
  takes the room it needs from the metavar and help columns, which wrap (unless the terminal is too narrow to
  leave those a readable width: then all columns share the room);
* every column, and every text inside a help cell (Typer groups them with ``rich.columns.Columns``, whose own
  grid would cut them), gets ``overflow="fold"``: a word longer than its column, or a name on a terminal too
  narrow even for it, continues on the next line instead of being cut.

Typer has no setting for any of this, so its two panel printers are wrapped once, when the CLI is imported; the
help test at 80 columns (tests/cli/test_narrow.py) fails if a Typer upgrade changes what they print.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.columns import Columns
from rich.console import Console, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_WRAPPING_COLUMNS = 2  # the last two columns of an options panel, metavar and help text, wrap; the others hold names
_MIN_HELP = 30  # columns left for metavar and help text before names are allowed to fold
_INSTALLED: set[Callable[..., None]] = set()  # our printers, so that install() wraps Typer's only once


def _width(cell: RenderableType) -> int:
    return cell.cell_len if isinstance(cell, Text) else 0


def _fold(renderable: RenderableType) -> None:
    if isinstance(renderable, Text):
        renderable.overflow = "fold"
    elif isinstance(renderable, Columns):
        for item in renderable.renderables:
            _fold(item)


class _NeverCut:
    """A console stand-in that fixes a help panel's table just before the panel is printed."""

    def __init__(self, console: Console, *, keep_names_whole: bool) -> None:
        self._console = console
        self._keep_names_whole = keep_names_whole

    def print(self, renderable: RenderableType, *args: Any, **kwargs: Any) -> None:
        table = renderable.renderable if isinstance(renderable, Panel) else None
        if isinstance(table, Table):
            names = table.columns[:-_WRAPPING_COLUMNS]
            # Names stay on one line while the metavar and help columns keep a readable width beside them; on a
            # terminal narrower than that every column shares the room (and a name folds) rather than the help vanish.
            needed = sum(max((_width(c) for c in col.cells), default=0) + 2 for col in names) + _MIN_HELP + 4
            whole = self._keep_names_whole and needed <= self._console.width
            for column in table.columns:
                column.overflow = "fold"
                if whole and column in names:
                    column.no_wrap = True
                for cell in column.cells:
                    _fold(cell)
        self._console.print(renderable, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # everything else is the real console's
        return getattr(self._console, name)


def install() -> None:
    """Wrap Typer's options-panel and commands-panel printers (idempotent)."""
    from typer import rich_utils

    for name, keep_names_whole in (("_print_options_panel", True), ("_print_commands_panel", False)):
        original = getattr(rich_utils, name)
        if original in _INSTALLED:
            continue

        def printer(*, console: Console, _original: Callable[..., None] = original, _keep: bool = keep_names_whole,
                    **kwargs: Any) -> None:
            _original(console=_NeverCut(console, keep_names_whole=_keep), **kwargs)

        _INSTALLED.add(printer)
        setattr(rich_utils, name, printer)
