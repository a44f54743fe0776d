"""`edgeshield tpm …`: seal the device key in a TPM under a PCR policy, approve PCR values, read and extend PCRs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeshield import keys
from edgeshield._io import atomic_write_bytes
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, given, requires
from edgeshield.errors import InvalidArgumentError, KeyMaterialError, OutputExistsError

app = typer.Typer(
    help="TPM-sealed device keys: seal under a PCR policy (optionally owner-signed), test an unseal, PCRs.",
    no_args_is_help=True,
)
pcr_app = typer.Typer(help="Read and extend the TPM's PCRs.", no_args_is_help=True)
app.add_typer(pcr_app, name="pcr")

TctiOpt = Annotated[
    str | None,
    typer.Option("--tcti", envvar="EDGESHIELD_TPM_TCTI",
                 help="tpm2-tss TCTI (default device:/dev/tpmrm0; a software TPM: swtpm:host=127.0.0.1,port=N)."),
]  # fmt: skip
PcrsOpt = Annotated[str, typer.Option("--pcrs", help="PCR selection, BANK:I,J,... (e.g. sha256:0,7).")]
ValueOpt = Annotated[
    list[str] | None,
    typer.Option("--pcr-value", metavar="I=HEX",
                 help="An expected PCR value (repeat for every selected PCR); default: the TPM's current values."),
]  # fmt: skip


def _values(items: list[str] | None) -> dict[int, bytes] | None:
    if not items:
        return None
    values: dict[int, bytes] = {}
    for item in items:
        index, sep, hexval = item.partition("=")
        try:
            i, v = int(index), bytes.fromhex(hexval)
        except ValueError as exc:
            raise InvalidArgumentError(f"--pcr-value expects I=HEX, got {item!r}") from exc
        if not sep or i in values:
            raise InvalidArgumentError(f"--pcr-value expects I=HEX once per PCR, got {item!r}")
        values[i] = v
    return values


def _handle(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError as exc:
        raise InvalidArgumentError(f"--handle expects a hex persistent handle like 0x81000001, got {text!r}") from exc


@app.command("seal-device-key")
@requires("tpm")
def seal_device_key(
    pcrs: PcrsOpt = "sha256:7",
    device_key: Annotated[
        Path | None, typer.Option("--device-key", help="The device private key (device.key) to seal.")
    ] = None,
    generate: Annotated[
        bool, typer.Option("--generate", help="Make a new device key in memory and seal it: it never exists on disk.")
    ] = False,
    public_out: Annotated[
        Path | None, typer.Option("--public-out", help="With --generate: write the device public key here.")
    ] = None,
    signed_by: Annotated[
        Path | None,
        typer.Option("--signed-by", help="Owner public key (owner.pub): seal to PCR values the owner signs "
                                         "(`tpm approve-pcrs`) instead of fixed values."),
    ] = None,
    pcr_value: ValueOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the sealed object to this file (0600).")] = None,
    handle: Annotated[
        str | None, typer.Option("--handle", help="Persist the sealed object in the TPM at this handle (0x81...).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out or replace what is at --handle.")] = False,
    tcti: TctiOpt = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal the device private key in the TPM: it unseals only while PCRS hold the sealed (or owner-approved)
    values. Then use `--device-key tpm:FILE` or `tpm:HANDLE` with run, serve and detect."""
    from edgeshield.hardware import _tpm

    if (device_key is None) == (not generate):
        raise InvalidArgumentError("give exactly one of --device-key and --generate")
    if generate and public_out is None:
        raise InvalidArgumentError("--generate needs --public-out for the device public key")
    if (out is None) == (handle is None):
        raise InvalidArgumentError("give exactly one of --out and --handle")
    if signed_by is not None and pcr_value:
        raise InvalidArgumentError("--pcr-value fixes the values; with --signed-by the owner approves them instead")
    for path in (out, public_out):
        if path is not None and path.exists() and not force:
            raise OutputExistsError(f"{path} exists; use --force to overwrite it")
    selection = _tpm.PCRSelection.parse(pcrs)
    persistent = _handle(handle) if handle is not None else None
    if device_key is not None:
        key = keys.load_device_private_key(device_key, keys.passphrase_from_env(passphrase_env))
    else:
        key = X25519PrivateKey.generate()
    signer = keys.load_owner_public_key(signed_by) if signed_by is not None else None
    with _tpm.connect(tcti) as esys:
        sealed = _tpm.seal_device_key(key, selection, esys=esys, values=_values(pcr_value), signer=signer)
        if persistent is not None:
            _tpm.persist(sealed, persistent, esys=esys, replace=force)
    if out is not None:
        sealed.save(out, overwrite=force)
    if public_out is not None:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write_bytes(public_out, pem, overwrite=force)
    where = f"tpm:{out}" if out is not None else f"tpm:{persistent:#x}"
    result = {"device_key": where, "key_id": keys.key_id(key.public_key()), "pcrs": str(selection),
              "policy": "signed" if sealed.signed else "pcr", "auth_policy": sealed.auth_policy.hex()}  # fmt: skip
    if as_json:
        emit_json(result)
        return
    values = "owner-approved values" if sealed.signed else "their current values"
    console.print(f"sealed device key {result['key_id']} to PCRs {selection} ({values}): --device-key {where}")
    if device_key is not None:
        console.print(f"delete {device_key} once the sealed key works (`edgeshield tpm unseal-test {where}`)")


@app.command("approve-pcrs")
@requires("tpm", when=given("from_tpm_tcti"))
def approve_pcrs(
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner's private signing key (owner.key).")],
    out: Annotated[Path, typer.Option("--out", help="Approvals file to write (or add to, with --append).")],
    pcrs: PcrsOpt = "sha256:7",
    pcr_value: ValueOpt = None,
    from_tpm_tcti: Annotated[
        str | None,
        typer.Option("--from-tpm", metavar="TCTI", help="Approve the current values of the TPM at TCTI instead."),
    ] = None,
    append: Annotated[bool, typer.Option("--append", help="Add to the approvals already in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign an approval of PCR values: devices whose key is sealed with --signed-by this owner unseal while their
    PCRs hold them (a new measured boot chain needs a new approval, not a re-seal)."""
    from edgeshield.hardware import _tpm

    selection = _tpm.PCRSelection.parse(pcrs)
    if (pcr_value is None) == (from_tpm_tcti is None):
        raise InvalidArgumentError("give the values with --pcr-value, or --from-tpm TCTI to read them")
    if out.exists() and not (append or force):
        raise OutputExistsError(f"{out} exists; use --append to add to it or --force to overwrite it")
    values = _values(pcr_value)
    if values is None:
        with _tpm.connect(from_tpm_tcti) as esys:
            values = _tpm.pcr_read(selection, esys=esys)
    owner = keys.load_owner_private_key(owner_key, keys.passphrase_from_env(passphrase_env))
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(owner, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{owner_key} is not the owner's ECDSA P-256 key")
    approval = _tpm.sign_approval(owner, selection, values)
    existing = _tpm.load_approvals(out) if append and out.exists() else []
    for a in existing:
        a.verify(owner.public_key())  # never re-sign a file someone else added approvals to
    _tpm.save_approvals(out, [*existing, approval])
    if as_json:
        emit_json({"approvals": len(existing) + 1, **approval.to_dict()})
        return
    console.print(f"approved PCRs {selection} = policy {approval.approved_policy.hex()[:16]}…; "
                  f"{len(existing) + 1} approval(s) in {out}")  # fmt: skip


@app.command("unseal-test")
@requires("tpm")
def unseal_test(
    device_key: Annotated[str, typer.Argument(help="tpm:HANDLE or tpm:FILE, optionally with ,policy=APPROVALS.")],
    device_pub: Annotated[
        Path | None, typer.Option("--device-pub", help="Check the unsealed key is this public key's.")
    ] = None,
    tcti: TctiOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Unseal the device key now and print its key id (never the key); exit 3 if the PCR policy refuses."""
    from edgeshield.hardware import _tpm

    key = _tpm.load_device_key(device_key, tcti=tcti)
    kid = keys.key_id(key.public_key())
    if device_pub is not None and keys.key_id(keys.load_device_public_key(device_pub)) != kid:
        raise KeyMaterialError(f"the unsealed key is not the key of {device_pub}")
    if as_json:
        emit_json({"unsealed": True, "key_id": kid})
        return
    console.print(f"unsealed device key {kid}")


@pcr_app.command("read")
@requires("tpm")
def pcr_read(pcrs: PcrsOpt = "sha256:0-23", tcti: TctiOpt = None, as_json: JsonOpt = False) -> None:
    """Print the current values of PCRS."""
    from edgeshield.hardware import _tpm

    selection = _tpm.PCRSelection.parse(pcrs)
    with _tpm.connect(tcti) as esys:
        values = _tpm.pcr_read(selection, esys=esys)
    if as_json:
        emit_json({"bank": selection.bank, "pcrs": {str(i): v.hex() for i, v in values.items()}})
        return
    for i, v in values.items():
        console.print(f"{selection.bank}:{i:<2} {v.hex()}")


@pcr_app.command("extend")
@requires("tpm")
def pcr_extend(
    index: Annotated[int, typer.Argument(help="PCR index (0-23; 16 is the debug PCR, resettable).")],
    data: Annotated[
        str | None, typer.Option("--data", help="Measure this text: extend with its digest in the bank's hash.")
    ] = None,
    digest: Annotated[str | None, typer.Option("--digest", help="Extend with this digest (hex).")] = None,
    bank: Annotated[str, typer.Option("--bank", help="PCR bank.")] = "sha256",
    tcti: TctiOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extend a PCR with a measurement (PCR := H(PCR || digest)): what a boot stage does before handing over."""
    from edgeshield.hardware import _tpm

    if (data is None) == (digest is None):
        raise InvalidArgumentError("give exactly one of --data and --digest")
    try:
        measured = bytes.fromhex(digest) if digest is not None else hashlib.new(bank, (data or "").encode()).digest()
    except ValueError as exc:
        raise InvalidArgumentError(f"--digest is not hex, or unknown bank {bank!r}") from exc
    selection = _tpm.PCRSelection(bank, (index,))
    with _tpm.connect(tcti) as esys:
        _tpm.pcr_extend(index, measured, bank=bank, esys=esys)
        value = _tpm.pcr_read(selection, esys=esys)[index]
    if as_json:
        emit_json({"pcr": f"{bank}:{index}", "value": value.hex()})
        return
    console.print(f"{bank}:{index} {value.hex()}")
