"""Demo stages for the hardware root of trust and updates: what this machine really has (probe), the demo device key
sealed in a software TPM and the bundle opened from it, a PCR change that locks the key, attestation-gated key
release (a replayed quote refused, a fresh one served), and a rollback-proof update from version N to N+1.

The TPM stage starts and stops its own ``swtpm``; without one (or without the ``tpm`` extra) it says so and skips
only itself, as the update stage does without the ``update`` extra.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage
from edgeshield.errors import MissingDependencyError

PCRS = (0, 7, 16)  # 16 is the debug PCR: the one the demo extends to play a changed boot chain


def _probe(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.hardware import FEATURES, probe

    report = probe("/")
    found = report.to_dict()
    table = Table(title="edgeshield probe: this machine (present / absent / unknown, with the reason read)")
    for col in ("feature", "status", "reason"):
        table.add_column(col)
    for name in FEATURES:
        table.add_row(name, found[name]["status"], found[name]["reason"])
    ctx.tables.append(table)
    statuses = {name: found[name]["status"] for name in FEATURES}
    exposed = found["listening"].get("exposed")
    ctx.summary["probe"] = {"statuses": statuses, "exposed_sockets": exposed}
    present = [n for n, s in statuses.items() if s == "present"]
    return (f"{len(FEATURES)} features: present {', '.join(present) or 'none'}; "
            f"{exposed if exposed is not None else '?'} socket(s) exposed beyond loopback")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@contextlib.contextmanager
def _release_service(work: Path, kdir: Path, tpm: Any, policy: Any) -> Iterator[tuple[Any, Path, str, Any]]:
    """A key-release service over mutual TLS holding a bundle addressed to it (not to the device); yields the
    running server, the bundle, its id and the device's TLS client context."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from edgeshield import transport
    from edgeshield.audit import AuditLog
    from edgeshield.hardware import EkTrust, ReleaseServer, ReleaseService, ReleaseStore
    from edgeshield.models import digits_model_path

    ca = work / "ca"
    transport.init_ca(ca)
    srv = transport.issue(ca, name="keyrelease", role="operator", server=True, sans=["127.0.0.1"])
    dev = transport.issue(ca, name="cam-1", role="client")
    recipient = X25519PrivateKey.generate()  # the service's bundle key: the device never holds it
    owner = keys.load_owner_private_key(kdir / "owner.key")
    bundle = work / "digits-released.esb"
    manifest = bundles.protect(digits_model_path(), bundle, signing_key=owner, recipients=[recipient.public_key()],
                               model_version=1)
    store, log = ReleaseStore(work / "release.db"), AuditLog(work / "audit.db")
    service = ReleaseService(store=store, recipient_key=recipient, owner_key=owner.public_key(),
                             bundles=ReleaseService.load_bundles([bundle], owner.public_key()),
                             trust=EkTrust.load(tpm.ek_ca_certs()), policy=policy, audit=log)
    server = ReleaseServer(service, transport.server_context(ca, srv.cert_path, srv.key_path))
    server.start()
    try:
        yield server, bundle, manifest.bundle_id, transport.client_context(ca, dev.cert_path, dev.key_path)
    finally:
        server.stop()
        store.close()
        log.close()


def _accuracy(session: Any, ctx: DemoContext) -> float:
    from edgeshield.models import DIGITS_INPUT_NAME, load_digits_split

    split = ctx.state.get("split") or load_digits_split()
    pred = session.run(None, {DIGITS_INPUT_NAME: split.x_test})[0].argmax(axis=1)
    return float((pred == split.y_test).mean())


def _tpm(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.hardware import (
        DeviceTpm,
        PcrPolicy,
        PCRSelection,
        ReleaseClient,
        SoftwareTPM,
        SoftwareTPMError,
        TPMPolicyError,
        connect,
        load_device_key,
        open_released,
        pcr_extend,
        seal_device_key,
    )

    tpm: SoftwareTPM | None = None
    try:  # swtpm_setup runs in the constructor (EK certificates), swtpm in start()
        if importlib.util.find_spec("tpm2_pytss") is None:
            raise MissingDependencyError("tpm2-pytss is not installed: pip install 'edgeshield[tpm]'")
        tpm = SoftwareTPM(with_ek_cert=True)
        tpm.start()
    except (MissingDependencyError, SoftwareTPMError) as exc:
        if tpm is not None:
            tpm.close()
        ctx.summary["tpm"] = {"skipped": str(exc)}
        return f"SKIPPED: no software TPM here ({exc})"
    from edgeshield.errors import ServerRefusedError

    kdir, work = ctx.state["kdir"], ctx.workdir / "hardware"
    work.mkdir(exist_ok=True)
    owner_pub = keys.load_owner_public_key(kdir / "owner.pub")
    rows: list[tuple[str, str]] = []
    result: dict[str, Any] = {"pcrs": list(PCRS)}
    try:
        # 1. the demo device key sealed under a PCR policy; the bundle opened with the key unsealed in memory
        sealed_path = work / "device.sealed"
        with connect(tpm.tcti) as esys:
            seal_device_key(keys.load_device_private_key(kdir / "device.key"),
                            PCRSelection.parse("sha256:" + ",".join(map(str, PCRS))), esys=esys).save(sealed_path)
        spec = f"tpm:{sealed_path}"
        session = bundles.open_session(ctx.state["bundle"], owner_pub, load_device_key(spec, tcti=tpm.tcti))
        acc = _accuracy(session, ctx)
        result["sealed_accuracy"] = acc
        rows.append((f"run digits.esb --device-key {spec}", f"opened; accuracy {acc:.3f} on the test split"))

        # 2. attestation-gated release: enrol (credential activation), a fresh quote releases, a replay does not
        with DeviceTpm(tpm.tcti) as d:
            policy, dkeys = PcrPolicy(d.pcr_values(PCRS)), d.create_keys()
        with _release_service(work, kdir, tpm, policy) as (server, bundle, bundle_id, tls):
            client = ReleaseClient("127.0.0.1", server.port, tls)
            with DeviceTpm(tpm.tcti) as d:
                client.enrol(d, dkeys)
                nonce = base64.b64decode(client.call("/v1/nonce", {})["nonce"])
                quote = d.quote(dkeys, nonce, PCRS)
                attest, sig = d.certify_release_key(dkeys, nonce)
            body = {"bundle_id": bundle_id, "nonce": _b64(nonce), "quote": quote.to_dict(),
                    "release_public": _b64(dkeys.release_public), "certify_attest": _b64(attest),
                    "certify_signature": _b64(sig)}
            client.call("/v1/release", body)  # the genuine request, once
            try:
                client.call("/v1/release", body)  # the same quote again: stale
            except ServerRefusedError as exc:
                result["stale_quote_refused"] = str(exc)
                rows.append(("release: the same quote replayed", str(exc)))
            else:
                raise DemoFailure("the release service released a key to a replayed quote")
            with DeviceTpm(tpm.tcti) as d:
                released = client.fetch_key(d, dkeys, bundle_id, PCRS)
            opened = open_released(bundle, owner_pub, released)
            acc = _accuracy(opened.session, ctx)
            result["fresh_quote_released"] = True
            result["released_accuracy"] = acc
            rows.append(("release: a fresh quote (new nonce)",
                         f"released, RSA-OAEP to the TPM's key; bundle opened, accuracy {acc:.3f}"))

            # 3. a changed boot chain: extend PCR 16; the sealed key no longer unseals, the service refuses too
            with connect(tpm.tcti) as esys:
                pcr_extend(16, hashlib.sha256(b"edgeshield demo: an unexpected boot stage").digest(), esys=esys)
            try:
                load_device_key(spec, tcti=tpm.tcti)
            except TPMPolicyError as exc:
                result["pcr_change_refused"] = type(exc).__name__
                rows.append(("pcr extend 16, then unseal", f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"))
            else:
                raise DemoFailure("the sealed device key unsealed after a PCR changed")
            try:
                with DeviceTpm(tpm.tcti) as d:
                    client.fetch_key(d, dkeys, bundle_id, PCRS)
            except ServerRefusedError as exc:
                result["pcr_change_release_refused"] = str(exc)
                rows.append(("release after the PCR change", str(exc)))
            else:
                raise DemoFailure("the release service released a key to a device whose PCRs changed")
    finally:
        tpm.close()
    table = Table(title="Software TPM (swtpm, started and stopped by this stage), PCR policy sha256:"
                        + ",".join(map(str, PCRS)))
    table.add_column("step")
    table.add_column("outcome")
    for step, outcome in rows:
        table.add_row(step, outcome)
    ctx.tables.append(table)
    ctx.summary["tpm"] = result
    return ("device key sealed in a software TPM opens digits.esb; a PCR change → TPMPolicyError; "
            "release service: replayed quote refused, fresh quote released")


def _updates(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.models import digits_input_spec, digits_model_path

    try:
        from edgeshield import updates

        work = ctx.workdir / "updates"
        repo, repo_keys, device = work / "repo", work / "repo-keys", work / "device"
        updates.init_repository(repo, repo_keys)
    except MissingDependencyError as exc:
        ctx.summary["update"] = {"skipped": str(exc)}
        return f"SKIPPED: {exc}"
    kdir = ctx.state["kdir"]
    owner, owner_pub = keys.load_owner_private_key(kdir / "owner.key"), keys.load_owner_public_key(kdir / "owner.pub")
    spec = work / "input-spec.json"
    spec.write_text(digits_input_spec().to_json())
    v1, v2 = ctx.state["bundle"], work / "digits-v2.esb"  # the demo's bundle is version 1
    bundles.protect(digits_model_path(), v2, signing_key=owner,
                    recipients=[keys.load_device_public_key(kdir / "device.pub")], model_version=2)
    updates.init_device(device, root=updates.repository_root(repo), owner_key_pem=(kdir / "owner.pub").read_bytes(),
                        model="digits", url=repo.as_uri())
    rows: list[tuple[str, str]] = []
    result: dict[str, Any] = {}
    with updates.DeviceUpdater(device, device_key=keys.load_device_private_key(kdir / "device.key")) as u:
        for version, bundle in ((1, v1), (2, v2)):
            updates.publish(repo, repo_keys, bundle, owner_key=owner_pub, model="digits", input_spec=spec)
            u.pull()
            rec = u.install(commit=True)
            rows.append((f"publish v{version}; pull, install, commit",
                         f"slot {rec.slot}, health {rec.health}; floor {u.status()['floor']['floor']}"))
        result["installed"] = u.status()["current"]["model_version"]
        # a repository replaying the genuinely signed v1 (the owner's tool would refuse; an attacker's does not)
        updates.publish(repo, repo_keys, v1, owner_key=owner_pub, model="digits", input_spec=spec,
                        allow_lower_version=True)
        try:
            u.pull()
        except updates.FloorViolationError as exc:
            result["replay_refused"] = type(exc).__name__
            rows.append(("replay of v1 (signed, republished)", f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"))
        else:
            raise DemoFailure("the device accepted a replay of an older version")
        st = u.status()
        result["floor"] = st["floor"]["floor"]
        result["still_current"] = st["current"]["model_version"]
    if (result["installed"], result["still_current"]) != (2, 2):
        raise DemoFailure(f"expected version 2 installed and kept, got {result}")
    table = Table(title="TUF update to A/B slots (file:// repository), device floor")
    table.add_column("step")
    table.add_column("outcome")
    for step, outcome in rows:
        table.add_row(step, outcome)
    ctx.tables.append(table)
    ctx.summary["update"] = result
    return (f"v1 → v2 installed atomically into the other slot and committed (floor {result['floor']}); "
            "a replay of v1 refused (FloorViolationError), v2 still running")


STAGES = [
    Stage("Probe this machine's hardware security features", _probe),
    Stage("Seal the device key in a software TPM, lock it with a PCR change, release keys to fresh quotes", _tpm),
    Stage("Update the model v1 → v2 through TUF into A/B slots and refuse a replay of v1", _updates),
]
