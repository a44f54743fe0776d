"""Incremental verification from a witness-cosigned checkpoint: only the new entries are read, the stored compact
range must fold to the signed root, and the starting point must carry a valid witness cosignature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield import audit
from edgeshield.errors import InvalidArgumentError, NoteSignatureError

from _auditlogs import tamper_module

tamper = tamper_module()


@pytest.fixture
def witnessed(tmp_path: Path) -> dict[str, Any]:
    """A log of 25 entries and a checkpoint (27 with the checkpoints' own entries), cosigned by an in-process
    witness, then 30 more entries and a checkpoint."""
    key = audit.generate_signing_key(tmp_path / "audit.key")
    db = tmp_path / "audit.db"
    wkey = Ed25519PrivateKey.generate()
    vkey = audit.log_vkey(key.public_key())
    witness = audit.Witness(tmp_path / "witness.db", wkey, "witness.example/w1", {vkey.name: [vkey]})
    with audit.AuditLog(db, signing_key=key, checkpoint_every=10) as log:
        log.append_many([("test.event", "tester", {"i": i}) for i in range(25)])
        log.checkpoint()
        published = audit.publish(log, witness, public_key=key.public_key(), witness_keys=[witness.vkey])
        for i in range(30):
            log.append("test.event", "tester", {"i": 100 + i})
        log.checkpoint()
    witness.close()
    note = tmp_path / "cosigned.note"
    note.write_text(published.note)
    return {"key": key, "pub": key.public_key(), "db": db, "note": published.note, "note_path": note,
            "wvkey": witness.vkey, "size": published.checkpoint.tree_size}


def _verify(w: dict[str, Any], note: str | None = None, keys: list[audit.Vkey] | None = None) -> audit.AgainstReport:
    return audit.verify_from_witnessed(audit.AuditLog(w["db"], readonly=True), note or w["note"],
                                       public_key=w["pub"], witness_keys=[w["wvkey"]] if keys is None else keys)


def test_incremental_equals_full_and_reads_only_new_entries(witnessed: dict[str, Any]) -> None:
    log = audit.AuditLog(witnessed["db"], readonly=True)
    full = log.verify(public_key=witnessed["pub"], require_checkpoint=True)
    inc = _verify(witnessed)
    assert (inc.tree_size, inc.incremental, inc.cosigned_by) == (27, True, ("witness.example/w1",))
    assert (inc.verified.entries, inc.verified.root, inc.verified.head_hash, inc.verified.covered) == (
        full.entries, full.root, full.head_hash, full.covered)
    assert inc.verified.checkpoints == len([c for c in log.checkpoints() if c.tree_size >= 27])
    # An entry below the witnessed size is not read again (its root is the witness's to vouch for): a full verify
    # sees the edit, the incremental one does not — that is the cost it saves.
    conn = tamper.attacker(witnessed["db"])
    conn.execute("UPDATE entries SET data = '{\"i\":999}' WHERE seq = 3")
    conn.close()
    with pytest.raises(audit.AuditChainError):
        log.verify(public_key=witnessed["pub"])
    assert _verify(witnessed).verified.entries == full.entries


@pytest.mark.parametrize("seq", [27, 28, 40, 57])
def test_a_tampered_new_entry_is_caught(witnessed: dict[str, Any], seq: int) -> None:
    conn = tamper.attacker(witnessed["db"])
    data = conn.execute("SELECT data FROM entries WHERE seq = ?", (seq,)).fetchone()[0]
    conn.execute("UPDATE entries SET data = ? WHERE seq = ?", (data.replace("1", "2", 1) if "1" in data
                                                               else data.replace("0", "9", 1), seq))
    conn.close()
    with pytest.raises(audit.AuditIntegrityError) as info:
        _verify(witnessed)
    assert info.value.seq == seq or info.value.tree_size is not None


def test_a_rewrite_under_the_witnessed_checkpoint_with_the_device_key_is_caught(witnessed: dict[str, Any]) -> None:
    conn = tamper.attacker(witnessed["db"])  # edit entry 5, rechain, re-sign every checkpoint with the stolen key
    conn.execute("UPDATE entries SET data = '{\"i\":999}' WHERE seq = 5")
    tamper.rechain_and_resign(conn, witnessed["key"])
    conn.close()
    audit.AuditLog(witnessed["db"], readonly=True).verify(public_key=witnessed["pub"])  # whole on the device
    with pytest.raises(audit.AuditIntegrityError):  # the witnessed root no longer matches what follows it
        _verify(witnessed)


def test_the_starting_point_must_be_witness_cosigned(witnessed: dict[str, Any]) -> None:
    log = audit.AuditLog(witnessed["db"], readonly=True)
    device_only = log.checkpoints()[-1].signed_note(witnessed["pub"])  # a marker the device alone signed
    with pytest.raises(NoteSignatureError):
        _verify(witnessed, note=device_only)
    with pytest.raises(InvalidArgumentError):  # no witness key: nothing off the device vouches for the start
        _verify(witnessed, keys=[])
    stranger = audit.note.make_vkey("witness.example/w1", Ed25519PrivateKey.generate().public_key(),
                                    audit.note.SIG_COSIGNATURE_V1)
    with pytest.raises(NoteSignatureError):  # cosigned, but not by a witness we trust
        _verify(witnessed, keys=[stranger])
    body, sigs = witnessed["note"].split("\n\n", 1)
    lines = body.split("\n")
    lines[1] = "30"  # a forged size under the real signatures
    with pytest.raises(NoteSignatureError):
        _verify(witnessed, note="\n".join(lines) + "\n\n" + sigs)


def test_a_compact_range_that_does_not_match_the_signed_root_is_refused(witnessed: dict[str, Any]) -> None:
    conn = tamper.attacker(witnessed["db"])
    blob = conn.execute("SELECT hashes FROM compact_ranges WHERE tree_size = 27").fetchone()[0]
    conn.execute("UPDATE compact_ranges SET hashes = ? WHERE tree_size = 27", (bytes(32) + blob[32:],))
    conn.close()
    with pytest.raises(audit.AuditCompactRangeError) as info:
        _verify(witnessed)
    assert (info.value.reason, info.value.tree_size) == ("compact-range-mismatch", 27)
    conn = tamper.attacker(witnessed["db"])
    conn.execute("DELETE FROM compact_ranges WHERE tree_size = 27")
    conn.close()
    with pytest.raises(audit.AuditCompactRangeError) as info:
        _verify(witnessed)
    assert info.value.reason == "no-compact-range"
    audit.AuditLog(witnessed["db"], readonly=True).verify(public_key=witnessed["pub"])  # the log itself is whole


def test_compact_ranges_are_the_frontiers_at_every_checkpoint(witnessed: dict[str, Any]) -> None:
    log = audit.AuditLog(witnessed["db"], readonly=True)
    conn = tamper.attacker(witnessed["db"])
    stored = dict(conn.execute("SELECT tree_size, hashes FROM compact_ranges").fetchall())
    conn.close()
    assert sorted(stored) == [c.tree_size for c in log.checkpoints()]
    for cp in log.checkpoints():
        frontier = audit.merkle.decode_frontier(cp.tree_size, stored[cp.tree_size])
        assert frontier is not None and audit.merkle.frontier_root(frontier) == cp.root


def test_cli_verify_from_witnessed(witnessed: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edgeshield.cli import main  # in process: the same entry point `python -m edgeshield` runs

    (tmp_path / "w.vkey").write_text(str(witnessed["wvkey"]) + "\n")
    args = ["audit", "verify", str(witnessed["db"]), "--checkpoint-key", str(tmp_path / "audit.pub"),
            "--from-witnessed", str(witnessed["note_path"]), "--witness-key", str(tmp_path / "w.vkey")]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["incremental"], out["witnessed_size"], out["cosigned_by"]) == (True, 27, ["witness.example/w1"])
    assert main(args[:6]) == 2  # no witness key: nothing off the device vouches for the start
    conn = tamper.attacker(witnessed["db"])
    conn.execute("UPDATE entries SET data = '{\"i\":1}' WHERE seq = 30")
    conn.close()
    assert main(args) == 3
    assert "entry 30" in capsys.readouterr().err
