"""Tables that never cut what they show: key ids, serials, hashes and names are folded onto the next line, or kept
on one line, but never end in an ellipsis.

rich's default for a column is ``overflow="ellipsis"``: at 80 columns a 64-digit hash became
``e908a76777…``. Every table the CLI prints is built here (or passed through :func:`never_cut`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from rich.table import Table
from rich.text import Text

_R = TypeVar("_R")


def table(title: str, columns: Sequence[str], *, whole: Iterable[str] = ()) -> Table:
    """A table whose cells fold rather than being cut; ``whole`` columns (ids) stay on one line while the terminal
    allows (on a terminal too narrow even for them they fold too)."""
    keep = set(whole)
    t = Table(title=title)
    for name in columns:
        t.add_column(name, overflow="fold", no_wrap=name in keep)
    return t


def fields(title: str | None, rows: Iterable[tuple[str, str]]) -> Table:
    """A borderless two-column key/value table: at 80 columns a 64-digit hash fits on one line beside a label of
    up to 14 characters; on a narrower terminal it folds."""
    t = Table(title=title, show_header=False, box=None, padding=(0, 1), pad_edge=False, title_justify="left")
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    for key, value in rows:
        t.add_row(key, Text(value))  # Text: a value is shown as it is, never read as rich markup
    return t


def never_cut(renderable: _R) -> _R:
    """Make a table built elsewhere (the evaluation reports, the demo) fold instead of cutting; returns it."""
    if isinstance(renderable, Table):
        for column in renderable.columns:
            column.overflow = "fold"
    return renderable

