"""The evaluation harness on a small subset: real ART attacks, the adaptive attack, ROC plots and `detect evaluate`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeshield  # noqa: F401 - sets ORT_DISABLE_TELEMETRY before onnxruntime is imported
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from edgeshield.adversarial import METADATA_KEY, calibrate  # noqa: E402
from edgeshield.adversarial._detectors import OnnxClassifier  # noqa: E402
from edgeshield.adversarial._torch import onnx_to_torch  # noqa: E402
from edgeshield.evaluation._adaptive import adaptive_attack  # noqa: E402
from edgeshield.evaluation._adversarial import evaluate, jsonable  # noqa: E402

N_CAL, N_EVAL = 225, 48
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ART writes ~/.art/config.json when first imported; keep that out of the real home directory."""
    h = tmp_path_factory.mktemp("home")
    if "art" not in sys.modules:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(h))
            pytest.importorskip("art.attacks.evasion")
    return h


@pytest.fixture(scope="module")
def setup(home: Path) -> dict:
    spec = dataclasses.replace(digits_input_spec(), quantum=1 / 16)
    model = digits_model_path().read_bytes()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    torch_model = onnx_to_torch(model)
    split = load_digits_split()
    file = calibrate(session, split.x_test[:N_CAL], model_sha256=hashlib.sha256(model).hexdigest(), input_spec=spec,
                     detectors=("squeeze", "noise", "reconstruction", "gradient"), reference=split.x_train,
                     torch_model=torch_model)
    x, y = split.x_test[N_CAL : N_CAL + N_EVAL], split.y_test[N_CAL : N_CAL + N_EVAL]
    return {"session": session, "torch": torch_model, "file": file, "x": x, "y": y, "split": split}


@pytest.fixture(scope="module")
def result(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("roc")
    return evaluate(setup["session"], setup["torch"], setup["file"], setup["x"], setup["y"], quick=True,
                    attacks=("fgsm", "pgd", "deepfool"), out_dir=out)


def test_result_structure(result: dict) -> None:
    flat = result["flat"]
    for key in ("clean_accuracy", "detection_rate_avg", "fpr_measured", "auroc_min", "adaptive_detection_rate",
                "adaptive_end_to_end_success", "squeeze_latency_ratio", "validation_fpr"):
        assert key in flat, key
    assert set(result["attacks"]) == {"fgsm", "pgd", "deepfool"}
    assert result["protocol"]["decision"] == "ensemble"
    assert set(result["fpr_measured"]) == {"squeeze", "noise", "reconstruction", "gradient", "ensemble", "fisher"}
    assert set(result["cost"]) == {"squeeze", "noise", "reconstruction", "ensemble", "fisher"}
    assert 0.9 <= flat["clean_accuracy"] <= 1.0
    assert flat["validation_fpr"] == 0.0  # clean digits lie exactly on the 1/16 grid
    json.dumps(jsonable(result))  # everything but the arrays serialises


def test_rates_are_rates(result: dict) -> None:
    for name, block in result["attacks"].items():
        assert 0.0 <= block["success_rate"] <= 1.0, name
        assert 0.0 <= block["end_to_end_success"] <= block["end_to_end_success_detector"] <= block["success_rate"]
        for det, d in block["detectors"].items():
            assert d["detection_rate"] is None or 0.0 <= d["detection_rate"] <= 1.0, (name, det)
            assert d["auroc"] is None or 0.0 <= d["auroc"] <= 1.0, (name, det)
    assert result["attacks"]["pgd"]["success_rate"] > 0
    # FGSM/PGD move pixels by 0.1, off the 1/16 grid: validation rejects every successful example
    assert result["attacks"]["pgd"]["validation_reject_rate"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in result["fpr_measured"].values())
    for c in result["cost"].values():
        assert c["latency_ratio"] > 0 and c["throughput_ratio"] > 0


def test_adaptive_examples_respect_box_and_grid(result: dict, setup: dict) -> None:
    a = result["adaptive"]
    x = setup["x"][OnnxClassifier(setup["session"]).predict(setup["x"]) == setup["y"]]
    xa = a["x_adv"]
    assert xa.shape == x.shape and xa.dtype == np.float32
    assert np.abs(xa - x).max() <= 0.1 + 1e-6
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    np.testing.assert_allclose(xa * 16, np.round(xa * 16), atol=1e-4)
    assert a["on_grid"] is True and a["validation_reject_rate"] in (0.0, None)
    assert 0.0 <= a["end_to_end_success"] <= a["success_rate"] <= 1.0


def test_adaptive_attack_without_grid_stays_in_box(setup: dict) -> None:
    file = setup["file"]
    from edgeshield.adversarial import build_all

    clf = OnnxClassifier(setup["session"])
    x, y = setup["x"][:16], setup["y"][:16]
    keep = clf.predict(x) == y
    det = build_all(file, clf, setup["torch"], ["ensemble"])["ensemble"]
    res = adaptive_attack(setup["torch"], clf, file, det, x[keep], y[keep], eps=0.05, iters=5, quantum=0.0,
                          spec=dataclasses.replace(file.input_spec, quantum=None), lambdas=(0.0, 1.0),
                          losses=("margin",), penalties=("hinge",))
    assert np.abs(res.x_adv - x[keep]).max() <= 0.05 + 1e-6
    assert len(res.sweep) == 2 and res.best["end_to_end_success"] == max(r["end_to_end_success"] for r in res.sweep)


def test_roc_pngs_are_written(result: dict) -> None:
    assert set(result["roc_png"]) == {"fgsm", "pgd", "deepfool", "adaptive"}
    for attack, path in result["roc_png"].items():
        p = Path(path)
        assert p.name == f"roc_{attack}.png"
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 5000


# --- CLI --------------------------------------------------------------------------------------------------------
def _cli(home: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


@pytest.fixture(scope="module")
def cli_world(setup: dict, home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from edgeshield import bundles, keys

    root = tmp_path_factory.mktemp("evalcli")
    k = root / "keys"
    keys.init_keys(k)
    bundle = root / "digits.esb"
    manifest = bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                               recipients=[keys.load_device_public_key(k / "device.pub")],
                               metadata={METADATA_KEY: digits_input_spec().to_json()})
    split = setup["split"]
    file = calibrate(setup["session"], split.x_test[:N_CAL], model_sha256=manifest.model_sha256,
                     input_spec=digits_input_spec(), detectors=("squeeze", "noise", "reconstruction", "gradient"),
                     reference=split.x_train, torch_model=setup["torch"])
    file.save(root / "detector.json")
    dataclasses.replace(file, model_sha256=hashlib.sha256(b"another model").hexdigest()).save(root / "other.json")
    np.save(root / "x.npy", split.x_test[N_CAL : N_CAL + 40])
    np.save(root / "y.npy", split.y_test[N_CAL : N_CAL + 40])
    return {"root": root, "keys": k, "bundle": bundle}


def _evaluate(home: Path, w: dict, detector: str, *extra: object) -> subprocess.CompletedProcess[str]:
    k, r = w["keys"], w["root"]
    return _cli(home, "detect", "evaluate", w["bundle"], "--owner-key", k / "owner.pub", "--device-key",
                k / "device.key", "--detector", r / detector, "--data", r / "x.npy", "--labels", r / "y.npy", *extra)


def test_cli_evaluate_quick_json(cli_world: dict, home: Path) -> None:
    out_dir = cli_world["root"] / "plots"
    proc = _evaluate(home, cli_world, "detector.json", "--quick", "--json", "--out-dir", out_dir)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    flat = out["flat"]
    assert flat["n_eval"] == 40 and flat["quantum"] is None  # this bundle's spec has no grid
    assert set(out["attacks"]) == {"fgsm", "pgd", "cw", "deepfool"}  # --quick drops HopSkipJump
    assert 0.0 <= flat["detection_rate_avg"] <= 1.0 and 0.0 <= flat["fpr_measured"] <= 1.0
    assert sorted(p.name for p in out_dir.glob("roc_*.png")) == [
        "roc_adaptive.png", "roc_cw.png", "roc_deepfool.png", "roc_fgsm.png", "roc_pgd.png"]


def test_cli_evaluate_refuses_a_detector_file_for_another_model(cli_world: dict, home: Path) -> None:
    proc = _evaluate(home, cli_world, "other.json", "--quick")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeshield: error: ") and "calibrated for model" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_evaluate_rejects_bad_labels(cli_world: dict, home: Path) -> None:
    np.save(cli_world["root"] / "bad_y.npy", np.zeros(3, dtype=np.int64))
    k, r = cli_world["keys"], cli_world["root"]
    proc = _cli(home, "detect", "evaluate", cli_world["bundle"], "--owner-key", k / "owner.pub", "--device-key",
                k / "device.key", "--detector", r / "detector.json", "--data", r / "x.npy", "--labels", r / "bad_y.npy")
    assert proc.returncode == 2 and "labels" in proc.stderr, proc.stderr


def test_importing_the_harness_stays_light() -> None:
    code = (
        "import sys, edgeshield.evaluation._adversarial, edgeshield.cli; "
        "bad = [n for n in ('torch', 'art', 'matplotlib', 'sklearn') if n in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_evaluate_system_quick_json(cli_world: dict, home: Path) -> None:
    proc = _evaluate(home, cli_world, "detector.json", "--quick", "--json", "--system", "--budget", "linf:2/16",
                     "--budget", "l2:1.0")
    assert proc.returncode == 0, proc.stderr
    system = json.loads(proc.stdout)["system"]
    assert [b["budget"] for b in system["budgets"]] == ["L∞ 2/16", "L2 1"]
    for b in system["budgets"]:
        assert set(b["per_attack"]) == {"autoattack", "adaptive"}
        e2e = b["end_to_end_success"]
        assert e2e["ci_low"] <= e2e["rate"] <= e2e["ci_high"] and e2e["n"] <= system["n"] == 40


def test_cli_evaluate_system_options_need_system(cli_world: dict, home: Path) -> None:
    for extra in (("--budget", "linf:2/16"), ("--system", "--budget", "linf:2"), ("--system", "--smoothing", "n=5")):
        proc = _evaluate(home, cli_world, "detector.json", "--quick", *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeshield: error: ") and "Traceback" not in proc.stderr
