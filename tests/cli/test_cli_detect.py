"""CLI: protect with an input spec, calibrate detectors, robust `run --detector`, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_cli import assert_one_line_error, cli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

    root = tmp_path_factory.mktemp("detect")
    k = root / "keys"
    assert cli("keys", "init", k).returncode == 0
    (root / "spec.json").write_text(digits_input_spec().to_json())
    bundle = root / "digits.esb"
    proc = cli("protect", digits_model_path(), "--out", bundle, "--signing-key", k / "owner.key",
               "--recipient", k / "device.pub", "--input-spec", root / "spec.json")
    assert proc.returncode == 0, proc.stderr
    split = load_digits_split()
    np.save(root / "clean.npy", split.x_test[:225])
    np.save(root / "eval.npy", split.x_test[225:])
    np.save(root / "train.npy", split.x_train)
    rng = np.random.default_rng(0)
    np.save(root / "noise.npy", rng.random((5, 64)).astype(np.float32))
    detector = root / "detector.json"
    proc = cli("detect", "calibrate", bundle, "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
               "--clean", root / "clean.npy", "--reference", root / "train.npy", "--target-fpr", "0.02",
               "--out", detector, "--json")
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "keys": k, "bundle": bundle, "detector": detector, "calibration": json.loads(proc.stdout)}


def _run(world: dict[str, Path], x: Path, *extra: object):  # type: ignore[no-untyped-def]
    k = world["keys"]
    return cli("run", world["bundle"], "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
               "--input", x, *extra)


def test_calibration_output(world: dict[str, Path]) -> None:
    cal = world["calibration"]
    assert [d["name"] for d in cal["detectors"]] == ["squeeze", "noise", "reconstruction", "ensemble", "fisher"]
    assert all(d["calibration"]["fpr_reject"] <= 0.02 for d in cal["detectors"])
    assert cal["input_spec"]["image_shape"] == [8, 8]  # taken from the bundle's manifest


def test_robust_run(world: dict[str, Path]) -> None:
    proc = _run(world, world["root"] / "eval.npy", "--detector", world["detector"], "--json",
                "--output", world["root"] / "pred.npy")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sum(out["counts"].values()) == 225 and out["counts"]["accept"] > 180
    preds = np.load(world["root"] / "pred.npy")
    rejected = [i for i, d in enumerate(out["decisions"]) if d["decision"] == "reject"]
    assert all(preds[i] == -1 for i in rejected) and all(out["decisions"][i]["prediction"] is None for i in rejected)
    noisy = json.loads(_run(world, world["root"] / "noise.npy", "--detector", world["detector"], "--json").stdout)
    assert noisy["counts"]["reject"] == 5
    table = _run(world, world["root"] / "noise.npy", "--detector", world["detector"])
    assert table.returncode == 0 and "rejected 5" in table.stdout


def test_bad_inputs_and_foreign_detector(world: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "nan.npy", np.full((2, 64), np.nan, np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((2, 64), np.float64))
    np.save(tmp_path / "big.npy", np.full((2, 64), 3.0, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.float32))
    for name, needle in (("nan.npy", "nan"), ("f64.npy", "dtype"), ("big.npy", "max"), ("empty.npy", "empty")):
        # validation applies with and without a detector, since the spec travels in the bundle
        assert_one_line_error(_run(world, tmp_path / name), 2, needle)
        assert_one_line_error(_run(world, tmp_path / name, "--detector", world["detector"]), 2, needle)
    foreign = json.loads(world["detector"].read_text())
    foreign["model_sha256"] = "0" * 64
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    assert_one_line_error(_run(world, world["root"] / "eval.npy", "--detector", tmp_path / "foreign.json"), 2,
                          "calibrated for model")
    (tmp_path / "junk.json").write_text("{")
    assert_one_line_error(_run(world, world["root"] / "eval.npy", "--detector", tmp_path / "junk.json"), 2,
                          "not a valid detector file")


def test_gradient_detector_file_runs_from_the_cli(world: dict[str, Path], tmp_path: Path) -> None:
    k = world["keys"]
    detector = tmp_path / "with-gradient.json"
    proc = cli("detect", "calibrate", world["bundle"], "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
               "--clean", world["root"] / "clean.npy", "--reference", world["root"] / "train.npy",
               "--detectors", "squeeze,noise,reconstruction,gradient", "--out", detector)
    assert proc.returncode == 0, proc.stderr
    out = _run(world, world["root"] / "eval.npy", "--detector", detector, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["decisions"][0]["detector"] == "ensemble"
