"""`edgeshield update …`: the owner's TUF repository (`repo init|publish|timestamp`) and the device's A/B updater
(`init|pull|install|commit|rollback|status`)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeshield import keys, updates
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, requires

app = typer.Typer(help="Rollback-proof, atomic model updates: a TUF repository (owner) and A/B slots with a version "
                       "floor (device).", no_args_is_help=True)
repo_app = typer.Typer(help="The owner's update repository: TUF metadata and targets as plain files.",
                       no_args_is_help=True)
app.add_typer(repo_app, name="repo")

RepoArg = Annotated[Path, typer.Argument(help="Repository directory (serve it as it is with any HTTP server).")]
KeysOpt = Annotated[Path, typer.Option("--keys", help="Directory of the repository's role keys (never served).")]
DeviceArg = Annotated[Path, typer.Argument(help="The device's update directory (slots, floor, TUF metadata).")]
DeviceKeyOpt = Annotated[str, typer.Option("--device-key", help="This device's private key (device.key), or "
                                                                "tpm:HANDLE / tpm:FILE (sealed in the TPM).")]
TctiOpt = Annotated[
    str | None,
    typer.Option("--tcti", help="The TPM holding a TPM floor (e.g. device:/dev/tpmrm0, swtpm:host=H,port=P); "
                 "default $EDGESHIELD_TPM_TCTI, else the one given to init, else device:/dev/tpmrm0."),
]
AuditKeyOpt = Annotated[
    Path | None,
    typer.Option("--audit-key", help="Ed25519 key signing the update audit log's checkpoints (`audit keygen`); use "
                 "it always or never for one device directory."),
]


def _expiry(hours: float) -> _dt.timedelta:
    return _dt.timedelta(hours=hours)


@repo_app.command("init")
@requires("update")
def repo_init(repo: RepoArg, keys_dir: KeysOpt, passphrase_env: PassphraseEnvOpt = None,
              as_json: JsonOpt = False) -> None:
    """Create the repository and its root, targets, snapshot and timestamp keys (ECDSA P-256, 0600)."""
    ids = updates.init_repository(repo, keys_dir, passphrase=keys.passphrase_from_env(passphrase_env))
    if as_json:
        emit_json({"repository": str(repo), "keys": str(keys_dir), "key_ids": ids,
                   "root": str(repo / "metadata" / "root.json")})
        return
    console.print(f"repository created in {repo}; role keys in {keys_dir}")
    console.print(f"provision devices with {repo / 'metadata' / 'root.json'} (edgeshield update init --root)")


@repo_app.command("publish")
@requires("update")
def repo_publish(
    repo: RepoArg,
    keys_dir: KeysOpt,
    bundle: Annotated[Path, typer.Option("--bundle", help="The bundle; its signed model_version is the version.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner's public key the bundle must verify "
                                                                "under (owner.pub).")],
    model: Annotated[str, typer.Option("--model", help="Model name devices follow (e.g. digits).")],
    detector: Annotated[Path | None, typer.Option("--detector", help="Detector file calibrated for it.")] = None,
    input_spec: Annotated[Path | None, typer.Option("--input-spec", help="Input spec (JSON) for this model.")] = None,
    timestamp_hours: Annotated[float, typer.Option("--timestamp-expiry-hours", min=0.01,
                                                   help="Hours until the new timestamp expires.")] = 24.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a bundle with its detector file and input spec as one update."""
    result = updates.publish(repo, keys_dir, bundle, owner_key=keys.load_owner_public_key(owner_key), model=model,
                             detector=detector, input_spec=input_spec,
                             passphrase=keys.passphrase_from_env(passphrase_env),
                             timestamp_expiry=_expiry(timestamp_hours))
    if as_json:
        emit_json(result.to_dict())
        return
    console.print(f"published {result.model} version {result.model_version} ({', '.join(sorted(result.targets))}); "
                  f"targets v{result.targets_version}, timestamp expires {result.timestamp_expires}")


@repo_app.command("timestamp")
@requires("update")
def repo_timestamp(
    repo: RepoArg,
    keys_dir: KeysOpt,
    hours: Annotated[float, typer.Option("--expiry-hours", min=0.01, help="Hours until it expires.")] = 24.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-sign the timestamp (and the snapshot when due); run it on a schedule shorter than its expiry."""
    version, expires = updates.resign_timestamp(repo, keys_dir, passphrase=keys.passphrase_from_env(passphrase_env),
                                                expiry=_expiry(hours))
    if as_json:
        emit_json({"timestamp_version": version, "expires": expires})
        return
    console.print(f"timestamp v{version} signed; expires {expires}")


# --- device ---------------------------------------------------------------------------------------------------------
@app.command("init")
def device_init(
    device_dir: DeviceArg,
    root: Annotated[Path, typer.Option("--root", help="The repository's metadata/root.json: the TUF trust anchor.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner's public key bundles must be signed "
                                                                "with (owner.pub).")],
    model: Annotated[str, typer.Option("--model", help="Model name this device follows.")],
    url: Annotated[str | None, typer.Option("--url", help="Repository URL (http(s):// or file://).")] = None,
    floor: Annotated[str, typer.Option("--floor", help="Where the version floor lives: file (a signed state file "
                                                       "in the directory) or tpm[:0xINDEX] (a TPM NV monotonic "
                                                       "counter, default index 0x0180E5F1, defined now).")] = "file",
    tcti: Annotated[str | None, typer.Option("--tcti", help="With --floor tpm: the TPM (stored in the device "
                                                            "config; default $EDGESHIELD_TPM_TCTI, else "
                                                            "device:/dev/tpmrm0).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision a device directory: trust anchors, model name, and a new version floor (a signed state file at
    0, key 0600, or a TPM NV counter at 1 or above)."""
    from edgeshield._io import check_readable_file
    from edgeshield.updates._device import FloorConfig

    floor_config = FloorConfig.parse(floor, tcti)
    root_bytes = check_readable_file(root, what="TUF root").read_bytes()
    owner_pem = check_readable_file(owner_key, what="owner key").read_bytes()
    updates.init_device(device_dir, root=root_bytes, owner_key_pem=owner_pem, model=model, url=url,
                        floor=floor_config)
    state = floor_config.open(device_dir, tcti=tcti).describe()
    if as_json:
        emit_json({"device_dir": str(device_dir), "model": model, "url": url, "floor": state["floor"],
                   "floor_state": state})
        return
    where = f"TPM NV counter {state['index']}" if floor_config.kind != "signed-file" else "signed state file"
    console.print(f"device directory {device_dir} provisioned for {model} (floor {state['floor']}, {where})")
    if floor_config.kind != "signed-file" and state["floor"] > 1:
        console.print(f"note: the TPM started the counter at {state['floor']}: a counter on this TPM held "
                      f"{state['floor'] - 1} before (counters never restart lower); versions below it are refused")


def _updater(device_dir: Path, device_key: str, passphrase_env: str | None,
             audit_key: Path | None, tcti: str | None = None) -> updates.DeviceUpdater:
    from edgeshield.hardware._tpm import load_device_key

    audit = None
    if audit_key is not None:
        from edgeshield.audit import AuditLog, load_signing_key

        audit = AuditLog(device_dir / "audit.db", signing_key=load_signing_key(audit_key))
    key = load_device_key(device_key, keys.passphrase_from_env(passphrase_env))
    return updates.DeviceUpdater(device_dir, device_key=key, audit=audit, tcti=tcti)


def _slot_line(record: updates.SlotRecord) -> str:
    return f"version {record.model_version} in slot {record.slot} (bundle {record.bundle_id}, health {record.health})"


@app.command("pull")
@requires("update")
def pull(
    device_dir: DeviceArg,
    device_key: DeviceKeyOpt,
    url: Annotated[str | None, typer.Option("--url", help="Repository URL (default: the one given to init).")] = None,
    install: Annotated[bool, typer.Option("--install", help="Install what was pulled.")] = False,
    commit: Annotated[bool, typer.Option("--commit", help="With --install: commit once healthy.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, max=600.0, help="Seconds to connect and between "
                                                                                 "bytes.")] = 30.0,
    deadline: Annotated[float, typer.Option("--deadline", min=1.0, help="Seconds a whole file may take.")] = 600.0,
    passphrase_env: PassphraseEnvOpt = None,
    audit_key: AuditKeyOpt = None,
    tcti: TctiOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refresh TUF metadata, download and verify the newest update, stage it (and install it with --install)."""
    with _updater(device_dir, device_key, passphrase_env, audit_key, tcti) as u:
        index = u.pull(url, timeout_s=timeout, deadline_s=deadline)
        record = u.install(commit=commit) if install and (index is not None or u.staged() is not None) else None
        out: dict[str, Any] = {"staged": index.to_dict() if index else None,
                               "installed": record.summary() if record else None, "status": u.status()}
    if as_json:
        emit_json(out)
        return
    console.print(f"staged version {index.model_version}" if index else "up to date: nothing new to stage")
    if record is not None:
        console.print(f"installed {_slot_line(record)}{' and committed' if commit else ''}")


@app.command("install")
def install(device_dir: DeviceArg, device_key: DeviceKeyOpt,
            commit: Annotated[bool, typer.Option("--commit", help="Commit once healthy.")] = False,
            passphrase_env: PassphraseEnvOpt = None, audit_key: AuditKeyOpt = None, tcti: TctiOpt = None,
            as_json: JsonOpt = False) -> None:
    """Install the staged update into the inactive slot, switch to it and health-check it (failure: switch back)."""
    with _updater(device_dir, device_key, passphrase_env, audit_key, tcti) as u:
        record = u.install(commit=commit)
        status = u.status()
    if as_json:
        emit_json({"installed": record.summary(), "status": status})
        return
    console.print(f"installed {_slot_line(record)}{' and committed' if commit else ''}")
    if not commit:
        console.print("commit it ('edgeshield update commit') once it serves well, or roll it back")


@app.command("commit")
def commit(device_dir: DeviceArg, device_key: DeviceKeyOpt, passphrase_env: PassphraseEnvOpt = None,
           audit_key: AuditKeyOpt = None, tcti: TctiOpt = None, as_json: JsonOpt = False) -> None:
    """Raise the version floor to the running model: no rollback below it afterwards."""
    with _updater(device_dir, device_key, passphrase_env, audit_key, tcti) as u:
        floor = u.commit()
    if as_json:
        emit_json({"floor": floor})
        return
    console.print(f"committed: the floor is now {floor}")


@app.command("rollback")
def rollback(device_dir: DeviceArg, device_key: DeviceKeyOpt, passphrase_env: PassphraseEnvOpt = None,
             audit_key: AuditKeyOpt = None, tcti: TctiOpt = None, as_json: JsonOpt = False) -> None:
    """Switch back to the previous slot (after its health check), never below the floor."""
    with _updater(device_dir, device_key, passphrase_env, audit_key, tcti) as u:
        record = u.rollback()
    if as_json:
        emit_json({"current": record.summary()})
        return
    console.print(f"rolled back to {_slot_line(record)}")


@app.command("status")
def status(device_dir: DeviceArg, device_key: DeviceKeyOpt, passphrase_env: PassphraseEnvOpt = None,
           audit_key: AuditKeyOpt = None, tcti: TctiOpt = None, as_json: JsonOpt = False) -> None:
    """Show the floor, the current and previous slots and any staged update (recovering after a crash first)."""
    with _updater(device_dir, device_key, passphrase_env, audit_key, tcti) as u:
        st = u.status()
    if as_json:
        emit_json(st)
        return
    def slot(s: dict[str, Any] | None) -> str:
        return f"version {s['model_version']} in slot {s['slot']}" if s else "none"

    prev = st["previous"]
    where = f"{st['floor']['kind']} {st['floor']['index']}" if "index" in st["floor"] else st["floor"]["kind"]
    console.print(f"model {st['model']}, floor {st['floor']['floor']} ({where})")
    console.print(f"current: {slot(st['current'])}{' (not committed)' if st['pending'] else ''}")
    console.print(f"previous: {slot(prev)}"
                  f"{'' if st['rollback_possible'] or not prev else ' (below the floor: no rollback)'}")
    if st["staged"]:
        console.print(f"staged: version {st['staged']['model_version']} (run 'edgeshield update install')")
    for action in st["recovered"]:
        console.print(f"recovered: {action}")
    console.print(f"serve with --bundle {st['serve']['bundle']}"
                  f"{' --detector ' + st['serve']['detector'] if st['serve']['detector'] else ''} (restart serve "
                  "after a commit)")
