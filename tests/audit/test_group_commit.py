"""Group commit: concurrent appends share one transaction and one fsync, each caller returns once its own entry is
durable, a failed group fails every caller in it and leaves the log whole, and kill -9 loses no acknowledged entry."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield import audit
from edgeshield.audit._format import canonical_data, entry_leaf, entry_leaf_text
from edgeshield.errors import InvalidArgumentError

from _auditlogs import kill_threaded_writer_mid_append


@pytest.fixture
def device_key(tmp_path: Path) -> Ed25519PrivateKey:
    return audit.generate_signing_key(tmp_path / "audit.key")


def _count_transactions(log: audit.AuditLog) -> list[int]:
    """Wrap the log's write transaction to record how many entries each one wrote."""
    sizes: list[int] = []
    inner = log._transaction

    class Counted:
        def __enter__(self) -> Any:
            self.cm = inner()
            self.conn, self.tx = self.cm.__enter__()
            self.start = self.tx.size
            return self.conn, self.tx

        def __exit__(self, *exc: Any) -> Any:
            out = self.cm.__exit__(*exc)
            sizes.append(self.tx.size - self.start)
            return out

    log._transaction = Counted  # type: ignore[method-assign]
    return sizes


def _queued(log: audit.AuditLog, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(log._queue) < n:
        assert time.monotonic() < deadline, "appenders did not queue"
        time.sleep(0.002)


def test_waiting_appends_share_one_transaction(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    with audit.AuditLog(tmp_path / "audit.db", signing_key=device_key, checkpoint_every=7) as log:
        sizes = _count_transactions(log)
        results: dict[int, audit.Entry] = {}

        def append(t: int) -> None:
            results[t] = log.append("inference.request", f"client-{t}", {"t": t})

        # Hold the writer so the first appender, as leader, waits for it; everyone after it queues behind.
        with log._lock:
            first = threading.Thread(target=append, args=(0,))
            first.start()
            _queued(log, 0)
            time.sleep(0.05)  # the leader has taken its (one-caller) batch and waits for the writer
            rest = [threading.Thread(target=append, args=(t,)) for t in range(1, 16)]
            for th in rest:
                th.start()
            _queued(log, 15)
        for th in (first, *rest):
            th.join()
        # two transactions: the first leader alone, then the fifteen that queued, with their checkpoints inside
        assert len(sizes) == 2 and sizes[0] == 1
        report = log.verify(public_key=device_key.public_key())
        assert report.entries == 16 + report.checkpoints
        assert [c.tree_size for c in log.checkpoints()] == [7, 14]  # where one append at a time puts them
        stored = {e.seq: e for e in log.entries()}
        assert all(stored[e.seq] == e for e in results.values())  # each caller got its own committed entry


def test_a_commit_delay_gathers_callers_that_arrive_while_the_leader_waits(tmp_path: Path) -> None:
    with audit.AuditLog(tmp_path / "audit.db", checkpoint_every=0, commit_delay_s=0.01) as log:
        log.commit_delay_s = 0.3  # beyond the configurable bound, so that five threads surely start inside it
        sizes = _count_transactions(log)
        with log._lock:  # a first leader alone, then two queued behind it: a group with company
            threads = [threading.Thread(target=log.append, args=("inference.request", "a", {}))]
            threads[0].start()
            _queued(log, 0)
            time.sleep(0.05)
            threads += [threading.Thread(target=log.append, args=("inference.request", "b", {})) for _ in range(2)]
            for th in threads[1:]:
                th.start()
            _queued(log, 2)
        for th in threads:
            th.join()
        assert sizes == [1, 2]
        # the next leader follows a group of two, so it waits; the five that arrive meanwhile join its group
        leader = threading.Thread(target=log.append, args=("inference.request", "c", {}))
        leader.start()
        _queued(log, 1)
        rest = [threading.Thread(target=log.append, args=("inference.request", "d", {})) for _ in range(5)]
        for th in rest:
            th.start()
        for th in (leader, *rest):
            th.join()
        assert sizes == [1, 2, 6]
        assert log.group_stats == {"groups": 3, "callers": 9, "entries": 9, "mean_callers_per_group": 3.0}
        assert log.verify().entries == 9


@pytest.mark.parametrize("delay", [-0.001, 0.011, True, "0.001"])
def test_a_commit_delay_outside_0_to_10_ms_is_refused(tmp_path: Path, delay: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="commit delay"):
        audit.AuditLog(tmp_path / "audit.db", commit_delay_s=delay)


def test_a_failed_group_fails_every_caller_in_it_and_leaves_the_log_whole(
        tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    with audit.AuditLog(db, signing_key=device_key, checkpoint_every=5) as log:
        log.append("inference.request", "before", {})
        conn = sqlite3.connect(db, isolation_level=None)  # a commit that fails inside SQLite, as a full disk would
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON entries WHEN NEW.actor = 'boom' "
                     "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        conn.close()
        outcome: dict[str, BaseException | int] = {}

        def append(actor: str) -> None:
            try:
                outcome[actor] = log.append("inference.request", actor, {"a": actor}).seq
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
                outcome[actor] = exc

        with log._lock:
            lead = threading.Thread(target=append, args=("alone",))
            lead.start()
            time.sleep(0.05)
            group = [threading.Thread(target=append, args=(a,)) for a in ("ok-1", "boom", "ok-2")]
            for th in group:
                th.start()
            _queued(log, 3)
        for th in (lead, *group):
            th.join()
        assert outcome["alone"] == 1
        for actor in ("ok-1", "boom", "ok-2"):
            assert isinstance(outcome[actor], audit.AuditCommitError), outcome[actor]
        assert [e.actor for e in log.entries()] == ["before", "alone"]
        assert log.group_stats["groups"] == 2 and log.group_stats["entries"] == 2  # the rolled-back group is not one
        log.verify(public_key=device_key.public_key())
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("DROP TRIGGER boom")
        conn.close()
        assert log.append("inference.request", "after", {}).seq == 2  # the log carries on
        assert log.verify(public_key=device_key.public_key()).entries == 3


def test_append_many_is_one_transaction_and_all_or_nothing(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    with audit.AuditLog(tmp_path / "audit.db", signing_key=device_key, checkpoint_every=10) as log:
        sizes = _count_transactions(log)
        entries = log.append_many([("test.bulk", "importer", {"i": i}) for i in range(45)])
        assert [e.data["i"] for e in entries] == list(range(45)) and len(sizes) == 1
        assert [c.tree_size for c in log.checkpoints()] == [10, 20, 30, 40]
        with pytest.raises(InvalidArgumentError):  # one bad record: nothing of the call is written
            log.append_many([("test.bulk", "importer", {"i": 1}), ("test.bulk", "importer", {"x": object()})])
        assert log.verify(public_key=device_key.public_key()).entries == 49
        assert log.append_many([]) == []


def test_event_loop_appends_join_the_group_commit(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    from edgeshield.monitor import EventStream, SecurityEvent
    from edgeshield.monitor._subscribers import AuditSubscriber

    with audit.AuditLog(tmp_path / "audit.db", signing_key=device_key, checkpoint_every=9) as log:
        sizes = _count_transactions(log)
        stream = EventStream([AuditSubscriber(log)])

        async def main() -> list[audit.Entry]:
            await asyncio.gather(*(stream.emit(SecurityEvent("inference.predict", f"client-{i}", {"i": i}))
                                   for i in range(40)))
            side = threading.Thread(target=lambda: [log.append("test.side", "thread", {"j": j}) for j in range(10)])
            side.start()  # thread callers and loop callers share the queue
            got = await asyncio.gather(*(log.append_async("test.loop", "loop", {"k": k}) for k in range(20)))
            side.join()
            return got

        got = asyncio.run(main())
        assert [e.data["k"] for e in got] == list(range(20))
        report = log.verify(public_key=device_key.public_key())
        assert report.entries == 70 + report.checkpoints
        assert [c.tree_size for c in log.checkpoints()] == list(range(9, report.entries, 9))
        assert len(sizes) < 70  # the loop's 40 emits were not 40 commits
        assert sorted(e.data["i"] for e in log.entries() if e.kind == "inference.predict") == list(range(40))
        with pytest.raises(InvalidArgumentError):
            asyncio.run(log.append_async("audit.checkpoint", "x", {}))  # checked before it is queued


def test_concurrent_sigkill_loses_no_acknowledged_entry(tmp_path: Path, device_key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    acked = kill_threaded_writer_mid_append(db, tmp_path / "audit.key", threads=8)
    log = audit.AuditLog(db, readonly=True)
    report = log.verify(public_key=device_key.public_key())
    stored = {(int(e.actor.split("-")[1]), e.data["i"]) for e in log.entries() if e.kind == "test.tick"}
    assert acked <= stored  # every acknowledged append is there (a few more may have committed unreported)
    for t in {t for t, _ in stored}:  # each thread's entries are a gap-free prefix 0..k
        mine = sorted(i for tt, i in stored if tt == t)
        assert mine == list(range(len(mine)))
    assert all(c.tree_size % 25 == 0 for c in log.checkpoints()) and report.checkpoints >= 4


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                            | st.floats(allow_nan=False, allow_infinity=False), _nested, max_leaves=8)


@settings(max_examples=15, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=5),
       st.text(min_size=1, max_size=10).filter(lambda a: a.isprintable() and a.strip() == a))
def test_the_fast_leaf_and_data_paths_equal_the_canonical_ones(data: dict[str, Any], actor: str) -> None:
    text, parsed = canonical_data(data)
    assert parsed == json.loads(text) and json.dumps(parsed) == json.dumps(json.loads(text))
    ts = "2026-12-02T00:00:00.000000Z"
    assert entry_leaf_text(7, ts, "inference.request", actor, text) == entry_leaf(7, ts, "inference.request", actor,
                                                                                  parsed)
