"""The audit log's tamper matrix: every way we know to alter a signed log, and what catches each.

``run_cases(workdir)`` builds a fresh signed log (35 events, a checkpoint every 10, a shutdown checkpoint), publishes
its newest checkpoint to an in-process witness (the same ``Witness`` the HTTPS service runs), and then, on a fresh
copy for each case, applies the tampering and runs

- ``verify`` with the device's public key,
- ``verify --require-checkpoint`` (counted only where the untampered log passes it: a running log's uncovered tail
  fails it without any tampering),
- ``verify --against`` the witness-cosigned checkpoint.

Each record says whether the case was detected on the device alone and with the witness, and whether
docs/server.md names it as undetectable without a witness (or at all). ``summary(records)`` gives the two figures
``benchmarks/hardening.py`` prints: ``audit_tamper_cases`` and ``audit_tamper_undetected`` (cases missed that the
docs do not name; the target is 0). Run it alone: ``python benchmarks/_audit_tamper.py [--json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield import audit
from edgeshield.audit import merkle
from edgeshield.audit._format import (
    CHECKPOINT_KIND,
    GENESIS_HASH,
    canonical_json,
    chain_hash,
    checkpoint_entry_data,
    checkpoint_text,
    entry_leaf,
    key_id,
    origin_for,
)
from edgeshield.errors import IntegrityError

EVENTS, EVERY, TAIL = 35, 10, 5  # checkpoints at 10, 20, 30 and (shutdown) 39; a running log adds 5 uncovered


# --- what an attacker with the file can do --------------------------------------------------------------------------
def attacker(db: Path) -> sqlite3.Connection:
    """A connection with the append-only triggers dropped (they stop mistakes, not attackers)."""
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f'DROP TRIGGER "{name}"')
    return conn


def _rows(conn: sqlite3.Connection) -> list[list[Any]]:
    return [list(r) for r in conn.execute("SELECT seq, ts, kind, actor, data FROM entries ORDER BY seq")]


def rechain_and_resign(conn: sqlite3.Connection, key: Ed25519PrivateKey | None) -> None:
    """Renumber the entries 0..n-1 and recompute every chain hash; with ``key``, also recompute and re-sign every
    checkpoint (root, key id, signature) and its chained entry, as someone holding that key can."""
    rows = _rows(conn)
    sizes = {r[0] for r in conn.execute("SELECT tree_size FROM checkpoints")}
    kid = key_id(key.public_key()) if key is not None else None
    conn.execute("DELETE FROM entries")
    prev, frontier = GENESIS_HASH, ()
    for seq, (_old, ts, kind, actor, stored) in enumerate(rows):
        data = stored
        if key is not None and seq in sizes:
            root = merkle.frontier_root(frontier)
            sig = key.sign(checkpoint_text(origin_for(kid), seq, root).encode())
            conn.execute("UPDATE checkpoints SET root = ?, key_id = ?, signature = ? WHERE tree_size = ?",
                         (root, kid, sig, seq))
            if kind == CHECKPOINT_KIND:
                data = canonical_json(checkpoint_entry_data(seq, root, kid, sig))
        leaf = entry_leaf(seq, ts, kind, actor, json.loads(data))
        h = chain_hash(prev, leaf)
        conn.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, ts, kind, actor, data, prev, h))
        prev, frontier = h, merkle.frontier_append(frontier, merkle.leaf_hash(leaf))


def rechain(conn: sqlite3.Connection) -> None:
    rechain_and_resign(conn, None)


def _edit(conn: sqlite3.Connection, seq: int, data: str = '{"i":999}') -> None:
    conn.execute("UPDATE entries SET data = ? WHERE seq = ?", (data, seq))


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of the file in place (also used by tests/audit through ``_auditlogs``)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ mask]))


def _cut(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


@dataclass(frozen=True)
class Ctx:
    key: Ed25519PrivateKey
    other: Ed25519PrivateKey
    older_copy: Path  # the same log as it was right after its checkpoint at 20


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    sql: Callable[[sqlite3.Connection, Ctx], None] | None = None
    file: Callable[[Path, Ctx], None] | None = None
    base: str = "sealed"  # "sealed": every entry covered, as after a shutdown; "running": plus an uncovered tail
    undetectable_on_device: bool = False  # docs/server.md names it as needing a witness
    undetectable_with_witness: bool = False  # ... or as beyond any check (entries no checkpoint covers)


def _swap_checkpoint_rows(c: sqlite3.Connection, _x: Ctx) -> None:
    a, b = (c.execute("SELECT root, signature FROM checkpoints WHERE tree_size = ?", (s,)).fetchone() for s in (10, 20))
    c.execute("UPDATE checkpoints SET root = ?, signature = ? WHERE tree_size = 20", a)
    c.execute("UPDATE checkpoints SET root = ?, signature = ? WHERE tree_size = 10", b)


def _swap_checkpoint_entries(c: sqlite3.Connection, _x: Ctx) -> None:
    a, b = (c.execute("SELECT data FROM entries WHERE seq = ?", (s,)).fetchone()[0] for s in (10, 20))
    _edit(c, 10, b)
    _edit(c, 20, a)
    rechain(c)


def _strip_checkpoints(c: sqlite3.Connection, _x: Ctx) -> None:
    _edit(c, 5)
    c.execute("DELETE FROM checkpoints")
    c.execute("DELETE FROM entries WHERE kind = ?", (CHECKPOINT_KIND,))
    rechain(c)


def _forge_newest_signature(c: sqlite3.Connection, _x: Ctx) -> None:
    size, root, kid, sig = c.execute("SELECT tree_size, root, key_id, signature FROM checkpoints "
                                     "ORDER BY tree_size DESC LIMIT 1").fetchone()
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    c.execute("UPDATE checkpoints SET signature = ? WHERE tree_size = ?", (forged, size))
    _edit(c, size, canonical_json(checkpoint_entry_data(size, root, kid, forged)))
    rechain(c)


def _append_checkpoint_entry(c: sqlite3.Connection, x: Ctx) -> None:
    n = c.execute("SELECT count(*) FROM entries").fetchone()[0]
    fake = checkpoint_entry_data(n, bytes(32), key_id(x.key.public_key()), bytes(64))
    c.execute("INSERT INTO entries VALUES (?, 't', ?, 'audit', ?, ?, ?)",
              (n, CHECKPOINT_KIND, canonical_json(fake), bytes(32), bytes(32)))
    rechain(c)


def _insert_entry(c: sqlite3.Connection, _x: Ctx) -> None:
    c.execute("UPDATE entries SET seq = seq + 1000 WHERE seq >= 12")
    c.execute("UPDATE entries SET seq = seq - 999 WHERE seq >= 1000")
    c.execute("INSERT INTO entries VALUES (12, '2030-01-01T00:00:00.000000Z', 'auth.login', 'mallory', '{}', ?, ?)",
              (bytes(32), bytes(32)))
    rechain(c)


def _new_log(path: Path, key: Ed25519PrivateKey | None, every: int) -> None:
    path.unlink()
    with audit.AuditLog(path, signing_key=key, checkpoint_every=every) as log:
        for i in range(EVENTS):
            log.append("inference.request", "client-0", {"i": i})
        if every:
            log.checkpoint()


def _offset(path: Path, needle: bytes) -> int:
    at = path.read_bytes().find(needle)
    if at < 0:
        raise RuntimeError(f"{needle!r} not in {path}")
    return at


CASES: list[Case] = [
    Case("edit_entry", "edit an entry's data in place", sql=lambda c, x: _edit(c, 13)),
    Case("edit_entry_rechain", "edit a covered entry and recompute the hash chain after it",
         sql=lambda c, x: (_edit(c, 13), rechain(c))),
    Case("delete_entry_rechain", "delete a covered entry, renumber and recompute the chain",
         sql=lambda c, x: (c.execute("DELETE FROM entries WHERE seq = 13"), rechain(c))),
    Case("insert_entry_rechain", "insert an entry among covered ones, renumber and recompute the chain",
         sql=_insert_entry),
    Case("delete_every_checkpoint_row", "delete every checkpoint row (their chained entries stay)",
         sql=lambda c, x: c.execute("DELETE FROM checkpoints")),
    Case("delete_newest_checkpoint_row", "delete only the newest checkpoint row",
         sql=lambda c, x: c.execute("DELETE FROM checkpoints WHERE tree_size = (SELECT max(tree_size) FROM "
                                    "checkpoints)")),
    Case("delete_a_checkpoint_row", "delete one older checkpoint row only",
         sql=lambda c, x: c.execute("DELETE FROM checkpoints WHERE tree_size = 20")),
    Case("delete_checkpoint_entry_rechain", "delete a checkpoint's chained entry, renumber and recompute the chain",
         sql=lambda c, x: (c.execute("DELETE FROM entries WHERE seq = 20"), rechain(c))),
    Case("delete_checkpoint_and_entry_rechain", "delete a checkpoint row and its chained entry, then recompute",
         sql=lambda c, x: (c.execute("DELETE FROM checkpoints WHERE tree_size = 20"),
                           c.execute("DELETE FROM entries WHERE seq = 20"), rechain(c))),
    Case("edit_and_delete_every_checkpoint", "edit an entry, delete every checkpoint row and chained entry, renumber "
         "and recompute the chain (a log that never had a checkpoint)", sql=_strip_checkpoints),
    Case("delete_newest_checkpoint_and_its_entry", "delete the newest checkpoint and its chained entry (the log's "
         "last entry), leaving the entries it covered",
         sql=lambda c, x: (c.execute("DELETE FROM checkpoints WHERE tree_size = 39"),
                           c.execute("DELETE FROM entries WHERE seq = 39"))),
    Case("reorder_checkpoint_rows", "swap two checkpoints' roots and signatures", sql=_swap_checkpoint_rows),
    Case("reorder_checkpoint_entries", "swap two checkpoint entries and recompute the chain",
         sql=_swap_checkpoint_entries),
    Case("edit_checkpoint_entry", "change the root in a checkpoint's chained entry and recompute the chain",
         sql=lambda c, x: (_edit(c, 20, canonical_json({**json.loads(c.execute(
             "SELECT data FROM entries WHERE seq = 20").fetchone()[0]), "root": "A" * 43 + "="})), rechain(c))),
    Case("append_forged_checkpoint_entry", "append an audit.checkpoint entry with no checkpoint behind it",
         sql=_append_checkpoint_entry),
    Case("truncate_entries", "delete the newest entries, keeping the checkpoints",
         sql=lambda c, x: c.execute("DELETE FROM entries WHERE seq >= 25")),
    Case("truncate_and_delete_newer_checkpoints", "delete the newest entries and every checkpoint above the cut "
         "(the cut is not right after a checkpoint)",
         sql=lambda c, x: (c.execute("DELETE FROM entries WHERE seq >= 25"),
                           c.execute("DELETE FROM checkpoints WHERE tree_size > 20"))),
    Case("cut_back_to_a_checkpoint", "remove the newest checkpoints together with every entry after an older "
         "checkpoint's own entry", undetectable_on_device=True,
         sql=lambda c, x: (c.execute("DELETE FROM entries WHERE seq > 20"),
                           c.execute("DELETE FROM checkpoints WHERE tree_size > 20"))),
    Case("restore_an_older_copy", "replace the file with a copy taken right after an older checkpoint",
         undetectable_on_device=True, file=lambda p, x: shutil.copyfile(x.older_copy, p)),
    Case("forged_signature", "alter the newest checkpoint's signature (and its chained entry to match)",
         sql=_forge_newest_signature),
    Case("another_key", "rewrite an entry and re-sign every checkpoint with another key",
         sql=lambda c, x: (_edit(c, 5), rechain_and_resign(c, x.other))),
    Case("device_key_rewrite", "rewrite an entry and re-sign every checkpoint with the device's own key (a "
         "stolen key)", undetectable_on_device=True, sql=lambda c, x: (_edit(c, 5), rechain_and_resign(c, x.key))),
    Case("replace_with_unsigned_log", "replace the file with a new log that has no checkpoints",
         file=lambda p, x: _new_log(p, None, 0)),
    Case("replace_with_other_key_log", "replace the file with a new log signed by another key",
         file=lambda p, x: _new_log(p, x.other, EVERY)),
    Case("flipped_byte_in_an_entry", "flip one bit of an entry's bytes in the file",
         file=lambda p, x: flip_byte(p, _offset(p, b'{"i":17}') + 5)),
    Case("flipped_byte_in_a_page_header", "flip the type byte of a b-tree page",
         file=lambda p, x: flip_byte(p, 4096, 0xFF)),
    Case("flipped_byte_in_the_header", "flip one byte of the SQLite header's magic", file=lambda p, x: flip_byte(p, 5)),
    Case("file_cut_short", "cut the file to half its size", file=lambda p, x: _cut(p, p.stat().st_size // 2)),
    Case("file_cut_to_zero", "cut the file to zero bytes", file=lambda p, x: _cut(p, 0)),
    Case("edit_uncovered_entry", "edit an entry no checkpoint covers yet and recompute the chain", base="running",
         undetectable_on_device=True, undetectable_with_witness=True, sql=lambda c, x: (_edit(c, 42), rechain(c))),
    Case("drop_uncovered_entries", "delete the entries no checkpoint covers yet", base="running",
         undetectable_on_device=True, undetectable_with_witness=True,
         sql=lambda c, x: c.execute("DELETE FROM entries WHERE seq > 39")),
]


# --- running them ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Base:
    path: Path
    require_passes: bool  # does the untampered log pass --require-checkpoint?


def _build(workdir: Path) -> tuple[dict[str, _Base], Ctx, str, audit.Vkey]:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    sealed, older = workdir / "sealed.db", workdir / "older.db"

    def events(start: int, stop: int) -> None:
        with audit.AuditLog(sealed, signing_key=key, checkpoint_every=EVERY, durability="normal") as log:
            for i in range(start, stop):
                log.append("inference.request", f"client-{i % 3}", {"i": i})
            if stop == EVENTS:
                log.append("server.shutdown", "server", {})
                log.checkpoint()  # tree size 39, its own entry 39: every entry covered

    events(0, 19)  # entries 0..20, the last one checkpoint 20's own entry
    shutil.copyfile(sealed, older)  # a backup taken then
    events(19, EVENTS)
    vkey = audit.log_vkey(key.public_key())
    witness = audit.Witness(workdir / "witness.db", Ed25519PrivateKey.generate(), "witness.example/tamper",
                            {vkey.name: [vkey]})
    try:
        note = audit.publish(audit.AuditLog(sealed, readonly=True), witness, public_key=key.public_key(),
                             witness_keys=[witness.vkey]).note
    finally:
        witness.close()
    running = workdir / "running.db"
    shutil.copyfile(sealed, running)
    with audit.AuditLog(running, signing_key=key, checkpoint_every=EVERY, durability="normal") as log:
        for i in range(TAIL):
            log.append("inference.request", "client-0", {"i": 100 + i})
    bases = {"sealed": _Base(sealed, True), "running": _Base(running, False)}
    return bases, Ctx(key, other, older), note, witness.vkey


def _detects(check: Callable[[], object]) -> str | None:
    try:
        check()
    except IntegrityError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_case(case: Case, bases: dict[str, _Base], ctx: Ctx, note: str, witness_vkey: audit.Vkey,
             workdir: Path) -> dict[str, Any]:
    base = bases[case.base]
    path = workdir / f"{case.name}.db"
    shutil.copyfile(base.path, path)
    if case.sql is not None:
        conn = attacker(path)
        case.sql(conn, ctx)
        conn.close()
    if case.file is not None:
        case.file(path, ctx)
    pub = ctx.key.public_key()

    def log() -> audit.AuditLog:
        return audit.AuditLog(path, readonly=True)

    plain = _detects(lambda: log().verify(public_key=pub))
    strict = _detects(lambda: log().verify(public_key=pub, require_checkpoint=True)) if base.require_passes else None
    against = _detects(lambda: audit.verify_against(log(), note, public_key=pub, witness_keys=[witness_vkey]))
    device = plain or strict
    return {
        "name": case.name,
        "description": case.description,
        "base": case.base,
        "detected_device": device is not None,
        "detected_by": "verify" if plain else "verify --require-checkpoint" if strict else None,
        "detected_with_witness": (device or against) is not None,
        "documented_undetectable_on_device": case.undetectable_on_device,
        "documented_undetectable_with_witness": case.undetectable_with_witness,
        "error": device or against,
    }


def run_cases(workdir: Path) -> list[dict[str, Any]]:
    """Build a fresh signed log in ``workdir`` and run every tampering case on a copy of it."""
    workdir.mkdir(parents=True, exist_ok=True)
    bases, ctx, note, witness_vkey = _build(workdir)
    return [run_case(case, bases, ctx, note, witness_vkey, workdir) for case in CASES]


def undetected(record: dict[str, Any]) -> bool:
    """Missed where the docs do not say it would be."""
    return ((not record["detected_device"] and not record["documented_undetectable_on_device"])
            or (not record["detected_with_witness"] and not record["documented_undetectable_with_witness"]))


def summary(records: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "audit_tamper_cases": len(records),
        "audit_tamper_undetected": sum(undetected(r) for r in records),
        "audit_tamper_detected_on_device": sum(r["detected_device"] for r in records),
        "audit_tamper_detected_with_witness": sum(r["detected_with_witness"] for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the records and the summary as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeshield-tamper-") as tmp:
        records = run_cases(Path(tmp))
    if args.json:
        print(json.dumps({"summary": summary(records), "cases": records}, indent=2))
    else:
        for r in records:
            device = r["detected_by"] or ("documented" if r["documented_undetectable_on_device"] else "MISSED")
            witness = "yes" if r["detected_with_witness"] else (
                "documented" if r["documented_undetectable_with_witness"] else "MISSED")
            print(f"{r['name']:40} device: {device:28} witness: {witness}")
        print(json.dumps(summary(records)))
    return 1 if summary(records)["audit_tamper_undetected"] else 0


if __name__ == "__main__":
    sys.exit(main())
