"""Fixtures: a freshly built deployment per test (cheap), and one running server per module where needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import Built, build


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return build(tmp_path / "device")
