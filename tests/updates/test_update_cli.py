"""`edgeshield update …` end to end through the real CLI entry point: owner publishes, device pulls over HTTP,
installs, commits, rolls back; refusals are one line with exit 3 (integrity) or 4 (key)."""

from __future__ import annotations

import json
from pathlib import Path

from _repo_http import serve_directory

from edgeshield import updates
from edgeshield.cli import main
from edgeshield.errors import EXIT_INTEGRITY, EXIT_KEY


def _json(capsys, argv: list[str]) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _fails(capsys, argv: list[str], code: int, words: str) -> None:  # type: ignore[no-untyped-def]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edgeshield: error: ") and words in err, err


def test_owner_and_device_commands(tmp_path: Path, ukeys, ubundles, capsys):  # type: ignore[no-untyped-def]
    repo, rkeys, dev = tmp_path / "repo", tmp_path / "rkeys", tmp_path / "dev"
    out = _json(capsys, ["update", "repo", "init", str(repo), "--keys", str(rkeys)])
    assert set(out["key_ids"]) == {"root", "targets", "snapshot", "timestamp"}
    assert all((rkeys / f"{r}.key").stat().st_mode & 0o777 == 0o600 for r in out["key_ids"])
    owner = str(ukeys.dir / "owner.pub")
    publish = ["update", "repo", "publish", str(repo), "--keys", str(rkeys), "--owner-key", owner, "--model", "digits",
               "--input-spec", str(ubundles.spec), "--bundle"]
    assert _json(capsys, [*publish, str(ubundles.v(1))])["model_version"] == 1
    with serve_directory(repo) as server:
        _json(capsys, ["update", "init", str(dev), "--root", out["root"], "--owner-key", owner, "--model", "digits",
                       "--url", server.url])
        device = ["--device-key", str(ukeys.dir / "device.key")]
        pulled = _json(capsys, ["update", "pull", str(dev), *device, "--install", "--commit"])
        assert pulled["installed"]["model_version"] == 1 and pulled["status"]["floor"]["floor"] == 1
        assert _json(capsys, [*publish, str(ubundles.v(2))])["model_version"] == 2
        assert _json(capsys, ["update", "pull", str(dev), *device])["staged"]["model_version"] == 2
        assert _json(capsys, ["update", "install", str(dev), *device])["status"]["pending"] is True
        assert _json(capsys, ["update", "rollback", str(dev), *device])["current"]["model_version"] == 1
        assert _json(capsys, ["update", "rollback", str(dev), *device])["current"]["model_version"] == 2
        assert _json(capsys, ["update", "commit", str(dev), *device]) == {"floor": 2}
        _fails(capsys, ["update", "rollback", str(dev), *device], EXIT_INTEGRITY, "below the floor")

        ts = _json(capsys, ["update", "repo", "timestamp", str(repo), "--keys", str(rkeys), "--expiry-hours", "6"])
        assert ts["timestamp_version"] >= 3
        _fails(capsys, [*publish, str(ubundles.v(1))], 2, "already published")
        updates.publish(repo, rkeys, ubundles.v(1), owner_key=ukeys.owner_pub, model="digits",
                        allow_lower_version=True)  # a repository in an attacker's hands
        _fails(capsys, ["update", "pull", str(dev), *device], EXIT_INTEGRITY, "below this device's floor")
        _fails(capsys, ["update", "pull", str(dev), "--device-key", str(ukeys.dir / "other.key")], EXIT_KEY,
               "not addressed to this device")

        assert main(["update", "status", str(dev), *device]) == 0
        text = capsys.readouterr().out
        assert "floor 2" in text and "version 2 in slot" in text and "restart serve" in text
        st = _json(capsys, ["update", "status", str(dev), *device])
        assert st["current"]["model_version"] == 2 and st["rollback_possible"] is False
        assert Path(st["serve"]["bundle"]).resolve().parent.name in ("a", "b")


def test_device_commands_refuse_an_unprovisioned_directory(tmp_path: Path, ukeys, capsys):  # type: ignore[no-untyped-def]
    _fails(capsys, ["update", "status", str(tmp_path), "--device-key", str(ukeys.dir / "device.key")], 2,
           "update init")
