"""The evidence store's subject column: a schema 1 store migrates, rows erase by subject and purge by age."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edgeshield.errors import InvalidArgumentError
from edgeshield.watermark import EvidenceStore

_V1 = ("CREATE TABLE evidence (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, client TEXT NOT NULL,"
       " digest TEXT NOT NULL, label INTEGER NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL,"
       " UNIQUE (client, digest))")


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8), dtype=np.float32)


def test_a_schema_1_store_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1163089750")  # "ESWV"
        conn.execute("PRAGMA user_version = 1")
        conn.execute(_V1)
    with EvidenceStore(path) as store:  # a v1 store is still read as it is
        store.add("alice", _x(3), np.zeros(3, dtype=np.int64), subject="s1")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT count(*) FROM evidence WHERE subject = 's1'").fetchone()[0] == 3
    with EvidenceStore(path, create=False) as store:
        assert store.load()[0].shape == (3, 8)


def test_a_schema_1_store_opened_read_only_has_no_subject_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1163089750")
        conn.execute("PRAGMA user_version = 1")
        conn.execute(_V1)
    with EvidenceStore(path, create=False) as store:
        assert store.erase_subject("s1") == 0
        with pytest.raises(InvalidArgumentError, match="schema 1"):
            store.add("alice", _x(1), np.zeros(1, dtype=np.int64))


def test_erase_subject_and_purge_before(tmp_path: Path) -> None:
    with EvidenceStore(tmp_path / "e.db") as store:
        assert store.oldest() is None
        store.add("alice", _x(4), np.zeros(4, dtype=np.int64), subject="s1")
        store.add("alice", _x(2, seed=1), np.zeros(2, dtype=np.int64), subject="s2")
        store.add("bob", _x(2, seed=2), np.zeros(2, dtype=np.int64))
        assert store.erase_subject("s1") == 4 and store.erase_subject("s1") == 0
        assert store.count() == 4 and set(store.clients()) == {"alice", "bob"}
        oldest = store.oldest()
        assert oldest is not None and abs(oldest - time.time()) < 60
        assert store.purge_before(time.time() - 3600) == 0
        assert store.purge_before(time.time() + 1) == 4 and store.count() == 0
        with pytest.raises(InvalidArgumentError):
            store.purge_before(float("nan"))
        with pytest.raises(InvalidArgumentError):
            store.add("alice", _x(1), np.zeros(1, dtype=np.int64), subject="")
