"""ONNX Runtime must never write its device id or telemetry files when EdgeShield runs a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import KeySet

TELEMETRY_ENV_VAR = "ORT_DISABLE_TELEMETRY"


def sandbox_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    # onnxruntime also stays quiet when CI is set (as it is on the CI machine); drop it so the control test
    # really shows what a device, which has no CI variable, would write.
    env = {k: v for k, v in os.environ.items() if k not in (TELEMETRY_ENV_VAR, "XDG_CACHE_HOME", "CI")}
    env |= {"HOME": str(home), "TMPDIR": str(tmp)}
    return env, home, tmp


def written(home: Path, tmp: Path) -> list[str]:
    return sorted(str(p) for root in (home, tmp) for p in root.rglob("*"))


def test_control_plain_onnxruntime_import_does_write_telemetry(tmp_path: Path) -> None:
    """Proves the check below can fail: without EdgeShield, importing onnxruntime writes these files."""
    env, home, tmp = sandbox_env(tmp_path)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)
    files = written(home, tmp)
    assert any("deviceid" in f for f in files) and any(f.endswith(".ses") for f in files), files


def test_edgeshield_run_writes_no_telemetry(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    from edgeshield import bundles

    bundles.protect(digits_model, tmp_path / "d.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub])
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    (tmp_path / "sandbox").mkdir()
    env, home, tmp = sandbox_env(tmp_path / "sandbox")
    k = keyset.dir
    subprocess.run(
        [sys.executable, "-m", "edgeshield", "run", tmp_path / "d.esb", "--owner-key", k / "owner.pub",
         "--device-key", k / "device.key", "--input", tmp_path / "x.npy"],
        env=env, check=True, capture_output=True,
    )
    # The library path too: a user who imports edgeshield.bundles and then onnxruntime directly.
    code = (
        "from edgeshield import bundles, keys\n"
        "import onnxruntime\n"
        f"bundles.open_session({str(tmp_path / 'd.esb')!r}, keys.load_owner_public_key({str(k / 'owner.pub')!r}),"
        f" keys.load_device_private_key({str(k / 'device.key')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert written(home, tmp) == []
