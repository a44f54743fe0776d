"""`edgeshield attest …`: TPM quotes and their verification, and the attestation-gated key-release service."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from edgeshield._io import atomic_write_bytes
from edgeshield.cli._common import JsonOpt, console, emit_json, requires
from edgeshield.errors import InvalidArgumentError

app = typer.Typer(
    help="TPM attestation: quotes, their verification, and key release to attested devices over mutual TLS.",
    no_args_is_help=True,
)

TctiOpt = Annotated[
    str | None,
    typer.Option("--tcti", envvar="EDGESHIELD_TPM_TCTI",
                 help="tpm2-tss TCTI (default device:/dev/tpmrm0; a software TPM: swtpm:host=127.0.0.1,port=N)."),
]  # fmt: skip
KeysOpt = Annotated[Path, typer.Option("--keys", help="The device's TPM key file (AK and release key blobs).")]
PcrsOpt = Annotated[str, typer.Option("--pcrs", help="SHA-256 PCRs to quote, e.g. 0,7.")]
ServerOpt = Annotated[str, typer.Option("--server", help="The release service, HOST:PORT.")]
CaOpt = Annotated[Path, typer.Option("--ca", help="The PKI's CA directory or certificate.")]
CertOpt = Annotated[Path, typer.Option("--cert", help="This side's TLS certificate (from `pki issue`).")]
KeyOpt = Annotated[Path, typer.Option("--key", help="This side's TLS private key.")]


def _pcrs(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.replace("sha256:", "").split(",") if x.strip()})
    except ValueError:
        raise InvalidArgumentError(f"--pcrs expects indices like 0,7, got {text!r}") from None
    if not out:
        raise InvalidArgumentError("--pcrs needs at least one PCR")
    return out


def _nonce(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidArgumentError("--nonce expects hex") from None


def _client(server: str, ca: Path, cert: Path, key: Path):  # type: ignore[no-untyped-def]
    from edgeshield import transport
    from edgeshield.hardware._release import ReleaseClient

    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgumentError(f"--server expects HOST:PORT, got {server!r}")
    return ReleaseClient(host, int(port), transport.client_context(ca, cert, key))


@app.command("keys")
@requires("tpm")
def create_keys(tcti: TctiOpt = None, out: KeysOpt = Path("tpm-keys.json"), as_json: JsonOpt = False) -> None:
    """Create the device's attestation key and release key in the TPM (children of its EK) and save their blobs."""
    from edgeshield.hardware._attest import DeviceTpm, parse_public

    with DeviceTpm(tcti) as tpm:
        keys = tpm.create_keys()
        ek, cert = tpm.endorsement()
    keys.save(out)
    info = {"keys": str(out), "ek_sha256": parse_public(ek).spki_sha256(), "ek_certificate": cert is not None}
    emit_json(info) if as_json else console.print(f"TPM keys written to {out}; EK {info['ek_sha256']}")


@app.command("quote")
@requires("tpm")
def quote(nonce: Annotated[str, typer.Option("--nonce", help="The verifier's nonce, hex.")],
          tcti: TctiOpt = None, keys: KeysOpt = Path("tpm-keys.json"), pcrs: PcrsOpt = "0,7",
          out: Annotated[Path | None, typer.Option("--out", help="Write the quote here (else stdout).")] = None
          ) -> None:
    """Quote the chosen PCRs over the verifier's nonce with the attestation key."""
    from edgeshield.hardware._attest import DeviceKeys, DeviceTpm

    with DeviceTpm(tcti) as tpm:
        q = tpm.quote(DeviceKeys.load(keys), _nonce(nonce), _pcrs(pcrs))
    text = json.dumps(q.to_dict(), indent=1)
    if out is None:
        print(text)
    else:
        atomic_write_bytes(out, text.encode())


@app.command("verify")
def verify(quote_file: Annotated[Path, typer.Argument(help="The quote (from `attest quote`).")],
           nonce: Annotated[str, typer.Option("--nonce", help="The nonce the verifier issued, hex.")],
           keys: Annotated[Path, typer.Option("--keys", help="A TPM key file holding the device's enrolled AK.")],
           policy: Annotated[Path | None, typer.Option("--policy", help='Expected PCRs: {"sha256": {"7": HEX}}.')]
           = None, as_json: JsonOpt = False) -> None:
    """Check a quote: the AK's signature, the nonce, the PCR digest and the expected-PCR policy (exit 3 if not)."""
    from edgeshield.hardware._attest import DeviceKeys, PcrPolicy, Quote, _load_json, parse_public, verify_quote

    ak = parse_public(DeviceKeys.load(keys).ak_public)
    result = verify_quote(Quote.from_dict(_load_json(quote_file, "quote")), ak, _nonce(nonce),
                          PcrPolicy.load(policy) if policy else None)
    emit_json(result.to_dict()) if as_json else console.print(
        f"quote verified: PCRs {', '.join(map(str, sorted(result.pcrs)))}, TPM clock {result.clock.clock} ms")


@app.command("enrol")
@requires("tpm")
def enrol(server: ServerOpt, ca: CaOpt, cert: CertOpt, key: KeyOpt, tcti: TctiOpt = None,
          keys: KeysOpt = Path("tpm-keys.json")) -> None:
    """Enrol this device's AK with the release service (EK check, then credential activation in the TPM)."""
    from edgeshield.hardware._attest import DeviceKeys, DeviceTpm

    with DeviceTpm(tcti) as tpm:
        _client(server, ca, cert, key).enrol(tpm, DeviceKeys.load(keys))
    console.print("enrolled: the service verified the EK and the credential activation")


@app.command("fetch-key")
@requires("tpm")
def fetch_key(bundle: Annotated[Path, typer.Argument(help="The bundle whose key to fetch.")],
              owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner public key (owner.pub).")],
              server: ServerOpt, ca: CaOpt, cert: CertOpt, key: KeyOpt, tcti: TctiOpt = None,
              keys: KeysOpt = Path("tpm-keys.json"), pcrs: PcrsOpt = "0,7",
              out: Annotated[Path | None, typer.Option(
                  "--out", help="Keep the released key here (0600), still wrapped to this TPM, for `serve "
                                "--released-key`.")] = None,
              floor_index: Annotated[str | None, typer.Option(
                  "--floor-index", help="Send the version floor: the TPM NV counter at this index (0x0180E5F1), "
                                        "certified by the AK.")] = None,
              as_json: JsonOpt = False) -> None:
    """Attest, have the bundle's key released to the TPM, and open the bundle in memory (the key never hits disk)."""
    from edgeshield import bundles
    from edgeshield import keys as ekeys
    from edgeshield.hardware._attest import DeviceKeys, DeviceTpm
    from edgeshield.hardware._nvfloor import parse_index
    from edgeshield.hardware._release import LicenceGuard, open_released, unwrap_released

    owner = ekeys.load_owner_public_key(owner_key)
    manifest, _ = bundles.inspect(bundle, owner)
    index = parse_index(floor_index) if floor_index is not None else None
    device_keys = DeviceKeys.load(keys)
    with DeviceTpm(tcti) as tpm:
        wrapped = _client(server, ca, cert, key).fetch_wrapped(tpm, device_keys, manifest.bundle_id, _pcrs(pcrs),
                                                                floor_index=index)
        released = unwrap_released(wrapped, tpm, device_keys)
        licence = LicenceGuard(wrapped.licence, tpm).describe()
    open_released(bundle, owner, released)
    if out is not None:
        wrapped.save(out)
    info = {"bundle_id": manifest.bundle_id, "released": True, "opened": True, "licence": released.licence,
            "enforced_by": licence["enforced_by"], "out": str(out) if out else None}
    kept = f"; wrapped key kept in {out}" if out else ""
    emit_json(info) if as_json else console.print(f"key released for bundle {manifest.bundle_id}; bundle opened{kept}")


@app.command("serve")
@requires("tpm")
def serve(
    ca: CaOpt, cert: CertOpt, key: KeyOpt,
    recipient_key: Annotated[Path, typer.Option("--recipient-key", help="The service's X25519 key: the bundles' "
                                                                        "recipient.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner public key (owner.pub).")],
    bundle: Annotated[list[Path], typer.Option("--bundle", help="A bundle the service may release (repeat).")],
    policy: Annotated[Path, typer.Option("--policy", help='Expected PCRs: {"sha256": {"7": HEX}}.')],
    store: Annotated[Path, typer.Option("--store", help="The service's SQLite state (created 0600).")],
    audit: Annotated[Path, typer.Option("--audit", help="The audit log (every release and refusal).")],
    ek_ca: Annotated[list[Path] | None, typer.Option("--ek-ca", help="An enrolled TPM manufacturer CA (repeat).")]
    = None,
    enrolment_list: Annotated[Path | None, typer.Option("--enrolment-list", help="Devices, groups, EK digests.")]
    = None,
    licences: Annotated[Path | None, typer.Option("--licences", help="Licence file for the bundles.")] = None,
    ek_crl: Annotated[list[Path] | None, typer.Option("--ek-crl", help="A CRL of an enrolled EK CA (repeat; "
                                                                         "checked at enrolment and release, an "
                                                                         "out-of-date one refuses).")] = None,
    require_floor: Annotated[bool, typer.Option("--require-floor", help="Release only with the device's version "
                                                                         "floor certified (fetch-key "
                                                                         "--floor-index).")] = False,
    host: Annotated[str, typer.Option("--host", help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Listen port.")] = 8743,
) -> None:
    """Run the key-release service over mutual TLS 1.3 until interrupted."""
    from edgeshield import keys as ekeys
    from edgeshield import transport
    from edgeshield.audit import AuditLog
    from edgeshield.hardware import _attest as at
    from edgeshield.hardware import _release as rel

    owner = ekeys.load_owner_public_key(owner_key)
    with rel.ReleaseStore(store) as st, AuditLog(audit) as log:
        service = rel.ReleaseService(
            store=st, recipient_key=ekeys.load_device_private_key(recipient_key), owner_key=owner,
            bundles=rel.ReleaseService.load_bundles(bundle, owner), trust=at.EkTrust.load(ek_ca or []),
            policy=at.PcrPolicy.load(policy),
            enrolment=rel.load_enrolment_list(enrolment_list) if enrolment_list else {},
            licences=rel.load_licences(licences) if licences else {}, audit=log, require_floor=require_floor,
            ek_crls=rel.load_crls(ek_crl or []))
        server = rel.ReleaseServer(service, transport.server_context(ca, cert, key), host, port)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        server.start()
        console.print(f"key-release service on {host}:{server.port} ({len(service.bundles)} bundle(s)"
                      + (", floor required)" if require_floor else ")"))
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


@app.command("revoke")
def revoke(store: Annotated[Path, typer.Option("--store", help="The service's SQLite state.")],
           device: Annotated[str | None, typer.Argument(help="The device's certificate name.")] = None,
           ek: Annotated[str | None, typer.Option("--ek", help="Revoke a TPM instead: its EK's SHA-256 (as `attest "
                                                                "keys` prints it); refused at enrolment and "
                                                                "release.")] = None) -> None:
    """Revoke a device's enrolment, or a TPM by its EK: the service releases it no key again (see also `pki
    revoke` for the device's TLS certificate)."""
    from edgeshield.hardware._release import ReleaseStore

    if (device is None) == (ek is None):
        raise InvalidArgumentError("name a device or give --ek SHA256 (one of them)")
    with ReleaseStore(store, create=False) as st:
        if ek is not None:
            new = st.revoke_ek(ek)
            console.print(f"EK {ek.lower()} revoked" if new else f"EK {ek.lower()} was revoked already")
            return
        assert device is not None  # noqa: S101
        if not st.revoke(device):
            raise InvalidArgumentError(f"no enrolled device {device!r}")
    console.print(f"device {device} revoked")
