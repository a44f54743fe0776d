"""The test tree's own rules: pytest imports every test module by its basename (there are no packages under
tests/), so two modules with the same name collide on a clean checkout ("import file mismatch"), and a
``conftest.py`` in a directory that sorts before tests/bundles would shadow the top-level one that
``from conftest import KeySet`` means."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_module_basenames_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py" and "__pycache__" not in p.parts)
    assert not [n for n, c in names.items() if c > 1], "test modules sharing a basename: rename one"


def test_no_conftest_shadows_the_top_level_one() -> None:
    # `from conftest import ...` resolves to the first conftest pytest imported; tests/bundles and tests/cli rely
    # on the top-level one, so no directory sorting before them may have its own.
    importers = sorted({p.parent.name for p in TESTS.rglob("test_*.py") if "from conftest import" in p.read_text()})
    first = min(importers) if importers else "~"
    shadows = [p.parent.name for p in TESTS.glob("*/conftest.py") if p.parent.name < first]
    assert not shadows, f"{shadows} would shadow tests/conftest.py for `from conftest import` in {importers}"
