"""`serve --config serve.toml` and EDGESHIELD_* variables: every flag is a key, the command line and the
environment override the file, relative paths are relative to the file, and a bad file is one line, exit 2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from edgeshield.cli import main
from edgeshield.server._limits import Limits

REQUIRED = {"owner-key": "keys/owner.pub", "device-key": "keys/device.key", "ca": "pki", "cert": "pki/edge.crt",
            "key": "pki/edge.key", "audit-db": "audit.db", "audit-key": "audit.key"}


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ServeConfig `serve` would run, instead of running it."""
    seen: list[Any] = []
    monkeypatch.setattr("edgeshield.server.serve", seen.append)
    for name in list(os.environ):
        if name.startswith("EDGESHIELD_"):
            monkeypatch.delenv(name)
    return seen


def _toml(path: Path, values: dict[str, Any]) -> Path:
    def render(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(render(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v).lower() if isinstance(v, bool) else str(v)

    path.write_text("".join(f"{k} = {render(v)}\n" for k, v in values.items()))
    return path


def test_the_config_file_alone_is_enough(tmp_path: Path, captured: list[Any]) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = _toml(etc / "serve.toml",
                 {"bundle": "model.esb", **REQUIRED, "port": 9443, "rate-limit": ["client=5:20", "admin=50:100"],
                  "max-connections-per-identity": 4, "crl-expired": "keep-last", "request-head-timeout": 2.5})
    assert main(["serve", "--config", str(conf)]) == 0
    cfg = captured[0]
    assert cfg.bundle == etc / "model.esb" and cfg.owner_key == etc / "keys/owner.pub" and cfg.ca == etc / "pki"
    assert cfg.port == 9443 and cfg.rate_limits == (("client", 5.0, 20.0), ("admin", 50.0, 100.0))
    assert cfg.crl_expired == "keep-last"
    assert cfg.limits == Limits(max_connections_per_identity=4, request_head_timeout_s=2.5)


def test_command_line_beats_environment_beats_file(tmp_path: Path, captured: list[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    conf = _toml(tmp_path / "serve.toml", {"bundle": "model.esb", **REQUIRED, "port": 9001, "max-body": 1000,
                                           "log-level": "warning"})
    monkeypatch.setenv("EDGESHIELD_PORT", "9002")
    monkeypatch.setenv("EDGESHIELD_MAX_BODY", "2000")
    monkeypatch.setenv("EDGESHIELD_OWNER_KEY", "/etc/edgeshield/owner.pub")
    assert main(["serve", "--config", str(conf), "--port", "9003"]) == 0
    cfg = captured[0]
    assert (cfg.port, cfg.max_body_bytes, cfg.log_level) == (9003, 2000, "warning")
    assert cfg.owner_key == Path("/etc/edgeshield/owner.pub")


def test_environment_alone(tmp_path: Path, captured: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"bundle": "m.esb", **REQUIRED}.items():
        monkeypatch.setenv("EDGESHIELD_" + key.upper().replace("-", "_"), str(tmp_path / value))
    assert main(["serve"]) == 0
    assert captured[0].audit_db == tmp_path / "audit.db"


@pytest.mark.parametrize(("content", "needle"), [
    ("owner_key = 1\n", "unknown key 'owner_key'"),
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("port = \n", "not valid TOML"),
    ("[limits]\nx = 1\n", "unknown key 'limits'"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path, captured: list[Any], content: str, needle: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "serve.toml"
    conf.write_text(content)
    assert main(["serve", "--config", str(conf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and not captured


def test_bad_values_are_refused_before_serving(tmp_path: Path, captured: list[Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    conf = _toml(tmp_path / "serve.toml", {"bundle": "m.esb", **REQUIRED})
    for extra in (["--crl-expired", "never"], ["--max-connections-per-identity", "600"], ["--log-level", "loud"]):
        assert main(["serve", "--config", str(conf), *extra]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not captured
