"""`edgeshield audit …`: verify, inspect and export tamper-evident audit logs; create the checkpoint key."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeshield import audit, keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.errors import InvalidArgumentError, OutputExistsError

app = typer.Typer(help="Verify, inspect and export tamper-evident audit logs.", no_args_is_help=True)

DbArg = Annotated[Path, typer.Argument(help="Audit log database (SQLite).")]


class ExportFormat(str, Enum):
    jsonl = "jsonl"


@app.command("verify")
def verify(
    db: DbArg,
    checkpoint_key: Annotated[
        Path | None,
        typer.Option("--checkpoint-key", help="The device's Ed25519 public key (PEM); checks every checkpoint "
                     "signature and refuses checkpoints signed by any other key."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the chain and every checkpoint; exit 0 only if intact, else 3 naming the first bad entry."""
    public_key = audit.load_verify_key(checkpoint_key) if checkpoint_key is not None else None
    report = audit.AuditLog(db, readonly=True).verify(public_key=public_key)
    if as_json:
        emit_json(report.to_dict())
        return
    console.print(f"audit log intact: {report.entries} entries, {report.checkpoints} checkpoints", markup=False)
    if report.latest_checkpoint is not None:
        console.print(f"  latest checkpoint: tree size {report.latest_checkpoint} "
                      f"({report.unanchored} entries after it)", markup=False)
    console.print(f"  root: {report.root.hex()}", markup=False)
    if report.signatures_checked:
        console.print(f"  checkpoint signatures verified with key {report.key_id}", markup=False)
    else:
        console.print("  checkpoint signatures NOT checked (give --checkpoint-key)", markup=False)


@app.command("show")
def show(
    db: DbArg,
    last: Annotated[int, typer.Option("--last", min=0, help="How many of the newest entries to show.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show the newest entries as stored (run `audit verify` to check them)."""
    log = audit.AuditLog(db, readonly=True)
    entries = log.tail(last)
    latest = log.latest_checkpoint()
    if as_json:
        emit_json({"size": len(log), "entries": [e.to_dict() for e in entries],
                   "latest_checkpoint": latest.to_dict() if latest else None})
        return
    table = Table(title=f"{db}: last {len(entries)} of {len(log)} entries")
    for col in ("seq", "time (UTC)", "kind", "actor", "data", "hash"):
        table.add_column(col, overflow="fold")
    for e in entries:
        data = json.dumps(e.data, sort_keys=True, separators=(",", ":"))
        table.add_row(str(e.seq), e.ts, e.kind, e.actor, data if len(data) <= 80 else data[:77] + "...",
                      e.entry_hash.hex()[:16])
    console.print(table)
    if latest is not None:
        console.print(f"latest checkpoint: tree size {latest.tree_size}, key {latest.key_id or 'unsigned'}",
                      markup=False)


@app.command("export")
def export(
    db: DbArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the export.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Export format.")] = ExportFormat.jsonl,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export every entry and checkpoint as stored, one JSON object per line (written atomically)."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; use --force to overwrite it")
    if out.resolve() == db.resolve():
        raise InvalidArgumentError("--out must not be the audit log itself")
    n_entries, n_cps = audit.AuditLog(db, readonly=True).export_jsonl(out, overwrite=force)
    if as_json:
        emit_json({"out": str(out), "format": fmt.value, "entries": n_entries, "checkpoints": n_cps})
    else:
        console.print(f"exported {n_entries} entries and {n_cps} checkpoints to {out}", markup=False)


@app.command("keygen")
def keygen(
    key: Annotated[Path, typer.Argument(help="Private key file to create (0600); the public key goes beside it.")],
    pub: Annotated[Path | None, typer.Option("--pub", help="Public key file (default: KEY with suffix .pub).")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the device's Ed25519 checkpoint-signing key pair."""
    pub_path = pub if pub is not None else key.with_suffix(".pub")
    private = audit.generate_signing_key(key, public_path=pub_path, passphrase=keys.passphrase_from_env(passphrase_env))
    kid = audit.key_id(private.public_key())
    if as_json:
        emit_json({"private_key": str(key), "public_key": str(pub_path), "key_id": kid})
    else:
        console.print(f"audit signing key {kid}: {key} (private), {pub_path} (public)", markup=False)
