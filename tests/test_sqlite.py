"""The private SQLite stores (edgeshield._sqlite.PrivateStore): a new file opened by several threads at once is
created exactly once, each opener gets a working store, and the file is private (0600)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from edgeshield.compliance import SubjectKeys
from edgeshield.monitor import MonitorStore
from edgeshield.watermark import EvidenceStore

STORES = [MonitorStore, SubjectKeys, EvidenceStore]


@pytest.mark.parametrize("store", STORES, ids=lambda s: s.__name__)
def test_first_open_from_many_threads(tmp_path: Path, store: type) -> None:
    errors: list[BaseException] = []
    opened: list[object] = []
    for n in range(8):
        path = tmp_path / f"{store.__name__}-{n}.db"
        barrier = threading.Barrier(6)

        def open_it(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                opened.append(store(path))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert errors == []
    assert len(opened) == 8 * 6
    for s in opened:
        s.close()  # type: ignore[attr-defined]
