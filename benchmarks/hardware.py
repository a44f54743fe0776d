"""Benchmark: the hardware root of trust and the updater, attacked for real and timed.

    python benchmarks/hardware.py [--quick] [--json PATH]

Protocol (fixed; every figure comes from this run; real swtpm processes, a real key-release service over mutual TLS
on 127.0.0.1, real TUF repositories served by http.server on 127.0.0.1 or read as file:// URLs):

1. Tamper cases, each mounted for real against the real component; a case counts as refused only when the expected
   typed error is raised (and, for the release service, the refusal carries the expected reason; for the updater,
   the device's ``current`` model and floor are unchanged afterwards):
   - ``pcr_change_unseal``: a device key sealed under PCRs 7,16, PCR 16 extended -> ``TPMPolicyError``;
   - ``sealed_blob_other_tpm``: that sealed object unsealed in another swtpm -> ``TPMSealedObjectError``;
   - release service (an enrolled device, EK certificate from swtpm's local CA): ``pcr_change_quote`` (PCR 16
     extended, fresh quote -> refused ``pcr``), ``replayed_nonce`` (the same release request sent twice ->
     ``nonce-replayed``), ``bad_attestation_key`` (the enrolled device's identity, another TPM's AK ->
     ``bad-signature``), ``unenrolled_tpm`` (a TPM without EK certificate enrols -> ``unknown-tpm``),
     ``restored_tpm_snapshot`` (state restored from a snapshot taken before an orderly reboot -> ``rollback``),
     ``expired_licence`` (licence not-after yesterday -> ``licence``); each ``ServerRefusedError`` 403;
   - the floor in a TPM NV counter, read by the service through NV certification (the bundle is version 3):
     ``release_below_floor`` (the device's counter raised to 4 -> ``below-floor``), ``floor_counter_redefined``
     (the counter undefined with owner auth and defined again, hoping it restarts low -> still ``below-floor``),
     ``floor_other_counter`` (another counter on the same TPM, left at 1, certified instead -> ``floor-index``);
   - a released key with a one-hour licence (version 5, above the floor), saved still wrapped to the TPM:
     ``licence_expired_tpm_clock`` (TPM2_ClockSet two hours on, the wall clock unchanged; ``unwrap_released`` ->
     ``LicenceExpiredError``), ``licence_edited`` (the file's not-after and TPM-clock end pushed out ->
     ``ReleasedKeyRefusedError``: the licence is bound into the OAEP label, so the TPM refuses to decrypt);
   - updater (a device committed at v2 or v1): ``lower_version`` (a genuinely signed v1 published over v2 ->
     ``FloorViolationError``), ``mix_and_match`` (v1's bundle put where v2's target file is ->
     ``MetadataMismatchError``/``EndlessDataError``), ``freeze`` (timestamp expired, mirror keeps serving it ->
     ``MetadataExpiredError``).
2. Timings: ``unseal_ms_p50`` (``unseal_device_key`` on an open TPM connection, PolicyPCR session included),
   ``quote_ms_p50`` (the device's TPM2_Quote) and ``quote_verify_ms_p50`` (the verifier's ``verify_quote``: AK
   signature, nonce, PCR digest, expected-PCR policy, clock monotonic against the previous quote).
3. kill -9: the updater child of tests/updates/test_kill9.py (pull, install, rollback in a loop, then install
   with commit) on a copy of a device committed at v1 whose repository offers v2, killed (SIGKILL) at a uniformly
   random moment within one uninterrupted run's duration; after each kill the device must come back (recovery
   runs in ``status``) with a ``current`` that passed its health check, version >= floor >= 1, that opens with
   the owner and device keys and answers an inference. ``kill9_unbootable`` counts the trials where it did not.
4. ``update_install_s_100mb``: a bundle of about 100 MB (the digits model plus a 100 MB float32 initializer of
   seeded random values, added to the logits times zero so that ONNX Runtime loads it), published as v2 to a
   repository served over HTTP; a device committed at v1 times
   pull (TUF refresh, download, hash and bundle verification) + install (slot write, fsync, switch, health check)
   + open ``current`` as serve does and answer one inference. Median over the repetitions; parts reported too.
5. Reload while serving: ``serve --update-dir`` (``running``, mutual TLS, the default monitor) with v1 and v2 in
   its two slots; 4 client threads send one-digit predicts back to back, each on its own keep-alive connection,
   while the slot is switched (``update rollback``) and ``POST /v1/admin/reload`` called, ``reloads`` times, 0.3 s
   apart. ``reload_failed_requests`` counts answers other than 200 (and transport errors; target 0);
   ``reload_ms_p50`` is the admin call's time (the new model verified, opened and swapped in);
   ``reload_request_ms_max_during`` / ``_outside`` the slowest predict overlapping a reload call / not.

``--quick``: 20 timings each, 10 kill trials, one install, 4 reloads (under a minute); the full run (100 timings
each, 100 kill trials, three installs, 20 reloads) takes about a minute and a half on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.server
import os
import platform
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off

from _machine import Background, hardware, open_report, temp_dir, write_report  # beside this script

ROOT = Path(__file__).resolve().parent.parent
KILL9_CHILD = ROOT / "tests" / "updates" / "_kill9_child.py"
PCRS = [0, 7, 16]
MB = 1 << 20
BIG_BYTES = 100 * MB
# (quick, full)
SIZES = {"timings": (20, 100), "kill9": (10, 100), "installs": (1, 3), "reloads": (4, 20)}


def _size(name: str, quick: bool) -> int:
    return SIZES[name][0 if quick else 1]


def _p50(samples: list[float]) -> float:
    return statistics.median(samples)


def machine_info() -> dict[str, str]:
    import onnxruntime
    import tuf

    exe = shutil.which("swtpm") or "swtpm"
    swtpm = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
    hw = f"{hardware()}; {temp_dir()}"
    from importlib.metadata import version

    swtpm_v = swtpm.stdout.split(",")[0].strip()
    versions = (f"Python {platform.python_version()}, swtpm ({swtpm_v}), tpm2-pytss {version('tpm2-pytss')}, "
                f"tuf {tuf.__version__}, onnxruntime {onnxruntime.__version__}")
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """``root`` served by http.server on 127.0.0.1 (a plain mirror); yields its URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclasses.dataclass
class Case:
    name: str
    expected: str
    refused: bool = False
    got: str = ""


def attempt(case: Case, expected: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[[], Any],
            check: Callable[[BaseException], bool] = lambda e: True) -> Case:
    """Run the attack: refused only if it raises ``expected`` and ``check`` accepts the error."""
    try:
        fn()
    except expected as exc:  # the typed refusal
        case.refused = bool(check(exc))
        case.got = f"{type(exc).__name__}: {str(exc)[:90]}"
    except Exception as exc:  # noqa: BLE001 - any other outcome is a miss, recorded
        case.got = f"unexpected {type(exc).__name__}: {str(exc)[:90]}"
    else:
        case.got = "accepted"
    return case


# --- 1a/2: sealing ---------------------------------------------------------------------------------------------------
def bench_sealing(reps: int) -> tuple[list[Case], dict[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from edgeshield.hardware import _tpm as T  # noqa: N812
    from edgeshield.hardware._swtpm import SoftwareTPM

    sel = T.PCRSelection.parse("sha256:7,16")
    cases = []
    with SoftwareTPM() as a, SoftwareTPM() as b:
        key = X25519PrivateKey.generate()
        with T.connect(a.tcti) as esys:
            sealed = T.seal_device_key(key, sel, esys=esys)
            T.unseal_device_key(sealed, esys=esys)  # warm
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                T.unseal_device_key(sealed, esys=esys)
                times.append((time.perf_counter() - t0) * 1000)

        def other_tpm() -> None:
            with T.connect(b.tcti) as esys:
                T.unseal(sealed, esys=esys)

        cases.append(attempt(Case("sealed_blob_other_tpm", "TPMSealedObjectError"), T.TPMSealedObjectError,
                             other_tpm))

        def pcr_change() -> None:
            with T.connect(a.tcti) as esys:
                T.pcr_extend(16, hashlib.sha256(b"a new boot stage").digest(), esys=esys)
                T.unseal(sealed, esys=esys)

        cases.insert(0, attempt(Case("pcr_change_unseal", "TPMPolicyError"), T.TPMPolicyError, pcr_change))
    return cases, {"unseal_ms_p50": _p50(times), "unseal_ms_max": max(times), "unseal_reps": reps}


# --- 1b/2: attestation and the release service -----------------------------------------------------------------------
def _extend(tpm: Any, pcr: int) -> None:
    t = tpm._t
    digest = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=b"\x5a" * 32))
    tpm.ctx.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES([digest]))


def _orderly_reboot(sw: Any) -> None:
    import edgeshield.hardware._attest as at

    with at.DeviceTpm(sw.tcti) as d:
        d.ctx.shutdown(d._t.TPM2_SU.CLEAR)
    sw.restart()


def bench_attestation(work: Path, reps: int) -> tuple[list[Case], dict[str, Any]]:
    import edgeshield.hardware._attest as at
    import edgeshield.hardware._release as rel
    from edgeshield import bundles, keys, transport
    from edgeshield.audit import AuditLog
    from edgeshield.errors import ServerRefusedError
    from edgeshield.hardware._swtpm import SoftwareTPM
    from edgeshield.models import digits_model_path
    from edgeshield.monitor import EventStream

    cases: list[Case] = []
    with contextlib.ExitStack() as stack:
        ek_tpm = stack.enter_context(SoftwareTPM(with_ek_cert=True))
        ca = work / "ca"
        transport.init_ca(ca)
        srv = transport.issue(ca, name="keyrelease", role="operator", server=True, sans=["127.0.0.1"])
        kdir = work / "release-keys"
        keys.init_keys(kdir)
        owner = keys.load_owner_private_key(kdir / "owner.key")
        bundle = work / "released.esb"
        manifest = bundles.protect(digits_model_path(), bundle, signing_key=owner,
                                   recipients=[keys.load_device_public_key(kdir / "device.pub")], model_version=3)
        with at.DeviceTpm(ek_tpm.tcti) as d:
            policy = at.PcrPolicy(d.pcr_values(PCRS))
        audit = AuditLog(work / "release-audit.db")
        stack.callback(audit.close)
        store = rel.ReleaseStore(work / "release.db")
        stack.callback(store.close)
        service = rel.ReleaseService(
            store=store, recipient_key=keys.load_device_private_key(kdir / "device.key"),
            owner_key=owner.public_key(), bundles=rel.ReleaseService.load_bundles([bundle], owner.public_key()),
            trust=at.EkTrust.load(ek_tpm.ek_ca_certs()), policy=policy, audit=audit, events=EventStream([]))
        server = rel.ReleaseServer(service, transport.server_context(ca, srv.cert_path, srv.key_path))
        server.start()
        stack.callback(server.stop)

        def client(name: str) -> Any:
            got = transport.issue(ca, name=name, role="client")
            return rel.ReleaseClient("127.0.0.1", server.port,
                                     transport.client_context(ca, got.cert_path, got.key_path))

        def device(sw: Any) -> Any:
            with at.DeviceTpm(sw.tcti) as d:
                return d.create_keys()

        def fetch(c: Any, sw: Any, dk: Any) -> Any:
            with at.DeviceTpm(sw.tcti) as d:
                return c.fetch_key(d, dk, manifest.bundle_id, PCRS)

        def reason(r: str) -> Callable[[BaseException], bool]:
            return lambda e: getattr(e, "status", None) == 403 and r in str(e)

        cam1, cam1_keys = client("cam-1"), device(ek_tpm)
        with at.DeviceTpm(ek_tpm.tcti) as d:
            cam1.enrol(d, cam1_keys)
        released = fetch(cam1, ek_tpm, cam1_keys)  # the honest path works before anything is attacked
        opened = rel.open_released(bundle, owner.public_key(), released)
        if opened.manifest.bundle_id != manifest.bundle_id:
            raise RuntimeError("the released key opened another bundle")

        # timings: the device's quote, the verifier's check
        ak = at.parse_public(cam1_keys.ak_public)
        q_ms, v_ms = [], []
        last = None
        with at.DeviceTpm(ek_tpm.tcti) as d:
            for _ in range(reps):
                nonce = os.urandom(32)
                t0 = time.perf_counter()
                q = d.quote(cam1_keys, nonce, PCRS)
                t1 = time.perf_counter()
                v = at.verify_quote(q, ak, nonce, policy, last=last)
                t2 = time.perf_counter()
                last = v.clock
                q_ms.append((t1 - t0) * 1000)
                v_ms.append((t2 - t1) * 1000)

        def replay() -> None:
            nonce = rel._unb64(cam1.call("/v1/nonce", {}), "nonce")
            with at.DeviceTpm(ek_tpm.tcti) as d:
                q = d.quote(cam1_keys, nonce, PCRS)
                attest, sig = d.certify_release_key(cam1_keys, nonce)
            body = {"bundle_id": manifest.bundle_id, "nonce": rel._b64(nonce), "quote": q.to_dict(),
                    "release_public": rel._b64(cam1_keys.release_public), "certify_attest": rel._b64(attest),
                    "certify_signature": rel._b64(sig)}
            cam1.call("/v1/release", body)  # the genuine request: released
            cam1.call("/v1/release", body)  # the recorded one, replayed

        cases.append(attempt(Case("replayed_nonce", "ServerRefusedError nonce-replayed"), ServerRefusedError, replay,
                             reason("nonce-replayed")))

        def pcr_change() -> None:
            with at.DeviceTpm(ek_tpm.tcti) as d:
                _extend(d, 16)
            fetch(cam1, ek_tpm, cam1_keys)

        cases.insert(0, attempt(Case("pcr_change_quote", "ServerRefusedError pcr"), ServerRefusedError, pcr_change,
                                reason("pcr")))
        _orderly_reboot(ek_tpm)  # the measured state back
        fetch(cam1, ek_tpm, cam1_keys)

        other = stack.enter_context(SoftwareTPM())
        other_keys = device(other)
        cases.append(attempt(Case("bad_attestation_key", "ServerRefusedError bad-signature"), ServerRefusedError,
                             lambda: fetch(cam1, other, other_keys), reason("bad-signature")))

        def unenrolled() -> None:
            with at.DeviceTpm(other.tcti) as d:
                client("rogue").enrol(d, other_keys)

        cases.append(attempt(Case("unenrolled_tpm", "ServerRefusedError unknown-tpm"), ServerRefusedError,
                             unenrolled, reason("unknown-tpm")))

        sw3 = stack.enter_context(SoftwareTPM(with_ek_cert=True, ca_dir=ek_tpm.ca_dir))
        cam3, cam3_keys = client("cam-3"), device(sw3)
        with at.DeviceTpm(sw3.tcti) as d:
            cam3.enrol(d, cam3_keys)
        fetch(cam3, sw3, cam3_keys)
        snap = sw3.snapshot()
        _orderly_reboot(sw3)
        fetch(cam3, sw3, cam3_keys)

        def restored() -> None:
            sw3.restore(snap)
            fetch(cam3, sw3, cam3_keys)

        cases.append(attempt(Case("restored_tpm_snapshot", "ServerRefusedError rollback"), ServerRefusedError,
                             restored, reason("rollback")))

        service.licences = {manifest.bundle_id: rel.Licence(manifest.bundle_id,
                                                            not_after=datetime.now(UTC) - timedelta(days=1))}
        cases.append(attempt(Case("expired_licence", "ServerRefusedError licence"), ServerRefusedError,
                             lambda: fetch(cam1, ek_tpm, cam1_keys), reason("licence")))
        service.licences = {}
        fetch(cam1, ek_tpm, cam1_keys)  # and the honest device is served again
        cases += _floor_and_licence_cases(cam1, ek_tpm, cam1_keys, service, manifest, reason)
    return cases, {"quote_ms_p50": _p50(q_ms), "quote_verify_ms_p50": _p50(v_ms),
                   "quote_verify_ms_max": max(v_ms), "quote_reps": reps}


def _floor_and_licence_cases(cam: Any, sw: Any, dk: Any, service: Any, manifest: Any,
                             reason: Callable[[str], Callable[[BaseException], bool]]) -> list[Case]:
    """The version floor in a TPM NV counter, read by the service through NV certification (the bundle is model
    version 3), and a released key's licence enforced on the device by the TPM clock."""
    import edgeshield.hardware._attest as at
    import edgeshield.hardware._release as rel
    from edgeshield.errors import ServerRefusedError
    from edgeshield.hardware._nvfloor import TpmCounterFloor

    bid, cases = manifest.bundle_id, []
    decoy = TpmCounterFloor.create(0x0180E600, tcti=sw.tcti)  # another counter on the same TPM, left at 1
    floor = TpmCounterFloor.create(tcti=sw.tcti)

    def fetch_with(index: int, bundle_id: str = bid) -> Any:
        with at.DeviceTpm(sw.tcti) as d:
            return cam.fetch_wrapped(d, dk, bundle_id, PCRS, floor_index=index)

    fetch_with(floor.index)  # floor 1 <= version 3: released, and the service pins this counter
    floor.raise_to(4)  # the device committed version 4
    cases.append(attempt(Case("release_below_floor", "ServerRefusedError below-floor"), ServerRefusedError,
                         lambda: fetch_with(floor.index), reason("below-floor")))

    def redefined() -> None:  # owner auth: undefine the counter and define it again, hoping it restarts low
        with at.DeviceTpm(sw.tcti) as d:
            t = d._t
            d.ctx.nv_undefine_space(d.ctx.tr_from_tpmpublic(floor.index), t.ESYS_TR.OWNER)
        TpmCounterFloor.create(floor.index, tcti=sw.tcti)
        fetch_with(floor.index)

    cases.append(attempt(Case("floor_counter_redefined", "ServerRefusedError below-floor"), ServerRefusedError,
                         redefined, reason("below-floor")))
    cases.append(attempt(Case("floor_other_counter", "ServerRefusedError floor-index"), ServerRefusedError,
                         lambda: fetch_with(decoy.index), reason("floor-index")))

    # a licence for one more hour on version 5 (above the floor): released with the TPM-clock anchor, bound into
    # the OAEP label
    v5 = _reissue(service, 5)
    service.licences = {v5: rel.Licence(v5, not_after=datetime.now(UTC) + timedelta(hours=1))}
    got = fetch_with(floor.index, v5)
    with at.DeviceTpm(sw.tcti) as d:
        rel.unwrap_released(got, d, dk)  # honest: opens now
        d.ctx.clock_set(d.read_clock().clock + 2 * 3_600_000, auth=d._t.ESYS_TR.OWNER)  # two hours of power-on
    cases.append(attempt(Case("licence_expired_tpm_clock", "LicenceExpiredError"), rel.LicenceExpiredError,
                         lambda: _unwrap(sw, dk, got)))
    edited = dataclasses.replace(got, licence={**(got.licence or {}),
                                               "not_after": (datetime.now(UTC) + timedelta(days=365)).isoformat(),
                                               "tpm_clock_not_after": 2**62})
    cases.append(attempt(Case("licence_edited", "ReleasedKeyRefusedError"), rel.ReleasedKeyRefusedError,
                         lambda: _unwrap(sw, dk, edited)))
    service.licences = {}
    return cases


def _unwrap(sw: Any, dk: Any, got: Any) -> Any:
    import edgeshield.hardware._attest as at
    import edgeshield.hardware._release as rel

    with at.DeviceTpm(sw.tcti) as d:
        return rel.unwrap_released(got, d, dk)


def _reissue(service: Any, version: int) -> str:
    """The same model protected again for the service's key at ``version``; the service holds it from now on."""
    from edgeshield import bundles, keys
    from edgeshield.models import digits_model_path

    path = next(iter(service.bundles.values()))
    owner = keys.load_owner_private_key(path.parent / "release-keys" / "owner.key")
    out = path.with_name(f"released-v{version}.esb")
    m = bundles.protect(digits_model_path(), out, signing_key=owner,
                        recipients=[service.recipient_key.public_key()], model_version=version)
    service.bundles = {**service.bundles, m.bundle_id: out}
    return str(m.bundle_id)


# --- 1c: updater attacks -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fleet:
    repo: Path
    repo_keys: Path
    device: Path
    url: str
    k: Any
    spec: Path

    def publish(self, bundle: Path, **kw: Any) -> Any:
        from edgeshield import updates

        return updates.publish(self.repo, self.repo_keys, bundle, owner_key=self.k["owner_pub"], model="digits",
                               input_spec=self.spec, **kw)

    def updater(self) -> Any:
        from edgeshield import updates

        return updates.DeviceUpdater(self.device, device_key=self.k["device_priv"])

    def state(self) -> tuple[str | None, int]:
        with self.updater() as u:
            st = u.status()
        return (st["current"]["bundle_id"] if st["current"] else None), st["floor"]["floor"]


def make_fleet(where: Path, k: dict[str, Any], spec: Path, url: str | None = None) -> Fleet:
    from edgeshield import updates

    repo, repo_keys, device = where / "repo", where / "repo-keys", where / "device"
    updates.init_repository(repo, repo_keys)
    url = url or repo.resolve().as_uri()
    updates.init_device(device, root=updates.repository_root(repo), owner_key_pem=k["owner_pub_pem"],
                        model="digits", url=url)
    return Fleet(repo, repo_keys, device, url, k, spec)


def committed(fleet: Fleet, bundle: Path) -> None:
    fleet.publish(bundle)
    with fleet.updater() as u:
        u.pull()
        u.install(commit=True)


def bench_update_attacks(work: Path, k: dict[str, Any], v: dict[int, Path], spec: Path) -> list[Case]:
    from edgeshield import updates
    from edgeshield.updates import _repo

    cases = []

    def unchanged(fleet: Fleet, before: tuple[str | None, int]) -> Callable[[BaseException], bool]:
        return lambda e: fleet.state() == before and not (fleet.device / "staged").exists()

    def pull(fleet: Fleet) -> None:
        with fleet.updater() as u:
            u.pull()
            u.install()

    f = make_fleet(work / "lower", k, spec)
    committed(f, v[2])
    before = f.state()
    f.publish(v[1], allow_lower_version=True)  # a repository under an attacker's control: genuinely signed v1
    cases.append(attempt(Case("lower_version", "FloorViolationError"), updates.FloorViolationError,
                         lambda: pull(f), unchanged(f, before)))

    f = make_fleet(work / "mix", k, spec)
    committed(f, v[1])
    f.publish(v[2])
    before = f.state()
    _, _, targets = _repo._current(f.repo)
    info = targets.signed.targets["digits/2/model.esb"]
    shutil.copy(v[1], f.repo / "targets" / "digits" / "2" / f"{info.hashes['sha256']}.model.esb")
    cases.append(attempt(Case("mix_and_match", "MetadataMismatchError|EndlessDataError"),
                         (updates.MetadataMismatchError, updates.EndlessDataError), lambda: pull(f),
                         unchanged(f, before)))

    f = make_fleet(work / "freeze", k, spec)
    committed(f, v[1])
    before = f.state()
    _repo.resign_timestamp(f.repo, f.repo_keys, expiry=timedelta(seconds=1))
    time.sleep(2.1)  # the attacker keeps serving the last timestamp it captured, after it expired
    cases.append(attempt(Case("freeze", "MetadataExpiredError"), updates.MetadataExpiredError, lambda: pull(f),
                         unchanged(f, before)))
    return cases


# --- 3: kill -9 ----------------------------------------------------------------------------------------------------
def _device_ok(device: Path, k: dict[str, Any]) -> tuple[bool, str]:
    import numpy as np

    from edgeshield import bundles, updates

    try:
        with updates.DeviceUpdater(device, device_key=k["device_priv"]) as u:
            st = u.status()  # recovery runs first
        cur = st["current"]
        if cur is None or cur["health"] != "passed":
            return False, f"current {cur}"
        version, floor = cur["model_version"], st["floor"]["floor"]
        if not version >= floor >= 1:
            return False, f"version {version} floor {floor}"
        opened = bundles.open_bundle(device / "current" / "model.esb", k["owner_pub"], k["device_priv"])
        if opened.manifest.model_version != version:
            return False, "manifest version differs"
        (logits,) = opened.session.run(None, {"input": np.zeros((1, 64), np.float32)})
        return bool(np.isfinite(logits).all()), f"v{version} floor {floor}"
    except Exception as exc:  # noqa: BLE001 - an unbootable device, recorded
        return False, f"{type(exc).__name__}: {exc}"


def bench_kill9(work: Path, k: dict[str, Any], v: dict[int, Path], spec: Path, trials: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    tmpl = make_fleet(work / "kill9", k, spec)
    committed(tmpl, v[1])
    tmpl.publish(v[2])
    rng = random.Random(12)  # noqa: S311 - when to kill, not a secret

    def run(device: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(KILL9_CHILD), str(device), tmpl.url, str(k["device_key_path"]),
                                 "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.stdout is None:
            raise RuntimeError("no pipe to the updater child")
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError("the updater child did not start")
        return proc

    device = work / "kill9-calibration"
    shutil.copytree(tmpl.device, device, symlinks=True)
    proc = run(device)
    t0 = time.monotonic()
    _out, err = proc.communicate(timeout=300)
    work_s = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted updater run failed: {err[-500:]}")
    shutil.rmtree(device)
    unbootable, outcomes, failures = 0, {}, []
    started = time.perf_counter()
    for i in range(trials):
        device = work / f"kill9-{i}"
        shutil.copytree(tmpl.device, device, symlinks=True)
        proc = run(device)
        time.sleep(rng.uniform(0, work_s))
        proc.kill()  # SIGKILL: no cleanup, no finally blocks
        proc.communicate(timeout=30)
        ok, what = _device_ok(device, k)
        if ok:
            outcomes[what] = outcomes.get(what, 0) + 1
        else:
            unbootable += 1
            failures.append(what)
        shutil.rmtree(device)
        if (i + 1) % 10 == 0:
            progress(f"kill -9 trial {i + 1}/{trials} ({time.perf_counter() - started:.0f} s)")
    return {"kill9_trials": trials, "kill9_unbootable": unbootable, "kill9_work_s": work_s,
            "kill9_outcomes": outcomes, "kill9_failures": failures[:5]}


# --- 4: a 100 MB update ----------------------------------------------------------------------------------------------
def big_model(path: Path) -> None:
    """The digits model plus a 100 MB float32 initializer of seeded random values, wired in as
    ``logits + 0 * ReduceSum(ballast)`` so that ONNX Runtime loads it (it drops unused initializers)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edgeshield.models import digits_model_path

    m = onnx.load(str(digits_model_path()))
    weights = np.random.default_rng(100).standard_normal(BIG_BYTES // 4, dtype=np.float32)
    g = m.graph
    g.initializer.append(numpy_helper.from_array(weights, name="bench_ballast"))
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), name="bench_zero"))
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{out}_core" if o == out else o for o in node.output]
    g.node.extend([helper.make_node("ReduceSum", ["bench_ballast"], ["bench_sum"], keepdims=0),
                   helper.make_node("Mul", ["bench_sum", "bench_zero"], ["bench_nil"]),
                   helper.make_node("Add", [f"{out}_core", "bench_nil"], [out])])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def bench_install(work: Path, k: dict[str, Any], v: dict[int, Path], spec: Path, reps: int) -> dict[str, Any]:
    import numpy as np

    from edgeshield import bundles, updates

    model = work / "big.onnx"
    big_model(model)
    big = work / "big-v2.esb"
    bundles.protect(model, big, signing_key=k["owner_priv"], recipients=[k["device_pub"]], model_version=2)
    model.unlink()
    size = big.stat().st_size
    repo, repo_keys = work / "big-repo", work / "big-repo-keys"
    updates.init_repository(repo, repo_keys)
    updates.publish(repo, repo_keys, v[1], owner_key=k["owner_pub"], model="digits", input_spec=spec)
    totals, parts = [], {"pull": [], "install": [], "answer": []}
    with serve_directory(repo) as url:
        template = work / "big-device-template"  # committed at v1 before v2 is published; copied for each rep
        updates.init_device(template, root=updates.repository_root(repo), owner_key_pem=k["owner_pub_pem"],
                            model="digits", url=url)
        with updates.DeviceUpdater(template, device_key=k["device_priv"]) as u:
            u.pull()
            u.install(commit=True)
        updates.publish(repo, repo_keys, big, owner_key=k["owner_pub"], model="digits", input_spec=spec)
        for i in range(reps):
            device = work / f"big-device-{i}"
            shutil.copytree(template, device, symlinks=True)
            t0 = time.perf_counter()
            with updates.DeviceUpdater(device, device_key=k["device_priv"]) as u:
                index = u.pull()
                t1 = time.perf_counter()
                rec = u.install()
                t2 = time.perf_counter()
            opened = bundles.open_bundle(device / "current" / "model.esb", k["owner_pub"], k["device_priv"])
            (logits,) = opened.session.run(None, {"input": np.zeros((1, 64), np.float32)})
            t3 = time.perf_counter()
            if index is None or index.model_version != 2 or rec.health != "passed" \
                    or opened.manifest.model_version != 2 or logits.shape != (1, 10):
                raise RuntimeError(f"the 100 MB update did not go through: {index} {rec}")
            totals.append(t3 - t0)
            for name, dt in (("pull", t1 - t0), ("install", t2 - t1), ("answer", t3 - t2)):
                parts[name].append(dt)
            del opened
            shutil.rmtree(device)
    return {"update_install_s_100mb": _p50(totals), "update_install_s_100mb_max": max(totals),
            "update_pull_s_100mb": _p50(parts["pull"]), "update_slot_install_s_100mb": _p50(parts["install"]),
            "update_first_answer_s_100mb": _p50(parts["answer"]), "update_bundle_bytes": size,
            "update_install_reps": reps}


# --- 1e: reload while serving ---------------------------------------------------------------------------------------
def bench_reload(work: Path, k: dict[str, Any], v: dict[int, Path], spec: Path, reloads: int,
                 clients: int = 4) -> dict[str, Any]:
    """`serve --update-dir` under steady keep-alive traffic from ``clients`` threads while the model is switched
    ``reloads`` times between v1 and v2 (update rollback, then POST /v1/admin/reload): failed requests, the reload
    call's time, and the slowest request inside the reload windows against the slowest outside them."""
    import httpx

    from edgeshield import audit, transport
    from edgeshield.models import load_digits_split
    from edgeshield.server import ServeConfig, running

    fleet = make_fleet(work / "reload", k, spec)
    committed(fleet, v[1])
    fleet.publish(v[2])
    with fleet.updater() as u:
        u.pull()
        u.install()  # v2 current (not committed): rollback switches between the two slots
    ca = work / "reload-ca"
    transport.init_ca(ca)
    srv = transport.issue(ca, name="edge", role="server", server=True, sans=["127.0.0.1"])
    certs = {name: transport.issue(ca, name=name, role=role) for name, role in
             [("admin", "admin"), *((f"cam-{i}", "client") for i in range(clients))]}
    audit.generate_signing_key(work / "reload-audit.key")
    cfg = ServeConfig(update_dir=fleet.device, owner_key=k["device_key_path"].parent / "owner.pub",
                      device_key=k["device_key_path"], ca=ca, cert=srv.cert_path, key=srv.key_path,
                      audit_db=work / "reload-audit.db", audit_key=work / "reload-audit.key", port=0,
                      log_level="error")
    x = {"inputs": load_digits_split().x_test[:1].tolist()}

    def tls(name: str) -> Any:
        return transport.client_context(ca / "ca.crt", certs[name].cert_path, certs[name].key_path)

    stop = threading.Event()
    samples: list[tuple[float, float, int]] = []  # (start, seconds, status); status 0 = transport error
    versions: set[str] = set()
    lock = threading.Lock()

    def traffic(name: str, url: str) -> None:
        with httpx.Client(base_url=url, verify=tls(name), timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/predict", json=x)
                    status = r.status_code
                    version = r.headers.get("edgeshield-model-version", "")
                except httpx.HTTPError:
                    status, version = 0, ""
                with lock:
                    samples.append((t0, time.perf_counter() - t0, status))
                    versions.add(version)

    windows, reload_ms = [], []
    with running(cfg) as (_server, _watcher, port):
        url = f"https://127.0.0.1:{port}"
        threads = [threading.Thread(target=traffic, args=(f"cam-{i}", url), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, verify=tls("admin"), timeout=60) as admin:
            time.sleep(1.0)
            for i in range(reloads):
                with fleet.updater() as u:
                    u.rollback()  # the other slot current on disk; the server still serves the old one
                t0 = time.perf_counter()
                r = admin.post("/v1/admin/reload")
                t1 = time.perf_counter()
                if r.status_code != 200 or r.json()["new"]["model_version"] != (1 if i % 2 == 0 else 2):
                    raise RuntimeError(f"reload {i} answered {r.status_code}: {r.text[:300]}")
                windows.append((t0, t1))
                reload_ms.append((t1 - t0) * 1000)
                time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)

    def inside(t0: float, dt: float) -> bool:
        return any(t0 < b and t0 + dt > a for a, b in windows)

    during = [dt * 1000 for t0, dt, _ in samples if inside(t0, dt)]
    outside = [dt * 1000 for t0, dt, _ in samples if not inside(t0, dt)]
    return {"reload_trials": reloads, "reload_clients": clients, "reload_requests": len(samples),
            "reload_failed_requests": sum(1 for *_, st in samples if st != 200),
            "reload_ms_p50": _p50(reload_ms), "reload_ms_max": max(reload_ms),
            "reload_request_ms_max_during": max(during) if during else 0.0,
            "reload_request_ms_max_outside": max(outside) if outside else 0.0,
            "reload_request_ms_p50_outside": _p50(outside), "reload_requests_during": len(during),
            "reload_versions_seen": ",".join(sorted(v for v in versions if v))}


# --- main ------------------------------------------------------------------------------------------------------------
def setup_keys(work: Path) -> tuple[dict[str, Any], dict[int, Path], Path]:
    from edgeshield import bundles, keys
    from edgeshield.models import digits_input_spec, digits_model_path

    d = work / "keys"
    keys.init_keys(d)
    k = {"owner_priv": keys.load_owner_private_key(d / "owner.key"),
         "owner_pub": keys.load_owner_public_key(d / "owner.pub"), "owner_pub_pem": (d / "owner.pub").read_bytes(),
         "device_priv": keys.load_device_private_key(d / "device.key"),
         "device_pub": keys.load_device_public_key(d / "device.pub"), "device_key_path": d / "device.key"}
    v = {}
    for version in (1, 2):
        v[version] = work / f"digits-v{version}.esb"
        bundles.protect(digits_model_path(), v[version], signing_key=k["owner_priv"], recipients=[k["device_pub"]],
                        model_version=version)
    spec = work / "input-spec.json"
    spec.write_text(digits_input_spec().to_json())
    return k, v, spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timings, 10 kill -9 trials, one install (< 1 min)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one JSON object")
    args = ap.parse_args(argv)

    from rich.table import Table

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(130, info)
    background = Background()
    work = Path(tempfile.mkdtemp(prefix="edgeshield-hwbench-"))

    def progress(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f} s[/dim] {msg}")

    try:
        k, v, spec = setup_keys(work)
        progress("sealing: attacks and unseal timings ...")
        seal_cases, seal = bench_sealing(_size("timings", quick))
        progress("attestation and key release: attacks and quote timings ...")
        att_cases, att = bench_attestation(work, _size("timings", quick))
        progress("updater attacks ...")
        upd_cases = bench_update_attacks(work, k, v, spec)
        progress("kill -9 trials ...")
        k9 = bench_kill9(work, k, v, spec, _size("kill9", quick), progress)
        progress("100 MB update ...")
        inst = bench_install(work, k, v, spec, _size("installs", quick))
        progress("reloads while serving ...")
        rel = bench_reload(work, k, v, spec, _size("reloads", quick))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cases = seal_cases + att_cases + upd_cases
    r: dict[str, Any] = {"quick": quick, "machine": info["machine"], "hardware": info["hardware"],
                         "versions": info["versions"], "tamper_cases": len(cases),
                         "tamper_cases_refused": sum(c.refused for c in cases)}
    for c in cases:
        r[f"tamper_refused_{c.name}"] = c.refused
    r.update(seal)
    r.update(att)
    r.update({key: val for key, val in k9.items() if key not in ("kill9_outcomes", "kill9_failures")})
    r["kill9_outcomes"] = "; ".join(f"{n}x {w}" for w, n in sorted(k9["kill9_outcomes"].items()))
    r["kill9_failures"] = " | ".join(k9["kill9_failures"])
    r.update(inst)
    r.update(rel)
    r.update(background.stop())
    r["wall_s"] = time.perf_counter() - started

    t = Table(title=f"Tamper cases: {r['tamper_cases_refused']} of {r['tamper_cases']} refused with the expected "
                    "typed error")
    for col in ("case", "expected", "refused", "what happened"):
        t.add_column(col)
    for c in cases:
        t.add_row(c.name, c.expected, "[green]yes[/green]" if c.refused else "[red]NO[/red]", c.got)
    console.print(t)
    t = Table(title="Timings and kill -9")
    for col in ("figure", "value", "detail"):
        t.add_column(col)
    t.add_row("unseal_ms_p50", f"{r['unseal_ms_p50']:.1f}", f"{r['unseal_reps']} unseals, max "
              f"{r['unseal_ms_max']:.1f} ms (open connection, PolicyPCR session)")
    t.add_row("quote_ms_p50", f"{r['quote_ms_p50']:.1f}", f"{r['quote_reps']} TPM2_Quote over PCRs {PCRS}")
    t.add_row("quote_verify_ms_p50", f"{r['quote_verify_ms_p50']:.2f}", f"max {r['quote_verify_ms_max']:.2f} ms")
    t.add_row("kill9_unbootable", f"{r['kill9_unbootable']} / {r['kill9_trials']}",
              f"target 0; work {r['kill9_work_s']:.2f} s; after recovery: {r['kill9_outcomes']}")
    t.add_row("update_install_s_100mb", f"{r['update_install_s_100mb']:.2f}",
              f"{r['update_bundle_bytes'] / MB:.1f} MB bundle, median of {r['update_install_reps']}: pull "
              f"{r['update_pull_s_100mb']:.2f} s + install {r['update_slot_install_s_100mb']:.2f} s + first answer "
              f"{r['update_first_answer_s_100mb']:.2f} s")
    t.add_row("reload_failed_requests", f"{r['reload_failed_requests']} / {r['reload_requests']}",
              f"target 0; {r['reload_clients']} keep-alive clients, {r['reload_trials']} reloads v1 <-> v2 (versions "
              f"served: {r['reload_versions_seen']}); reload call {r['reload_ms_p50']:.0f} ms median, max "
              f"{r['reload_ms_max']:.0f}; slowest request during reloads {r['reload_request_ms_max_during']:.0f} ms, "
              f"outside {r['reload_request_ms_max_outside']:.0f} ms (median {r['reload_request_ms_p50_outside']:.1f})")
    console.print(t)
    if r["kill9_failures"]:
        console.print(f"[red]unbootable after kill -9:[/red] {r['kill9_failures']}")
    console.print(Background.note(r) + f" Wall time {r['wall_s']:.0f} s.")
    write_report(console, args.json, r)
    ok = r["tamper_cases_refused"] == r["tamper_cases"] and r["kill9_unbootable"] == 0 \
        and r["reload_failed_requests"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
