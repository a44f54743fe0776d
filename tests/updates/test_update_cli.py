"""`edgeshield update …` end to end through the real CLI entry point: owner publishes, device pulls over HTTP,
installs, commits, rolls back; refusals are one line with exit 3 (integrity) or 4 (key)."""

from __future__ import annotations

from pathlib import Path

from _cli import cli_fails, cli_json
from _repo_http import serve_directory

from edgeshield import updates
from edgeshield.cli import main
from edgeshield.errors import EXIT_INTEGRITY, EXIT_KEY


def test_owner_and_device_commands(tmp_path: Path, ukeys, ubundles, capsys):  # type: ignore[no-untyped-def]
    repo, rkeys, dev = tmp_path / "repo", tmp_path / "rkeys", tmp_path / "dev"
    out = cli_json(capsys, ["update", "repo", "init", str(repo), "--keys", str(rkeys)])
    assert set(out["key_ids"]) == {"root", "targets", "snapshot", "timestamp"}
    assert all((rkeys / f"{r}.key").stat().st_mode & 0o777 == 0o600 for r in out["key_ids"])
    owner = str(ukeys.dir / "owner.pub")
    publish = ["update", "repo", "publish", str(repo), "--keys", str(rkeys), "--owner-key", owner, "--model", "digits",
               "--input-spec", str(ubundles.spec), "--bundle"]
    assert cli_json(capsys, [*publish, str(ubundles.v(1))])["model_version"] == 1
    with serve_directory(repo) as server:
        cli_json(capsys, ["update", "init", str(dev), "--root", out["root"], "--owner-key", owner, "--model", "digits",
                       "--url", server.url])
        device = ["--device-key", str(ukeys.dir / "device.key")]
        pulled = cli_json(capsys, ["update", "pull", str(dev), *device, "--install", "--commit"])
        assert pulled["installed"]["model_version"] == 1 and pulled["status"]["floor"]["floor"] == 1
        assert cli_json(capsys, [*publish, str(ubundles.v(2))])["model_version"] == 2
        assert cli_json(capsys, ["update", "pull", str(dev), *device])["staged"]["model_version"] == 2
        assert cli_json(capsys, ["update", "install", str(dev), *device])["status"]["pending"] is True
        assert cli_json(capsys, ["update", "rollback", str(dev), *device])["current"]["model_version"] == 1
        assert cli_json(capsys, ["update", "rollback", str(dev), *device])["current"]["model_version"] == 2
        assert cli_json(capsys, ["update", "commit", str(dev), *device]) == {"floor": 2}
        cli_fails(capsys, ["update", "rollback", str(dev), *device], EXIT_INTEGRITY, "below the floor")

        ts = cli_json(capsys, ["update", "repo", "timestamp", str(repo), "--keys", str(rkeys), "--expiry-hours", "6"])
        assert ts["timestamp_version"] >= 3
        cli_fails(capsys, [*publish, str(ubundles.v(1))], 2, "already published")
        updates.publish(repo, rkeys, ubundles.v(1), owner_key=ukeys.owner_pub, model="digits",
                        allow_lower_version=True)  # a repository in an attacker's hands
        cli_fails(capsys, ["update", "pull", str(dev), *device], EXIT_INTEGRITY, "below this device's floor")
        cli_fails(capsys, ["update", "pull", str(dev), "--device-key", str(ukeys.dir / "other.key")], EXIT_KEY,
               "not addressed to this device")

        assert main(["update", "status", str(dev), *device]) == 0
        text = capsys.readouterr().out
        assert "floor 2" in text and "version 2 in slot" in text and "restart serve" in text
        st = cli_json(capsys, ["update", "status", str(dev), *device])
        assert st["current"]["model_version"] == 2 and st["rollback_possible"] is False
        assert Path(st["serve"]["bundle"]).resolve().parent.name in ("a", "b")


def test_device_commands_refuse_an_unprovisioned_directory(tmp_path: Path, ukeys, capsys):  # type: ignore[no-untyped-def]
    cli_fails(capsys, ["update", "status", str(tmp_path), "--device-key", str(ukeys.dir / "device.key")], 2,
           "update init")
