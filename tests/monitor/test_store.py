"""The monitor's SQLite store: private, marked, transactional, and consistent after a kill -9 mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeshield.errors import InputError, PathNotFoundError
from edgeshield.monitor import _store
from edgeshield.monitor._store import ActiveResponse, MonitorStore, NotAMonitorStoreError


def test_created_private_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "monitor.db"
    with MonitorStore(path) as s:
        s.put_response(ActiveResponse("block", "identity:eve", "r", 1.0, None, "why"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for side in (path.with_name("monitor.db-wal"), path.with_name("monitor.db-shm")):
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x45534D4E
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_foreign_missing_and_newer_files(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(NotAMonitorStoreError):
        MonitorStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(NotAMonitorStoreError):
        MonitorStore(junk)
    with pytest.raises(PathNotFoundError):
        MonitorStore(tmp_path / "absent.db", create=False)
    with pytest.raises(PathNotFoundError):
        MonitorStore(tmp_path / "no" / "dir.db")
    with pytest.raises(InputError):
        MonitorStore(tmp_path)
    newer = tmp_path / "newer.db"
    MonitorStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(NotAMonitorStoreError, match="newer"):
        MonitorStore(newer)


def test_responses_replace_lift_and_expire(tmp_path: Path) -> None:
    with MonitorStore(tmp_path / "m.db") as s:
        s.put_response(ActiveResponse("block", "identity:eve", "r1", 10.0, 100.0, "first"))
        s.put_response(ActiveResponse("block", "identity:eve", "r2", 20.0, None, "second"))  # replaces
        s.put_response(ActiveResponse("throttle", "address:10.0.0.1", "r3", 30.0, 50.0, "t", {"rate": 2, "burst": 5}))
        active = s.active_responses(now=40.0)
        assert [(r.action, r.rule) for r in active] == [("block", "r2"), ("throttle", "r3")]
        assert active[1].params == {"rate": 2, "burst": 5}
        assert [r.rule for r in s.active_responses(now=60.0)] == ["r2"]  # the throttle has expired
        assert s.lift_response("block", "identity:eve", "adm", 70.0) is True
        assert s.lift_response("block", "identity:eve", "adm", 71.0) is False
        assert s.active_responses(now=0.0) == [ActiveResponse("throttle", "address:10.0.0.1", "r3", 30.0, 50.0, "t",
                                                              {"rate": 2, "burst": 5})]
        history = s.history()
        assert [(h["rule"], h["lifted_by"]) for h in history] == [("r3", None), ("r2", "adm"), ("r1", "replaced")]


def test_revocation_requests(tmp_path: Path) -> None:
    with MonitorStore(tmp_path / "m.db") as s:
        s.request_revocation("1a2b", "eve", "r", 5.0, "misuse")
        s.request_revocation("1a2b", "eve", "r", 6.0, "again")  # already pending: kept as it was
        assert s.pending_revocations() == [{"serial": "1a2b", "identity": "eve", "rule": "r", "since": 5.0,
                                            "reason": "misuse"}]
        assert s.cancel_revocation("1a2b", "adm", 7.0) is True
        assert s.cancel_revocation("1a2b", "adm", 7.0) is False
        assert s.pending_revocations() == []
        s.request_revocation("1a2b", "eve", "r", 8.0, "third time")  # cancelled, then requested anew
        assert [p["since"] for p in s.pending_revocations()] == [8.0]


def test_alert_history_is_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_store, "MAX_ALERTS", 5)
    with MonitorStore(tmp_path / "m.db") as s:
        for i in range(12):
            s.add_alert({"ts": float(i), "rule": "r", "severity": "low", "key": "all", "count": i, "output": "o",
                         "tags": ["AML.T0040"]})
        assert s.alert_count() == 5
        assert [a["count"] for a in s.recent_alerts(3)] == [9, 10, 11]
        assert s.recent_alerts(1)[0]["tags"] == ["AML.T0040"]


def test_closed_store_is_a_typed_error(tmp_path: Path) -> None:
    s = MonitorStore(tmp_path / "m.db")
    s.close()
    with pytest.raises(InputError, match="closed"):
        s.pending_revocations()


_WRITER = textwrap.dedent("""
    import sys
    from edgeshield.monitor._store import ActiveResponse, MonitorStore
    s = MonitorStore(sys.argv[1])
    i = 0
    while True:
        s.put_response(ActiveResponse("block", f"identity:c{i % 50}", "r", float(i), None, "x" * 200))
        s.request_revocation(f"{i:x}", f"c{i}", "r", float(i), "y")
        s.add_alert({"ts": float(i), "rule": "r", "severity": "high", "key": f"k{i}", "count": i, "output": "o",
                     "tags": []})
        if i == 20:
            print("ready", flush=True)
        i += 1
""")


def test_kill_9_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MonitorStore(path).close()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with MonitorStore(path) as s:
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        active = s.active_responses(now=0.0)
        # one open block per identity at most, whatever instant the kill hit
        targets = [r.target for r in active]
        assert len(targets) == len(set(targets)) and 0 < len(targets) <= 50
        n = len(s.pending_revocations())
        assert n > 20 and s.alert_count() in (n - 1, n)  # each write a whole transaction, in order
        s.put_response(ActiveResponse("block", "identity:after", "r", 1.0, None, "x"))  # still writable
