"""Helpers the audit tests share: a writer process to SIGKILL, and a log written the way schema 1 wrote it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield.audit import key_id, merkle
from edgeshield.audit._format import GENESIS_HASH, canonical_json, chain_hash, checkpoint_text, entry_leaf, origin_for

WRITER = """
import sys
from edgeshield import audit
log = audit.AuditLog(sys.argv[1], signing_key=audit.load_signing_key(sys.argv[2]), checkpoint_every=25)
i = 0
while True:
    log.append("test.tick", "writer", {"i": i})
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
    i += 1
"""


def _lines_until_killed(script: str, args: list[str], at_least: int) -> tuple[list[str], str]:
    """Run ``script`` until it printed ``at_least`` lines (or 60 s), SIGKILL it, and return every complete line it
    printed and its stderr; asserts that it died of the SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(lines) < at_least and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    return lines + out.split("\n")[:-1], err  # complete lines only


def kill_writer_mid_append(db: Path, key: Path, at_least: int = 120) -> list[int]:
    """Run WRITER until it reported ``at_least`` appends, SIGKILL it (very likely inside an append transaction),
    and return the ``i`` of every append it acknowledged."""
    lines, err = _lines_until_killed(WRITER, [str(db), str(key)], at_least)
    reported = [int(x) for x in lines]
    assert len(reported) >= at_least, err
    assert reported == list(range(len(reported)))
    return reported


V1_SCHEMA = (
    ("CREATE TABLE entries (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL, "
     "data TEXT NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL)"),
    ("CREATE TABLE checkpoints (tree_size INTEGER PRIMARY KEY, root BLOB NOT NULL, ts TEXT NOT NULL, key_id TEXT, "
     "signature BLOB)"),
    "PRAGMA application_id=1163084081",
    "PRAGMA user_version=1",
)


def make_v1_log(path: Path, key: Ed25519PrivateKey | None, n: int, every: int) -> Path:
    """A log exactly as schema 1 wrote it: entries chained, a signed checkpoint row every ``every`` entries, no
    checkpoint entries."""
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in V1_SCHEMA:
        conn.execute(statement)
    kid = key_id(key.public_key()) if key is not None else None
    prev, leaves = GENESIS_HASH, []
    conn.execute("BEGIN")
    for seq in range(n):
        ts, data = f"2026-01-01T00:00:{seq % 60:02d}.000000Z", {"i": seq}
        leaf = entry_leaf(seq, ts, "test.v1", "old-writer", data)
        h = chain_hash(prev, leaf)
        conn.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (seq, ts, "test.v1", "old-writer", canonical_json(data), prev, h))
        prev = h
        leaves.append(leaf)
        if every and (seq + 1) % every == 0:
            root = merkle.root(leaves)
            sig = key.sign(checkpoint_text(origin_for(kid), seq + 1, root).encode()) if key is not None else None
            conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)", (seq + 1, root, ts, kid, sig))
    conn.execute("COMMIT")
    conn.close()
    return path


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """The tamper matrix's byte flip (benchmarks/_audit_tamper.py), for the recovery tests."""
    tamper_module().flip_byte(path, offset, mask)


def offset_of(path: Path, needle: bytes) -> int:
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0 and data.count(needle) == 1, needle
    return at



def tamper_module():  # type: ignore[no-untyped-def]
    """benchmarks/_audit_tamper.py, imported by putting benchmarks/ on sys.path (it is not a package)."""
    import importlib

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("_audit_tamper")


THREADED_WRITER = """
import sys, threading
from edgeshield import audit
log = audit.AuditLog(sys.argv[1], signing_key=audit.load_signing_key(sys.argv[2]), checkpoint_every=25)
out = threading.Lock()

def run(t):
    i = 0
    while True:
        log.append("test.tick", f"writer-{t}", {"i": i})
        with out:
            sys.stdout.write(f"{t} {i}\\n")
            sys.stdout.flush()
        i += 1

for t in range(int(sys.argv[3])):
    threading.Thread(target=run, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def kill_threaded_writer_mid_append(db: Path, key: Path, threads: int, at_least: int = 300) -> set[tuple[int, int]]:
    """THREADED_WRITER with ``threads`` appending threads (group-committed) until ``at_least`` appends were
    acknowledged, then SIGKILL; the ``(thread, i)`` of every acknowledged append."""
    lines, err = _lines_until_killed(THREADED_WRITER, [str(db), str(key), str(threads)], at_least)
    acked = {(int(t), int(i)) for t, i in (line.split() for line in lines if line.strip())}
    assert len(acked) >= at_least, err
    return acked
