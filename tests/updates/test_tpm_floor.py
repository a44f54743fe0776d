"""The updater on a TPM NV-counter floor (a real swtpm): provisioning through the CLI, the floor kind found in the
device config, a disk-image restore that no longer lowers the floor, a too-big version jump refused before
anything is written, and kill -9 in the middle of a commit's raise."""

from __future__ import annotations

import json
import random
import select
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import cli_fails, cli_json

from edgeshield import bundles, updates
from edgeshield.cli import main
from edgeshield.errors import EXIT_INPUT, EXIT_INTEGRITY
from edgeshield.hardware import _attest as at
from edgeshield.hardware._nvfloor import FloorJumpError, TpmCounterFloor
from edgeshield.hardware._swtpm import SoftwareTPM, live_instances
from edgeshield.hardware._tpm import TCTI_ENV
from edgeshield.models import digits_model_path
from edgeshield.updates._device import FLOOR_TPM, FloorConfig

INDEX = 0x01800200


@pytest.fixture
def swtpm() -> Iterator[SoftwareTPM]:
    before = set(live_instances())
    with SoftwareTPM() as tpm:
        yield tpm
    assert set(live_instances()) <= before


@pytest.fixture(scope="module")
def big_bundles(ukeys, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Bundles far above 1: two one-raise steps of 600 and one jump past the 1024 bound."""
    d = tmp_path_factory.mktemp("bigbundles")
    for version in (601, 1201, 5000):
        bundles.protect(digits_model_path(), d / f"digits-v{version}.esb", signing_key=ukeys.owner_priv,
                        recipients=[ukeys.device_pub], model_version=version)
    return d


def _repo(tmp_path: Path) -> tuple[Path, Path, str]:
    repo, rkeys = tmp_path / "repo", tmp_path / "repo-keys"
    updates.init_repository(repo, rkeys)
    return repo, rkeys, repo.resolve().as_uri()


def _publish(repo: Path, rkeys: Path, bundle: Path, ukeys, ubundles) -> None:  # type: ignore[no-untyped-def]
    updates.publish(repo, rkeys, bundle, owner_key=ukeys.owner_pub, model="digits", input_spec=ubundles.spec)


def test_cli_tpm_floor_end_to_end(tmp_path, swtpm, ukeys, ubundles, capsys):  # type: ignore[no-untyped-def]
    repo, rkeys, url = _repo(tmp_path)
    _publish(repo, rkeys, ubundles.v(1), ukeys, ubundles)
    dev = tmp_path / "dev"
    init = ["update", "init", str(dev), "--root", str(repo / "metadata" / "root.json"), "--owner-key",
            str(ukeys.dir / "owner.pub"), "--model", "digits", "--url", url]
    cli_fails(capsys, [*init, "--floor", "flash"], EXIT_INPUT, "file or tpm")
    cli_fails(capsys, [*init, "--floor", "tpm:0x81000001", "--tcti", swtpm.tcti], EXIT_INPUT, "not an NV index")
    out = cli_json(capsys, [*init, "--floor", f"tpm:0x{INDEX:08X}", "--tcti", swtpm.tcti])
    assert out["floor"] == 1 and out["floor_state"]["kind"] == FLOOR_TPM == "tpm-nv-counter"
    assert out["floor_state"]["index"] == f"0x{INDEX:08x}" and not (dev / "floor.json").exists()
    config = json.loads((dev / "update.json").read_text())
    assert config["floor"] == {"kind": "tpm-nv-counter", "index": f"0x{INDEX:08x}", "tcti": swtpm.tcti}
    cli_fails(capsys, [*init[:2], str(tmp_path / "dev2"), *init[3:], "--floor", f"tpm:0x{INDEX:08x}", "--tcti",
                    swtpm.tcti], EXIT_INPUT, "already defined")

    device = ["--device-key", str(ukeys.dir / "device.key")]
    pulled = cli_json(capsys, ["update", "pull", str(dev), *device, "--install", "--commit"])
    assert pulled["status"]["floor"]["floor"] == 1 and pulled["status"]["floor"]["kind"] == "tpm-nv-counter"
    _publish(repo, rkeys, ubundles.v(3), ukeys, ubundles)
    cli_json(capsys, ["update", "pull", str(dev), *device, "--install", "--commit"])
    assert TpmCounterFloor(INDEX, tcti=swtpm.tcti).read() == 3  # the floor is the counter itself
    assert main(["update", "status", str(dev), *device]) == 0
    assert f"floor 3 (tpm-nv-counter 0x{INDEX:08x})" in capsys.readouterr().out
    updates.publish(repo, rkeys, ubundles.v(2), owner_key=ukeys.owner_pub, model="digits",
                    allow_lower_version=True)  # the repository in an attacker's hands
    cli_fails(capsys, ["update", "pull", str(dev), *device], EXIT_INTEGRITY, "below this device's floor 3")

    with at.DeviceTpm(swtpm.tcti) as d:  # someone with owner auth removes the counter
        d.ctx.nv_undefine_space(d.ctx.tr_from_tpmpublic(INDEX), d._t.ESYS_TR.OWNER)
    cli_fails(capsys, ["update", "status", str(dev), *device], EXIT_INTEGRITY, "not defined")


def test_a_disk_image_restore_no_longer_lowers_the_floor(tmp_path, swtpm, ukeys, ubundles):  # type: ignore[no-untyped-def]
    repo, rkeys, url = _repo(tmp_path)
    _publish(repo, rkeys, ubundles.v(1), ukeys, ubundles)
    dev = tmp_path / "dev"
    updates.init_device(dev, root=updates.repository_root(repo), owner_key_pem=(ukeys.dir / "owner.pub").read_bytes(),
                        model="digits", url=url, floor=FloorConfig(FLOOR_TPM, INDEX, swtpm.tcti))
    with updates.DeviceUpdater(dev, device_key=ukeys.device_priv) as u:
        assert isinstance(u.floor, TpmCounterFloor)
        u.pull()
        u.install(commit=True)
    image = tmp_path / "image-at-v1"
    shutil.copytree(dev, image, symlinks=True)  # the attacker's copy of the whole disk at v1
    _publish(repo, rkeys, ubundles.v(2), ukeys, ubundles)
    with updates.DeviceUpdater(dev, device_key=ukeys.device_priv) as u:
        u.pull()
        u.install(commit=True)
    shutil.rmtree(dev)
    shutil.copytree(image, dev, symlinks=True)  # ... put back: v1 in current, the state of then
    with updates.DeviceUpdater(dev, device_key=ukeys.device_priv) as u:
        st = u.status()
        assert st["floor"]["floor"] == 2 and st["current"] is None  # v1 is below the floor: abandoned
        assert "no verified model at or above the floor: current removed" in st["recovered"]
        with pytest.raises(updates.FloorViolationError, match="below the floor 2"):
            u.rollback()


def test_a_version_jump_past_the_raise_bound_is_refused_before_anything_is_written(  # type: ignore[no-untyped-def]
        tmp_path, swtpm, ukeys, ubundles, big_bundles):
    repo, rkeys, url = _repo(tmp_path)
    _publish(repo, rkeys, big_bundles / "digits-v5000.esb", ukeys, ubundles)
    dev = tmp_path / "dev"
    updates.init_device(dev, root=updates.repository_root(repo), owner_key_pem=(ukeys.dir / "owner.pub").read_bytes(),
                        model="digits", url=url, floor=FloorConfig(FLOOR_TPM, INDEX, swtpm.tcti))
    with updates.DeviceUpdater(dev, device_key=ukeys.device_priv) as u:
        with pytest.raises(FloorJumpError, match="at most 1024"):
            u.pull()
        assert u.staged() is None and u.floor.read() == 1
    from edgeshield.audit import AuditLog

    log = AuditLog(dev / "audit.db", readonly=True)
    try:
        refused = [e.data for e in log.entries() if e.kind == "update.refused"]
    finally:
        log.close()
    assert refused and refused[-1]["reason"] == "floor-jump" and refused[-1]["version"] == 5000


_COMMITTER = textwrap.dedent("""
    import sys
    from edgeshield import keys, updates
    u = updates.DeviceUpdater(sys.argv[1], device_key=keys.load_device_private_key(sys.argv[2]), tcti=sys.argv[3])
    u.status()
    print("ready", flush=True)
    u.commit()
    print("done", flush=True)
""")


def test_kill9_mid_commit_leaves_a_partial_floor_that_commit_completes(  # type: ignore[no-untyped-def]
        tmp_path, swtpm, ukeys, ubundles, big_bundles, monkeypatch):
    repo, rkeys, url = _repo(tmp_path)
    _publish(repo, rkeys, ubundles.v(1), ukeys, ubundles)
    dev = tmp_path / "dev"
    with monkeypatch.context() as env:  # no TCTI in the config: the environment's at provisioning, then tcti=
        env.setenv(TCTI_ENV, swtpm.tcti)
        updates.init_device(dev, root=updates.repository_root(repo), model="digits", url=url,
                            owner_key_pem=(ukeys.dir / "owner.pub").read_bytes(), floor=FloorConfig(FLOOR_TPM, INDEX))
    with updates.DeviceUpdater(dev, device_key=ukeys.device_priv, tcti=swtpm.tcti) as u:
        u.pull()
        u.install(commit=True)
    rng = random.Random()  # noqa: S311 - when to kill, not a secret
    old, left = 1, []
    for new in (601, 1201):
        _publish(repo, rkeys, big_bundles / f"digits-v{new}.esb", ukeys, ubundles)
        with updates.DeviceUpdater(dev, device_key=ukeys.device_priv, tcti=swtpm.tcti) as u:
            u.pull()
            u.install()
        proc = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(dev), str(ukeys.dir / "device.key"),
                                 swtpm.tcti], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.1, 0.6))
        proc.kill()  # SIGKILL, somewhere in the commit's verify or its 600 NV increments
        proc.communicate(timeout=30)
        with updates.DeviceUpdater(dev, device_key=ukeys.device_priv, tcti=swtpm.tcti) as u:
            st = u.status()
            floor = st["floor"]["floor"]
            left.append(floor)
            assert old <= floor <= new
            assert st["current"]["model_version"] == new and st["current"]["health"] == "passed"
            if floor < new:  # the raise was cut short: still pending, the way back already closed above old
                assert st["pending"] is True
                if floor > old:
                    with pytest.raises(updates.FloorViolationError):
                        u.rollback()
                assert u.commit() == new
            assert u.floor.read() == new and u.status()["pending"] is False
        old = new
    print(f"kill -9 mid-commit: floors left {left} (old 1 -> 601, 601 -> 1201)")
