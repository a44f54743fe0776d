"""`edgeshield audit …`: verify, inspect and export tamper-evident audit logs; keys; publish to and run a witness."""

from __future__ import annotations

import json
import signal
import sys
import threading
import tomllib
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from edgeshield import audit, keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.cli._tables import table
from edgeshield.errors import InvalidArgumentError, OutputExistsError

app = typer.Typer(help="Verify, inspect and export tamper-evident audit logs; publish them to a witness.",
                  no_args_is_help=True)
witness_app = typer.Typer(help="Run a witness: a service off the device that cosigns consistent checkpoints "
                               "(C2SP tlog-witness).", no_args_is_help=True)
app.add_typer(witness_app, name="witness")

DbArg = Annotated[Path, typer.Argument(help="Audit log database (SQLite).")]
CheckpointKeyOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint-key", help="The device's Ed25519 public key (PEM); checks every checkpoint "
                 "signature and refuses checkpoints signed by any other key."),
]
WitnessKeyOpt = Annotated[
    list[str] | None,
    typer.Option("--witness-key", metavar="VKEY", help="A witness's cosignature verifier key (C2SP vkey), or a file "
                 "holding one; repeatable. Without it, cosignatures are not checked."),
]
CaOpt = Annotated[Path | None, typer.Option("--ca", help="CA certificate (or `pki` directory) the witness's TLS "
                                                         "certificate must chain to.")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="Client certificate to present to the witness.")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="Private key of --cert.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, max=300.0, help="Seconds to wait for the witness.")]


class ExportFormat(str, Enum):  # noqa: UP042 - a StrEnum would change what str() and format() of a member give
    jsonl = "jsonl"


def _witness_keys(values: list[str] | None) -> list[audit.Vkey]:
    out = []
    for value in values or []:
        path = Path(value)
        out.append(audit.parse_vkey(path.read_text(encoding="utf-8") if path.is_file() else value))
    return out


def _witness_client(url: str, ca: Path | None, cert: Path | None, key: Path | None, passphrase_env: str | None,
                    timeout: float) -> audit.WitnessClient:
    if ca is None:
        raise InvalidArgumentError("--witness needs --ca: the CA the witness's TLS certificate chains to")
    ctx = audit.witness_client_context(ca, cert, key, passphrase=keys.passphrase_from_env(passphrase_env))
    return audit.WitnessClient(url, ctx, timeout=timeout)


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}..{last}"


def _report_lines(report: audit.VerifyReport) -> list[str]:
    n, k = report.entries, report.checkpoints
    if n and not report.uncovered and k and report.signatures_checked:
        head = (f"audit log intact: {n} entries, every one covered by a checkpoint; {k} checkpoint signatures "
                f"verified with key {report.key_id}")
    else:
        head = f"audit log verified: {n} entries, {k} checkpoints (hash chain and checkpoint roots recomputed)"
    lines = [head]
    if report.latest_checkpoint is not None:
        lines.append(f"  latest checkpoint: tree size {report.latest_checkpoint}")
    if report.uncovered:
        lines.append(f"  {report.uncovered} of {n} entries are NOT covered by any checkpoint "
                     f"({_span(report.covered, n - 1)}): protected by the hash chain only, which anyone holding the "
                     "file can recompute (--require-checkpoint fails on this)")
    elif n:
        lines.append("  entries not covered by a checkpoint: 0")
    if k == 0:
        lines.append("  no checkpoints, so no checkpoint signatures to verify: nothing in this log is signed")
    elif not report.signatures_checked:
        lines.append("  checkpoint signatures NOT checked (give --checkpoint-key)")
    elif report.uncovered or not n:
        lines.append(f"  {k} checkpoint signatures verified with key {report.key_id}")
    if report.schema == 1:
        lines.append("  schema 1 log: its checkpoints are not chained, so removing one cannot be detected; open it "
                     "for writing with this version (e.g. start the server) to migrate it")
    elif report.legacy_checkpoints:
        lines.append(f"  {report.legacy_checkpoints} checkpoints from before the schema migration are not chained "
                     "(the migration's checkpoint covers their entries)")
    lines.append(f"  root: {report.root.hex()}")
    return lines


@app.command("verify")
def verify(
    db: DbArg,
    checkpoint_key: CheckpointKeyOpt = None,
    require_checkpoint: Annotated[
        bool, typer.Option("--require-checkpoint", help="Fail (exit 3) when any entry is covered by no checkpoint.")
    ] = False,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="A checkpoint note (as `audit publish --out` writes it): prove the log "
                                       "extends it. Needs --checkpoint-key."),
    ] = None,
    witness: Annotated[
        str | None, typer.Option("--witness", metavar="URL", help="Fetch the witness's view of this log and prove "
                                                                  "the log extends it. Needs --checkpoint-key, --ca.")
    ] = None,
    from_witnessed: Annotated[
        Path | None,
        typer.Option("--from-witnessed", metavar="NOTE",
                     help="Verify only the entries after this witness-cosigned checkpoint note (as `audit publish "
                          "--out` writes it), from the compact range stored there: time proportional to the new "
                          "entries. Needs --checkpoint-key and --witness-key."),
    ] = None,
    witness_key: WitnessKeyOpt = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    passphrase_env: PassphraseEnvOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the chain and every checkpoint; say how many entries no checkpoint covers; exit 3 on tampering."""
    public_key = audit.load_verify_key(checkpoint_key) if checkpoint_key is not None else None
    log = audit.AuditLog(db, readonly=True)
    if from_witnessed is not None:
        if against is not None or witness is not None:
            raise InvalidArgumentError("give --from-witnessed alone, not with --against or --witness")
        if public_key is None or not witness_key:
            raise InvalidArgumentError("--from-witnessed needs --checkpoint-key (the device key) and --witness-key "
                                       "(the witness whose cosignature makes the starting point trustworthy)")
        from edgeshield._io import check_readable_file

        note = check_readable_file(from_witnessed, what="checkpoint note").read_bytes()
        result = audit.verify_from_witnessed(log, note, public_key=public_key, witness_keys=_witness_keys(witness_key),
                                             require_checkpoint=require_checkpoint)
        if as_json:
            emit_json({**result.to_dict(), "from_witnessed": str(from_witnessed)})
            return
        for line in _report_lines(result.verified):
            console.print(line, markup=False)
        console.print(f"  incremental: entries {result.tree_size}..{result.verified.entries - 1} checked from the "
                      f"compact range at the witnessed checkpoint (tree size {result.tree_size}); the entries "
                      "before it are committed by its root, not re-read", markup=False)
        for name, ts in zip(result.cosigned_by, result.cosigned_at, strict=True):
            when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            console.print(f"  starting checkpoint cosigned by witness {name} at {when}", markup=False)
        return
    if against is None and witness is None:
        report = log.verify(public_key=public_key, require_checkpoint=require_checkpoint)
        if as_json:
            emit_json(report.to_dict())
        else:
            for line in _report_lines(report):
                console.print(line, markup=False)
        return
    if against is not None and witness is not None:
        raise InvalidArgumentError("give --against or --witness, not both")
    if public_key is None:
        raise InvalidArgumentError("--against and --witness need --checkpoint-key: the device key the witnessed "
                                   "checkpoint must be signed with")
    if against is not None:
        from edgeshield._io import check_readable_file

        note = check_readable_file(against, what="checkpoint note").read_bytes()
        source = str(against)
    elif witness is not None:
        client = _witness_client(witness, ca, cert, key, passphrase_env, timeout)
        fetched = client.checkpoint(audit.log_vkey(public_key).name)
        if fetched is None:
            raise audit.WitnessRefusedError(404, f"the witness at {witness} has cosigned no checkpoint of this log")
        note, source = fetched.encode(), witness
    else:  # not reached: without either flag the plain verification above has run and returned
        raise InvalidArgumentError("give --against or --witness")
    result = audit.verify_against(log, note, public_key=public_key, witness_keys=_witness_keys(witness_key),
                                  require_checkpoint=require_checkpoint)
    if as_json:
        emit_json({**result.to_dict(), "against": source})
        return
    for line in _report_lines(result.verified):
        console.print(line, markup=False)
    console.print(f"  extends the witnessed checkpoint at tree size {result.tree_size} ({source}), proven by a "
                  "consistency proof", markup=False)
    if result.witness_checked:
        for name, ts in zip(result.cosigned_by, result.cosigned_at, strict=True):
            when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            console.print(f"  cosigned by witness {name} at {when}", markup=False)
    else:
        console.print("  witness cosignature NOT checked (give --witness-key)", markup=False)


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
    # one cell per entry, stacked: time, kind and actor; the data in full; the whole 64-digit chain hash
    shown = table(f"{db}: last {len(entries)} of {len(log)} entries", ("seq", "entry"), whole=("seq",))
    for e in entries:
        data = json.dumps(e.data, sort_keys=True, separators=(",", ":"))
        shown.add_row(str(e.seq), Text(f"{e.ts}  {e.kind}  {e.actor}\n{data}\nhash {e.entry_hash.hex()}"))
    console.print(shown)
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
    """Create the device's Ed25519 checkpoint-signing key pair (and print the log's vkey for a witness)."""
    pub_path = pub if pub is not None else key.with_suffix(".pub")
    private = audit.generate_signing_key(key, public_path=pub_path, passphrase=keys.passphrase_from_env(passphrase_env))
    kid = audit.key_id(private.public_key())
    vkey = str(audit.log_vkey(private.public_key()))
    if as_json:
        emit_json({"private_key": str(key), "public_key": str(pub_path), "key_id": kid, "vkey": vkey})
    else:
        console.print(f"audit signing key {kid}: {key} (private), {pub_path} (public)", markup=False)
        console.print(f"log vkey (for a witness's --log): {vkey}", markup=False, soft_wrap=True)


@app.command("vkey")
def vkey(
    pub: Annotated[Path, typer.Argument(help="The device's checkpoint public key (audit.pub).")],
    as_json: JsonOpt = False,
) -> None:
    """Print the log's C2SP verifier key and origin: what a witness is configured with (`--log`)."""
    v = audit.log_vkey(audit.load_verify_key(pub))
    if as_json:
        emit_json({"origin": v.name, "vkey": str(v)})
    else:
        sys.stdout.write(f"{v}\n")


@app.command("publish")
def publish(
    db: DbArg,
    witness: Annotated[str, typer.Option("--witness", metavar="URL", help="The witness (https://host:port).")],
    checkpoint_key: Annotated[Path, typer.Option("--checkpoint-key", help="The device's checkpoint public key.")],
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    passphrase_env: PassphraseEnvOpt = None,
    witness_key: WitnessKeyOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the cosigned checkpoint note here "
                                                           "(for `audit verify --against`).")] = None,
    old: Annotated[int, typer.Option("--old", min=0, help="Tree size last published (0: ask the witness).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Submit the log's newest checkpoint to a witness with a consistency proof; keep its cosigned note."""
    from edgeshield._io import atomic_write_bytes

    if out is not None and out.exists() and not force:
        raise OutputExistsError(f"{out} exists; use --force to overwrite it")
    client = _witness_client(witness, ca, cert, key, passphrase_env, timeout)
    log = audit.AuditLog(db, readonly=True)
    result = audit.publish(log, client, public_key=audit.load_verify_key(checkpoint_key),
                           witness_keys=_witness_keys(witness_key), old_size=old)
    if out is not None:
        atomic_write_bytes(out, result.note.encode(), overwrite=force)
    if as_json:
        emit_json({**result.to_dict(), "out": str(out) if out else None})
        return
    names = ", ".join(s.name for s in result.cosignatures)
    console.print(f"checkpoint at tree size {result.checkpoint.tree_size} cosigned by {names} (the witness held "
                  f"{result.witness_size})", markup=False)
    if not result.verified_witnesses:
        console.print("  cosignature NOT checked (give --witness-key)", markup=False)
    if out is not None:
        console.print(f"  cosigned note written to {out}", markup=False)
    else:
        sys.stdout.write(result.note)


# --- the witness ----------------------------------------------------------------------------------------------------
@witness_app.command("keygen")
def witness_keygen(
    key: Annotated[Path, typer.Argument(help="Witness private key to create (0600); KEY.pub and KEY.vkey beside it.")],
    name: Annotated[str, typer.Option("--name", help="The witness's name, e.g. witness.example.com/w1.")],
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a witness's Ed25519 key; its cosignature vkey is printed and written to KEY.vkey."""
    from edgeshield._io import atomic_write_bytes

    audit.note.check_key_name(name)
    vkey_path = key.with_suffix(".vkey")
    if vkey_path.exists():
        raise OutputExistsError(f"key already exists, refusing to overwrite: {vkey_path}")
    private = audit.generate_signing_key(key, passphrase=keys.passphrase_from_env(passphrase_env))
    v = audit.note.make_vkey(name, private.public_key(), audit.note.SIG_COSIGNATURE_V1)
    atomic_write_bytes(vkey_path, f"{v}\n".encode(), overwrite=False)
    if as_json:
        emit_json({"private_key": str(key), "vkey_file": str(vkey_path), "vkey": str(v), "name": name})
    else:
        console.print(f"witness key {key} (private), {vkey_path}:", markup=False)
        sys.stdout.write(f"{v}\n")


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    from edgeshield._io import check_readable_file

    try:
        config = tomllib.loads(check_readable_file(path, what="witness config").read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{path} is not valid TOML: {exc}") from exc
    known = {"name", "signing_key", "db", "tls_cert", "tls_key", "client_ca", "host", "port", "timeout",
             "max_connections", "log"}
    unknown = set(config) - known
    if unknown:
        raise InvalidArgumentError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    base = path.parent
    for k in ("signing_key", "db", "tls_cert", "tls_key", "client_ca"):
        if isinstance(config.get(k), str):
            config[k] = str(base / config[k])
    return config


def _logs(config_logs: object, flags: list[str] | None) -> dict[str, list[audit.Vkey]]:
    logs: dict[str, list[audit.Vkey]] = {}
    entries: list[tuple[str | None, str]] = [(None, v) for v in flags or []]
    if not isinstance(config_logs, list | type(None)):
        raise InvalidArgumentError("config 'log' must be a list of tables: [[log]] vkey = \"...\"")
    for item in config_logs or []:
        if not isinstance(item, dict) or not isinstance(item.get("vkey"), str):
            raise InvalidArgumentError("each [[log]] in the config needs a vkey (and optionally an origin)")
        entries.append((item.get("origin"), item["vkey"]))
    for origin, text in entries:
        v = audit.parse_vkey(text)
        logs.setdefault(origin or v.name, []).append(v)
    if not logs:
        raise InvalidArgumentError("the witness needs at least one log to witness (--log VKEY, or [[log]] in --config)")
    return logs


@witness_app.command("serve")
def witness_serve(
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with any of the options below "
                                                                 "(and [[log]] tables: origin, vkey).")] = None,
    signing_key: Annotated[Path | None, typer.Option("--signing-key", help="Witness key (`audit witness keygen`).")]
    = None,
    name: Annotated[str | None, typer.Option("--name", help="Witness name (default: from SIGNING_KEY.vkey).")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="The witness's state (SQLite, created 0600).")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="The witness's TLS server certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its private key.")] = None,
    client_ca: Annotated[Path | None, typer.Option("--client-ca", help="Require client certificates from this CA "
                                                                       "(a `pki` directory: CRL checked too).")] = None,
    log: Annotated[list[str] | None, typer.Option("--log", metavar="VKEY", help="A log to witness, by its vkey "
                                                                                "(`audit vkey`); repeatable.")] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="0 picks a free port.")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the C2SP tlog-witness API over TLS 1.3 until SIGINT/SIGTERM."""
    cfg = _load_config(config)

    def pick(flag: Any, key: str, default: Any = None) -> Any:
        return flag if flag is not None else cfg.get(key, default)

    key_path = pick(signing_key, "signing_key")
    db_path, cert_path, tls_key_path = pick(db, "db"), pick(tls_cert, "tls_cert"), pick(tls_key, "tls_key")
    for value, flag in ((key_path, "--signing-key"), (db_path, "--db"), (cert_path, "--tls-cert"),
                        (tls_key_path, "--tls-key")):
        if value is None:
            raise InvalidArgumentError(f"the witness needs {flag} (or its key in --config)")
    passphrase = keys.passphrase_from_env(passphrase_env)
    private = audit.load_signing_key(key_path, passphrase)
    witness_name = pick(name, "name")
    if witness_name is None:
        vkey_file = Path(key_path).with_suffix(".vkey")
        if not vkey_file.is_file():
            raise InvalidArgumentError(f"give --name (no {vkey_file} to read it from)")
        witness_name = audit.parse_vkey(vkey_file.read_text(encoding="utf-8")).name
    w = audit.Witness(db_path, private, witness_name, _logs(cfg.get("log"), log))
    ctx = audit.witness_server_context(cert_path, tls_key_path, client_ca=pick(client_ca, "client_ca"),
                                       passphrase=passphrase)
    server = audit.WitnessServer(w, (pick(host, "host", "127.0.0.1"), int(pick(port, "port", 8444))), ctx,
                                 timeout=float(cfg.get("timeout", 10.0)),
                                 max_connections=int(cfg.get("max_connections", 64)))
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    audit.serve_in_thread(server)
    info = {"event": "witness.listening", "url": server.url, "name": witness_name, "vkey": str(w.vkey),
            "logs": sorted(w.logs)}
    sys.stdout.write((json.dumps(info) if as_json else f"witness {witness_name} listening on {server.url}; vkey "
                      f"{w.vkey}") + "\n")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    w.close()
