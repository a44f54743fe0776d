"""`edgeshield pki …`: a device CA that issues client and server certificates with roles, and revokes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from edgeshield import transport
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.cli._tables import fields, table
from edgeshield.errors import InvalidArgumentError
from edgeshield.keys import passphrase_from_env

app = typer.Typer(help="A device CA: issue client and server certificates with roles, revoke them.",
                  no_args_is_help=True)

DirArg = Annotated[Path, typer.Argument(help="CA directory.")]


def _show(certs: list[transport.CertInfo], title: str) -> None:
    """Two lines per certificate: what it is, then its serial whole on a line of its own (what `revoke --serial`
    takes; 42 characters do not fit beside five other columns at 80)."""
    t = table(title, ("name", "role (kind), status, expiry / serial"))
    # A long name folds before the serial has to: leave the second column the serial's 42 characters (+ borders).
    t.columns[0].max_width = max(12, console.width - 7 - 42)
    for c in certs:
        t.add_row(Text(c.name, style="bold"),
                  Text(f"{c.role} ({c.kind}), {c.status()}, not after {c.not_after.strftime('%Y-%m-%d %H:%M')} UTC"))
        t.add_row(Text("  serial", style="dim"), Text(c.serial_hex), end_section=c is not certs[-1])
    console.print(t)


def _show_one(info: transport.CertInfo, title: str) -> None:
    """Everything about one certificate, one field a line (the fingerprint's 64 digits fit at 80 columns)."""
    rows = [("serial", info.serial_hex), ("name", info.name), ("role", info.role), ("kind", info.kind),
            ("not before", f"{info.not_before.strftime('%Y-%m-%d %H:%M')} UTC"),
            ("not after", f"{info.not_after.strftime('%Y-%m-%d %H:%M')} UTC")]
    if info.sans:
        rows.append(("SANs", "\n".join(info.sans)))
    rows += [("fingerprint", info.fingerprint_sha256), ("status", info.status())]
    if info.revoked_at is not None:
        rows.append(("revoked", (f"{info.revoked_at.strftime('%Y-%m-%d %H:%M')} UTC"
                                 f"{f' ({info.revocation_reason})' if info.revocation_reason else ''}")))
    console.print(fields(title, rows))


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
    _show_one(issued.info, f"issued {issued.cert_path} and {issued.key_path}")


@app.command("revoke")
def revoke(
    directory: DirArg,
    serial: Annotated[str | None, typer.Option("--serial", help="Serial, decimal or hex with 0x.")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Name of the certificate to revoke (its one unexpired certificate).")
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help=f"One of: {', '.join(transport.REVOCATION_REASONS)}.")
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a certificate, by --serial or by --name, and publish a new crl.pem; servers reload it."""
    if (serial is None) == (name is None):
        raise InvalidArgumentError("give exactly one of --serial and --name")
    info = transport.revoke(directory, None if serial is None else transport.parse_serial(serial), name=name,
                            reason=reason, passphrase=passphrase_from_env(passphrase_env))
    if as_json:
        emit_json(info.to_dict())
        return
    _show_one(info, f"revoked {info.name}; new CRL in {Path(directory) / 'crl.pem'}")


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
