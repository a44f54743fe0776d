"""`edgeshield pki …`: a device CA that issues client and server certificates with roles, and revokes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeshield import transport
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.keys import passphrase_from_env

app = typer.Typer(help="A device CA: issue client and server certificates with roles, revoke them.",
                  no_args_is_help=True)

DirArg = Annotated[Path, typer.Argument(help="CA directory.")]


def _show(certs: list[transport.CertInfo], title: str) -> None:
    table = Table(title=title)
    table.add_column("serial", overflow="fold")  # folded, never cut: it is what `revoke --serial` takes
    for col in ("name", "role", "kind", "not after (UTC)", "status"):
        table.add_column(col)
    for c in certs:
        table.add_row(c.serial_hex, c.name, c.role, c.kind, c.not_after.strftime("%Y-%m-%d %H:%M"), c.status())
    console.print(table)


@app.command("init")
def init(
    directory: DirArg,
    algorithm: Annotated[str, typer.Option("--algorithm", help="CA key: ecdsa-p256 or ed25519.")] = "ecdsa-p256",
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = "EdgeShield Root CA",
    days: Annotated[int, typer.Option("--days", help="CA validity in days.")] = 3650,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a CA in DIRECTORY: ca.key (0600), ca.crt, an empty crl.pem and index.json."""
    info = transport.init_ca(directory, algorithm=algorithm, name=name, days=days,
                             passphrase=passphrase_from_env(passphrase_env))
    if as_json:
        emit_json(info.to_dict())
        return
    console.print(f"CA {info.name!r} ({info.algorithm}) created in {directory}; serial {info.to_dict()['serial']}, "
                  f"valid until {info.not_after.isoformat()}")


@app.command("issue")
def issue(
    directory: DirArg,
    name: Annotated[str, typer.Option("--name", help="Device or user name (CN); writes issued/NAME.key and .crt.")],
    role: Annotated[str, typer.Option("--role", help="Role, e.g. admin, operator, auditor, client.")],
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
    server: Annotated[bool, typer.Option("--server", help="A TLS server certificate (needs --san).")] = False,
    san: Annotated[list[str] | None, typer.Option("--san", help="DNS name or IP address (repeatable).")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    key_passphrase_env: Annotated[
        str | None,
        typer.Option("--key-passphrase-env", metavar="VAR", help="Encrypt the new private key with the passphrase "
                     "in this environment variable."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a key and a certificate for NAME with ROLE, signed by the CA in DIRECTORY."""
    issued = transport.issue(
        directory, name=name, role=role, days=days, server=server, sans=tuple(san or ()),
        passphrase=passphrase_from_env(passphrase_env), key_passphrase=passphrase_from_env(key_passphrase_env),
    )
    if as_json:
        emit_json(issued.to_dict())
        return
    _show([issued.info], f"issued {issued.cert_path} and {issued.key_path}")


@app.command("revoke")
def revoke(
    directory: DirArg,
    serial: Annotated[str, typer.Option("--serial", help="Serial, decimal or hex with 0x.")],
    reason: Annotated[
        str | None, typer.Option("--reason", help=f"One of: {', '.join(transport.REVOCATION_REASONS)}.")
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a certificate and publish a new crl.pem; servers take it with reload_crl."""
    info = transport.revoke(directory, transport.parse_serial(serial), reason=reason,
                            passphrase=passphrase_from_env(passphrase_env))
    if as_json:
        emit_json(info.to_dict())
        return
    _show([info], f"revoked {info.serial_hex}; new CRL in {Path(directory) / 'crl.pem'}")


@app.command("crl")
def crl(
    directory: DirArg,
    days: Annotated[int, typer.Option("--days", help="Days until the CRL's nextUpdate.")] = transport.CRL_DAYS,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-sign crl.pem with fresh dates (do it well before nextUpdate, or servers refuse every client)."""
    info = transport.update_crl(directory, days=days, passphrase=passphrase_from_env(passphrase_env))
    if as_json:
        emit_json(info.to_dict())
        return
    console.print(f"CRL {info.number} published: {len(info.revoked)} revoked, next update by "
                  f"{info.next_update.isoformat()}")


@app.command("list")
def list_(directory: DirArg, as_json: JsonOpt = False) -> None:
    """List every certificate the CA in DIRECTORY issued, with its status."""
    certs = transport.list_certs(directory)
    if as_json:
        emit_json({"certificates": [c.to_dict() for c in certs]})
        return
    _show(certs, f"certificates issued by {directory}")
