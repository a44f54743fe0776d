"""Following another process's audit log: a real second AuditLog written while the follower reads it."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from edgeshield.audit import AuditLog
from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor import SecurityEvent
from edgeshield.monitor._follow import AuditLogFollower


def _kinds(events: list[SecurityEvent]) -> list[str]:
    return [e.kind for e in events]


def test_follows_new_entries_from_the_end(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with AuditLog(db) as writer:
        writer.append("auth.failure", "old", {"reason": "before"})
        events: list[SecurityEvent] = []
        f = AuditLogFollower(db, events.append)
        assert f.poll_now() == 0  # "end": what was there before is not replayed
        writer.append("fl.update_rejected", "client-7", {"round": 3, "reason": "norm"})
        writer.append("auth.failure", "mallory", {"reason": "no certificate"})
        assert f.poll_now() == 2 and f.poll_now() == 0
        f.stop()
    first = events[0]
    assert (first.kind, first.actor, first.source) == ("fl.update_rejected", "client-7", "auditlog:other.db")
    assert dict(first.data) == {"round": 3, "reason": "norm", "origin_seq": 1}
    assert abs(first.ts - time.time()) < 60
    assert _kinds(events) == ["fl.update_rejected", "auth.failure"]


def test_replays_from_the_beginning_and_maps_kinds(tmp_path: Path) -> None:
    db = tmp_path / "fl.db"
    with AuditLog(db, checkpoint_every=3) as writer:
        writer.append("fl.round", "server", {"round": 1})  # not declared here
        writer.append("monitor.lifted", "admin", {"action": "block", "target": "identity:x"})  # another monitor's
        writer.append("privacy.budget_exhausted", "client-2", {"epsilon": 8.0})
        writer.checkpoint()
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, start="beginning")
    assert f.poll_now() == 3  # the log's own audit.checkpoint entries are skipped
    assert _kinds(events) == ["external.event", "external.event", "privacy.budget_exhausted"]
    assert dict(events[0].data) == {"original_kind": "fl.round", "origin_seq": 0, "data": {"round": 1}}
    assert events[1].data["original_kind"] == "monitor.lifted"
    f.stop()


def test_never_writes_the_followed_log(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with AuditLog(db) as writer:
        for i in range(5):
            writer.append("auth.failure", f"c{i}", {})
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    os.chmod(db, 0o444)
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, start="beginning")
    assert f.poll_now() == 5
    f.stop()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_thread_follows_a_live_writer(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, interval_s=0.02, start="beginning")
    f.start()  # the log does not exist yet: the follower waits for it
    try:
        time.sleep(0.05)
        with AuditLog(db) as writer:
            for i in range(20):
                writer.append("attestation.failed", f"dev-{i}", {"reason": "pcr"})
            deadline = time.monotonic() + 10
            while len(events) < 20:
                assert time.monotonic() < deadline, len(events)
                time.sleep(0.02)
    finally:
        f.stop()
    assert [e.actor for e in events] == [f"dev-{i}" for i in range(20)]


def test_position_survives_a_restart(tmp_path: Path) -> None:
    db, pos = tmp_path / "other.db", tmp_path / "follow.pos"
    with AuditLog(db) as writer:
        events: list[SecurityEvent] = []
        f = AuditLogFollower(db, events.append, start="beginning", position_file=pos)
        writer.append("update.refused", "updater", {"version": "1"})
        writer.append("update.refused", "updater", {"version": "2"})
        assert f.poll_now() == 2
        f.stop()
        assert stat.S_IMODE(pos.stat().st_mode) == 0o600
        writer.append("update.refused", "updater", {"version": "3"})
        again: list[SecurityEvent] = []
        g = AuditLogFollower(db, again.append, start="beginning", position_file=pos)
        assert g.poll_now() == 1 and again[0].data["version"] == "3"
        g.stop()


def _fresh_log(path: Path, n: int, actor: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with AuditLog(path) as w:
        for i in range(n):
            w.append("update.refused", actor, {"version": str(i)})


def test_replaced_or_truncated_log_is_reported(tmp_path: Path) -> None:
    db, pos = tmp_path / "other.db", tmp_path / "follow.pos"
    _fresh_log(db, 3, "first")
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, start="beginning", position_file=pos)
    assert f.poll_now() == 3
    f.stop()
    _fresh_log(db, 5, "second")  # another log of the same name, longer than the position
    events.clear()
    g = AuditLogFollower(db, events.append, position_file=pos)
    g.poll_now()
    g.stop()
    assert events[0].kind == "external.event" and events[0].data["reason"] == "replaced"
    assert events[0].data["original_kind"] == "audit.discontinuity"
    assert len(events) == 1  # restarted at the end ("end"), nothing old replayed
    _fresh_log(db, 2, "third")
    events.clear()
    h = AuditLogFollower(db, events.append, position_file=pos)
    h.poll_now()
    h.stop()
    assert [e.data.get("reason") for e in events] == ["truncated"]


def test_log_swapped_while_following_is_reported(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    _fresh_log(db, 2, "first")
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, start="beginning")
    assert f.poll_now() == 2
    f.stop()  # closes its reader; the next poll opens the file again
    _fresh_log(db, 4, "second")
    f.poll_now()
    assert events[2].data["reason"] == "rewritten" and events[2].data["seq"] == 2
    assert [e.actor for e in events[3:]] == ["second", "second"]


def test_emit_failure_is_retried(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    _fresh_log(db, 3, "a")
    got: list[SecurityEvent] = []
    fail = [True]

    def emit(ev: SecurityEvent) -> None:
        if fail[0] and len(got) == 1:
            raise OSError("audit write failed")
        got.append(ev)

    f = AuditLogFollower(db, emit, start="beginning")
    with pytest.raises(OSError, match="audit write failed"):
        f.poll_now()
    fail[0] = False
    assert f.poll_now() == 2
    assert [e.data["version"] for e in got] == ["0", "1", "2"]  # at least once, in order
    f.stop()


def test_large_entry_is_summarised(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with AuditLog(db) as w:
        w.append("update.refused", "u", {"reason": "x" * 16300})
    events: list[SecurityEvent] = []
    f = AuditLogFollower(db, events.append, start="beginning")
    f.poll_now()
    f.stop()
    data = events[0].data
    assert data["data_truncated"] is True and len(data["data_sha256"]) == 64 and "reason" not in data


def test_refuses_own_log_and_bad_options(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    AuditLog(db).close()
    with pytest.raises(InvalidArgumentError, match="own audit log"):
        AuditLogFollower(db, lambda ev: None, own_log=db)
    with pytest.raises(InvalidArgumentError):
        AuditLogFollower(db, lambda ev: None, start="middle")  # type: ignore[arg-type]
