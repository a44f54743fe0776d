"""Demo stages for the hardware root of trust and updates: what this machine really has (probe), the demo device key
sealed in a software TPM and the bundle served from it, a PCR change that locks the key, attestation-gated key
release (a replayed quote refused, a fresh one served) and a server whose released key's licence the TPM clock ends,
and a rollback-proof update from version N to N+1 that a running server reloads without a restart.

The TPM stage starts and stops its own ``swtpm``; without one (or without the ``tpm`` extra) it says so and skips
only itself, as the update stage does without the ``update`` extra.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage
from edgeshield.errors import MissingDependencyError

PCRS = (0, 7, 16)  # 16 is the debug PCR: the one the demo extends to play a changed boot chain
PROBE_INPUTS = 32  # digits each served model answers in this stage


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


@contextlib.contextmanager
def _serving(work: Path, name: str, **settings: Any) -> Iterator[tuple[str, Any, Any]]:
    """``serve`` (``edgeshield.server.running``) on 127.0.0.1 with its own CA, audit log and audit key under
    ``work/name``; yields its URL and a client's and an admin's TLS contexts."""
    from edgeshield import audit, transport
    from edgeshield.server import ServeConfig, running

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    transport.init_ca(d / "ca")
    srv = transport.issue(d / "ca", name="edge", role="server", server=True, sans=["127.0.0.1"])
    who = {role: transport.issue(d / "ca", name=role, role=role) for role in ("client", "admin")}
    audit.generate_signing_key(d / "audit.key")
    cfg = ServeConfig(ca=d / "ca", cert=srv.cert_path, key=srv.key_path, audit_db=d / "audit.db",
                      audit_key=d / "audit.key", port=0, **{"log_level": "error", **settings})
    with running(cfg) as (_server, _watcher, port):
        client, admin = (transport.client_context(d / "ca" / "ca.crt", c.cert_path, c.key_path) for c in who.values())
        yield f"https://127.0.0.1:{port}", client, admin


def _predict(ctx: DemoContext, url: str, tls: Any) -> tuple[int, str]:
    """POST the first PROBE_INPUTS test digits; (status, what the answer says: correct count and model version)."""
    import httpx

    from edgeshield.models import load_digits_split

    split = ctx.state.get("split") or load_digits_split()
    with httpx.Client(base_url=url, verify=tls, timeout=30) as c:
        r = c.post("/v1/predict", json={"inputs": split.x_test[:PROBE_INPUTS].tolist()})
    if r.status_code != 200:
        return r.status_code, str(r.json().get("detail") or r.json().get("error") or r.text[:200])
    right = sum(int(p == y) for p, y in zip(r.json()["predictions"], split.y_test[:PROBE_INPUTS], strict=True))
    return 200, f"{right}/{PROBE_INPUTS} correct, model version {r.headers.get('edgeshield-model-version')}"


def _steps_table(ctx: DemoContext, title: str, rows: list[tuple[str, str]]) -> None:
    """A stage's steps and their outcomes, shown after the demo."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("step")
    table.add_column("outcome")
    for step, outcome in rows:
        table.add_row(step, outcome)
    ctx.tables.append(table)


def _accuracy(session: Any, ctx: DemoContext) -> float:
    from edgeshield.models import DIGITS_INPUT_NAME, load_digits_split

    split = ctx.state.get("split") or load_digits_split()
    pred = session.run(None, {DIGITS_INPUT_NAME: split.x_test})[0].argmax(axis=1)
    return float((pred == split.y_test).mean())


def _tpm(ctx: DemoContext) -> str:

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
        with _serving(work, "serve-sealed", bundle=ctx.state["bundle"], owner_key=kdir / "owner.pub",
                      device_key=Path(spec), tcti=tpm.tcti) as (url, tls, _admin):
            status, said = _predict(ctx, url, tls)
        if status != 200:
            raise DemoFailure(f"serve from the sealed key answered {status}: {said}")
        result["served_from_sealed_key"] = said
        rows.append((f"serve digits.esb --device-key {spec}; POST /v1/predict", f"200: {said}"))

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
            result["licence"] = _licensed_serving(ctx, work, kdir, tpm, server, client, dkeys, bundle, bundle_id,
                                                  rows)

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
    _steps_table(ctx, "Software TPM (swtpm, started and stopped by this stage), PCR policy sha256:"
                 + ",".join(map(str, PCRS)), rows)
    ctx.summary["tpm"] = result
    return ("device key sealed in a software TPM serves digits.esb; a PCR change → TPMPolicyError; release "
            "service: replayed quote refused, fresh quote released; a licensed released key served, then 451 once "
            "the TPM clock passed the licence")


def _licensed_serving(ctx: DemoContext, work: Path, kdir: Path, tpm: Any, server: Any, client: Any, dkeys: Any,
                      bundle: Path, bundle_id: str, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """A one-hour licence on the released key: ``serve --released-key`` answers; two hours of TPM clock later
    (TPM2_ClockSet, which only moves forward) it answers 451, though the wall clock says the licence is valid."""
    from datetime import UTC, datetime, timedelta

    from edgeshield.hardware import DeviceTpm, Licence

    server.service.licences = {bundle_id: Licence(bundle_id, not_after=datetime.now(UTC) + timedelta(hours=1))}
    with DeviceTpm(tpm.tcti) as d:
        client.fetch_wrapped(d, dkeys, bundle_id, PCRS).save(work / "released-key.json")  # still wrapped to the TPM
    dkeys.save(work / "tpm-keys.json")
    out: dict[str, Any] = {}
    with _serving(work, "serve-released", bundle=bundle, owner_key=kdir / "owner.pub",
                  released_key=work / "released-key.json", tpm_keys=work / "tpm-keys.json", tcti=tpm.tcti,
                  watch_interval_s=0.2, log_level="critical") as (url, tls, _admin):  # the expiry is in the table
        status, said = _predict(ctx, url, tls)
        if status != 200:
            raise DemoFailure(f"serve --released-key answered {status}: {said}")
        out["served"] = said
        rows.append(("serve --released-key (licence: 1 hour); POST /v1/predict", f"200: {said}"))
        with DeviceTpm(tpm.tcti) as d:
            d.ctx.clock_set(d.read_clock().clock + 2 * 3_600_000, auth=d._t.ESYS_TR.OWNER)
        deadline = time.monotonic() + 10
        while (status := _predict(ctx, url, tls)[0]) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
    if status != 451:
        raise DemoFailure(f"after the TPM clock passed the licence the server answered {status}, not 451")
    out["after_tpm_clock"] = status
    rows.append(("TPM clock +2 h (TPM2_ClockSet; the wall clock unchanged); POST /v1/predict",
                 "451: the licence expired by the TPM clock (licence.expired audited)"))
    return out


def _updates(ctx: DemoContext) -> str:

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

        def update_to(version: int, bundle: Path) -> None:
            updates.publish(repo, repo_keys, bundle, owner_key=owner_pub, model="digits", input_spec=spec)
            u.pull()
            rec = u.install(commit=True)
            rows.append((f"publish v{version}; pull, install, commit",
                         f"slot {rec.slot}, health {rec.health}; floor {u.status()['floor']['floor']}"))

        update_to(1, v1)
        # serve the device's current slot; v2 lands while it serves, and a reload switches without a restart
        with _serving(work, "serve-slot", update_dir=device, owner_key=kdir / "owner.pub",
                      device_key=kdir / "device.key") as (url, tls, admin):
            before = _predict(ctx, url, tls)
            update_to(2, v2)
            import httpx

            with httpx.Client(base_url=url, verify=admin, timeout=60) as c:
                reload = c.post("/v1/admin/reload")
            after = _predict(ctx, url, tls)
        if reload.status_code != 200 or before[0] != 200 or after[0] != 200 \
                or not (before[1].endswith("version 1") and after[1].endswith("version 2")):
            raise DemoFailure(f"serve --update-dir did not switch v1 → v2: {before}, reload {reload.status_code}, "
                              f"{after}")
        result["reload"] = {"before": before[1], "after": after[1]}
        rows.append(("serve --update-dir: before v2, POST /v1/predict", f"200: {before[1]}"))
        rows.append(("POST /v1/admin/reload (no restart), POST /v1/predict", f"200: {after[1]}"))
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
    _steps_table(ctx, "TUF update to A/B slots (file:// repository), device floor", rows)
    ctx.summary["update"] = result
    return (f"v1 → v2 installed atomically into the other slot and committed (floor {result['floor']}); the running "
            "server reloaded it without a restart; a replay of v1 refused (FloorViolationError), v2 still running")


STAGES = [
    Stage("Probe this machine's hardware security features", _probe),
    Stage("Seal the device key in a software TPM, lock it with a PCR change, release keys to fresh quotes", _tpm),
    Stage("Update the model v1 → v2 through TUF into A/B slots and refuse a replay of v1", _updates),
]
