"""Running `edgeshield update …` through the real CLI entry point in a test: JSON answers and one-line refusals."""

from __future__ import annotations

import json
from typing import Any

from edgeshield.cli import main


def cli_json(capsys: Any, argv: list[str]) -> dict[str, Any]:
    """``edgeshield ARGV --json``: must exit 0; its JSON output."""
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def cli_fails(capsys: Any, argv: list[str], code: int, words: str) -> None:
    """``edgeshield ARGV`` must exit ``code`` with one stderr line containing ``words``."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edgeshield: error: ") and words in err, err
