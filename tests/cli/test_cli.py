"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True, env=full_env, timeout=120
, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str = "") -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgeshield: error: ")
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert needle.lower() in lines[0].lower()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys, a protected digits bundle with a model-signing signature, and a test batch."""
    from edgeshield.models import digits_model_path, load_digits_split

    root = tmp_path_factory.mktemp("cli")
    k = root / "keys"
    assert cli("keys", "init", k).returncode == 0
    assert cli("keys", "device", k, "--name", "stranger").returncode == 0
    bundle, sig = root / "digits.esb", root / "digits.sig"
    proc = cli(
        "protect", digits_model_path(), "--out", bundle, "--signing-key", k / "owner.key",
        "--recipient", k / "device.pub", "--model-version", "7", "--meta", "team=vision", "--meta", "stage=prod",
        "--sigstore-sig", sig, "--json",
    )
    assert proc.returncode == 0, proc.stderr
    split = load_digits_split()
    np.save(root / "x.npy", split.x_test[:25])
    np.save(root / "labels.npy", split.y_test[:25])
    return {"root": root, "keys": k, "bundle": bundle, "sig": sig, "model": digits_model_path(), "x": root / "x.npy",
            "protect_json": json.loads(proc.stdout)}


def test_help_everywhere() -> None:
    for args in ([], ["keys"], ["keys", "init"], ["keys", "device"], ["keys", "list"], ["protect"], ["verify"],
                 ["inspect"], ["run"], ["demo"], ["detect"], ["detect", "calibrate"], ["detect", "evaluate"],
                 ["audit"], ["audit", "verify"], ["audit", "show"], ["audit", "export"], ["audit", "keygen"],
                 ["pki"], ["pki", "init"], ["pki", "issue"], ["pki", "revoke"], ["pki", "list"], ["pki", "crl"],
                 ["serve"], ["client"], ["client", "predict"],
                 ["watermark"], ["watermark", "embed"], ["watermark", "verify"], ["watermark", "keygen"],
                 ["extraction"], ["extraction", "evaluate"]):
        proc = cli(*args, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, (args, proc.stderr)


def test_protect_json_and_inspect_show_no_secret(world: dict[str, Path]) -> None:
    manifest = world["protect_json"]["manifest"]
    assert manifest["model_version"] == 7
    # the owner's labels, and the model's inputs and outputs that protect records beside them
    assert manifest["metadata"].keys() == {"stage", "team", "edgeshield.model_io"}
    assert manifest["metadata"]["team"] == "vision" and manifest["metadata"]["stage"] == "prod"
    for args in (("inspect", world["bundle"], "--json"), ("inspect", world["bundle"])):
        proc = cli(*args)
        assert proc.returncode == 0
        assert "wrapped_key" not in proc.stdout and "PRIVATE" not in proc.stdout
    shown = json.loads(cli("inspect", world["bundle"], "--json").stdout)
    assert shown["verified"] is False
    verified = cli("inspect", world["bundle"], "--owner-key", world["keys"] / "owner.pub", "--json")
    assert json.loads(verified.stdout)["verified"]


def test_keys_list_json(world: dict[str, Path]) -> None:
    listed = json.loads(cli("keys", "list", world["keys"], "--json").stdout)["keys"]
    assert [k["name"] for k in listed] == ["owner", "device", "stranger"]
    assert all(len(k["key_id"]) == 16 for k in listed)


def test_verify_and_run(world: dict[str, Path]) -> None:
    k = world["keys"]
    proc = cli("verify", world["bundle"], "--owner-key", k / "owner.pub", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["authentic"] is True
    out = world["root"] / "y.npy"
    proc = cli("run", world["bundle"], "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
               "--input", world["x"], "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    preds = json.loads(proc.stdout)["predictions"]
    strict = cli("run", world["bundle"], "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
                 "--input", world["x"], "--check-digest", "--json")
    assert strict.returncode == 0 and json.loads(strict.stdout)["predictions"] == preds
    assert np.load(out).shape == (25, 10)
    assert (np.array(preds) == np.load(world["root"] / "labels.npy")).mean() > 0.9


def test_run_output_refuses_an_existing_file_unless_forced(world: dict[str, Path], tmp_path: Path) -> None:
    k = world["keys"]
    run = ("run", world["bundle"], "--owner-key", k / "owner.pub", "--device-key", k / "device.key",
           "--input", world["x"], "--output")
    out = tmp_path / "y.npy"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli(*run, out), 2, "exists; use --force")
    assert out.read_bytes() == b"keep me"  # like protect and audit export: untouched
    assert_one_line_error(cli(*run, world["bundle"], "--force"), 2, "must not be the bundle")
    proc = cli(*run, out, "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (25, 10)


def test_model_signing_signature_round_trip(world: dict[str, Path], tmp_path: Path) -> None:
    pub = world["keys"] / "owner.pub"
    assert cli("verify", "--model", world["model"], "--sigstore-sig", world["sig"], "--owner-key", pub).returncode == 0
    tool = Path(sys.executable).with_name("model_signing")
    proc = subprocess.run([tool, "verify", "key", world["model"], "--signature", world["sig"], "--public_key", pub],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    altered = tmp_path / "digits.onnx"
    data = bytearray(world["model"].read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    assert_one_line_error(cli("verify", "--model", altered, "--sigstore-sig", world["sig"], "--owner-key", pub), 3)


def test_error_matrix(world: dict[str, Path], tmp_path: Path) -> None:
    k, bundle = world["keys"], world["bundle"]
    owner_pub, dev = k / "owner.pub", k / "device.key"
    data = bundle.read_bytes()
    tampered = tmp_path / "tampered.esb"
    tampered.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    v2 = tmp_path / "v9.esb"  # a format version this reader does not know
    v2.write_bytes(data[:8] + b"\x00\x09" + data[10:])
    empty = tmp_path / "empty.esb"
    empty.write_bytes(b"")
    other = tmp_path / "other"
    assert cli("keys", "init", other).returncode == 0
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5), np.float32))
    run = ("run", bundle, "--owner-key", owner_pub, "--device-key")

    cases = [
        (("verify", tampered, "--owner-key", owner_pub), 3, "digest"),
        (("verify", bundle, "--owner-key", other / "owner.pub"), 3, "signed by key"),
        (("verify", v2, "--owner-key", owner_pub), 2, "version"),
        (("verify", empty, "--owner-key", owner_pub), 2, "empty"),
        (("verify", tmp_path, "--owner-key", owner_pub), 2, "not a regular file"),
        (("verify", tmp_path / "nope.esb", "--owner-key", owner_pub), 2, "not found"),
        (("verify", world["model"], "--owner-key", owner_pub), 2, "not an edgeshield bundle"),
        (("verify", bundle, "--owner-key", dev), 4, "not a pem public key"),
        ((*run, k / "stranger.key", "--input", world["x"]), 4, "not a recipient"),
        ((*run, other / "device.key", "--input", world["x"]), 4, "not a recipient"),
        ((*run, dev, "--input", tmp_path / "wrong.npy"), 2, "axis 1 must be 64"),
        ((*run, dev, "--input", world["model"]), 2, ".npy"),
        (("protect", world["model"], "--out", bundle, "--signing-key", k / "owner.key",
          "--recipient", k / "device.pub"), 2, "exists"),
        (("verify", "--bogus-flag"), 2, "no such option"),
        (("keys", "init", k), 2, "refusing to overwrite"),
    ]
    for args, code, needle in cases:
        assert_one_line_error(cli(*args), code, needle)


def test_protect_bad_model_leaves_nothing(world: dict[str, Path], tmp_path: Path) -> None:
    k = world["keys"]
    (tmp_path / "notes.txt").write_text("not a model")
    out = tmp_path / "out.esb"
    sig = tmp_path / "out.sig"
    proc = cli("protect", tmp_path / "notes.txt", "--out", out, "--signing-key", k / "owner.key",
               "--recipient", k / "device.pub", "--sigstore-sig", sig)
    assert_one_line_error(proc, 2, "not a valid onnx model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_encrypted_keys_need_their_passphrase(tmp_path: Path, tiny_model: Path) -> None:
    env = {"ES_PASS": "s3cret passphrase"}
    assert cli("keys", "init", tmp_path / "k", "--passphrase-env", "ES_PASS", env=env).returncode == 0
    args = ("protect", tiny_model, "--out", tmp_path / "m.esb", "--signing-key", tmp_path / "k" / "owner.key",
            "--recipient", tmp_path / "k" / "device.pub")
    assert_one_line_error(cli(*args), 4, "passphrase")
    assert_one_line_error(cli(*args, "--passphrase-env", "ES_PASS", env={"ES_PASS": "wrong"}), 4, "wrong passphrase")
    proc = cli(*args, "--passphrase-env", "ES_PASS", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
