"""The extraction monitor's state on disk (``serve --extraction-state``): one SQLite file, mode 0600, WAL.

One table ``state(component, id, updated, data)``: each detector's state of one client (component = the detector's
name: ``prada``, ``query_budget``, ``decaying_budget``, ``ood_rate``), the client's action (``action``), shared
state such as a group's daily union (``fleet_budget``, id = the group) and the canonical-key registry (``keys``, id
``registry``). Blobs are the detectors' own serialisations (framed bytes, ``np.savez`` or JSON; never pickle) and
are checked by whoever reads them: a malformed one raises :class:`~edgeshield.errors.ExtractionStateError` naming
the row. The store runs WAL with ``synchronous=NORMAL``: a commit survives a killed process, not a power cut.
The file holds what clients sent in sketched or summarised form (PRADA's sets hold raw query vectors): it is as
private as the evidence store.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator

from edgeshield._sqlite import PrivateStore
from edgeshield.errors import ExtractionStateError, InvalidArgumentError, NotAnExtractionStateError

__all__ = ["KEYS_COMPONENT", "MonitorStore"]

_APPLICATION_ID = 0x45535853  # "ESXS"
_SCHEMA_VERSION = 1
KEYS_COMPONENT, _REGISTRY = "keys", "registry"


class MonitorStore(PrivateStore):
    """Rows of extraction-monitor state, keyed by (component, id)."""

    _what = "extraction state"
    _application_id = _APPLICATION_ID
    _schema = (
        f"PRAGMA application_id = {_APPLICATION_ID}",
        f"PRAGMA user_version = {_SCHEMA_VERSION}",
        ("CREATE TABLE state (component TEXT NOT NULL, id TEXT NOT NULL, updated REAL NOT NULL,"
         " data BLOB NOT NULL, PRIMARY KEY (component, id))"),
    )
    _tables = frozenset({"state"})
    _not_a_store = NotAnExtractionStateError

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        # WAL with synchronous=NORMAL: a commit survives a killed process, not a power cut, and costs no fsync — an
        # eviction writes one client, and a flood of new identities must not turn into a flood of fsyncs
        conn.execute("PRAGMA synchronous = NORMAL")

    def put(self, component: str, id: str, data: bytes) -> None:  # noqa: A002 - the column's name
        self.put_many([(component, id, data)])

    def put_many(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Write (component, id, data) rows in one transaction (all or none)."""
        now = time.time()
        checked = [(_name(c, "component"), _name(i, "id"), now, _blob(d)) for c, i, d in rows]
        if not checked:
            return
        with self._tx() as conn:
            conn.executemany("INSERT INTO state (component, id, updated, data) VALUES (?, ?, ?, ?)"
                             " ON CONFLICT (component, id) DO UPDATE SET updated = excluded.updated,"
                             " data = excluded.data", checked)

    def get(self, component: str, id: str) -> bytes | None:  # noqa: A002
        rows = self._read("SELECT data FROM state WHERE component = ? AND id = ?", (component, id))
        return None if not rows else _stored(rows[0][0], component, id)

    def items(self, component: str) -> Iterator[tuple[str, bytes]]:
        """(id, data) of every row of ``component``, in id order."""
        for id_, data in self._read("SELECT id, data FROM state WHERE component = ? ORDER BY id", (component,)):
            yield str(id_), _stored(data, component, str(id_))

    def delete(self, component: str, id: str) -> None:  # noqa: A002
        with self._tx() as conn:
            conn.execute("DELETE FROM state WHERE component = ? AND id = ?", (component, id))

    def delete_id(self, id: str, components: Iterable[str]) -> None:  # noqa: A002
        """Delete one client's rows of ``components`` in one transaction (an operator reset)."""
        with self._tx() as conn:
            conn.executemany("DELETE FROM state WHERE component = ? AND id = ?", [(c, id) for c in components])

    def count(self, component: str | None = None) -> int:
        if component is None:
            return int(self._read("SELECT count(*) FROM state")[0][0])
        return int(self._read("SELECT count(*) FROM state WHERE component = ?", (component,))[0][0])

    # --- the canonical-key registry (LeaderKeys) ---
    def save_keys(self, keys: object) -> bool:
        """Store ``keys``' registry (``InputKeys.export_state``); False when it holds none (stateless keys)."""
        export = getattr(keys, "export_state", None)
        data = export() if export is not None else None
        if data is None:
            return False
        self.put(KEYS_COMPONENT, _REGISTRY, data)
        return True

    def load_keys(self, keys: object) -> bool:
        """Restore ``keys``' registry if one is stored; a malformed one raises ExtractionStateError."""
        data = self.get(KEYS_COMPONENT, _REGISTRY)
        load = getattr(keys, "import_state", None)
        if data is None or load is None:
            return False
        try:
            load(data)
        except ExtractionStateError as exc:
            raise ExtractionStateError(f"{self.path}: component {KEYS_COMPONENT!r} id {_REGISTRY!r}: {exc}") from None
        return True


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"extraction state {what} must be a non-empty string, not {value!r}")
    return value


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgumentError(f"extraction state data must be bytes, not {type(value).__name__}")
    return bytes(value)


def _stored(data: object, component: str, id: str) -> bytes:  # noqa: A002
    if not isinstance(data, bytes):
        raise ExtractionStateError(f"extraction state row component {component!r} id {id!r} is not a blob")
    return data
