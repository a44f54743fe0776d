"""The audit log as an attacker and a crash meet it: raw SQLite edits, SIGKILL mid-append, racing threads, the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield import audit, keys
from edgeshield.audit import merkle
from edgeshield.audit._format import (
    canonical_json,
    chain_hash,
    checkpoint_entry_data,
    checkpoint_text,
    entry_leaf,
    origin_for,
)
from edgeshield.errors import (
    InvalidArgumentError,
    KeyFileError,
    OutputExistsError,
    PassphraseError,
    PathNotFoundError,
)

from _auditlogs import kill_writer_mid_append

N_ENTRIES, EVERY = 35, 10  # 35 appends; checkpoints at tree sizes 10, 20, 30, each chained in as that entry
SIZE = N_ENTRIES + 3  # entries 0..37; 31..37 are covered by no checkpoint


@pytest.fixture
def device_key(tmp_path: Path) -> Ed25519PrivateKey:
    return audit.generate_signing_key(tmp_path / "audit.key")


@pytest.fixture
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def build_log(path: Path, key: Ed25519PrivateKey | None, n: int = N_ENTRIES, every: int = EVERY) -> Path:
    with audit.AuditLog(path, signing_key=key, checkpoint_every=every) as log:
        for i in range(n):
            log.append("inference.request", f"client-{i % 3}", {"i": i, "input_sha256": hashlib.sha256(
                str(i).encode()).hexdigest(), "decision": "accepted" if i % 4 else "rejected"})
    return path


@pytest.fixture
def signed_log(tmp_path: Path, device_key: Ed25519PrivateKey) -> Path:
    return build_log(tmp_path / "audit.db", device_key)


# --- round trip -----------------------------------------------------------------------------------------------------
def test_round_trip(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.db"
    with audit.AuditLog(path, signing_key=device_key, checkpoint_every=4) as log:
        e0 = log.append("bundle.load", "system", {"bundle_sha256": "ab" * 32, "version": 7})
        assert (e0.seq, e0.prev_hash) == (0, bytes(32))
        e1 = log.append("inference.request", "client-1", {"score": 0.25, "labels": [1, 2], "ok": True, "n": None})
        assert e1.seq == 1 and e1.prev_hash == e0.entry_hash
        e2 = log.append("auth.denied", "client-2")
        assert e2.data == {}
        for i in range(3, 9):
            log.append("inference.request", "client-1", {"i": i})
        # 9 appends; a checkpoint at every tree size divisible by 4, chained in as entries 4 and 8
        assert len(log) == 11
        cps = log.checkpoints()
        assert [c.tree_size for c in cps] == [4, 8]
        stored = list(log.entries())
        assert [e.seq for e in stored] == list(range(11))
        assert stored[:3] == [e0, e1, e2]
        assert [e.kind for e in stored].count("audit.checkpoint") == 2
        for cp in cps:
            chained = stored[cp.tree_size]
            assert (chained.kind, chained.actor, chained.ts) == ("audit.checkpoint", "audit", cp.ts)
            assert chained.data == {"tree_size": cp.tree_size, "root": base64.b64encode(cp.root).decode(),
                                    "key_id": cp.key_id, "signature": base64.b64encode(cp.signature).decode()}
        assert list(log.entries(3, 5)) == stored[3:5]
        assert log.tail(2) == stored[9:]
        assert log.tail(0) == []
        report = log.verify(public_key=device_key.public_key())
        assert (report.entries, report.checkpoints, report.latest_checkpoint) == (11, 2, 8)
        assert (report.covered, report.uncovered, report.first_uncovered) == (9, 2, 9)  # 8's own entry is covered
        assert report.signatures_checked and report.key_id == audit.key_id(device_key.public_key())
        assert report.signatures_verified == 2 and report.schema == 2
        assert report.head_hash == stored[-1].entry_hash
        assert report.root == merkle.root([e.leaf() for e in stored])
        cp = log.checkpoint()
        assert cp.tree_size == 11 and len(log) == 12
        assert log.checkpoint() == cp and len(log) == 12  # nothing new to cover: idempotent
        report = log.verify(require_checkpoint=True)
        assert (report.latest_checkpoint, report.covered, report.uncovered) == (11, 12, 0)


def test_entry_and_checkpoint_encoding(signed_log: Path, device_key: Ed25519PrivateKey) -> None:
    log = audit.AuditLog(signed_log, readonly=True)
    e = next(log.entries(5, 6))
    leaf = entry_leaf(e.seq, e.ts, e.kind, e.actor, e.data)
    assert leaf == e.leaf()
    assert json.loads(leaf) == {"v": 1, "seq": 5, "ts": e.ts, "kind": e.kind, "actor": e.actor, "data": e.data}
    assert e.entry_hash == hashlib.sha256(b"edgeshield/audit/entry/v1\x00" + e.prev_hash + leaf).digest()

    cp = log.checkpoints()[1]
    kid = audit.key_id(device_key.public_key())
    assert kid == keys.key_id(device_key.public_key())  # the same key id as every other EdgeShield key
    assert cp.text() == f"edgeshield/audit/{kid}\n20\n{base64.b64encode(cp.root).decode()}\n"
    device_key.public_key().verify(cp.signature, cp.text().encode())
    # The C2SP signed note: text, blank line, "— origin base64(keyhash4 || signature)".
    note = cp.signed_note(device_key.public_key())
    body, sig_line = note.split("\n\n")
    assert body + "\n" == cp.text()
    name, b64 = sig_line.removeprefix("\u2014 ").rstrip("\n").split(" ")
    blob = base64.b64decode(b64)
    assert name == cp.origin and blob[4:] == cp.signature
    raw = device_key.public_key().public_bytes_raw()
    assert blob[:4] == hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()[:4]


def test_proofs_against_signed_checkpoints(signed_log: Path, device_key: Ed25519PrivateKey) -> None:
    log = audit.AuditLog(signed_log, readonly=True)
    cps = {c.tree_size: c for c in log.checkpoints()}
    for seq in (0, 7, 19, 29):
        proof = log.inclusion_proof(seq, 30)
        assert proof.root == cps[30].root and proof.verify()
        assert merkle.verify_inclusion(proof.leaf_hash, seq, 30, list(proof.path), cps[30].root)
        assert not merkle.verify_inclusion(proof.leaf_hash, seq, 30, list(proof.path), cps[20].root)
    full = log.inclusion_proof(SIZE - 1)
    assert full.tree_size == SIZE and full.root == log.verify().root and full.verify()
    for old, new in ((10, 20), (10, 30), (20, 30)):
        c = log.consistency_proof(old, new)
        assert (c.old_root, c.new_root) == (cps[old].root, cps[new].root) and c.verify()
    assert log.consistency_proof(30).new_size == SIZE
    with pytest.raises(InvalidArgumentError):
        log.inclusion_proof(SIZE)
    with pytest.raises(InvalidArgumentError):
        log.consistency_proof(SIZE + 1)


def test_export_jsonl(signed_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    log = audit.AuditLog(signed_log, readonly=True)
    assert log.export_jsonl(out) == (SIZE, 3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["type"] for x in lines].count("checkpoint") == 3
    assert lines[10] == {"type": "checkpoint", **log.checkpoints()[0].to_dict()}  # right after entry 9
    entries = [x for x in lines if x["type"] == "entry"]
    assert [x["seq"] for x in entries] == list(range(SIZE))
    assert entries[3]["entry_hash"] == next(log.entries(3, 4)).entry_hash.hex()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(OutputExistsError):
        log.export_jsonl(out, overwrite=False)


# --- input validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "actor", "data"), [
    ("Inference", "a", {}), ("", "a", {}), ("a..b", "a", {}), ("x" * 65, "a", {}), (3, "a", {}),
    ("ok", "", {}), ("ok", " padded", {}), ("ok", "line\nbreak", {}), ("ok", "x" * 129, {}),
    ("ok", "a", [1, 2]), ("ok", "a", {"raw": b"\x00\x01"}), ("ok", "a", {"x": float("nan")}),
    ("ok", "a", {1: "int key"}), ("ok", "a", {"blob": "x" * 20000}), ("ok", "a", {"t": object()}),
    ("audit.checkpoint", "a", {}), ("audit.migrated", "a", {}), ("audit.anything", "a", {}),  # the log's own
])
def test_append_rejects_bad_input(tmp_path: Path, kind: object, actor: object, data: object) -> None:
    with audit.AuditLog(tmp_path / "a.db") as log:
        with pytest.raises(InvalidArgumentError):
            log.append(kind, actor, data)  # type: ignore[arg-type]
        assert len(log) == 0


def test_open_errors(tmp_path: Path, signed_log: Path, device_key: Ed25519PrivateKey,
                     other_key: Ed25519PrivateKey) -> None:
    with pytest.raises(PathNotFoundError):
        audit.AuditLog(tmp_path / "missing.db", readonly=True)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(audit.NotAnAuditLogError):
        audit.AuditLog(tmp_path / "junk.db")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(audit.NotAnAuditLogError):
        audit.AuditLog(tmp_path / "other.db")
    # One signing identity per log: another key, or none, would make every later verify fail.
    with pytest.raises(audit.AuditKeyMismatchError):
        audit.AuditLog(signed_log, signing_key=other_key)
    with pytest.raises(audit.AuditKeyMismatchError):
        audit.AuditLog(signed_log)
    ro = audit.AuditLog(signed_log, readonly=True)
    with pytest.raises(InvalidArgumentError):
        ro.append("x", "y", {})
    with pytest.raises(InvalidArgumentError):
        audit.AuditLog(tmp_path / "n.db", checkpoint_every=-1)


def test_triggers_refuse_plain_updates(signed_log: Path) -> None:
    conn = sqlite3.connect(signed_log)
    for sql in ("UPDATE entries SET actor = 'x' WHERE seq = 1", "DELETE FROM entries WHERE seq = 34",
                "DELETE FROM checkpoints"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()


# --- the tamper matrix ----------------------------------------------------------------------------------------------
Conn, Key = sqlite3.Connection, Ed25519PrivateKey


def raw(db: Path) -> sqlite3.Connection:
    """An attacker's connection: the append-only triggers dropped first."""
    conn = sqlite3.connect(db, isolation_level=None)
    for t in ("entries_no_update", "entries_no_delete", "checkpoints_no_update", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {t}")
    return conn


def row(conn: sqlite3.Connection, seq: int) -> tuple:
    return conn.execute("SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries WHERE seq = ?",
                        (seq,)).fetchone()


def rehash(conn: sqlite3.Connection, seq: int, prev: bytes, *, data: str | None = None) -> bytes:
    """Rewrite entry ``seq`` (optionally with new data) so that it chains correctly onto ``prev``."""
    _, ts, kind, actor, old, _, _ = row(conn, seq)
    text = old if data is None else data
    h = chain_hash(prev, entry_leaf(seq, ts, kind, actor, json.loads(text)))
    conn.execute("UPDATE entries SET data = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?", (text, prev, h, seq))
    return h


def shift(conn: sqlite3.Connection, start: int, by: int) -> None:
    seqs = [r[0] for r in conn.execute("SELECT seq FROM entries WHERE seq >= ? ORDER BY seq", (start,))]
    for s in (reversed(seqs) if by > 0 else seqs):
        conn.execute("UPDATE entries SET seq = ? WHERE seq = ?", (s + by, s))


def resign(conn: sqlite3.Connection, size: int, key: Ed25519PrivateKey, *, root: bytes | None = None,
           kid: str | None = None) -> None:
    root = root or conn.execute("SELECT root FROM checkpoints WHERE tree_size = ?", (size,)).fetchone()[0]
    kid = kid or audit.key_id(key.public_key())
    sig = key.sign(checkpoint_text(origin_for(kid), size, root).encode())
    conn.execute("UPDATE checkpoints SET root = ?, key_id = ?, signature = ? WHERE tree_size = ?",
                 (root, kid, sig, size))


def t_edit_data(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET data = '{\"i\":999}' WHERE seq = 13")


def t_edit_kind(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET kind = 'auth.login' WHERE seq = 5")


def t_edit_ts(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET ts = '2020-01-01T00:00:00.000000Z' WHERE seq = 0")


def t_edit_actor_in_unanchored_tail(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET actor = 'root' WHERE seq = 33")


def t_edit_data_noncanonical(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET data = ' ' || data WHERE seq = 8")


def t_edit_and_rehash_one_row(c: Conn, k: Key, o: Key) -> None:
    rehash(c, 13, row(c, 12)[6], data='{"i":999}')


def t_delete(c: Conn, k: Key, o: Key) -> None:
    c.execute("DELETE FROM entries WHERE seq = 17")


def t_delete_and_renumber(c: Conn, k: Key, o: Key) -> None:
    c.execute("DELETE FROM entries WHERE seq = 17")
    shift(c, 18, -1)


def t_delete_first(c: Conn, k: Key, o: Key) -> None:
    c.execute("DELETE FROM entries WHERE seq = 0")


def t_swap(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE entries SET seq = -1 WHERE seq = 7")
    c.execute("UPDATE entries SET seq = 7 WHERE seq = 11")
    c.execute("UPDATE entries SET seq = 11 WHERE seq = -1")


def t_insert_naive(c: Conn, k: Key, o: Key) -> None:
    shift(c, 12, +1)
    c.execute("INSERT INTO entries VALUES (12, '2030-01-01T00:00:00.000000Z', 'auth.login', 'mallory', '{}', ?, ?)",
              (os.urandom(32), os.urandom(32)))


def t_insert_chained(c: Conn, k: Key, o: Key) -> None:
    # The inserted row links to entry 11 with a correct hash of its own; only its successor can tell.
    shift(c, 12, +1)
    prev, ts = row(c, 11)[6], "2030-01-01T00:00:00.000000Z"
    h = chain_hash(prev, entry_leaf(12, ts, "auth.login", "mallory", {}))
    c.execute("INSERT INTO entries VALUES (12, ?, 'auth.login', 'mallory', '{}', ?, ?)", (ts, prev, h))


def t_insert_before_genesis(c: Conn, k: Key, o: Key) -> None:
    c.execute("INSERT INTO entries VALUES (-1, 'x', 'a', 'b', '{}', ?, ?)", (bytes(32), bytes(32)))


def t_append_forged(c: Conn, k: Key, o: Key) -> None:
    c.execute("INSERT INTO entries VALUES (38, 'x', 'a', 'b', '{}', ?, ?)", (os.urandom(32), os.urandom(32)))


def t_rewrite_rest_of_chain(c: Conn, k: Key, o: Key) -> None:
    # A consistent chain after the edit: only the Merkle checkpoints can catch this.
    prev = rehash(c, 13, row(c, 12)[6], data='{"i":999}')
    for seq in range(14, SIZE):
        prev = rehash(c, seq, prev)


def t_truncate_below_checkpoint(c: Conn, k: Key, o: Key) -> None:
    c.execute("DELETE FROM entries WHERE seq >= 25")


def t_truncate_beyond_checkpoint(c: Conn, k: Key, o: Key) -> None:
    c.execute("DELETE FROM entries WHERE seq >= 20")  # everything after checkpoint 20: checkpoint 30 remembers


def t_bad_signature(c: Conn, k: Key, o: Key) -> None:
    sig = c.execute("SELECT signature FROM checkpoints WHERE tree_size = 20").fetchone()[0]
    c.execute("UPDATE checkpoints SET signature = ? WHERE tree_size = 20", (bytes([sig[0] ^ 1]) + sig[1:],))


def t_other_key_valid_signature(c: Conn, k: Key, o: Key) -> None:
    resign(c, 20, o)


def t_other_key_under_device_key_id(c: Conn, k: Key, o: Key) -> None:
    resign(c, 20, o, kid=audit.key_id(k.public_key()))


def t_signed_wrong_root(c: Conn, k: Key, o: Key) -> None:
    resign(c, 20, k, root=hashlib.sha256(b"forged").digest())


def t_wrong_root_unsigned_change(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE checkpoints SET root = ? WHERE tree_size = 10", (hashlib.sha256(b"x").digest(),))


def t_unsigned_checkpoint(c: Conn, k: Key, o: Key) -> None:
    c.execute("UPDATE checkpoints SET signature = NULL WHERE tree_size = 10")


def t_forged_extra_checkpoint(c: Conn, k: Key, o: Key) -> None:
    root = merkle.root_from_hashes([os.urandom(32)] * 15)
    kid = audit.key_id(o.public_key())
    c.execute("INSERT INTO checkpoints VALUES (15, ?, 'now', ?, ?)",
              (root, kid, o.sign(checkpoint_text(origin_for(kid), 15, root).encode())))


TAMPERS: list[tuple[Callable, type[audit.AuditIntegrityError], int | None, int | None]] = [
    # (tamper, error type, first bad seq, checkpoint tree size)
    (t_edit_data, audit.AuditChainError, 13, None),
    (t_edit_kind, audit.AuditChainError, 5, None),
    (t_edit_ts, audit.AuditChainError, 0, None),
    (t_edit_actor_in_unanchored_tail, audit.AuditChainError, 33, None),
    (t_edit_data_noncanonical, audit.AuditChainError, 8, None),
    (t_edit_and_rehash_one_row, audit.AuditChainError, 13, None),
    (t_delete, audit.AuditChainError, 17, None),
    (t_delete_and_renumber, audit.AuditChainError, 17, None),
    (t_delete_first, audit.AuditChainError, 0, None),
    (t_swap, audit.AuditChainError, 7, None),
    (t_insert_naive, audit.AuditChainError, 12, None),
    (t_insert_chained, audit.AuditChainError, 12, None),
    (t_insert_before_genesis, audit.AuditChainError, -1, None),
    (t_append_forged, audit.AuditChainError, 38, None),
    (t_rewrite_rest_of_chain, audit.AuditCheckpointError, None, 20),
    (t_truncate_below_checkpoint, audit.AuditTruncatedError, 25, 30),
    (t_truncate_beyond_checkpoint, audit.AuditTruncatedError, 20, 30),
    (t_bad_signature, audit.AuditSignatureError, None, 20),
    (t_other_key_valid_signature, audit.AuditWrongKeyError, None, 20),
    (t_other_key_under_device_key_id, audit.AuditSignatureError, None, 20),
    (t_signed_wrong_root, audit.AuditCheckpointError, None, 20),
    (t_wrong_root_unsigned_change, audit.AuditSignatureError, None, 10),
    (t_unsigned_checkpoint, audit.AuditSignatureError, None, 10),
    (t_forged_extra_checkpoint, audit.AuditWrongKeyError, None, 15),
]


@pytest.mark.parametrize(("tamper", "error", "seq", "tree_size"), TAMPERS, ids=[t[0].__name__[2:] for t in TAMPERS])
def test_tamper_is_detected(signed_log: Path, device_key: Ed25519PrivateKey, other_key: Ed25519PrivateKey,
                            tamper: Callable, error: type, seq: int | None, tree_size: int | None) -> None:
    assert audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key()).entries == SIZE
    conn = raw(signed_log)
    tamper(conn, device_key, other_key)
    conn.close()
    with pytest.raises(audit.AuditIntegrityError) as info:
        audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key())
    exc = info.value
    assert type(exc) is error, (type(exc), str(exc))
    assert (exc.seq, exc.tree_size) == (seq, tree_size), str(exc)
    assert exc.exit_code == 3 and "\n" not in str(exc)
    if seq is not None:
        assert str(seq) in str(exc)
    # The device itself refuses to sign a checkpoint over a tampered log: the append that would trigger one fails
    # whole, leaving the log as it was.
    with audit.AuditLog(signed_log, signing_key=device_key, checkpoint_every=1) as log:
        before = len(log)
        with pytest.raises(error):
            log.append("test.check", "system", {})
        assert len(log) == before


def rechain(conn: sqlite3.Connection, start: int) -> None:
    """Recompute every chain hash from entry ``start`` on, as an attacker with the file can."""
    prev = row(conn, start - 1)[6] if start else bytes(32)
    for (seq,) in conn.execute("SELECT seq FROM entries WHERE seq >= ? ORDER BY seq", (start,)).fetchall():
        prev = rehash(conn, seq, prev)


def sync_checkpoint_entry(conn: sqlite3.Connection, size: int) -> None:
    """Make checkpoint ``size``'s chained entry repeat its (altered) row again, and rechain from there."""
    root, kid, sig = conn.execute("SELECT root, key_id, signature FROM checkpoints WHERE tree_size = ?",
                                  (size,)).fetchone()
    data = canonical_json(checkpoint_entry_data(size, root, kid, sig))
    conn.execute("UPDATE entries SET data = ? WHERE seq = ?", (data, size))
    rechain(conn, size)


def flip_signature(conn: sqlite3.Connection, size: int) -> None:
    sig = conn.execute("SELECT signature FROM checkpoints WHERE tree_size = ?", (size,)).fetchone()[0]
    conn.execute("UPDATE checkpoints SET signature = ? WHERE tree_size = ?", (bytes([sig[0] ^ 1]) + sig[1:], size))


def test_roots_checked_without_a_key(signed_log: Path, device_key: Ed25519PrivateKey) -> None:
    conn = raw(signed_log)
    flip_signature(conn, 30)
    conn.close()
    with pytest.raises(audit.AuditCheckpointLinkError) as info:  # the row no longer matches its chained entry
        audit.AuditLog(signed_log, readonly=True).verify()
    assert (info.value.seq, info.value.tree_size, info.value.reason) == (30, 30, "checkpoint-mismatch")
    conn = raw(signed_log)
    sync_checkpoint_entry(conn, 30)  # forge the newest checkpoint's entry too: only its signature can tell now
    conn.close()
    report = audit.AuditLog(signed_log, readonly=True).verify()  # no key: roots only, and the report says so
    assert not report.signatures_checked and report.key_id is None and report.signatures_verified == 0
    with pytest.raises(audit.AuditSignatureError):
        audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key())


def test_older_checkpoints_are_sealed_by_newer_roots(signed_log: Path, device_key: Ed25519PrivateKey) -> None:
    """A checkpoint's entry is a leaf under every later checkpoint: forging checkpoint 20 (row and entry alike)
    breaks checkpoint 30's root even when no key is given."""
    conn = raw(signed_log)
    flip_signature(conn, 20)
    sync_checkpoint_entry(conn, 20)
    conn.close()
    with pytest.raises(audit.AuditCheckpointError) as info:
        audit.AuditLog(signed_log, readonly=True).verify()
    assert (info.value.tree_size, info.value.reason) == (30, "root-mismatch")
    conn = raw(signed_log)
    t_signed_wrong_root(conn, device_key, device_key)
    sync_checkpoint_entry(conn, 20)
    conn.close()
    with pytest.raises(audit.AuditCheckpointError) as info:
        audit.AuditLog(signed_log, readonly=True).verify()
    assert info.value.tree_size == 20


def test_limits_of_detection(signed_log: Path, device_key: Ed25519PrivateKey) -> None:
    """Documented limits of the device alone: whoever holds the file can rewrite the entries no checkpoint covers
    (verify says how many there are), or cut the log back to right after a checkpoint's own entry, removing the
    newer checkpoints with it. A witness that saw a newer checkpoint catches the cut (tests/audit/test_witness.py)."""
    conn = raw(signed_log)
    prev = rehash(conn, 31, row(conn, 30)[6], data='{"i":999}')
    for seq in range(32, SIZE):
        prev = rehash(conn, seq, prev)
    conn.close()
    report = audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key())
    assert (report.entries, report.uncovered, report.first_uncovered) == (SIZE, 7, 31)
    with pytest.raises(audit.AuditUncoveredError) as info:  # they were uncovered before the rewrite, too
        audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key(), require_checkpoint=True)
    assert (info.value.seq, info.value.tree_size, info.value.exit_code) == (31, 30, 3)
    assert "7 of 38 entries" in str(info.value) and "31..37" in str(info.value)
    conn = raw(signed_log)
    conn.execute("DELETE FROM entries WHERE seq > 20")  # keep checkpoint 20's own entry
    conn.execute("DELETE FROM checkpoints WHERE tree_size > 20")
    conn.close()
    report = audit.AuditLog(signed_log, readonly=True).verify(public_key=device_key.public_key(),
                                                               require_checkpoint=True)
    assert (report.entries, report.latest_checkpoint, report.uncovered) == (21, 20, 0)


def test_unsigned_log(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    path = build_log(tmp_path / "u.db", None, n=12, every=5)
    log = audit.AuditLog(path, readonly=True)
    report = log.verify()
    assert (report.checkpoints, report.signatures_checked) == (2, False)
    assert log.checkpoints()[0].text().startswith("edgeshield/audit/unsigned\n5\n")
    with pytest.raises(audit.AuditSignatureError):
        log.verify(public_key=device_key.public_key())


# --- durability and concurrency -------------------------------------------------------------------------------------
def test_sigkill_loses_no_committed_entry(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    reported = kill_writer_mid_append(db, tmp_path / "audit.key")
    log = audit.AuditLog(db, readonly=True)
    report = log.verify(public_key=device_key.public_key())
    ticks = [e.data["i"] for e in log.entries() if e.kind == "test.tick"]
    assert len(reported) <= len(ticks) <= len(reported) + 1  # at most one committed-but-unreported entry more
    assert ticks[:len(reported)] == reported
    assert all(c.tree_size % 25 == 0 for c in log.checkpoints()) and report.checkpoints >= 4
    # The log carries on where it stopped.
    with audit.AuditLog(db, signing_key=device_key, checkpoint_every=25) as writer:
        assert writer.append("test.tick", "writer", {"i": -1}).seq == report.entries
        assert writer.verify().entries - report.entries in (1, 2)  # 2 when that append was due a checkpoint


def test_concurrent_appends_keep_a_valid_chain(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    threads_n, per_thread = 8, 30
    errors: list[BaseException] = []
    verified: list[int] = []
    done = threading.Event()
    with audit.AuditLog(tmp_path / "audit.db", signing_key=device_key, checkpoint_every=16) as log:
        def writer(t: int) -> None:
            try:
                for i in range(per_thread):
                    log.append("inference.request", f"thread-{t}", {"i": i})
            except BaseException as exc:  # noqa: BLE001  # pragma: no cover - reported below
                errors.append(exc)

        def reader() -> None:  # snapshot reads beside the writers must always see a whole, valid log
            try:
                while not done.is_set():
                    verified.append(log.verify().entries)
            except BaseException as exc:  # noqa: BLE001  # pragma: no cover - reported below
                errors.append(exc)

        r = threading.Thread(target=reader)
        r.start()
        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        r.join()
        assert not errors, errors
        total = threads_n * per_thread
        report = log.verify(public_key=device_key.public_key())
        assert report.entries == total + report.checkpoints  # every checkpoint is an entry too
        assert [c.tree_size for c in log.checkpoints()] == list(range(16, report.entries, 16))
        seen = {(e.actor, e.data["i"]) for e in log.entries() if e.kind != "audit.checkpoint"}
        assert seen == {(f"thread-{t}", i) for t in range(threads_n) for i in range(per_thread)}
        assert verified == sorted(verified)


# --- keys -----------------------------------------------------------------------------------------------------------
def test_signing_key_files(tmp_path: Path) -> None:
    key = audit.generate_signing_key(tmp_path / "k.key", passphrase=b"pw")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.key").read_bytes()
    with pytest.raises(PassphraseError):
        audit.load_signing_key(tmp_path / "k.key")
    with pytest.raises(PassphraseError):
        audit.load_signing_key(tmp_path / "k.key", b"wrong")
    loaded = audit.load_signing_key(tmp_path / "k.key", b"pw")
    assert audit.key_id(loaded.public_key()) == audit.key_id(key.public_key())
    assert audit.key_id(audit.load_verify_key(tmp_path / "k.pub")) == audit.key_id(key.public_key())
    with pytest.raises(OutputExistsError):
        audit.generate_signing_key(tmp_path / "k.key")
    keys.init_keys(tmp_path / "keys")  # X25519 device keys cannot sign checkpoints
    with pytest.raises(KeyFileError):
        audit.load_signing_key(tmp_path / "keys" / "device.key")
    with pytest.raises(KeyFileError):
        audit.load_verify_key(tmp_path / "keys" / "owner.pub")
    with pytest.raises(KeyFileError):
        audit.load_verify_key(tmp_path / "k.key")


# --- CLI ------------------------------------------------------------------------------------------------------------
def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


_registered = cli("audit", "--help").returncode == 0
needs_cli = pytest.mark.skipif(not _registered, reason="the audit sub-app is not registered in edgeshield.cli yet")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeshield: error: "), proc.stderr
    assert needle in lines[0], lines[0]


@needs_cli
def test_cli_verify_show_export(signed_log: Path, tmp_path: Path) -> None:
    pub = tmp_path / "audit.pub"
    ok = cli("audit", "verify", signed_log, "--checkpoint-key", pub)
    assert ok.returncode == 0, ok.stderr
    # 7 entries no checkpoint covers: said plainly, and never a bare "intact"
    assert "intact" not in ok.stdout and "7 of 38 entries are NOT covered" in ok.stdout, ok.stdout
    assert "entries 31..37" in ok.stdout and "3 checkpoint signatures verified" in ok.stdout
    report = json.loads(cli("audit", "verify", signed_log, "--checkpoint-key", pub, "--json").stdout)
    assert report["ok"] and report["entries"] == SIZE and report["signatures_checked"]
    assert (report["uncovered_entries"], report["first_uncovered"], report["signatures_verified"]) == (7, 31, 3)
    unsigned = cli("audit", "verify", signed_log)
    assert unsigned.returncode == 0 and "NOT checked" in unsigned.stdout and "verified with" not in unsigned.stdout
    assert_one_line_error(cli("audit", "verify", signed_log, "--checkpoint-key", pub, "--require-checkpoint"), 3,
                          "7 of 38 entries are not covered by any checkpoint (entries 31..37)")
    with audit.AuditLog(signed_log, signing_key=audit.load_signing_key(tmp_path / "audit.key")) as log:
        log.checkpoint()
    full = cli("audit", "verify", signed_log, "--checkpoint-key", pub, "--require-checkpoint")
    assert full.returncode == 0 and full.stdout.startswith("audit log intact: 39 entries, every one covered")
    shown = json.loads(cli("audit", "show", signed_log, "--last", "3", "--json").stdout)
    assert [e["seq"] for e in shown["entries"]] == [36, 37, 38] and shown["size"] == SIZE + 1
    assert cli("audit", "show", signed_log).returncode == 0
    out = tmp_path / "log.jsonl"
    assert cli("audit", "export", signed_log, "--format", "jsonl", "--out", out).returncode == 0
    assert len(out.read_text().splitlines()) == SIZE + 1 + 4
    assert_one_line_error(cli("audit", "export", signed_log, "--format", "jsonl", "--out", out), 2, "exists")
    assert cli("audit", "export", signed_log, "--format", "jsonl", "--out", out, "--force").returncode == 0


def test_cli_never_claims_signatures_it_did_not_check(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    """Regression (issue 9): with no checkpoints, verify said "checkpoint signatures verified" and "intact"."""
    path = build_log(tmp_path / "nocp.db", device_key, n=5, every=0)
    proc = cli("audit", "verify", path, "--checkpoint-key", tmp_path / "audit.pub")
    assert proc.returncode == 0, proc.stderr
    assert "signatures verified" not in proc.stdout and "intact" not in proc.stdout
    assert "no checkpoints" in proc.stdout and "5 of 5 entries are NOT covered" in proc.stdout
    assert_one_line_error(cli("audit", "verify", path, "--require-checkpoint"), 3, "5 of 5 entries")


@needs_cli
def test_cli_exit_codes_on_tampering(signed_log: Path, tmp_path: Path, device_key: Ed25519PrivateKey,
                                     other_key: Ed25519PrivateKey) -> None:
    pub = tmp_path / "audit.pub"
    conn = raw(signed_log)
    resign(conn, 30, other_key)  # the newest checkpoint, re-signed by another key, its chained entry to match
    sync_checkpoint_entry(conn, 30)
    conn.close()
    assert cli("audit", "verify", signed_log).returncode == 0  # roots still match; signatures unchecked
    assert_one_line_error(cli("audit", "verify", signed_log, "--checkpoint-key", pub), 3, "tree size 30")
    conn = raw(signed_log)
    t_edit_data(conn, device_key, other_key)
    conn.close()
    assert_one_line_error(cli("audit", "verify", signed_log, "--checkpoint-key", pub), 3, "entry 13")
    assert_one_line_error(cli("audit", "verify", signed_log), 3, "entry 13")
    assert_one_line_error(cli("audit", "verify", tmp_path / "missing.db"), 2, "not found")
    assert_one_line_error(cli("audit", "verify", pub), 2, "not an audit log")
    assert_one_line_error(cli("audit", "verify", signed_log, "--checkpoint-key", tmp_path / "audit.key"), 4, "")


@needs_cli
def test_cli_keygen(tmp_path: Path) -> None:
    proc = cli("audit", "keygen", tmp_path / "dev.key", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["key_id"] == audit.key_id(audit.load_verify_key(tmp_path / "dev.pub"))
    assert_one_line_error(cli("audit", "keygen", tmp_path / "dev.key"), 2, "refusing to overwrite")


def test_durability_modes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    import pytest

    from edgeshield.audit import AuditLog
    from edgeshield.errors import InvalidArgumentError

    for mode, pragma in (("full", 2), ("normal", 1)):
        log = AuditLog(tmp_path / f"{mode}.db", durability=mode)
        log.append("test.entry", "tester", {"n": 1})
        assert log._writer().execute("PRAGMA synchronous").fetchone()[0] == pragma
        assert log.verify().entries == 1
        log.close()
    with pytest.raises(InvalidArgumentError):
        AuditLog(tmp_path / "x.db", durability="off")
    assert sqlite3.connect(tmp_path / "full.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@needs_cli
def test_issue_9_removed_checkpoints_are_no_longer_a_clean_exit_0(signed_log: Path, tmp_path: Path) -> None:
    """Regression (issue 9): deleting every checkpoint (or only the newest), editing an entry and recomputing the
    chain verified with exit 0 ("0 checkpoints", "intact")."""
    from _auditlogs import tamper_module

    tamper = tamper_module()
    pub = tmp_path / "audit.pub"
    for variant in ("every", "newest"):
        db = tmp_path / f"{variant}.db"
        db.write_bytes(signed_log.read_bytes())
        conn = tamper.attacker(db)
        conn.execute("UPDATE entries SET data = '{\"i\":999}' WHERE seq = 13")
        conn.execute("DELETE FROM checkpoints" + (" WHERE tree_size = 30" if variant == "newest" else ""))
        tamper.rechain(conn)
        conn.close()
        needle = "not in the checkpoint table" if variant == "every" else "checkpoint at tree size 20 does not match"
        assert_one_line_error(cli("audit", "verify", db, "--checkpoint-key", pub), 3, needle)
        # ... and an attacker who also removes the checkpoints' chained entries is left with a log nothing covers:
        conn = tamper.attacker(db)
        conn.execute("DELETE FROM entries WHERE kind = 'audit.checkpoint'"
                     + (" AND seq = 30" if variant == "newest" else ""))
        tamper.rechain(conn)
        conn.close()
        if variant == "every":
            plain = cli("audit", "verify", db, "--checkpoint-key", pub)
            assert plain.returncode == 0 and "intact" not in plain.stdout and "signatures verified" not in plain.stdout
            assert "35 of 35 entries are NOT covered" in plain.stdout
        else:  # checkpoint 30's root is gone, but 20's still binds entry 13
            assert_one_line_error(cli("audit", "verify", db, "--checkpoint-key", pub), 3, "tree size 20")
        assert_one_line_error(cli("audit", "verify", db, "--checkpoint-key", pub, "--require-checkpoint"), 3, "")
