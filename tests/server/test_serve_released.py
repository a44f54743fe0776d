"""Serving from a released key on the real mutual-TLS server, with a real software TPM and a real release service:
the bundle opens in the TPM without a device key, serves until its licence runs out (~2 s), then answers 451 with
the licence named; ``licence.expired`` is audited once, health and status say so; an expired or edited released
key stops ``serve`` at start with its typed error."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tpm2_pytss")
if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed", allow_module_level=True)

import edgeshield.hardware._attest as at
import edgeshield.hardware._release as rel
from edgeshield import audit, bundles, keys, transport
from edgeshield.adversarial import METADATA_KEY
from edgeshield.hardware import SoftwareTPM
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
from edgeshield.server import ServeConfig, build_state

from _serving import mtls_client, serving

PCRS = [0, 7]
X = load_digits_split().x_test[:2].tolist()


@pytest.fixture(scope="module")
def tpm() -> Iterator[SoftwareTPM]:
    with SoftwareTPM(with_ek_cert=True) as sw:
        yield sw


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tpm: SoftwareTPM) -> Iterator[dict[str, Any]]:
    """A release service holding the bundle's key (its recipient), this device's TPM enrolled with it, and the
    server's PKI."""
    root = tmp_path_factory.mktemp("released")
    k = root / "keys"
    keys.init_keys(k)  # owner + the release service's recipient key ("device" here)
    owner = keys.load_owner_private_key(k / "owner.key")
    bundle = root / "digits.esb"
    m = bundles.protect(digits_model_path(), bundle, signing_key=owner, model_version=4,
                        recipients=[keys.load_device_public_key(k / "device.pub")],
                        metadata={METADATA_KEY: digits_input_spec().to_json()})
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    svc_cert = transport.issue(ca, name="keyrelease", role="operator", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role=r) for n, r in (("alice", "client"), ("aud", "auditor"),
                                                                   ("cam-1", "client"))}
    with at.DeviceTpm(tpm.tcti) as d:
        policy = at.PcrPolicy(d.pcr_values(PCRS))
        device_keys = d.create_keys()
    device_keys.save(root / "tpm-keys.json")
    store = rel.ReleaseStore(root / "release.db")
    service = rel.ReleaseService(
        store=store, recipient_key=keys.load_device_private_key(k / "device.key"), owner_key=owner.public_key(),
        bundles=rel.ReleaseService.load_bundles([bundle], owner.public_key()),
        trust=at.EkTrust.load(tpm.ek_ca_certs()), policy=policy)
    release = rel.ReleaseServer(service, transport.server_context(ca, svc_cert.cert_path, svc_cert.key_path))
    release.start()
    cam = certs["cam-1"]
    client = rel.ReleaseClient("127.0.0.1", release.port,
                               transport.client_context(ca / "ca.crt", cam.cert_path, cam.key_path))
    with at.DeviceTpm(tpm.tcti) as d:
        client.enrol(d, device_keys)
    audit.generate_signing_key(root / "audit.key")
    try:
        yield {"root": root, "keys": k, "bundle": bundle, "manifest": m, "ca": ca, "server": server,
               "certs": certs, "service": service, "client": client, "tpm": tpm, "device_keys": device_keys}
    finally:
        release.stop()
        store.close()


def _released(world: dict[str, Any], path: Path, seconds: float | None) -> rel.ReleasedKeyFile:
    """Fetch the bundle's key, still wrapped to the TPM, under a licence ending ``seconds`` from now."""
    svc, bid = world["service"], world["manifest"].bundle_id
    try:
        if seconds is not None:
            svc.licences = {bid: rel.Licence(bid, not_after=datetime.now(UTC) + timedelta(seconds=seconds))}
        with at.DeviceTpm(world["tpm"].tcti) as d:
            file = world["client"].fetch_wrapped(d, world["device_keys"], bid, PCRS)
    finally:
        svc.licences = {}
    file.save(path)
    return file


def _config(world: dict[str, Any], d: Path, released: Path, **kw: Any) -> ServeConfig:
    server = world["server"]
    return ServeConfig(bundle=world["bundle"], owner_key=world["keys"] / "owner.pub", released_key=released,
                       tpm_keys=world["root"] / "tpm-keys.json", tcti=world["tpm"].tcti, ca=world["ca"],
                       cert=server.cert_path, key=server.key_path, audit_db=d / "audit.db",
                       audit_key=world["root"] / "audit.key", port=0, log_level="warning",
                       monitor_db=d / "monitor.db", **kw)


def test_a_released_key_serves_until_its_licence_ends_then_451(world: dict[str, Any], tmp_path: Path) -> None:
    released = tmp_path / "digits.key.json"
    _released(world, released, seconds=2.5)
    cfg = _config(world, tmp_path, released, watch_interval_s=0.3)
    state = build_state(cfg)
    assert state.model.licence is not None
    with serving(cfg, state) as (_srv, _crl, port), mtls_client(world, "alice", port=port) as c, \
            mtls_client(world, "aud", port=port) as auditor:
        r = c.post("/v1/predict", json={"inputs": X})
        assert r.status_code == 200 and r.headers["edgeshield-model-version"] == "4"
        assert c.get("/healthz").json() == {"status": "ok"}
        licence = auditor.get("/status.json").json()["server"]["licence"]
        assert licence["expired"] is False and licence["enforced_by"] == ["wall-clock", "tpm-clock"]
        deadline = time.monotonic() + 15
        while (r := c.post("/v1/predict", json={"inputs": X})).status_code == 200:
            assert time.monotonic() < deadline, "the licence never ended"
            time.sleep(0.1)
        assert r.status_code == 451, r.text
        assert r.json()["licence"] == world["manifest"].bundle_id and "expired" in r.json()["error"]
        assert c.post("/v1/predict", json={"inputs": X}).status_code == 451  # for good
        assert c.get("/healthz").json() == {"status": "licence-expired"}
        assert auditor.get("/status.json").json()["server"]["licence"]["expired"] is True
        time.sleep(0.7)  # the background check runs again: still one audit entry
    entries = list(audit.AuditLog(cfg.audit_db, readonly=True).entries())
    expired = [e for e in entries if e.kind == "licence.expired"]
    assert len(expired) == 1 and expired[0].data["bundle_id"] == world["manifest"].bundle_id
    refused = [e for e in entries if e.kind == "licence.refused"]
    assert len(refused) >= 2 and all(e.data["status"] == 451 for e in refused)
    startup = next(e for e in entries if e.kind == "server.startup")
    assert startup.data["licence"]["bundle_id"] == world["manifest"].bundle_id


def test_a_released_key_without_a_licence_serves_and_reloads(world: dict[str, Any], tmp_path: Path) -> None:
    released = tmp_path / "digits.key.json"
    _released(world, released, seconds=None)
    cfg = _config(world, tmp_path, released, monitor=False)
    assert cfg.device_key is None  # no device key on this device: the TPM opens the bundle
    state = build_state(cfg)
    assert state.model.licence is None and state.reload is not None
    with serving(cfg, state) as (_srv, _crl, port), mtls_client(world, "alice", port=port) as c:
        assert c.post("/v1/predict", json={"inputs": X}).status_code == 200
        _released(world, released, seconds=3600)  # a new release, now under a licence: a reload takes it up
        info = state.reload("test")
        assert info["new"]["bundle_id"] == world["manifest"].bundle_id
        assert state.model.licence is not None and state.model.licence.refusal() is None
        assert c.post("/v1/predict", json={"inputs": X}).status_code == 200


def test_an_expired_or_edited_released_key_stops_serve_at_start(world: dict[str, Any], tmp_path: Path) -> None:
    released = tmp_path / "digits.key.json"
    _released(world, released, seconds=0.5)
    time.sleep(1.0)
    with pytest.raises(rel.LicenceExpiredError):
        build_state(_config(world, tmp_path, released, monitor=False))
    file = _released(world, released, seconds=3600)
    assert file.licence is not None
    later = {**file.licence, "not_after": (datetime.now(UTC) + timedelta(days=365)).isoformat()}
    dataclasses.replace(file, licence=later).save(released)
    (tmp_path / "b").mkdir()
    with pytest.raises(rel.ReleasedKeyRefusedError):  # the licence is bound into the key's label
        build_state(_config(world, tmp_path / "b", released, monitor=False))
