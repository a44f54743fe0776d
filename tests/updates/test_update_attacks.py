"""The updater against a real TUF repository over a real socket: the happy path, then every attack the issue names.

Each attack ends the same way: a typed refusal (exit 3 integrity, 4 key), nothing installed, the running model and
the floor untouched, and one ``update.refused`` audit entry.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeshield import bundles, updates
from edgeshield.audit import AuditLog
from edgeshield.errors import (
    EXIT_INTEGRITY,
    EXIT_KEY,
    IntegrityError,
    InvalidArgumentError,
    NotARecipientError,
    SignatureError,
)
from edgeshield.models import digits_input_spec
from edgeshield.updates import _repo

MODEL = "digits"


# --- helpers ------------------------------------------------------------------------------------------------------
def _installed(fleet) -> tuple[str | None, int]:  # type: ignore[no-untyped-def]
    with fleet.updater() as u:
        st = u.status()
    return (st["current"]["bundle_id"] if st["current"] else None), st["floor"]["floor"]


def _serves(fleet, version: int) -> None:  # type: ignore[no-untyped-def]
    """``current`` opens as the server would open it, with the expected version, and answers."""
    opened = bundles.open_bundle(fleet.device_dir / "current" / "model.esb", fleet.keys.owner_pub,
                                 fleet.keys.device_priv)
    assert opened.manifest.model_version == version
    (logits,) = opened.session.run(None, {"input": np.zeros((1, 64), np.float32)})
    assert logits.shape == (1, 10)


def _audit(fleet) -> list[tuple[str, dict[str, Any]]]:  # type: ignore[no-untyped-def]
    log = AuditLog(fleet.device_dir / "audit.db", readonly=True)
    try:
        log.verify()
        return [(e.kind, e.data) for e in log.entries()]
    finally:
        log.close()


def _committed_at(fleet, version: int) -> None:  # type: ignore[no-untyped-def]
    fleet.publish(version)
    with fleet.updater() as u:
        u.pull()
        u.install(commit=True)


def _refused(fleet, exc_type: type[BaseException], before: tuple[str | None, int], *, reason: str | None = None,
             exit_code: int = EXIT_INTEGRITY) -> BaseException:  # type: ignore[no-untyped-def]
    with fleet.updater() as u, pytest.raises(exc_type) as info:
        u.pull()  # refused before anything is staged
    assert info.value.exit_code == exit_code  # type: ignore[attr-defined]
    assert _installed(fleet) == before  # nothing installed, the floor unchanged
    assert not (fleet.device_dir / "staged").exists()
    kind, data = _audit(fleet)[-1]
    assert kind == "update.refused", (kind, data)
    if reason is not None:
        assert data["reason"] == reason, data
    return info.value


def _resign_targets(fleet, edit) -> None:  # type: ignore[no-untyped-def]
    """An attacker holding the repository's own keys (not the owner's bundle key) re-signs targets metadata."""
    _, snapshot, targets = _repo._current(fleet.repo)
    edit(targets.signed)
    _repo._bump(targets.signed, dt.timedelta(days=1))
    raw = _repo._sign(targets, _repo._signer(fleet.repo_keys, "targets", None))
    _repo._write_meta(fleet.repo, f"{targets.signed.version}.targets.json", raw)
    _repo._publish_chain(fleet.repo, fleet.repo_keys, None, snapshot, raw, targets.signed.version,
                         timestamp_expiry=dt.timedelta(days=1))


def _target_url(fleet, path: str) -> str:  # type: ignore[no-untyped-def]
    _, _, targets = _repo._current(fleet.repo)
    info = targets.signed.targets[path]
    directory, _, name = path.rpartition("/")
    return f"/targets/{directory}/{info.hashes['sha256']}.{name}"


# --- the happy path -------------------------------------------------------------------------------------------------
def test_publish_pull_install_commit_then_rollback_only_before_commit(fleet):
    fleet.publish(1)
    with fleet.updater() as u:
        assert u.pull().model_version == 1
        rec = u.install()
        assert (rec.slot, rec.health) == ("a", "passed")
        assert u.commit() == 1
        _serves(fleet, 1)
        assert u.pull() is None  # up to date: nothing staged
        fleet.publish(2)
        assert u.pull().model_version == 2
        assert u.install().slot == "b"
        _serves(fleet, 2)
        st = u.status()
        assert st["pending"] and st["rollback_possible"] and st["previous"]["model_version"] == 1
        assert u.rollback().model_version == 1  # before commit: back to the previous slot
        _serves(fleet, 1)
        assert u.rollback().model_version == 2  # the slots swap; the floor (1) still allows either
        assert u.commit() == 2
        with pytest.raises(updates.FloorViolationError) as info:  # after commit: never below the floor
            u.rollback()
        assert info.value.exit_code == EXIT_INTEGRITY
        _serves(fleet, 2)
        assert u.status()["rollback_possible"] is False
    kinds = [k for k, _ in _audit(fleet)]
    assert kinds == ["update.staged", "update.installed", "update.committed", "update.staged", "update.installed",
                     "update.rolled_back", "update.rolled_back", "update.committed", "update.refused"]


def test_an_uncommitted_update_blocks_the_next_install(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    with fleet.updater() as u:
        u.pull()
        u.install()
        fleet.publish(3)
        u.pull()
        with pytest.raises(updates.UpdatePendingError):
            u.install()  # slot a holds the last committed model: it must not be overwritten
        _serves(fleet, 2)
        u.commit()
        assert u.install().model_version == 3
        _serves(fleet, 3)


def test_detector_and_input_spec_travel_with_the_bundle(fleet, tmp_path):
    from edgeshield.adversarial import CalibratedDetector, DetectorFile

    manifest = bundles.verify(fleet.bundles.v(1), fleet.keys.owner_pub)
    det = tmp_path / "detector.json"
    DetectorFile(model_sha256=manifest.model_sha256, input_spec=digits_input_spec(), target_fpr=0.02, flag_fpr=0.05,
                 decision="squeeze", detectors=(CalibratedDetector("squeeze", {}, 1.0, 0.5, {}),)).save(det)
    result = fleet.publish(1, detector=det)
    assert set(result.targets) == {"bundle", "detector", "input_spec"}
    with fleet.updater() as u:
        u.pull()
        u.install(commit=True)
        assert u.status()["serve"]["detector"].endswith("current/detector.json")
    assert (fleet.device_dir / "current" / "detector.json").read_bytes() == det.read_bytes()
    wrong = tmp_path / "wrong.json"
    DetectorFile(model_sha256="0" * 64, input_spec=digits_input_spec(), target_fpr=0.02, flag_fpr=0.05,
                 decision="squeeze", detectors=(CalibratedDetector("squeeze", {}, 1.0, 0.5, {}),)).save(wrong)
    with pytest.raises(Exception, match="calibrated for model"):  # the owner cannot publish a mismatched set
        fleet.publish(2, detector=wrong)


# --- TUF: rollback, freeze, mix-and-match, endless data, wrong signature ---------------------------------------------
def test_metadata_rollback_is_refused(fleet):
    fleet.publish(1)
    old = fleet.snapshot_repo("repo-at-v1")
    fleet.publish(2)
    with fleet.updater() as u:
        u.pull()
        u.install(commit=True)
    before = _installed(fleet)
    shutil.rmtree(fleet.repo)
    shutil.copytree(old, fleet.repo)  # the mirror now serves the older, genuinely signed metadata
    _refused(fleet, updates.MetadataRollbackError, before, reason="metadata-rollback")


def test_freeze_expired_timestamp_is_refused(fleet):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    _repo.resign_timestamp(fleet.repo, fleet.repo_keys, expiry=dt.timedelta(seconds=1))
    time.sleep(2.1)  # the attacker keeps serving the last timestamp it captured, after it expired
    err = _refused(fleet, updates.MetadataExpiredError, before, reason="metadata-expired")
    assert "freeze" in str(err)
    _repo.resign_timestamp(fleet.repo, fleet.repo_keys)  # the owner's schedule re-signs: devices move on
    fleet.publish(2)
    with fleet.updater() as u:
        assert u.pull().model_version == 2


def test_mix_and_match_metadata_is_refused(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)
    meta = fleet.repo / "metadata"
    _, snapshot, _ = _repo._current(fleet.repo)
    newest = snapshot.signed.meta["targets.json"].version
    shutil.copy(meta / f"{newest - 1}.targets.json", meta / f"{newest}.targets.json")  # older targets, newer name
    _refused(fleet, updates.MetadataMismatchError, before)


def test_mix_and_match_of_target_files_is_refused(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)
    url = _target_url(fleet, "digits/2/model.esb")
    shutil.copy(fleet.bundles.v(1), fleet.repo / url.lstrip("/"))  # v1's bundle where v2's should be
    err = _refused(fleet, updates.UpdateRefusedError, before)
    # a different length (ECDSA signatures vary by a byte) is caught as too long or short, else by its hash
    assert isinstance(err, updates.MetadataMismatchError | updates.EndlessDataError), err


def test_mix_and_match_under_the_repository_keys_is_refused(fleet):
    """Even an attacker who holds every TUF key cannot make a device take parts that do not belong together."""
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)

    def relabel(targets) -> None:  # type: ignore[no-untyped-def]
        targets.targets["digits/2/model.esb"].unrecognized_fields["custom"]["edgeshield"]["model_version"] = 3

    _resign_targets(fleet, relabel)
    _refused(fleet, updates.UpdateMismatchError, before, reason="mix-and-match")


def test_device_checks_the_parts_against_each_other(fleet, tmp_path):
    from edgeshield.adversarial import CalibratedDetector, DetectorFile

    manifest = bundles.verify(fleet.bundles.v(2), fleet.keys.owner_pub)
    index = updates.UpdateIndex(MODEL, 3, manifest.bundle_id, manifest.model_sha256,
                                {"bundle": "digits/3/model.esb"})
    with fleet.updater() as u:
        with pytest.raises(updates.UpdateMismatchError):  # an index saying 3 for a bundle signed as 2
            u.verify(index, {"bundle": fleet.bundles.v(2)})
        det = tmp_path / "d.json"
        DetectorFile(model_sha256="1" * 64, input_spec=digits_input_spec(), target_fpr=0.02, flag_fpr=0.05,
                     decision="squeeze", detectors=(CalibratedDetector("squeeze", {}, 1.0, 0.5, {}),)).save(det)
        index = updates.UpdateIndex(MODEL, 2, manifest.bundle_id, manifest.model_sha256,
                                    {"bundle": "digits/2/model.esb", "detector": "digits/2/detector.json"})
        with pytest.raises(updates.UpdateMismatchError, match="another model"):
            u.verify(index, {"bundle": fleet.bundles.v(2), "detector": det})


def _endless(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.end_headers()
    try:
        for _ in range(10_000):  # 640 MB if nobody stops reading; TUF stops at the signed length
            handler.wfile.write(b"\0" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_endless_metadata_is_refused(fleet):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    fleet.server.overrides["/metadata/timestamp.json"] = _endless
    _refused(fleet, updates.EndlessDataError, before, reason="endless-data")


def test_endless_target_is_refused(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)
    fleet.server.overrides[_target_url(fleet, "digits/2/model.esb")] = _endless
    _refused(fleet, updates.EndlessDataError, before, reason="endless-data")


def test_metadata_signed_by_a_wrong_key_is_refused(fleet):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    from securesystemslib.signer import CryptoSigner

    ts = _repo._load(fleet.repo, "timestamp.json")
    ts.signed.version += 1
    ts.signatures.clear()
    ts.sign(CryptoSigner.generate_ecdsa())  # not the key root names for the timestamp role
    (fleet.repo / "metadata" / "timestamp.json").write_bytes(_repo._serialize(ts))
    _refused(fleet, updates.MetadataSignatureError, before, reason="metadata-signature")


# --- the bundle and the floor ----------------------------------------------------------------------------------------
def test_lower_version_is_refused_by_the_floor(fleet):
    _committed_at(fleet, 2)
    before = _installed(fleet)
    with pytest.raises(InvalidArgumentError, match="already published"):  # the owner's own tool refuses
        fleet.publish(1)
    fleet.publish(1, allow_lower_version=True)  # a repository under an attacker's control: genuinely signed v1
    _refused(fleet, updates.FloorViolationError, before, reason="below-floor")
    _serves(fleet, 2)


def test_bundle_signed_by_another_owner_is_refused(fleet):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    fleet.publish(8, owner_key=fleet.bundles.other_owner_pub)  # the repository vouches; the owner never signed it
    _refused(fleet, SignatureError, before)


def test_bundle_for_another_device_is_refused(fleet):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    fleet.publish(9)
    _refused(fleet, NotARecipientError, before, reason="not-a-recipient", exit_code=EXIT_KEY)


def _cut_short(path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])  # and the connection closes

    return answer


def test_truncated_download_is_refused(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)
    url = _target_url(fleet, "digits/2/model.esb")
    fleet.server.overrides[url] = _cut_short(fleet.bundles.v(2))
    _refused(fleet, updates.TruncatedDownloadError, before, reason="truncated")
    del fleet.server.overrides[url]
    served = fleet.repo / url.lstrip("/")
    served.write_bytes(fleet.bundles.v(2).read_bytes()[:1000])  # a truncated file on the mirror
    _refused(fleet, updates.MetadataMismatchError, before, reason="hash-mismatch")


def test_tampered_staged_files_are_refused_at_install(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)
    with fleet.updater() as u:
        u.pull()
        staged = fleet.device_dir / "staged" / "model.esb"
        staged.write_bytes(staged.read_bytes()[:-10])
        with pytest.raises(IntegrityError) as info:
            u.install()
    assert info.value.exit_code == EXIT_INTEGRITY
    assert _installed(fleet) == before and not (fleet.device_dir / "staged").exists()


@pytest.fixture(scope="module")
def nan_bundle(ukeys, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A genuinely signed v4 whose model answers NaN: it verifies, and fails its health check."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("nan")
    graph = helper.make_graph(
        [helper.make_node("Sub", ["input", "two"], ["shifted"]), helper.make_node("Log", ["shifted"], ["logits"])],
        "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(d / "nan.onnx"))
    bundles.protect(d / "nan.onnx", d / "nan-v4.esb", signing_key=ukeys.owner_priv, recipients=[ukeys.device_pub],
                    model_version=4)
    return d / "nan-v4.esb"


def test_failed_health_check_restores_the_last_good_model(fleet, nan_bundle):
    _committed_at(fleet, 1)
    before = _installed(fleet)
    fleet.publish(4, bundle=nan_bundle)
    with fleet.updater() as u:
        u.pull()
        with pytest.raises(updates.HealthCheckError, match="NaN"):
            u.install()
        st = u.status()
    assert (st["current"]["bundle_id"], st["floor"]["floor"]) == before
    assert st["previous"]["health"] == "failed"
    _serves(fleet, 1)
    kind, data = _audit(fleet)[-1]
    assert (kind, data["reason"]) == ("update.refused", "health-check")


# --- the floor's own state -------------------------------------------------------------------------------------------
def test_floor_state_cannot_be_edited_deleted_or_swapped(fleet, tmp_path):
    _committed_at(fleet, 2)
    state = fleet.device_dir / "floor.json"
    assert state.stat().st_mode & 0o777 == 0o600 and (fleet.device_dir / "floor.key").stat().st_mode & 0o777 == 0o600
    good = state.read_bytes()
    doc = json.loads(good)
    doc["state"]["floor"] = 0  # lower it by hand
    state.write_text(json.dumps(doc))
    with fleet.updater() as u, pytest.raises(updates.FloorStateError, match="edited"):
        u.status()
    assert _audit(fleet)[-1][1]["reason"] == "floor-state"  # the tampering itself is on the record
    state.unlink()  # delete it: never read as floor 0
    with fleet.updater() as u, pytest.raises(updates.FloorStateError, match="missing"):
        u.rollback()
    other = updates.SignedFileFloor.create(tmp_path / "f.json", tmp_path / "f.key")  # another device's state
    state.write_bytes(other.state_path.read_bytes())
    with fleet.updater() as u, pytest.raises(updates.FloorStateError, match="another"):
        u.install()
    state.write_bytes(good)
    _serves(fleet, 2)
    assert _installed(fleet)[1] == 2


def test_floor_never_lowers(tmp_path):
    floor = updates.SignedFileFloor.create(tmp_path / "floor.json", tmp_path / "floor.key")
    assert floor.read() == 0
    floor.raise_to(5)
    floor.raise_to(5)
    with pytest.raises(updates.FloorViolationError):
        floor.raise_to(4)
    assert updates.SignedFileFloor(tmp_path / "floor.json", tmp_path / "floor.key").read() == 5
    assert isinstance(floor, updates.Floor)
    with pytest.raises(Exception, match="overwrite"):
        updates.SignedFileFloor.create(tmp_path / "floor.json", tmp_path / "floor.key")


def test_slow_retrieval_hits_the_deadline(fleet):
    _committed_at(fleet, 1)
    fleet.publish(2)
    before = _installed(fleet)

    def drip(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(40):  # one byte every 0.1 s: never idle long enough for the socket timeout
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    fleet.server.overrides[_target_url(fleet, "digits/2/model.esb")] = drip
    start = time.monotonic()
    with fleet.updater() as u, pytest.raises(updates.UpdateDownloadError, match="too slow"):
        u.pull(timeout_s=1.0, deadline_s=1.0)
    assert time.monotonic() - start < 4
    assert _installed(fleet) == before
    assert _audit(fleet)[-1][0] == "update.failed"
