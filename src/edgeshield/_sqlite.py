"""A private SQLite store: one file that holds identities, keys or personal data, opened the same way everywhere.

The file is created mode 0600 with O_EXCL before SQLite touches it (SQLite gives its WAL and shm files the same
mode), is marked by its ``application_id`` and must hold the store's tables; a new file gets its schema in one
transaction. One connection is shared by the store's threads under a lock; every write is one ``BEGIN IMMEDIATE``
transaction. A file that is not the store (a foreign database, junk bytes) is refused with the store's own typed
error, never a raw ``sqlite3`` one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

from edgeshield.errors import EdgeShieldError, InvalidArgumentError, NotAFileError, PathNotFoundError


class PrivateStore:
    """Base of the SQLite stores: subclasses set the class attributes and override the hooks they need."""

    _what: ClassVar[str]  # names the store in every error: "monitor store"
    _application_id: ClassVar[int]
    _schema: ClassVar[tuple[str, ...]]  # run in one transaction on a new file; it sets application_id
    _tables: ClassVar[frozenset[str]]  # an existing file must hold at least these
    _not_a_store: ClassVar[type[EdgeShieldError]]

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._create_private(create)
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._configure(conn)
            self._ensure_schema(conn, create)
            if create:
                _wal(conn)
            self._opened(conn, create)
        except sqlite3.DatabaseError as exc:
            conn.close()
            article = "an" if self._what[0] in "aeiou" else "a"
            raise self._not_a_store(f"{self.path} is not {article} {self._what} database: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- hooks ---
    def _configure(self, conn: sqlite3.Connection) -> None:
        """Connection settings made before the file is read (``PRAGMA secure_delete``, ...)."""

    def _created(self, conn: sqlite3.Connection) -> None:
        """More rows for a new file, inside the transaction that creates the schema."""

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        """Checks, migrations and settings once the file is known to be this store."""

    # --- opening ---
    def _create_private(self, create: bool) -> None:
        if self.path.exists() and not self.path.is_file():
            raise NotAFileError(f"{self._what} is not a regular file: {self.path}")
        if self.path.exists():
            return
        if not create:
            raise PathNotFoundError(f"{self._what} not found: {self.path}")
        try:  # private before it holds anything
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileNotFoundError:
            raise PathNotFoundError(f"{self._what} directory not found: {self.path.parent}") from None
        except FileExistsError:
            pass  # another process created it first

    def _ensure_schema(self, conn: sqlite3.Connection, create: bool) -> None:
        app_id, tables = _identity(conn)
        if create and app_id == 0 and not tables:
            conn.execute("BEGIN IMMEDIATE")  # an error leaves it open: closing the connection rolls it back
            app_id, tables = _identity(conn)
            if app_id == 0 and not tables:  # not made meanwhile by another process
                for statement in self._schema:
                    conn.execute(statement)
                self._created(conn)
            conn.execute("COMMIT")
            app_id, tables = _identity(conn)
        if app_id != self._application_id or not self._tables <= tables:
            raise self._not_a_store(f"{self.path} is not an EdgeShield {self._what}")

    # --- use ---
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_conn(self) -> sqlite3.Connection:
        """The connection; call with the lock held."""
        if self._conn is None:
            raise InvalidArgumentError(f"{self._what} {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed when the block ends, rolled back when it raises."""
        with self._lock:
            conn = self._open_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._open_conn().execute(sql, args).fetchall()

    def _checkpoint(self) -> None:
        """Fold the WAL into the file and truncate it, so deleted rows' old pages do not linger there (best effort:
        a reader in another process can hold it back)."""
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            if self._conn is not None:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _identity(conn: sqlite3.Connection) -> tuple[int, set[str]]:
    """The file's application_id and table names, read in one statement so that both come from one snapshot (two
    reads could straddle another process's creating transaction: the id before it, the tables after)."""
    rows = conn.execute("SELECT a.application_id, m.name FROM pragma_application_id() AS a"
                        " LEFT JOIN sqlite_master AS m ON m.type = 'table'").fetchall()
    return int(rows[0][0]), {name for _, name in rows if name is not None}


def _wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    # Leaving rollback-journal mode takes an exclusive lock, and SQLite answers BUSY at once, without its busy
    # handler, when another connection is making the same new file: wait for it as the busy timeout would.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
