"""Attestation against a real software TPM: credential activation, EK enrolment, quotes and their verification.

Every attack is mounted for real: a credential for another TPM, an EK from another CA, a wrong nonce, a tampered
quote, a changed PCR, a TPM state restored from an earlier snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeshield.hardware._attest as at
from edgeshield.errors import InvalidArgumentError
from edgeshield.hardware._swtpm import SoftwareTPM

PCRS = [0, 7, 16]


def extend(tpm: at.DeviceTpm, pcr: int, data: bytes = b"boot-chain change") -> None:
    """A simulated measurement: extend a SHA-256 PCR (what a changed boot component does)."""
    t = tpm._t
    digests = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=(data * 32)[:32]))])
    tpm.ctx.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), digests)


def orderly_reboot(sw: SoftwareTPM) -> None:
    """A reboot as an OS does it: TPM2_Shutdown(CLEAR) first (which saves the clock), then power cycle."""
    with at.DeviceTpm(sw.tcti) as d:
        d.ctx.shutdown(d._t.TPM2_SU.CLEAR)
    sw.restart()


@dataclasses.dataclass
class Device:
    sw: SoftwareTPM
    ek: at.TpmPublic
    ek_cert: bytes | None
    keys: at.DeviceKeys
    ak: at.TpmPublic

    def tpm(self) -> at.DeviceTpm:
        return at.DeviceTpm(self.sw.tcti)


def make_device(sw: SoftwareTPM) -> Device:
    with at.DeviceTpm(sw.tcti) as d:
        ek_raw, cert = d.endorsement()
        keys = d.create_keys()
    return Device(sw, at.parse_public(ek_raw), cert, keys, at.parse_public(keys.ak_public))


@pytest.fixture(scope="module")
def device(swtpm_ek: SoftwareTPM) -> Device:
    return make_device(swtpm_ek)


@pytest.fixture
def fresh(swtpm: SoftwareTPM) -> Device:
    return make_device(swtpm)


# --- credential activation -----------------------------------------------------------------------------------------
def test_credential_activation_proves_the_ak_is_in_the_tpm_with_that_ek(device: Device) -> None:
    at.check_attestation_key(device.ak)
    secret = os.urandom(32)
    blob, enc = at.make_credential(device.ek, device.ak, secret)
    with device.tpm() as d:
        assert d.activate_credential(device.keys, blob, enc) == secret


def test_a_credential_for_another_tpm_cannot_be_activated(device: Device, fresh: Device) -> None:
    # The attacker claims the enrolled TPM's EK but holds its AK in another TPM: the credential is sealed to the
    # enrolled EK, which the attacker's TPM does not have.
    blob, enc = at.make_credential(device.ek, fresh.ak, os.urandom(32))
    with fresh.tpm() as d, pytest.raises(at.CredentialActivationError):
        d.activate_credential(fresh.keys, blob, enc)


def test_a_credential_for_another_ak_name_cannot_be_activated(device: Device, fresh: Device) -> None:
    blob, enc = at.make_credential(device.ek, fresh.ak, os.urandom(32))  # right EK, AK name of another key
    with device.tpm() as d, pytest.raises(at.CredentialActivationError):
        d.activate_credential(device.keys, blob, enc)


def test_an_ak_without_the_attestation_attributes_is_refused(device: Device) -> None:
    release = at.parse_public(device.keys.release_public)  # a decrypt key passed off as an AK
    with pytest.raises(at.KeyAttributesError):
        at.check_attestation_key(release)
    at.check_release_key(release)
    with pytest.raises(at.KeyAttributesError):
        at.check_release_key(device.ak)


# --- EK enrolment --------------------------------------------------------------------------------------------------
def test_ek_certificate_chains_to_the_enrolled_swtpm_ca(device: Device) -> None:
    trust = at.EkTrust.load(device.sw.ek_ca_certs())
    assert device.ek_cert is not None
    assert at.check_endorsement_key(device.ek, device.ek_cert, trust) == "certificate"


def test_ek_from_another_ca_or_without_certificate_is_unknown(device: Device, swtpm_factory: Any,
                                                              fresh: Device) -> None:
    other = make_device(swtpm_factory(with_ek_cert=True))  # a TPM from another manufacturer's CA
    trust = at.EkTrust.load(device.sw.ek_ca_certs())
    with pytest.raises(at.UnknownTpmError) as exc:
        at.check_endorsement_key(other.ek, other.ek_cert, trust)
    assert exc.value.exit_code == 4
    with pytest.raises(at.UnknownTpmError):
        at.check_endorsement_key(fresh.ek, None, trust)  # no certificate, not listed
    with pytest.raises(at.UnknownTpmError):  # a genuine certificate presented for another TPM's EK
        at.check_endorsement_key(fresh.ek, device.ek_cert, trust)


def test_ek_enrolment_list_by_public_key_digest(fresh: Device) -> None:
    trust = at.EkTrust.load(ek_digests=[fresh.ek.spki_sha256()])
    assert at.check_endorsement_key(fresh.ek, None, trust) == "list"
    with pytest.raises(at.UnknownTpmError):
        at.check_endorsement_key(fresh.ek, None, at.EkTrust.load(ek_digests=["00" * 32]))


# --- quotes --------------------------------------------------------------------------------------------------------
def quote(device: Device, nonce: bytes, pcrs: list[int] = PCRS) -> at.Quote:
    with device.tpm() as d:
        return d.quote(device.keys, nonce, pcrs)


def test_a_fresh_quote_verifies_and_round_trips_through_json(device: Device) -> None:
    nonce = os.urandom(32)
    q = at.Quote.from_dict(quote(device, nonce).to_dict())
    v = at.verify_quote(q, device.ak, nonce, at.PcrPolicy({i: q.pcrs[i] for i in PCRS}))
    assert sorted(v.pcrs) == PCRS and v.clock.clock > 0


def test_wrong_nonce_is_refused(device: Device) -> None:
    q = quote(device, os.urandom(32))
    with pytest.raises(at.NonceMismatchError) as exc:
        at.verify_quote(q, device.ak, os.urandom(32))
    assert exc.value.exit_code == 3


@pytest.mark.parametrize("where", [0, 10, 40, -1])
def test_a_tampered_quote_is_refused(device: Device, where: int) -> None:
    nonce = os.urandom(32)
    q = quote(device, nonce)
    attest = bytearray(q.attest)
    attest[where] ^= 1
    with pytest.raises(at.QuoteSignatureError):
        at.verify_quote(dataclasses.replace(q, attest=bytes(attest)), device.ak, nonce)


def test_a_quote_signed_by_another_ak_is_refused(device: Device, fresh: Device) -> None:
    nonce = os.urandom(32)
    with pytest.raises(at.QuoteSignatureError):
        at.verify_quote(quote(fresh, nonce), device.ak, nonce)


def test_lying_about_pcr_values_is_refused(device: Device) -> None:
    nonce = os.urandom(32)
    q = quote(device, nonce)
    forged = dict(q.pcrs)
    forged[16] = b"\x00" * 32 if q.pcrs[16] != b"\x00" * 32 else b"\x01" * 32
    with pytest.raises(at.PcrMismatchError, match="do not hash"):
        at.verify_quote(dataclasses.replace(q, pcrs=forged), device.ak, nonce)
    with pytest.raises(at.PcrMismatchError, match="not the PCRs"):
        at.verify_quote(dataclasses.replace(q, pcrs={0: q.pcrs[0]}), device.ak, nonce)


def test_a_changed_pcr_fails_the_policy(fresh: Device) -> None:
    nonce = os.urandom(32)
    policy = at.PcrPolicy(dict(quote(fresh, nonce).pcrs))
    with fresh.tpm() as d:
        extend(d, 16)
    nonce = os.urandom(32)
    with pytest.raises(at.PcrMismatchError, match="PCR 16 differs"):
        at.verify_quote(quote(fresh, nonce), fresh.ak, nonce, policy)
    with pytest.raises(at.PcrMismatchError, match="does not cover PCR 7"):
        at.verify_quote(quote(fresh, nonce, [0]), fresh.ak, nonce, policy)


def test_reboot_passes_but_a_restored_tpm_state_is_detected(fresh: Device) -> None:
    n1 = os.urandom(32)
    first = at.verify_quote(quote(fresh, n1), fresh.ak, n1)
    snap = fresh.sw.snapshot()
    orderly_reboot(fresh.sw)
    n2 = os.urandom(32)
    second = at.verify_quote(quote(fresh, n2), fresh.ak, n2, last=first.clock)  # a reboot is fine
    assert second.clock.reset_count > first.clock.reset_count
    with pytest.raises(at.TpmRollbackError):  # the same quote presented again
        at.verify_quote(quote(fresh, n2), fresh.ak, n2, last=at.ClockInfo(second.clock.clock + 10**9,
                                                                         second.clock.reset_count, 0, True))
    fresh.sw.restore(snap)  # roll the TPM back, then reboot it several times to push its reset count up
    for _ in range(3):
        orderly_reboot(fresh.sw)
    n3 = os.urandom(32)
    with pytest.raises(at.TpmRollbackError):
        at.verify_quote(quote(fresh, n3), fresh.ak, n3, last=second.clock)


def test_check_clock_rules() -> None:
    last = at.ClockInfo(1000, 5, 2, True)
    at.check_clock(at.ClockInfo(1001, 5, 2, True), last)
    at.check_clock(at.ClockInfo(1001, 6, 0, True), last)
    for bad in (at.ClockInfo(999, 6, 0, True), at.ClockInfo(2000, 4, 9, True), at.ClockInfo(2000, 5, 1, True),
                at.ClockInfo(1000, 5, 2, True)):
        with pytest.raises(at.TpmRollbackError):
            at.check_clock(bad, last)


# --- the release key's certification -------------------------------------------------------------------------------
def test_release_key_certification(device: Device, fresh: Device) -> None:
    nonce = os.urandom(32)
    release = at.parse_public(device.keys.release_public)
    with device.tpm() as d:
        attest, sig = d.certify_release_key(device.keys, nonce)
    at.verify_certification(attest, sig, device.ak, release, nonce)
    with pytest.raises(at.NonceMismatchError):
        at.verify_certification(attest, sig, device.ak, release, os.urandom(32))
    with pytest.raises(at.KeyAttributesError):  # a key from another TPM substituted for the certified one
        at.verify_certification(attest, sig, device.ak, at.parse_public(fresh.keys.release_public), nonce)
    with pytest.raises(at.QuoteSignatureError):
        at.verify_certification(attest, sig, fresh.ak, release, nonce)


def test_key_blobs_from_another_tpm_do_not_load(device: Device, fresh: Device) -> None:
    with fresh.tpm() as d, pytest.raises(at.TpmUnavailableError):
        d.quote(device.keys, os.urandom(16), [0])


def test_device_keys_file_round_trip(device: Device, tmp_path: Any) -> None:
    path = tmp_path / "tpm-keys.json"
    device.keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert at.DeviceKeys.load(path).ak_public == device.keys.ak_public


# --- parsers -----------------------------------------------------------------------------------------------------
def test_truncated_or_extended_structures_are_malformed(device: Device) -> None:
    nonce = os.urandom(32)
    q = quote(device, nonce)
    for cut in range(len(q.attest)):
        with pytest.raises(at.QuoteFormatError):
            at.parse_attest(q.attest[:cut])
    with pytest.raises(at.QuoteFormatError):
        at.parse_attest(q.attest + b"\x00")
    for cut in range(0, len(device.keys.ak_public), 7):
        with pytest.raises(at.QuoteFormatError):
            at.parse_public(device.keys.ak_public[:cut])
    with pytest.raises(at.QuoteFormatError):
        at.verify_quote(dataclasses.replace(q, signature=q.signature[:-1]), device.ak, nonce)


def test_parsed_public_matches_the_tss(device: Device) -> None:
    import tpm2_pytss as t

    for raw in (device.keys.ak_public, device.keys.release_public, device.ek.raw):
        pub, _ = t.TPMT_PUBLIC.unmarshal(raw)
        assert at.parse_public(raw).name == bytes(t.TPM2B_PUBLIC(publicArea=pub).get_name())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parsers_raise_only_typed_errors(data: bytes) -> None:
    for parse in (at.parse_attest, at.parse_public):
        with contextlib.suppress(at.QuoteFormatError):
            parse(data)
    for obj in ({"format": at.QUOTE_FORMAT, "version": 1, "attest": data.hex(), "signature": "", "pcrs": {}},
                {"sha256": {"1": data.hex()}}):
        with contextlib.suppress(at.QuoteFormatError):
            at.Quote.from_dict(obj)
        with contextlib.suppress(InvalidArgumentError):
            at.PcrPolicy.from_dict(obj)


# --- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_keys_quote_verify(fresh: Device, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from edgeshield.cli import app

    runner = CliRunner()
    keys, quote_file, policy = tmp_path / "k.json", tmp_path / "q.json", tmp_path / "policy.json"
    tcti = ["--tcti", fresh.sw.tcti]
    r = runner.invoke(app, ["attest", "keys", *tcti, "--keys", str(keys), "--json"])
    assert r.exit_code == 0, r.output
    nonce = os.urandom(16).hex()
    r = runner.invoke(app, ["attest", "quote", *tcti, "--keys", str(keys), "--nonce", nonce, "--pcrs", "0,7",
                            "--out", str(quote_file)])
    assert r.exit_code == 0, r.output
    q = at.Quote.from_dict(json.loads(quote_file.read_text()))
    policy.write_text(json.dumps(at.PcrPolicy(dict(q.pcrs)).to_dict()))
    ok = ["attest", "verify", str(quote_file), "--keys", str(keys), "--policy", str(policy)]
    r = runner.invoke(app, [*ok, "--nonce", nonce, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["verified"], r.output
    r = runner.invoke(app, [*ok, "--nonce", os.urandom(16).hex()])
    assert isinstance(r.exception, at.NonceMismatchError) and r.exception.exit_code == 3
    policy.write_text(json.dumps({"sha256": {"7": "11" * 32}}))
    r = runner.invoke(app, [*ok, "--nonce", nonce])
    assert isinstance(r.exception, at.PcrMismatchError) and "PCR 7 differs" in str(r.exception)
