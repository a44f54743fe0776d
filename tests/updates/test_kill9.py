"""kill -9 the updater at random moments, many times: the device always comes back with a verified model in
``current``, at or above its floor, and can still update afterwards.

``EDGESHIELD_KILL9_TRIALS`` sets the number of trials (default 12, about 20 s on two cores).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeshield import bundles, updates

CHILD = Path(__file__).with_name("_kill9_child.py")
CYCLES = 2


@pytest.fixture(scope="module")
def template(ukeys, ubundles, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A device committed at v1 whose repository (on local media: a file:// URL) offers v2."""
    d = tmp_path_factory.mktemp("kill9")
    repo, repo_keys, device = d / "repo", d / "repo-keys", d / "device"
    updates.init_repository(repo, repo_keys)
    updates.publish(repo, repo_keys, ubundles.v(1), owner_key=ukeys.owner_pub, model="digits",
                    input_spec=ubundles.spec)
    url = repo.resolve().as_uri()
    updates.init_device(device, root=updates.repository_root(repo),
                        owner_key_pem=(ukeys.dir / "owner.pub").read_bytes(), model="digits", url=url)
    with updates.DeviceUpdater(device, device_key=ukeys.device_priv) as u:
        u.pull()
        u.install(commit=True)
    updates.publish(repo, repo_keys, ubundles.v(2), owner_key=ukeys.owner_pub, model="digits",
                    input_spec=ubundles.spec)
    return device, url


RECOVERIES: list[list[str]] = []


def _check(device: Path, ukeys) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with updates.DeviceUpdater(device, device_key=ukeys.device_priv) as u:
        st = u.status()  # recovery runs first
    if st["recovered"]:
        RECOVERIES.append(st["recovered"])
    assert st["current"] is not None, st
    assert st["current"]["health"] == "passed", st
    version, floor = st["current"]["model_version"], st["floor"]["floor"]
    assert version >= floor >= 1
    opened = bundles.open_bundle(device / "current" / "model.esb", ukeys.owner_pub, ukeys.device_priv)
    assert opened.manifest.model_version == version
    (logits,) = opened.session.run(None, {"input": np.zeros((1, 64), np.float32)})
    assert np.isfinite(logits).all()
    return version, floor


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        proc.kill()
        pytest.fail("the updater child did not start")
    assert proc.stdout.readline().strip() == "ready"


def test_kill9_at_random_points_always_leaves_a_verified_model(template, ukeys, tmp_path):
    template_dir, url = template
    trials = int(os.environ.get("EDGESHIELD_KILL9_TRIALS", "12"))
    rng = random.Random(os.environ.get("EDGESHIELD_KILL9_SEED"))  # noqa: S311 - when to kill, not a secret

    def run(device: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(CHILD), str(device), url, str(ukeys.dir / "device.key"),
                                 str(CYCLES)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # One uninterrupted run measures how long the work takes, so the kills spread over all of it.
    device = tmp_path / "calibration"
    shutil.copytree(template_dir, device, symlinks=True)
    proc = run(device)
    _wait_ready(proc)
    start = time.monotonic()
    out, err = proc.communicate(timeout=120)
    work_s = time.monotonic() - start
    assert proc.returncode == 0 and out.strip() == "done", err
    assert _check(device, ukeys) == (2, 2)

    outcomes: dict[tuple[int, int], int] = {}
    for i in range(trials):
        device = tmp_path / f"trial-{i}"
        shutil.copytree(template_dir, device, symlinks=True)
        proc = run(device)
        _wait_ready(proc)
        time.sleep(rng.uniform(0, work_s))
        proc.kill()  # SIGKILL: no cleanup, no finally blocks, no flushed buffers
        proc.communicate(timeout=30)
        state = _check(device, ukeys)
        outcomes[state] = outcomes.get(state, 0) + 1
        if i % 4 == 0 and state != (2, 2):  # and it can still move on: the interrupted update goes through
            with updates.DeviceUpdater(device, device_key=ukeys.device_priv) as u:
                if u.status()["pending"]:
                    u.rollback()
                u.pull(url)
                u.install(commit=True)
            assert _check(device, ukeys) == (2, 2)
        shutil.rmtree(device)
    print(f"kill -9: {trials} trials, (version, floor) after recovery: {outcomes}, work {work_s:.2f} s, "
          f"recovery acted {len(RECOVERIES)} times: {RECOVERIES[:3]}")
