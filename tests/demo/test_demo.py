"""`edgeshield demo` runs end to end and its summary carries the figures it claims."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from edgeshield.demo import DemoFailure
from edgeshield.demo._adversarial import _check_comparison


def test_demo_json_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeshield", "demo", "--json", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    acc = summary["accuracy"]
    assert acc["bundle"] == acc["plain"] and acc["bundle"] > 0.95 and acc["test_examples"] == 450
    rejected = " ".join(summary["tamper_rejected"])
    for err in ("SignatureError", "PayloadDigestError", "NotARecipientError"):
        assert err in rejected
    assert summary["verified"] is True
    assert next(s["stage"] for s in summary["stages"]) == "Create owner and device keys"
    n = len(summary["stages"])
    assert f"[{n}/{n}]" in proc.stderr  # progress goes to stderr when --json keeps stdout machine-readable
    # adversarial stages: both models calibrated on the same clean half; real ART attacks through the robust
    # model's robust inference; then the standard and robust model under the same adaptive attack, with certificates
    for detector in ("detector", "detector_standard"):
        assert summary[detector]["ensemble"]["fpr_calibration"] <= 0.02
    assert summary["robust_bundle"]["model_sha256"] != summary["bundle"]["model_sha256"]
    rows = summary["robust_inference"]
    assert rows["clean"]["reject"] < 0.1 * 225
    for attack in ("FGSM ε=0.1", "PGD ε=0.1"):
        assert rows[attack]["fooled"] > 0 and 0 <= rows[attack]["reject_of_fooled"] <= rows[attack]["fooled"]
    cmp = summary["adaptive_comparison"]
    assert cmp["attack"]["eps"] == 2 / 16 and cmp["attack"]["quantum"] == 1 / 16 and cmp["evaluation_inputs"] == 225
    assert cmp["smoothing"] == {"sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001}
    std, rob = cmp["standard"], cmp["robust"]
    for m in (std, rob):
        assert m["clean_accuracy"] > 0.95 and m["clean_rejects"] <= 0.1 * 225
        assert m["end_to_end_broken"] == round(m["end_to_end_success"] * cmp["attack"]["inputs"])
        assert 0 < m["certified_accuracy_r0_25"] <= 1 and m["median_radius_correct"] > 0
    assert rob["end_to_end_success"] < std["end_to_end_success"]
    assert rob["bare_model_success"] < std["bare_model_success"]
    # server stage: real mTLS calls; audit stage: the log verifies and a tampered copy does not
    assert len(summary["server"]["calls"]) == 6
    assert summary["audit"]["verified"] and summary["audit"]["checkpoints"] >= 1
    assert "does not match its hash" in summary["audit"]["tampered_copy"]
    assert {"server.startup", "inference.predict", "auth.forbidden", "auth.failure"} <= set(summary["audit"]["kinds"])
    # transport stage: OHTTP through a relay that saw only ciphertext and whose replay was refused; HTTP/3 served
    tr = summary["transport"]
    assert tr["leaked_to_relay"] == [] and 400 <= tr["relay_replay"] < 500 and tr["http3_status"] == 200
    # witness stage: concurrent appends group-committed, the new entries verified from the cosigned checkpoint
    wit = summary["witness"]
    assert wit["group_commits"]["entries"] == 200 and 1 <= wit["group_commits"]["groups"] <= 200
    assert 0 < wit["incremental_new_entries"] < wit["full_entries"]
    # extraction stage: the attacker is blocked early, the honest client served; the watermark proves ownership
    assert summary["extraction"]["attacker_blocked_after_queries"] <= 500
    assert summary["extraction"]["honest_requests_ok"] == 45
    assert summary["watermark"]["marked_p"] < 1e-6 and summary["watermark"]["clean_z"] < 5
    # stolen-copy stage: the budget stops each identity, yet the served watermark proves the copy they built
    copy = summary["stolen_copy"]
    assert copy["identities_blocked"] == 2 and copy["p_value"] < 1e-6 and copy["independent_matches"] <= 2
    assert copy["matches"] <= copy["evidence"] and copy["stolen_answers"] == 1000
    # operations: the attack burst tripped both rules, the admin lifted the block; compliance came from evidence
    ops = summary["operations"]
    assert {"rbac_denials", "tls_handshake_failures"} <= set(ops["alerts"]) and ops["lifted_by_admin"]
    assert summary["compliance"]["statuses"].get("pass", 0) > 0 and summary["compliance"]["erasure"]["records"] >= 1
    # privacy: DP-FedAvg reports ε from the accountant, refuses exactly the boosted client, ships a bundle
    fed = summary["federated"]
    assert fed["refused"] == ["client-7"] and 0 < fed["epsilon"] <= 8.0 + 1e-6 and fed["accuracy"] > 0.7
    # hardware: the probe answers every feature; a TPM-sealed device key opens and serves the bundle until a PCR
    # changes; the release service refuses a replayed quote and a changed PCR and releases to a fresh quote; a
    # licensed released key serves until the TPM clock passes the licence (451); updates go v1 → v2, a running
    # server reloads v2 without a restart, and a replayed v1 is refused by the floor
    assert set(summary["probe"]["statuses"]) == {"sgx", "tdx", "sev", "trustzone", "tpm", "secure_boot", "ima",
                                                 "hwrng", "listening"}
    assert set(summary["probe"]["statuses"].values()) <= {"present", "absent", "unknown"}
    tpm = summary["tpm"]
    if shutil.which("swtpm") and shutil.which("swtpm_setup") and importlib.util.find_spec("tpm2_pytss"):
        assert "skipped" not in tpm, tpm
        assert tpm["sealed_accuracy"] == acc["bundle"] and tpm["released_accuracy"] == acc["bundle"]
        assert tpm["pcr_change_refused"] == "TPMPolicyError"
        assert "nonce-replayed" in tpm["stale_quote_refused"] and tpm["fresh_quote_released"] is True
        assert "pcr" in tpm["pcr_change_release_refused"]
        assert tpm["served_from_sealed_key"].endswith("model version 1")
        assert tpm["licence"]["served"].endswith("model version 1") and tpm["licence"]["after_tpm_clock"] == 451
    else:  # the stage skips only itself, and says why
        assert "not found" in tpm["skipped"] or "not installed" in tpm["skipped"]
    update = summary["update"]
    if importlib.util.find_spec("tuf"):
        reload = update.pop("reload")
        assert reload["before"].endswith("model version 1") and reload["after"].endswith("model version 2"), reload
        assert update == {"installed": 2, "still_current": 2, "floor": 2, "replay_refused": "FloorViolationError"}
    else:
        assert "skipped" in update


def test_adversarial_comparison_check_fails_when_the_robust_model_is_not_better() -> None:
    """The comparison stage raises, rather than reports, a robust model no better end to end or a noisy detector."""
    good = {"standard": {"clean_rejects": 0, "end_to_end_success": 0.6},
            "robust": {"clean_rejects": 3, "end_to_end_success": 0.1}}
    _check_comparison(good, 225)
    with pytest.raises(DemoFailure, match="not better end to end"):
        _check_comparison(good | {"robust": {"clean_rejects": 3, "end_to_end_success": 0.6}}, 225)
    with pytest.raises(DemoFailure, match="rejected 23/225 clean"):
        _check_comparison(good | {"standard": {"clean_rejects": 23, "end_to_end_success": 0.6}}, 225)
