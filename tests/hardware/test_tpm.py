"""TPM-sealed device keys against a real software TPM (swtpm): sealing, PCR policies, owner-signed approvals,
persistent handles, the CLI, and run/serve with ``--device-key tpm:...``. Every refusal is a typed error."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield import bundles, keys
from edgeshield.errors import EdgeShieldError, IntegrityError, InvalidArgumentError
from edgeshield.hardware import _tpm as T  # noqa: N812 - T for TPM, read like a namespace
from edgeshield.hardware._swtpm import SoftwareTPM

pytest.importorskip("tpm2_pytss")

SEL = T.PCRSelection.parse("sha256:7,16")


def raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def measure(tpm: SoftwareTPM, what: bytes = b"a new boot stage", index: int = 16) -> None:
    with T.connect(tpm.tcti) as esys:
        T.pcr_extend(index, hashlib.sha256(what).digest(), esys=esys)


def cli(*args: object, tcti: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({T.TCTI_ENV: tcti} if tcti else {})}
    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeshield: error: "), proc.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def owner() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- the policy arithmetic ----------------------------------------------------------------------------------------
def test_policy_digests_match_the_tpms_own(swtpm_module: SoftwareTPM, owner: ec.EllipticCurvePrivateKey) -> None:
    """Our offline PolicyPCR / PolicyAuthorize digests are the TPM's (a trial session computes them)."""
    import tpm2_pytss as tss

    with T.connect(swtpm_module.tcti) as esys:
        values = T.pcr_read(SEL, esys=esys)
        trial = esys.start_auth_session(tss.ESYS_TR.NONE, tss.ESYS_TR.NONE, tss.TPM2_SE.TRIAL, None,
                                        tss.TPM2_ALG.SHA256)  # fmt: skip
        esys.policy_pcr(trial, b"", str(SEL))
        assert bytes(esys.policy_get_digest(trial)) == T.policy_pcr_digest(SEL, values)
        esys.flush_context(trial)
    pem = owner.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    name = T._signer_name(pem)
    assert name[:2] == b"\x00\x0b" and len(name) == 34  # SHA-256 name of the owner's public area
    with T.connect(swtpm_module.tcti) as esys:
        trial = esys.start_auth_session(tss.ESYS_TR.NONE, tss.ESYS_TR.NONE, tss.TPM2_SE.TRIAL, None,
                                        tss.TPM2_ALG.SHA256)  # fmt: skip
        approval = T.sign_approval(owner, SEL, values)
        key = esys.load_external(T._signer_public(pem), None, tss.ESYS_TR.OWNER)
        ticket = esys.verify_signature(key, approval.a_hash(), T_signature(approval))
        esys.policy_authorize(trial, approval.approved_policy, name, ticket, T.POLICY_REF)
        assert bytes(esys.policy_get_digest(trial)) == T.policy_authorize_digest(name)
        esys.flush_context(trial)
        esys.flush_context(key)


def T_signature(approval: T.PolicyApproval) -> Any:  # noqa: N802 - the TPM's signature structure, as unseal builds it
    import tpm2_pytss as tss
    from cryptography.hazmat.primitives.asymmetric import utils

    r, s = utils.decode_dss_signature(approval.signature)
    return tss.TPMT_SIGNATURE(sigAlg=tss.TPM2_ALG.ECDSA, signature=tss.TPMU_SIGNATURE(ecdsa=tss.TPMS_SIGNATURE_ECC(
        hash=tss.TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"), signatureS=s.to_bytes(32, "big"))))  # fmt: skip


# --- PCR-bound sealing --------------------------------------------------------------------------------------------
def test_seal_unseal_then_a_measurement_locks_the_key_until_reboot(swtpm: SoftwareTPM, tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    with T.connect(swtpm.tcti) as esys:
        sealed = T.seal_device_key(key, SEL, esys=esys)
    path = tmp_path / "device.sealed"
    sealed.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_bytes()
    for form in (raw(key), raw(key).hex().encode(), base64.b64encode(raw(key))):
        assert form not in text  # the file holds TPM-wrapped blobs, never the key
    loaded = T.SealedObject.load(path)
    with T.connect(swtpm.tcti) as esys:
        assert raw(T.unseal_device_key(loaded, esys=esys)) == raw(key)
    measure(swtpm)  # a boot-chain change
    with T.connect(swtpm.tcti) as esys, pytest.raises(T.TPMPolicyError, match="policy check failed"):
        T.unseal(loaded, esys=esys)
    swtpm.restart()  # a reboot into the measured state: PCR 16 back to its sealed value
    with T.connect(swtpm.tcti) as esys:
        assert raw(T.unseal_device_key(loaded, esys=esys)) == raw(key)


def test_seal_to_given_values_and_blob_from_another_tpm(swtpm: SoftwareTPM, swtpm_factory: Any) -> None:
    future = {7: bytes(32), 16: hashlib.sha256(bytes(32) + hashlib.sha256(b"stage").digest()).digest()}
    with T.connect(swtpm.tcti) as esys:
        sealed = T.seal(b"secret", SEL, esys=esys, values=future)  # sealed to a state not reached yet
        with pytest.raises(T.TPMPolicyError):
            T.unseal(sealed, esys=esys)
    measure(swtpm, b"stage")
    with T.connect(swtpm.tcti) as esys:
        assert T.unseal(sealed, esys=esys) == b"secret"
    other = swtpm_factory()
    measure(other, b"stage")  # same PCR values, different TPM
    with T.connect(other.tcti) as esys, pytest.raises(T.TPMSealedObjectError, match="another TPM"):
        T.unseal(sealed, esys=esys)


def test_tampered_or_truncated_sealed_objects_are_integrity_errors(swtpm_module: SoftwareTPM) -> None:
    with T.connect(swtpm_module.tcti) as esys:
        sealed = T.seal(b"secret", SEL, esys=esys)
        doc = json.loads(sealed.to_json())
        priv = bytearray(base64.b64decode(doc["private"]))
        priv[len(priv) // 2] ^= 1
        flipped = T.SealedObject.from_json(json.dumps({**doc, "private": base64.b64encode(priv).decode()}).encode())
        with pytest.raises(T.TPMSealedObjectError):
            T.unseal(flipped, esys=esys)
        # Metadata naming another policy than the object carries (e.g. a wider PCR selection) is caught.
        wider = T.SealedObject.from_json(json.dumps({**doc, "auth_policy": "00" * 32}).encode())
        with pytest.raises(T.TPMSealedObjectError, match="policy"):
            T.unseal(wider, esys=esys)
    blob = sealed.to_json()
    for bad in (blob[: len(blob) // 2], b"", b"{}", blob.replace(b'"version": 1', b'"version": 9'), b"\xff" * 10):
        with pytest.raises(T.TPMSealedObjectError):
            T.SealedObject.from_json(bad)


# --- owner-signed PCR policies ------------------------------------------------------------------------------------
def test_signed_policy_new_measurement_needs_only_a_new_owner_signature(
    swtpm: SoftwareTPM, owner: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    key = X25519PrivateKey.generate()
    with T.connect(swtpm.tcti) as esys:
        sealed = T.seal_device_key(key, SEL, esys=esys, signer=owner.public_key())
        before = T.pcr_read(SEL, esys=esys)
        with pytest.raises(T.TPMApprovalError, match="approvals"):
            T.unseal(sealed, esys=esys)  # no approval given
        approvals = [T.sign_approval(owner, SEL, before)]
        T.save_approvals(tmp_path / "approved.json", approvals)
        assert raw(T.unseal_device_key(sealed, esys=esys, approvals=T.load_approvals(tmp_path / "approved.json")))\
            == raw(key)  # fmt: skip
    measure(swtpm, b"kernel 6.1 -> 6.2")
    with T.connect(swtpm.tcti) as esys:
        with pytest.raises(T.TPMPolicyError, match="no owner approval"):
            T.unseal(sealed, esys=esys, approvals=approvals)
        after = T.pcr_read(SEL, esys=esys)
        stranger = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(T.TPMApprovalError, match="not signed by the owner"):
            T.unseal(sealed, esys=esys, approvals=[T.sign_approval(stranger, SEL, after)])
        approvals.append(T.sign_approval(owner, SEL, after))  # the owner approves the new measurement
        assert raw(T.unseal_device_key(sealed, esys=esys, approvals=approvals)) == raw(key)  # no re-seal


def test_the_tpm_not_our_python_enforces_the_signer(
    swtpm_module: SoftwareTPM, owner: ec.EllipticCurvePrivateKey
) -> None:
    """An attacker who rewrites the sealed object's signer to their own key and signs an approval passes our local
    check (it verifies under the key the file names) but not the TPM: the object's policy names the owner's key."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    with T.connect(swtpm_module.tcti) as esys:
        sealed = T.seal(b"secret", SEL, esys=esys, signer=owner.public_key())
        pem = attacker.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
        forged = T.SealedObject(sealed.selection, sealed.auth_policy, pem, sealed.public, sealed.private)
        approval = T.sign_approval(attacker, SEL, T.pcr_read(SEL, esys=esys))
        with pytest.raises(T.TPMPolicyError, match="policy check failed"):
            T.unseal(forged, esys=esys, approvals=[approval])


def test_malformed_approvals_are_refused(tmp_path: Path, owner: ec.EllipticCurvePrivateKey) -> None:
    approval = T.sign_approval(owner, SEL, {7: bytes(32), 16: bytes(32)})
    T.save_approvals(tmp_path / "a.json", [approval])
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["approvals"][0]["values"]["16"] = "11" * 32  # values edited, approved_policy left: caught before the TPM
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(T.TPMApprovalError, match="approved_policy"):
        T.load_approvals(tmp_path / "b.json")
    for bad in ("", "[]", '{"format": "x"}', (tmp_path / "a.json").read_text()[:40]):
        (tmp_path / "c.json").write_text(bad)
        with pytest.raises(EdgeShieldError):
            T.load_approvals(tmp_path / "c.json")
    with pytest.raises(IntegrityError):
        T.PolicyApproval(SEL, approval.values, approval.signature[:-2] + b"\0\0").verify(owner.public_key())


# --- parsers ------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_selection_and_spec_parsers_only_raise_typed_errors(text: str) -> None:
    for parse in (T.PCRSelection.parse, lambda s: T.parse_device_key_spec("tpm:" + s)):
        with contextlib.suppress(InvalidArgumentError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_sealed_object_parser_only_raises_integrity_errors(data: bytes) -> None:
    with pytest.raises(T.TPMSealedObjectError):
        T.SealedObject.from_json(data)


def test_spec_grammar() -> None:
    assert T.parse_device_key_spec("tpm:0x81000001") == T.DeviceKeySpec(0x81000001, None, None)
    assert T.parse_device_key_spec("tpm:/k/s.json,policy=/k/a.json") == T.DeviceKeySpec(
        None, Path("/k/s.json"), Path("/k/a.json"))  # fmt: skip
    assert T.PCRSelection.parse("sha256:0-2,7") == T.PCRSelection("sha256", (0, 1, 2, 7))
    for bad in ("tpm:", "tpm:0x01000001", "device.key"):
        with pytest.raises(InvalidArgumentError):
            T.parse_device_key_spec(bad)


# --- CLI, persistent handles, run and serve -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgeshield.models import digits_model_path, load_digits_split

    root = tmp_path_factory.mktemp("tpm")
    keys.init_keys(root / "keys")
    np.save(root / "x.npy", load_digits_split().x_test[:4])
    return {"root": root, "keys": root / "keys", "model": digits_model_path(), "x": root / "x.npy"}


def protect_for(world: dict[str, Path], device_pub: Path, name: str) -> Path:
    bundle = world["root"] / f"{name}.esb"
    bundles.protect(world["model"], bundle, signing_key=keys.load_owner_private_key(world["keys"] / "owner.key"),
                    recipients=[keys.load_device_public_key(device_pub)])  # fmt: skip
    return bundle


def test_cli_generated_key_never_on_disk_runs_a_bundle_and_locks(swtpm: SoftwareTPM, world: dict[str, Path]) -> None:
    d = world["root"] / "gen"
    d.mkdir()
    proc = cli("tpm", "seal-device-key", "--generate", "--public-out", d / "device.pub", "--pcrs", "sha256:7,16",
               "--out", d / "device.sealed", "--json", tcti=swtpm.tcti)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device_key"] == f"tpm:{d / 'device.sealed'}"
    spec = f"tpm:{d / 'device.sealed'}"
    key = T.load_device_key(spec, tcti=swtpm.tcti)
    secret = raw(key)
    for f in d.rglob("*"):  # the private key exists nowhere on disk
        data = f.read_bytes()
        assert secret not in data and secret.hex().encode() not in data and base64.b64encode(secret) not in data
    bundle = protect_for(world, d / "device.pub", "gen")
    run = cli("run", bundle, "--owner-key", world["keys"] / "owner.pub", "--device-key", spec, "--input", world["x"],
              "--json", tcti=swtpm.tcti)  # fmt: skip
    assert run.returncode == 0, run.stderr
    ok = cli("tpm", "unseal-test", spec, "--device-pub", d / "device.pub", tcti=swtpm.tcti)
    assert ok.returncode == 0 and keys.key_id(key.public_key()) in ok.stdout, ok.stderr
    ext = cli("tpm", "pcr", "extend", "16", "--data", "rootkit", "--json", tcti=swtpm.tcti)
    assert ext.returncode == 0, ext.stderr
    one_line_error(cli("run", bundle, "--owner-key", world["keys"] / "owner.pub", "--device-key", spec, "--input",
                       world["x"], tcti=swtpm.tcti), 3, "policy check failed")  # fmt: skip


def test_cli_persistent_handle_and_signed_policy(swtpm: SoftwareTPM, world: dict[str, Path]) -> None:
    k, d = world["keys"], world["root"] / "handle"
    d.mkdir()
    approved = d / "approved.json"
    proc = cli("tpm", "approve-pcrs", "--owner-key", k / "owner.key", "--pcrs", "sha256:7,16", "--from-tpm",
               swtpm.tcti, "--out", approved)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seal = ("tpm", "seal-device-key", "--device-key", k / "device.key", "--signed-by", k / "owner.pub", "--pcrs",
            "sha256:7,16", "--handle", "0x81000001")  # fmt: skip
    assert cli(*seal, tcti=swtpm.tcti).returncode == 0
    one_line_error(cli(*seal, tcti=swtpm.tcti), 2, "in use")
    assert cli(*seal, "--force", tcti=swtpm.tcti).returncode == 0
    spec = f"tpm:0x81000001,policy={approved}"
    swtpm.restart()  # persisted: survives the reboot, no file needed
    assert cli("tpm", "unseal-test", spec, "--device-pub", k / "device.pub", tcti=swtpm.tcti).returncode == 0
    one_line_error(cli("tpm", "unseal-test", "tpm:0x81000001", tcti=swtpm.tcti), 3, "approvals")
    measure(swtpm, b"new bootloader")
    one_line_error(cli("tpm", "unseal-test", spec, tcti=swtpm.tcti), 3, "no owner approval")
    values = [f"{i}={v}" for i, v in json.loads(cli("tpm", "pcr", "read", "--pcrs", "sha256:7,16", "--json",
                                                    tcti=swtpm.tcti).stdout)["pcrs"].items()]  # fmt: skip
    add = cli("tpm", "approve-pcrs", "--owner-key", k / "owner.key", "--pcrs", "sha256:7,16", "--out", approved,
              "--append", *[a for v in values for a in ("--pcr-value", v)])  # fmt: skip
    assert add.returncode == 0, add.stderr
    assert cli("tpm", "unseal-test", spec, tcti=swtpm.tcti).returncode == 0  # the owner's signature, no re-seal


def test_no_tpm_is_a_clear_error(world: dict[str, Path]) -> None:
    one_line_error(cli("tpm", "pcr", "read", "--tcti", "swtpm:host=127.0.0.1,port=1"), 1, "no TPM at")


def test_serve_opens_its_bundle_with_a_tpm_sealed_key(
    swtpm: SoftwareTPM, world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeshield import audit, transport
    from edgeshield.server import ServeConfig
    from edgeshield.server import running as serving

    root = world["root"] / "serve"
    root.mkdir()
    with T.connect(swtpm.tcti) as esys:
        T.seal_device_key(keys.load_device_private_key(world["keys"] / "device.key"), SEL, esys=esys).save(
            root / "device.sealed")  # fmt: skip
    bundle = protect_for(world, world["keys"] / "device.pub", "serve")
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    client = transport.issue(ca, name="ops", role="client")
    audit.generate_signing_key(root / "audit.key")
    monkeypatch.setenv(T.TCTI_ENV, swtpm.tcti)
    spec = Path(f"tpm:{root / 'device.sealed'}")
    cfg = ServeConfig(bundle=bundle, owner_key=world["keys"] / "owner.pub", device_key=spec, ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0)  # fmt: skip
    x = np.load(world["x"]).tolist()
    with serving(cfg) as (_srv, _watcher, port):
        ctx = transport.client_context(ca / "ca.crt", client.cert_path, client.key_path)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as c:
            r = c.post("/v1/predict", json={"inputs": x})
            assert r.status_code == 200, r.text
    measure(swtpm)
    with pytest.raises(T.TPMPolicyError), serving(cfg):
        pass
