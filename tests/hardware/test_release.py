"""The attestation-gated key-release service over real mutual TLS, with real software TPMs and a real bundle.

A device enrols (credential activation), fetches a bundle's key with a fresh quote, and opens the bundle with it;
every attack from the issue is refused, audited and emitted: a replayed nonce, a changed PCR, an unknown TPM, an
unknown attestation key, a revoked device, a restored TPM state, and requests outside the licence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgeshield.hardware._attest as at
import edgeshield.hardware._release as rel
from edgeshield import bundles, keys, transport
from edgeshield.audit import AuditLog
from edgeshield.errors import ConnectionFailedError, InvalidArgumentError, KeyCommitmentError, ServerRefusedError
from edgeshield.hardware._swtpm import SoftwareTPM
from edgeshield.monitor import EventStream, SecurityEvent

PCRS = [0, 7, 16]


def extend(tpm: at.DeviceTpm, pcr: int) -> None:
    """A simulated boot-chain change: extend a SHA-256 PCR."""
    t = tpm._t
    digest = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=b"\x5a" * 32))
    tpm.ctx.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES([digest]))


def orderly_reboot(sw: SoftwareTPM) -> None:
    """A reboot as an OS does it: TPM2_Shutdown(CLEAR) (which saves the clock), then power cycle."""
    with at.DeviceTpm(sw.tcti) as d:
        d.ctx.shutdown(d._t.TPM2_SU.CLEAR)
    sw.restart()


class Collect:
    durable = False

    def __init__(self) -> None:
        self.events: list[SecurityEvent] = []

    def handle(self, event: SecurityEvent) -> None:
        self.events.append(event)

    def reasons(self) -> list[str]:
        return [e.data["reason"] for e in self.events if e.kind == "attestation.failed"]


@dataclasses.dataclass
class Fleet:
    tmp: Path
    ca: Path
    service: rel.ReleaseService
    server: rel.ReleaseServer
    events: Collect
    audit: AuditLog
    owner: Any
    bundle: Path
    bundle_id: str
    ek_tpm: SoftwareTPM

    def client(self, name: str) -> rel.ReleaseClient:
        issued = self.tmp / "pki-issued" / name
        if not issued.exists():
            got = transport.issue(self.ca, name=name, role="client")
            issued.mkdir(parents=True)
            (issued / "cert").write_text(str(got.cert_path))
            (issued / "key").write_text(str(got.key_path))
        cert, key = (issued / "cert").read_text(), (issued / "key").read_text()
        return rel.ReleaseClient("127.0.0.1", self.server.port, transport.client_context(self.ca, cert, key))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, swtpm_ek: SoftwareTPM) -> Iterator[Fleet]:
    from edgeshield.models import digits_model_path

    digits_model = digits_model_path()
    tmp = tmp_path_factory.mktemp("release")
    ca = tmp / "ca"
    transport.init_ca(ca)
    srv = transport.issue(ca, name="keyrelease", role="operator", server=True, sans=["127.0.0.1"])
    kdir = tmp / "keys"
    keys.init_keys(kdir)  # owner + "device": here the release service is the bundle's recipient
    owner = keys.load_owner_private_key(kdir / "owner.key")
    bundle = tmp / "digits.esb"
    manifest = bundles.protect(digits_model, bundle, signing_key=owner,
                               recipients=[keys.load_device_public_key(kdir / "device.pub")], model_version=3)
    with at.DeviceTpm(swtpm_ek.tcti) as d:
        policy = at.PcrPolicy(d.pcr_values(PCRS))
    events = Collect()
    audit = AuditLog(tmp / "audit.db")
    store = rel.ReleaseStore(tmp / "release.db")
    service = rel.ReleaseService(
        store=store, recipient_key=keys.load_device_private_key(kdir / "device.key"),
        owner_key=owner.public_key(), bundles=rel.ReleaseService.load_bundles([bundle], owner.public_key()),
        trust=at.EkTrust.load(swtpm_ek.ek_ca_certs()), policy=policy, audit=audit, events=EventStream([events]))
    server = rel.ReleaseServer(service, transport.server_context(ca, srv.cert_path, srv.key_path))
    server.start()
    yield Fleet(tmp, ca, service, server, events, audit, owner, bundle, manifest.bundle_id, swtpm_ek)
    server.stop()
    store.close()
    audit.close()


@dataclasses.dataclass
class Dev:
    sw: SoftwareTPM
    keys: at.DeviceKeys


def new_device(sw: SoftwareTPM) -> Dev:
    with at.DeviceTpm(sw.tcti) as d:
        return Dev(sw, d.create_keys())


@pytest.fixture(scope="module")
def cam1(fleet: Fleet) -> Dev:
    dev = new_device(fleet.ek_tpm)
    with at.DeviceTpm(dev.sw.tcti) as d:
        fleet.client("cam-1").enrol(d, dev.keys)
    return dev


def fetch(fleet: Fleet, dev: Dev, name: str = "cam-1", bundle_id: str | None = None) -> rel.ReleasedKey:
    with at.DeviceTpm(dev.sw.tcti) as d:
        return fleet.client(name).fetch_key(d, dev.keys, bundle_id or fleet.bundle_id, PCRS)


def refused(fleet: Fleet, status: int, reason: str) -> Any:
    class Ctx:
        def __enter__(self) -> None:
            self.n = len(fleet.events.reasons())
            self.audited = len(fleet.audit)

        def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
            assert isinstance(exc, ServerRefusedError), exc
            assert exc.status == status and exc.args[0].find(reason) >= 0, exc
            assert fleet.events.reasons()[self.n:] == [reason]
            assert len(fleet.audit) > self.audited
            return True

    return Ctx()


def test_an_attested_device_gets_the_key_and_opens_the_bundle(fleet: Fleet, cam1: Dev) -> None:
    released = fetch(fleet, cam1)
    opened = rel.open_released(fleet.bundle, fleet.owner.public_key(), released)
    inp = opened.session.get_inputs()[0]
    x = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    assert opened.session.run(None, {inp.name: x})[0].shape[0] == 1
    assert any(e.kind == "keyrelease.released" and e.data["bundle_id"] == fleet.bundle_id
               for e in fleet.events.events)
    kinds = [e.kind for e in fleet.audit.entries()]
    assert "attestation.enrolled" in kinds and "keyrelease.released" in kinds
    with pytest.raises(KeyCommitmentError):  # a secret that is not the bundle's never opens it
        rel.open_released(fleet.bundle, fleet.owner.public_key(),
                          dataclasses.replace(released, secret=bytes(64)))


def test_a_replayed_nonce_is_refused(fleet: Fleet, cam1: Dev) -> None:
    client = fleet.client("cam-1")
    nonce = rel._unb64(client.call("/v1/nonce", {}), "nonce")
    with at.DeviceTpm(cam1.sw.tcti) as d:
        q = d.quote(cam1.keys, nonce, PCRS)
        attest, sig = d.certify_release_key(cam1.keys, nonce)
    body = {"bundle_id": fleet.bundle_id, "nonce": rel._b64(nonce), "quote": q.to_dict(),
            "release_public": rel._b64(cam1.keys.release_public), "certify_attest": rel._b64(attest),
            "certify_signature": rel._b64(sig)}
    client.call("/v1/release", body)
    with refused(fleet, 403, "nonce-replayed"):
        client.call("/v1/release", body)  # the very same request again
    own = rel._unb64(fleet.client("cam-2").call("/v1/nonce", {}), "nonce")  # a nonce issued to someone else
    with refused(fleet, 403, "nonce-replayed"):
        client.call("/v1/release", dict(body, nonce=rel._b64(own)))


def test_a_changed_pcr_is_refused_and_a_reboot_restores_it(fleet: Fleet, cam1: Dev) -> None:
    with at.DeviceTpm(cam1.sw.tcti) as d:
        extend(d, 16)
    with refused(fleet, 403, "pcr"):
        fetch(fleet, cam1)
    orderly_reboot(cam1.sw)  # the measured state comes back: the key is released again
    fetch(fleet, cam1)


def test_a_restored_tpm_state_is_refused(fleet: Fleet, swtpm_factory: Any) -> None:
    sw = swtpm_factory(with_ek_cert=True, ca_dir=fleet.ek_tpm.ca_dir)  # another TPM from the same manufacturer CA
    dev = new_device(sw)
    with at.DeviceTpm(sw.tcti) as d:
        fleet.client("cam-3").enrol(d, dev.keys)
    fetch(fleet, dev, "cam-3")
    snap = sw.snapshot()
    orderly_reboot(sw)
    fetch(fleet, dev, "cam-3")
    sw.restore(snap)
    with refused(fleet, 403, "rollback"):
        fetch(fleet, dev, "cam-3")


def test_an_unknown_tpm_cannot_enrol(fleet: Fleet, swtpm: SoftwareTPM, swtpm_factory: Any) -> None:
    dev = new_device(swtpm)  # no EK certificate, not in any list
    with at.DeviceTpm(swtpm.tcti) as d, refused(fleet, 403, "unknown-tpm"):
        fleet.client("rogue").enrol(d, dev.keys)
    other = swtpm_factory(with_ek_cert=True)  # an EK certificate from a CA nobody enrolled
    dev2 = new_device(other)
    with at.DeviceTpm(other.tcti) as d, refused(fleet, 403, "unknown-tpm"):
        fleet.client("rogue").enrol(d, dev2.keys)


def test_an_unknown_attestation_key_is_refused(fleet: Fleet, cam1: Dev, swtpm: SoftwareTPM) -> None:
    with refused(fleet, 403, "unknown-ak"):
        fetch(fleet, cam1, "never-enrolled")
    # cam-1's certificate but another TPM's AK: the quote does not verify under cam-1's enrolled AK
    other = new_device(swtpm)
    with refused(fleet, 403, "bad-signature"):
        fetch(fleet, other, "cam-1")


def test_an_ak_from_another_tpm_cannot_pose_as_the_enrolled_one(fleet: Fleet, cam1: Dev,
                                                                swtpm: SoftwareTPM) -> None:
    other = new_device(swtpm)
    client = fleet.client("cam-4")
    with at.DeviceTpm(fleet.ek_tpm.tcti) as d:
        ek, cert = d.endorsement()
    assert cert is not None
    ch = client.call("/v1/enrol/begin", {"ek_public": rel._b64(ek), "ek_certificate": rel._b64(cert),
                                         "ak_public": rel._b64(other.keys.ak_public)})
    with at.DeviceTpm(swtpm.tcti) as d, pytest.raises(at.CredentialActivationError):
        d.activate_credential(other.keys, rel._unb64(ch, "credential_blob"), rel._unb64(ch, "encrypted_secret"))
    with refused(fleet, 403, "activation"):
        client.call("/v1/enrol/finish", {"challenge_id": ch["challenge_id"], "secret": rel._b64(os.urandom(32))})


def test_a_revoked_device_is_refused(fleet: Fleet, cam1: Dev) -> None:
    dev = new_device(fleet.ek_tpm)
    with at.DeviceTpm(dev.sw.tcti) as d:
        fleet.client("cam-5").enrol(d, dev.keys)
    fetch(fleet, dev, "cam-5")
    assert fleet.service.store.revoke("cam-5")  # the operator's revocation of the enrolment
    with refused(fleet, 403, "revoked"):
        fetch(fleet, dev, "cam-5")
    client = fleet.client("cam-6")
    transport.revoke(fleet.ca, name="cam-6")  # the PKI's revocation: the handshake itself fails
    transport.reload_crl(fleet.server.context, fleet.ca / "crl.pem")
    before = len(fleet.events.events)
    with pytest.raises((ConnectionFailedError, ServerRefusedError)):
        client.call("/v1/nonce", {})
    deadline = time.monotonic() + 5  # the server audits the failed handshake in its own thread
    while len(fleet.events.events) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [e.data["reason"] for e in fleet.events.events[before:]] == ["revoked"]


def test_licences_not_after_max_devices_and_groups(fleet: Fleet, cam1: Dev) -> None:
    svc = fleet.service
    try:
        svc.licences = {fleet.bundle_id: rel.Licence(fleet.bundle_id, not_after=datetime.now(UTC) - timedelta(1))}
        with refused(fleet, 403, "licence-expired"):
            fetch(fleet, cam1)
        svc.licences = {fleet.bundle_id: rel.Licence(fleet.bundle_id, groups=frozenset({"line-a"}))}
        with refused(fleet, 403, "licence"):
            fetch(fleet, cam1)  # cam-1 has no group
        # max_devices: cam-1 and cam-3/cam-5 already hold it; a limit of the devices counted so far admits
        # them again but no newcomer
        counted = svc.store._read("SELECT COUNT(*) FROM releases WHERE bundle_id = ?", (fleet.bundle_id,))[0][0]
        svc.licences = {fleet.bundle_id: rel.Licence(fleet.bundle_id, max_devices=counted)}
        assert fetch(fleet, cam1).licence == {"bundle_id": fleet.bundle_id, "not_after": None,
                                              "max_devices": counted, "groups": []}
        dev = new_device(fleet.ek_tpm)
        with at.DeviceTpm(dev.sw.tcti) as d:
            fleet.client("cam-7").enrol(d, dev.keys)
        with refused(fleet, 403, "licence"):
            fetch(fleet, dev, "cam-7")
    finally:
        svc.licences = {}


def test_grouped_enrolment_list_and_licence_file(tmp_path: Path, fleet: Fleet, swtpm: SoftwareTPM) -> None:
    dev = new_device(swtpm)
    with at.DeviceTpm(swtpm.tcti) as d:
        ek = at.parse_public(d.endorsement()[0])
    (tmp_path / "devices.json").write_text(
        f'{{"devices": [{{"device": "cam-8", "group": "line-a", "ek_sha256": "{ek.spki_sha256()}"}}]}}')
    (tmp_path / "licences.json").write_text(
        f'{{"licences": [{{"bundle_id": "{fleet.bundle_id}", "groups": ["line-a"], "max_devices": 100,'
        f' "not_after": "{(datetime.now(UTC) + timedelta(days=1)).isoformat()}"}}]}}')
    svc = fleet.service
    try:
        svc.enrolment = rel.load_enrolment_list(tmp_path / "devices.json")
        svc.licences = rel.load_licences(tmp_path / "licences.json")
        with at.DeviceTpm(swtpm.tcti) as d:
            fleet.client("cam-8").enrol(d, dev.keys)  # enrolled by the list: this TPM has no EK certificate
        assert fetch(fleet, dev, "cam-8").licence is not None
        with refused(fleet, 403, "licence"):
            fetch(fleet, new_dev_enrolled(fleet), "cam-9")  # enrolled by certificate, no group
    finally:
        svc.enrolment, svc.licences = {}, {}


def new_dev_enrolled(fleet: Fleet) -> Dev:
    dev = new_device(fleet.ek_tpm)
    with at.DeviceTpm(dev.sw.tcti) as d:
        fleet.client("cam-9").enrol(d, dev.keys)
    return dev


def test_unknown_bundle_and_bad_requests(fleet: Fleet, cam1: Dev) -> None:
    with refused(fleet, 400, "unknown-bundle"):
        fetch(fleet, cam1, bundle_id="00" * 16)
    with pytest.raises(ServerRefusedError) as exc:
        fleet.client("cam-1").call("/v1/release", {"bundle_id": fleet.bundle_id})
    assert exc.value.status in (400, 403)


# --- released-key files, licences enforced on the device, the floor, EK revocation ---------------------------------
def second_device(fleet: Fleet, swtpm_factory: Any, name: str) -> Dev:
    """Another TPM from the fleet's manufacturer CA, enrolled as ``name`` (its own clock, counters and NV)."""
    sw = swtpm_factory(with_ek_cert=True, ca_dir=fleet.ek_tpm.ca_dir)
    dev = new_device(sw)
    with at.DeviceTpm(sw.tcti) as d:
        fleet.client(name).enrol(d, dev.keys)
    return dev


def fetch_wrapped(fleet: Fleet, dev: Dev, name: str, **kw: Any) -> rel.ReleasedKeyFile:
    with at.DeviceTpm(dev.sw.tcti) as d:
        return fleet.client(name).fetch_wrapped(d, dev.keys, fleet.bundle_id, PCRS, **kw)


def unwrap(dev: Dev, file: rel.ReleasedKeyFile) -> rel.ReleasedKey:
    with at.DeviceTpm(dev.sw.tcti) as d:
        return rel.unwrap_released(file, d, dev.keys)


def test_a_released_key_file_keeps_the_key_wrapped_and_opens_the_bundle(fleet: Fleet, cam1: Dev,
                                                                        tmp_path: Path) -> None:
    file = fetch_wrapped(fleet, cam1, "cam-1")
    path = tmp_path / "digits.key.json"
    file.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = rel.ReleasedKeyFile.load(path)
    assert loaded == file and loaded.licence is None
    released = unwrap(cam1, loaded)
    assert len(released.secret) == 64 and released.secret.hex() not in path.read_text()
    assert rel.open_released(fleet.bundle, fleet.owner.public_key(), released).manifest.bundle_id == fleet.bundle_id


def test_the_licence_is_bound_to_the_key_and_anchored_to_the_tpm_clock(fleet: Fleet, swtpm_factory: Any) -> None:
    dev = second_device(fleet, swtpm_factory, "cam-10")
    svc = fleet.service
    not_after = datetime.now(UTC) + timedelta(days=1)
    try:
        svc.licences = {fleet.bundle_id: rel.Licence(fleet.bundle_id, not_after=not_after)}
        file = fetch_wrapped(fleet, dev, "cam-10")
    finally:
        svc.licences = {}
    assert file.licence is not None
    start, end = file.licence["tpm_clock_at_release"], file.licence["tpm_clock_not_after"]
    assert 0 < end - start <= 86_400_000 and end - start > 86_000_000
    with at.DeviceTpm(dev.sw.tcti) as d:
        guard = rel.LicenceGuard(file.licence, d)
        guard.check()
        assert guard.not_after == not_after and guard.describe()["enforced_by"] == ["wall-clock", "tpm-clock"]
        assert unwrap(dev, file).licence == file.licence
        # an edited licence (a later end, by either clock) or a dropped one: the TPM refuses to decrypt
        for edited in ({**file.licence, "not_after": (not_after + timedelta(days=365)).isoformat()},
                       {**file.licence, "tpm_clock_not_after": end + 10**12}, None):
            with pytest.raises(rel.ReleasedKeyRefusedError):
                rel.unwrap_released(dataclasses.replace(file, licence=edited), d, dev.keys)
        # the TPM clock runs out before the wall clock: TPM2_ClockSet only moves it forward
        d.ctx.clock_set(d.read_clock().clock + 2 * 86_400_000, auth=d._t.ESYS_TR.OWNER)
        with pytest.raises(rel.LicenceExpiredError, match="TPM clock"):
            rel.unwrap_released(file, d, dev.keys)
        assert guard.describe()["last_check"]["expired"] is False
        with pytest.raises(rel.LicenceExpiredError):
            guard.check()
        assert guard.describe()["last_check"]["expired"] is True


def test_a_cleared_tpm_does_not_restart_the_licence(fleet: Fleet, swtpm_factory: Any) -> None:
    dev = second_device(fleet, swtpm_factory, "cam-11")
    svc = fleet.service
    try:
        svc.licences = {fleet.bundle_id: rel.Licence(fleet.bundle_id, not_after=datetime.now(UTC) + timedelta(1))}
        with at.DeviceTpm(dev.sw.tcti) as d:
            d.ctx.clock_set(d.read_clock().clock + 3_600_000, auth=d._t.ESYS_TR.OWNER)
        file = fetch_wrapped(fleet, dev, "cam-11")
    finally:
        svc.licences = {}
    with at.DeviceTpm(dev.sw.tcti) as d:
        d.ctx.clear(d._t.ESYS_TR.PLATFORM)  # TPM2_Clear sets the clock back to 0 (and flushes the EK)
        d._ek = None
    with pytest.raises(rel.LicenceExpiredError, match="cleared"):
        unwrap(dev, file)


def test_the_device_wall_clock_ends_a_licence() -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    guard = rel.LicenceGuard({"bundle_id": "ab" * 16, "not_after": past}, None)
    with pytest.raises(rel.LicenceExpiredError, match="wall clock"):
        guard.check()
    assert guard.describe()["enforced_by"] == ["wall-clock"]
    rel.LicenceGuard(None, None).check()
    rel.LicenceGuard({"bundle_id": "ab" * 16, "not_after": None, "max_devices": 2, "groups": []}, None).check()
    for bad in ({"not_after": past}, {"bundle_id": "x", "not_after": "soon"},
                {"bundle_id": "x", "not_after": "2030-01-01T00:00:00"},
                {"bundle_id": "x", "tpm_clock_at_release": 5}, {"bundle_id": "x", "tpm_clock_at_release": 9,
                                                                "tpm_clock_not_after": 3},
                {"bundle_id": "x", "tpm_clock_at_release": True, "tpm_clock_not_after": 3}):
        with pytest.raises(rel.LicenceError):
            rel.LicenceGuard(bad, None)


def test_the_service_refuses_a_bundle_below_the_device_floor(fleet: Fleet, swtpm_factory: Any) -> None:
    from edgeshield.hardware._nvfloor import DEFAULT_FLOOR_INDEX, TpmCounterFloor

    dev = second_device(fleet, swtpm_factory, "cam-12")
    floor = TpmCounterFloor.create(tcti=dev.sw.tcti, floor=3)  # the bundle is model version 3
    assert fetch_wrapped(fleet, dev, "cam-12", floor_index=DEFAULT_FLOOR_INDEX).bundle_id == fleet.bundle_id
    assert fleet.service.store.device_floor("cam-12") == (at.nv_name(floor.nv_public()), 3)
    floor.raise_to(4)  # an update to v4 committed: the v3 key is never released to this device again
    with refused(fleet, 403, "below-floor"):
        fetch_wrapped(fleet, dev, "cam-12", floor_index=DEFAULT_FLOOR_INDEX)
    assert fleet.service.store.device_floor("cam-12") == (at.nv_name(floor.nv_public()), 4)
    with refused(fleet, 403, "floor-required"):  # it showed a floor once: hiding it now does not help
        fetch_wrapped(fleet, dev, "cam-12")
    other = TpmCounterFloor.create(DEFAULT_FLOOR_INDEX + 1, tcti=dev.sw.tcti)  # a fresh counter at a low value
    with refused(fleet, 403, "floor-index"):
        fetch_wrapped(fleet, dev, "cam-12", floor_index=other.index)
    with pytest.raises(rel.FloorRollbackError):  # the store keeps the highest floor seen
        fleet.service.store.record_floor("cam-12", at.nv_name(floor.nv_public()), 2)


def test_require_floor_refuses_a_release_without_floor_evidence(fleet: Fleet, cam1: Dev) -> None:
    fleet.service.require_floor = True
    try:
        with refused(fleet, 403, "floor-required"):
            fetch(fleet, cam1)
    finally:
        fleet.service.require_floor = False


def test_a_revoked_ek_can_neither_enrol_nor_fetch(fleet: Fleet, swtpm_factory: Any) -> None:
    dev = second_device(fleet, swtpm_factory, "cam-13")
    fetch_wrapped(fleet, dev, "cam-13")
    with at.DeviceTpm(dev.sw.tcti) as d:
        ek = at.parse_public(d.endorsement()[0]).spki_sha256()
    assert fleet.service.store.revoke_ek(ek.upper()) and not fleet.service.store.revoke_ek(ek)
    assert ek in fleet.service.store.revoked_eks()
    with refused(fleet, 403, "ek-revoked"):
        fetch_wrapped(fleet, dev, "cam-13")
    with at.DeviceTpm(dev.sw.tcti) as d, refused(fleet, 403, "ek-revoked"):
        fleet.client("cam-14").enrol(d, dev.keys)
    with pytest.raises(InvalidArgumentError):
        fleet.service.store.revoke_ek("not-hex")


def _crl(fleet: Fleet, serials: list[int], next_update: timedelta = timedelta(days=1)) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = fleet.ek_tpm.ca_dir
    issuer = x509.load_pem_x509_certificate((ca / "issuercert.pem").read_bytes())
    key = serialization.load_pem_private_key((ca / "signkey.pem").read_bytes(), None)
    now = datetime.now(UTC)
    b = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(now - timedelta(1)) \
        .next_update(now + next_update)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    return b.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def test_an_ek_certificate_revoked_by_its_ca_crl(fleet: Fleet, swtpm_factory: Any, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    dev = second_device(fleet, swtpm_factory, "cam-15")
    with at.DeviceTpm(dev.sw.tcti) as d:
        cert = x509.load_der_x509_certificate(d.endorsement()[1] or b"")
    crl = _crl(fleet, [cert.serial_number])
    (tmp_path / "ek.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    svc = fleet.service
    try:
        svc.ek_crls = rel.load_crls([tmp_path / "ek.crl"])
        with refused(fleet, 403, "ek-revoked"):  # enrolled before the CRL: refused at release
            fetch_wrapped(fleet, dev, "cam-15")
        with at.DeviceTpm(dev.sw.tcti) as d, refused(fleet, 403, "ek-revoked"):
            fleet.client("cam-16").enrol(d, dev.keys)
        svc.ek_crls = (_crl(fleet, [], next_update=-timedelta(hours=1)),)  # a stale CRL fails closed
        with refused(fleet, 403, "ek-revoked"):
            new_device_enrolled_as(fleet, "cam-17")  # even a TPM the CRL does not list cannot enrol
        svc.ek_crls = (_crl(fleet, [cert.serial_number + 1]),)  # not on the list: released
        fetch_wrapped(fleet, dev, "cam-15")
    finally:
        svc.ek_crls = ()
    foreign = x509.CertificateRevocationListBuilder().issuer_name(cert.issuer)
    with pytest.raises(InvalidArgumentError, match="not signed by an enrolled"):
        dataclasses.replace(svc, ek_crls=(_foreign_crl(foreign),))


def _foreign_crl(builder: Any) -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.now(UTC)
    return builder.last_update(now).next_update(now + timedelta(1)).sign(ec.generate_private_key(ec.SECP256R1()),
                                                                         hashes.SHA256())


def new_device_enrolled_as(fleet: Fleet, name: str) -> Dev:
    dev = new_device(fleet.ek_tpm)
    with at.DeviceTpm(dev.sw.tcti) as d:
        fleet.client(name).enrol(d, dev.keys)
    return dev


def test_cli_fetch_key_out_with_floor_and_revoke_ek(fleet: Fleet, swtpm_factory: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeshield.cli import app
    from edgeshield.hardware._nvfloor import TpmCounterFloor

    dev = second_device(fleet, swtpm_factory, "cam-18")
    TpmCounterFloor.create(tcti=dev.sw.tcti, floor=3)
    dev.keys.save(tmp_path / "tpm-keys.json")
    fleet.client("cam-18")
    issued = fleet.tmp / "pki-issued" / "cam-18"
    tls = ["--server", f"127.0.0.1:{fleet.server.port}", "--ca", str(fleet.ca), "--cert",
           (issued / "cert").read_text(), "--key", (issued / "key").read_text()]
    runner = CliRunner()
    out = tmp_path / "digits.key.json"
    owner_pub = str(fleet.tmp / "keys" / "owner.pub")
    r = runner.invoke(app, ["attest", "fetch-key", str(fleet.bundle), "--owner-key", owner_pub, *tls,
                            "--tcti", dev.sw.tcti, "--keys", str(tmp_path / "tpm-keys.json"),
                            "--pcrs", ",".join(map(str, PCRS)), "--out", str(out), "--floor-index", "0x0180E5F1",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["opened"] and out.stat().st_mode & 0o777 == 0o600
    assert rel.ReleasedKeyFile.load(out).bundle_id == fleet.bundle_id
    assert fleet.service.store.device_floor("cam-18") is not None  # the floor went with the request
    with at.DeviceTpm(dev.sw.tcti) as d:
        ek = at.parse_public(d.endorsement()[0]).spki_sha256()
    r = runner.invoke(app, ["attest", "revoke", "--store", str(fleet.tmp / "release.db"), "--ek", ek])
    assert r.exit_code == 0 and "revoked" in r.output, r.output
    with refused(fleet, 403, "ek-revoked"):
        fetch_wrapped(fleet, dev, "cam-18", floor_index=0x0180E5F1)
    r = runner.invoke(app, ["attest", "revoke", "--store", str(fleet.tmp / "release.db")])
    assert isinstance(r.exception, InvalidArgumentError)
