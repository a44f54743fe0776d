"""`edgeshield keys …`: create and list owner and device keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from edgeshield import keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.cli._tables import table

app = typer.Typer(help="Create and list owner signing keys and device keys.", no_args_is_help=True)

DirArg = Annotated[Path, typer.Argument(help="Key directory.")]


def _show(infos: list[keys.KeyInfo], as_json: bool, title: str) -> None:
    if as_json:
        emit_json({"keys": [k.to_dict() for k in infos]})
        return
    t = table(title, ("name", "kind", "key id", "files"), whole=("kind", "key id"))
    for k in infos:
        files = k.public_path.name
        if k.private_path is not None:  # stacked under the public key's: a long name folds once, not twice
            files += f"\n{k.private_path.name}{' (encrypted)' if k.encrypted else ''}"
        t.add_row(*(Text(cell) for cell in (k.name, k.kind, k.key_id, files)))
    console.print(t)


@app.command("init")
def init(directory: DirArg, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False) -> None:
    """Create owner.key/owner.pub (ECDSA P-256) and device.key/device.pub (X25519) in DIRECTORY."""
    infos = keys.init_keys(directory, passphrase=keys.passphrase_from_env(passphrase_env))
    _show(infos, as_json, f"keys created in {directory}")


@app.command("device")
def device(
    directory: DirArg,
    name: Annotated[str, typer.Option("--name", help="Device name; writes NAME.key and NAME.pub.")],
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a device key-agreement pair (X25519) to DIRECTORY."""
    info = keys.add_device(directory, name, passphrase=keys.passphrase_from_env(passphrase_env))
    _show([info], as_json, f"device key added to {directory}")


@app.command("list")
def list_(directory: DirArg, as_json: JsonOpt = False) -> None:
    """List the public keys in DIRECTORY with their key ids."""
    _show(keys.list_keys(directory), as_json, f"keys in {directory}")
