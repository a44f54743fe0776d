"""MonitorStore (SQLite, 0600, WAL, typed refusals) and QueryMonitor's bounded memory and persistence: eviction to
the store and back, blocks that survive restarts and eviction, corrupt rows failing closed."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass, field

import numpy as np
import pytest

from edgeshield.errors import ExtractionStateError, InvalidArgumentError, NotAnExtractionStateError
from edgeshield.extraction import DecayingBudget, MonitorStore, QueryMonitor, ResponsePolicy, SignalState


class Clock:
    t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Recorder:
    """Records what the monitor hands it: keys and (when it asks) the group."""

    name: str = "recorder"
    wants_group: bool = False
    calls: list[tuple] = field(default_factory=list)

    def observe(self, client_id, x, predicted, keys=None, group="unset"):
        self.calls.append((client_id, list(keys) if keys is not None else None, group))
        return SignalState(self.name, False, {})

    def reset(self, client_id):
        pass


def _x(rng: np.random.Generator, n: int = 10) -> np.ndarray:
    return rng.uniform(0, 1, (n, 8)).astype(np.float32)


def test_store_file_is_private_wal_and_refuses_other_files(tmp_path) -> None:
    path = tmp_path / "state.db"
    store = MonitorStore(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store._read("PRAGMA journal_mode")[0][0] == "wal"
    store.put_many([("action", "a", b"1"), ("prada", "a", b"2"), ("prada", "b", b"3")])
    store.put("prada", "a", b"4")  # an update, not a second row
    assert store.get("prada", "a") == b"4" and store.get("prada", "zz") is None
    assert list(store.items("prada")) == [("a", b"4"), ("b", b"3")] and store.count() == 3
    store.delete("prada", "b")
    store.delete_id("a", ["action", "prada"])
    assert store.count() == 0
    with pytest.raises(InvalidArgumentError):
        store.put("", "a", b"x")
    with pytest.raises(InvalidArgumentError):
        store.put("c", "a", "text")  # type: ignore[arg-type]
    store.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(NotAnExtractionStateError):
        MonitorStore(junk)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(NotAnExtractionStateError):
        MonitorStore(foreign)


def test_keys_are_computed_once_and_the_group_goes_only_to_who_asks() -> None:
    rng = np.random.default_rng(0)
    plain, grouped = Recorder("plain"), Recorder("grouped", wants_group=True)
    computed = []

    class CountingKeys:
        name = "counting"

        def keys(self, x):
            computed.append(len(x))
            return [bytes([i]) * 32 for i in range(len(x))]

    monitor = QueryMonitor([plain, grouped], input_keys=CountingKeys())  # type: ignore[arg-type]
    monitor.observe("c", _x(rng, 3), np.zeros(3, dtype=int), group="client")
    assert computed == [3]
    assert plain.calls[0][1] == grouped.calls[0][1] == [bytes([i]) * 32 for i in range(3)]
    assert plain.calls[0][2] == "unset" and grouped.calls[0][2] == "client"
    given = [b"k" * 32] * 3
    monitor.observe("c", _x(rng, 3), np.zeros(3, dtype=int), keys=given)
    assert computed == [3] and plain.calls[1][1] == given  # the caller's keys: none computed
    with pytest.raises(InvalidArgumentError):
        monitor.observe("c", _x(rng, 3), np.zeros(3, dtype=int), keys=given[:2])


def test_eviction_with_a_store_loses_nothing(tmp_path) -> None:
    rng, clock = np.random.default_rng(1), Clock()
    store = MonitorStore(tmp_path / "state.db")
    budget = DecayingBudget(30, 1, clock=clock)
    monitor = QueryMonitor([budget], ResponsePolicy(default="block"), store=store, max_clients=5, clock=clock)
    first = _x(rng, 20)
    monitor.observe("c0", first, np.zeros(20, dtype=int))
    for i in range(1, 50):
        monitor.observe(f"c{i}", _x(rng), np.zeros(10, dtype=int))
        assert monitor.clients_in_memory <= 5
    assert "c0" not in budget._clients and store.get("decaying_budget", "c0") is not None
    # c0 comes back: its 20 inputs are still known (free), and only 10 tokens are left
    assert monitor.observe("c0", first, np.zeros(20, dtype=int)).action == "allow"
    assert monitor.observe("c0", _x(rng, 11), np.zeros(11, dtype=int)).action == "block"
    store.close()


def test_without_a_store_eviction_forgets_budgets_but_never_a_block() -> None:
    rng, clock = np.random.default_rng(2), Clock()
    monitor = QueryMonitor([DecayingBudget(10, 1, clock=clock)], ResponsePolicy(default="block"), max_clients=3)
    assert monitor.observe("bad", _x(rng, 11), np.zeros(11, dtype=int)).action == "block"
    assert monitor.observe("half", _x(rng, 8), np.zeros(8, dtype=int)).action == "allow"
    for i in range(5):
        monitor.observe(f"other{i}", _x(rng, 1), np.zeros(1, dtype=int))
    assert monitor.action("bad") == "block"  # kept through eviction
    assert monitor.observe("half", _x(rng, 8), np.zeros(8, dtype=int)).action == "allow"  # its budget was forgotten


def test_a_block_survives_a_restart_and_reset_clears_it_everywhere(tmp_path) -> None:
    rng, clock = np.random.default_rng(3), Clock()
    path = tmp_path / "state.db"
    monitor = QueryMonitor([DecayingBudget(10, 1, clock=clock)], ResponsePolicy(default="block"),
                           store=MonitorStore(path), clock=clock)
    monitor.observe("mallory", _x(rng, 11), np.zeros(11, dtype=int))
    assert monitor.store is not None and monitor.store.get("action", "mallory") is not None  # a block: at once
    monitor.observe("alice", _x(rng, 5), np.zeros(5, dtype=int))
    assert monitor.store.get("action", "alice") is None  # the rest waits for the flush
    assert monitor.flush() == 1 and monitor.flush() == 0  # only what changed
    monitor.close()
    again = QueryMonitor([DecayingBudget(10, 1, clock=clock)], ResponsePolicy(default="block"),
                         store=MonitorStore(path), clock=clock)
    assert again.cached_action("mallory") is None  # not in memory yet: the lock-free answer says so
    assert again.action("mallory") == "block" and again.action("alice") == "allow"
    assert again.cached_action("mallory") == "block"
    assert again.observe("alice", _x(rng, 6), np.zeros(6, dtype=int)).action == "block"  # 5 + 6 > 10: remembered
    again.reset("mallory")
    assert again.action("mallory") == "allow" and again.store is not None
    assert again.store.get("action", "mallory") is None
    again.close()


def test_a_corrupt_row_fails_closed_with_one_log_line(tmp_path, caplog) -> None:
    rng, clock = np.random.default_rng(4), Clock()
    store = MonitorStore(tmp_path / "state.db")
    store.put("decaying_budget", "alice", b"\x00garbage")
    store.put("action", "bob", b"{not json")
    monitor = QueryMonitor([DecayingBudget(100, 10, clock=clock)], ResponsePolicy(default="flag"), store=store)
    with caplog.at_level(logging.ERROR, logger="edgeshield.extraction"):
        assert monitor.action("alice") == "block"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'decaying_budget'" in lines[0] and "'alice'" in lines[0]
    verdict = monitor.observe("alice", _x(rng, 1), np.zeros(1, dtype=int))
    assert verdict.action == "block" and "extraction_state" in verdict.reasons
    assert "alice" in monitor.unreadable and monitor.action("bob") == "block"
    strict = QueryMonitor([DecayingBudget(100, 10, clock=clock)], store=store, fail_closed=False)
    with pytest.raises(ExtractionStateError, match="component 'action' id 'bob'"):
        strict.action("bob")
    store.close()


def test_bad_monitor_configuration() -> None:
    with pytest.raises(InvalidArgumentError):
        QueryMonitor([Recorder()], max_clients=0)
    with pytest.raises(InvalidArgumentError):
        QueryMonitor([Recorder("action")])
