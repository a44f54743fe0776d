"""The software-TPM manager itself: starts on free ports, reboots with state kept, rolls back, leaves nothing."""

from __future__ import annotations

import os
import socket

import pytest
from cryptography import x509

from edgeshield.hardware._swtpm import SoftwareTPM, SoftwareTPMError, live_processes

tss = pytest.importorskip("tpm2_pytss")


def _pcr16(tcti: str) -> bytes:
    with tss.ESAPI(tcti) as esys:
        return bytes(esys.pcr_read("sha256:16")[2][0])


def _extend16(tcti: str) -> None:
    with tss.ESAPI(tcti) as esys:
        digests = tss.TPML_DIGEST_VALUES(
            [tss.TPMT_HA(hashAlg=tss.TPM2_ALG.SHA256, digest=tss.TPMU_HA(sha256=b"\x01" * 32))]
        )
        esys.pcr_extend(tss.ESYS_TR.PCR16, digests)


def test_two_tpms_run_side_by_side_on_loopback(swtpm: SoftwareTPM, swtpm_factory) -> None:  # type: ignore[no-untyped-def]
    other = swtpm_factory()
    assert swtpm.port != other.port and swtpm.tcti.startswith("swtpm:host=127.0.0.1,port=")
    assert os.stat(swtpm._work).st_mode & 0o777 == 0o700
    _extend16(swtpm.tcti)
    assert _pcr16(swtpm.tcti) != bytes(32) and _pcr16(other.tcti) == bytes(32)  # two separate TPMs


def test_restart_is_a_reboot_and_snapshot_rolls_back(swtpm: SoftwareTPM) -> None:
    _extend16(swtpm.tcti)
    with tss.ESAPI(swtpm.tcti) as esys:
        reset_before = esys.read_clock().clockInfo.resetCount
    snap = swtpm.snapshot()
    old_port = swtpm.port
    swtpm.restart()
    assert _pcr16(swtpm.tcti) == bytes(32)  # PCRs reset
    with tss.ESAPI(swtpm.tcti) as esys:
        assert esys.read_clock().clockInfo.resetCount == reset_before + 1  # permanent state kept
    with socket.socket() as s:  # the old port is closed: the old process is gone
        assert s.connect_ex(("127.0.0.1", old_port)) != 0
    swtpm.restore(snap)
    with tss.ESAPI(swtpm.tcti) as esys:
        assert esys.read_clock().clockInfo.resetCount == reset_before + 1  # snapshot's count, rebooted once


def test_stop_leaves_no_process_and_close_removes_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tpm = SoftwareTPM()
    tpm.start()
    pid = tpm._proc.pid  # type: ignore[union-attr]
    work = tpm._work
    tpm.close()
    assert pid not in live_processes() and not work.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(SoftwareTPMError):
        tpm.start()
    kept = SoftwareTPM(tmp_path / "state")  # a caller-chosen state directory survives close()
    kept.start()
    kept.close()
    assert (tmp_path / "state" / "tpm2-00.permall").exists()


def test_killed_swtpm_is_reaped_on_stop(swtpm: SoftwareTPM) -> None:
    os.kill(swtpm._proc.pid, 9)  # type: ignore[union-attr]
    swtpm.stop()
    assert live_processes() == []


def test_ek_certificates_chain_to_the_local_ca(swtpm_ek: SoftwareTPM) -> None:
    root, issuer = (x509.load_pem_x509_certificate(p.read_bytes()) for p in swtpm_ek.ek_ca_certs())
    certs = [x509.load_der_x509_certificate(p.read_bytes()) for p in swtpm_ek.ek_certs()]
    assert len(certs) == 2
    for cert in certs:
        cert.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
