"""The audit log's SQLite file: its schema, telling our file from a damaged one, and what SQLite errors mean.

A file that is simply not an audit log (not SQLite at all, or SQLite without our application id and tables) is bad
input (exit 2). A file that was ours and is now damaged — cut to zero bytes, cut short, bytes flipped in the header
or in a page, our tables with the application id overwritten — is an integrity failure (exit 3): for an audit log,
"unreadable" is what a cover-up looks like.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from edgeshield.audit._verify import SCHEMA_VERSION
from edgeshield.errors import (
    AuditIntegrityError,
    EdgeShieldError,
    NotAFileError,
    NotAnAuditLogError,
    PathNotFoundError,
    UnsupportedFormatVersionError,
)

APPLICATION_ID = 0x45534131  # "ESA1": marks a SQLite file as an EdgeShield audit log
SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER = 100  # bytes of the SQLite database header
_NEAR_MAGIC = 10  # a header agreeing with the magic in this many of its 16 bytes is a damaged SQLite file
_PLAUSIBLE_SCHEMA = 99  # schema numbers a newer EdgeShield might write; anything larger is a damaged header

_APPEND_ONLY = "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END"
TRIGGERS = ("entries_no_update", "entries_no_delete", "checkpoints_no_update", "checkpoints_no_delete")
SCHEMA = (
    ("CREATE TABLE entries (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL, "
     "data TEXT NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL)"),
    ("CREATE TABLE checkpoints (tree_size INTEGER PRIMARY KEY, root BLOB NOT NULL, ts TEXT NOT NULL, key_id TEXT, "
     "signature BLOB)"),
    # Append-only by construction: the triggers stop mistakes, not attackers (who can drop them; verify() catches
    # what they do next).
    f"CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries {_APPEND_ONLY}",
    f"CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries {_APPEND_ONLY}",
    f"CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints {_APPEND_ONLY}",
    f"CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints {_APPEND_ONLY}",
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
)
# The Merkle compact range (RFC 9162 intermediate state: the frontier's subtree roots, largest first, 32 bytes each)
# at each checkpoint's tree size. Not trusted by itself: incremental verification uses one only after checking it
# folds to a witness-cosigned root. Created on every writer open, so logs from before it gain it.
COMPACT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS compact_ranges (tree_size INTEGER PRIMARY KEY, hashes BLOB NOT NULL)",
    f"CREATE TRIGGER IF NOT EXISTS compact_ranges_no_update BEFORE UPDATE ON compact_ranges {_APPEND_ONLY}",
    f"CREATE TRIGGER IF NOT EXISTS compact_ranges_no_delete BEFORE DELETE ON compact_ranges {_APPEND_ONLY}",
)


def _damaged(path: Path, what: str) -> AuditIntegrityError:
    return AuditIntegrityError(f"audit log {path} is damaged: {what}", reason="corrupt")


def check_file(path: Path, *, must_exist: bool) -> bool:
    """Classify the file before SQLite sees it; False when it does not exist (and may be created)."""
    if not path.exists():
        if must_exist:
            raise PathNotFoundError(f"audit log not found: {path}")
        return False
    if not path.is_file():
        raise NotAFileError(f"audit log is not a regular file: {path}")
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEADER)
    except OSError as exc:
        raise EdgeShieldError(f"cannot read audit log {path}: {exc.strerror or exc}") from exc
    if not head:
        raise _damaged(path, "it is empty (0 bytes): cut to nothing? Move it away to start a new log")
    magic = head[:16]
    if magic != SQLITE_MAGIC:
        if len(magic) < 16 and SQLITE_MAGIC.startswith(magic):
            raise _damaged(path, f"it is cut short ({len(head)} bytes)")
        if sum(a == b for a, b in zip(magic, SQLITE_MAGIC, strict=False)) >= _NEAR_MAGIC:
            raise _damaged(path, "its SQLite header was altered")
        raise NotAnAuditLogError(f"{path} is not an audit log (not an SQLite database)")
    if len(head) < _HEADER:
        raise _damaged(path, f"it is cut short ({len(head)} bytes, inside the SQLite header)")
    return True


# SQLite errors, and the UnicodeDecodeError Python raises when a corrupt schema makes SQLite's own error message
# (or a schema name) undecodable.
SQLITE_ERRORS = (sqlite3.Error, UnicodeDecodeError)


def db_error(exc: sqlite3.Error | UnicodeDecodeError, path: Path) -> EdgeShieldError:
    """What an SQLite error means for an audit log: corruption is integrity, anything else a plain failure."""
    if isinstance(exc, UnicodeDecodeError):
        return _damaged(path, "SQLite reads text that is not UTF-8 in its own schema")
    name = getattr(exc, "sqlite_errorname", "")
    if "unsupported file format" in str(exc):  # SQLite's schema format byte: 1-4 since 2006, anything else damage
        return _damaged(path, f"SQLite reports: {exc}")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or (
            isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError) and not name):
        return _damaged(path, f"SQLite reports: {exc}")
    return EdgeShieldError(f"cannot use audit log {path}: {exc}")


def check_schema(conn: sqlite3.Connection, path: Path, *, allow_empty: bool = False) -> int:
    """The log's schema version (1 or 2); 0 for a new, empty database when ``allow_empty``."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        table_sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    except SQLITE_ERRORS as exc:
        raise db_error(exc, path) from exc
    tables = set(table_sql)
    ours = {"entries", "checkpoints"} <= tables
    if app_id == 0 and not tables and allow_empty:
        return 0
    if app_id != APPLICATION_ID:
        if ours:  # our tables, but the header no longer says so
            raise _damaged(path, f"its application id reads 0x{app_id & 0xFFFFFFFF:08x}")
        raise NotAnAuditLogError(f"{path} is not an EdgeShield audit log")
    if not ours:
        raise _damaged(path, "the audit tables are missing")
    if (table_sql["entries"], table_sql["checkpoints"]) != (SCHEMA[0], SCHEMA[1]):
        raise _damaged(path, "its table definitions were altered")
    if SCHEMA_VERSION < version <= _PLAUSIBLE_SCHEMA:
        raise UnsupportedFormatVersionError(f"{path} is audit log schema {version}; this build reads up to "
                                            f"{SCHEMA_VERSION}")
    if not 1 <= version <= SCHEMA_VERSION:
        raise _damaged(path, f"its schema version reads {version}")
    return int(version)


class UndecodableText(bytes):
    """A text column whose bytes are not UTF-8 (a flipped byte): not a ``str``, so verify calls the row malformed."""


def _text(raw: bytes) -> str | UndecodableText:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return UndecodableText(raw)


def connect(target: str | Path, *, uri: bool = False) -> sqlite3.Connection:
    """``sqlite3.connect`` for audit logs: text that is not UTF-8 is read as :class:`UndecodableText`, not an error."""
    conn = sqlite3.connect(target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=uri)
    conn.text_factory = _text
    return conn


@contextlib.contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    """A fresh read-only connection; one read transaction gives a consistent snapshot next to the writer."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = connect(uri, uri=True)
    except SQLITE_ERRORS as exc:
        raise db_error(exc, path) from exc
    try:
        conn.execute("BEGIN")
        yield conn
    except SQLITE_ERRORS as exc:
        raise db_error(exc, path) from exc
    finally:
        conn.close()


def quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """SQLite's own structural check (b-trees, pages): catches corruption the entries alone might not show."""
    rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
    if rows != ["ok"]:
        raise _damaged(path, f"SQLite's integrity check says: {'; '.join(map(str, rows[:3]))}")
