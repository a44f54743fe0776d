"""`edgeshield watermark keygen|embed|verify` through the Typer sub-app (exit codes, text and JSON)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import edgeshield  # noqa: F401
from edgeshield.cli._watermark import app
from edgeshield.errors import KeyFileError, OutputExistsError, PathNotFoundError
from edgeshield.models import digits_model_path

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wm-cli")
    for name in ("owner.wmkey", "other.wmkey"):
        res = runner.invoke(app, ["keygen", str(root / name)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(digits_model_path()), "--key", str(root / "owner.wmkey"),
                              "--out", str(root / "marked.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    return {"root": root, "key": root / "owner.wmkey", "other": root / "other.wmkey",
            "marked": root / "marked.onnx", "embed": json.loads(res.output)}


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(world: dict[str, Path]) -> None:
    assert stat.S_IMODE(world["key"].stat().st_mode) == 0o600 and world["key"].stat().st_size == 32
    res = runner.invoke(app, ["keygen", str(world["key"])])
    assert res.exit_code != 0 and isinstance(res.exception, OutputExistsError)


def test_embed_reports_json(world: dict[str, Path]) -> None:
    e = world["embed"]
    assert e["positions"] == 2000 and e["strength"] == 0.25 and e["out"] == str(world["marked"])
    assert world["marked"].stat().st_size > 0


def test_verify_present_json(world: dict[str, Path]) -> None:
    res = runner.invoke(app, ["verify", str(world["marked"]), "--key", str(world["key"]), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["present"] is True and out["p_value"] < 1e-6 and out["statistic"] > 8


def test_verify_absent_is_not_an_error(world: dict[str, Path]) -> None:
    for model, key in ((world["marked"], world["other"]), (digits_model_path(), world["key"])):
        res = runner.invoke(app, ["verify", str(model), "--key", str(key), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["present"] is False
    res = runner.invoke(app, ["verify", str(digits_model_path()), "--key", str(world["key"])])
    assert res.exit_code == 0 and "not found" in res.output and "z =" in res.output


def test_verify_text_when_present(world: dict[str, Path]) -> None:
    res = runner.invoke(app, ["verify", str(world["marked"]), "--key", str(world["key"])])
    assert res.exit_code == 0 and "PRESENT" in res.output


def test_bad_inputs_raise_typed_errors(world: dict[str, Path]) -> None:
    bad_key = world["root"] / "bad.key"
    bad_key.write_bytes(b"short")
    res = runner.invoke(app, ["verify", str(world["marked"]), "--key", str(bad_key)])
    assert isinstance(res.exception, KeyFileError) and res.exception.exit_code == 4
    res = runner.invoke(app, ["verify", str(world["root"] / "missing.onnx"), "--key", str(world["key"])])
    assert isinstance(res.exception, PathNotFoundError) and res.exception.exit_code == 2
    res = runner.invoke(app, ["embed", str(digits_model_path()), "--key", str(world["key"]),
                              "--out", str(world["root"] / "x.onnx"), "--strength", "5"])
    assert res.exception is not None and getattr(res.exception, "exit_code", None) == 2
