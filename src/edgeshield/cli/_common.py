"""What every CLI command shares: consoles, JSON output, option types."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from edgeshield.errors import InvalidArgumentError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON object instead of text.")]
PassphraseEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env",
        metavar="VAR",
        help="Name of an environment variable holding the private key's passphrase (never pass it as an argument).",
    ),
]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_meta(items: list[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--meta expects key=value, got {item!r}")
        if key in meta:
            raise InvalidArgumentError(f"--meta key {key!r} given twice")
        meta[key] = value
    return meta
