"""Where the ledger lives: an SQLite file (or ``:memory:``), the embedded default, or a PostgreSQL database.

The concept modules write one SQL dialect, the common ground of both (``?`` placeholders, ``ON CONFLICT``
upserts, no two-argument ``MAX``), against a connection with ``execute``/``executemany``; a backend
supplies that connection and the three transaction shapes the ledger uses:

- ``begin_write``: one writer at a time for the whole run. SQLite's ``BEGIN IMMEDIATE`` takes the file's
  write lock; on PostgreSQL every write transaction first takes one transaction-scoped advisory lock, so
  coordinators in different processes or on different machines serialize their writes exactly as one
  SQLite file would, and two of them can never lease one shard twice.
- ``begin_snapshot``: one consistent read of several statements (the status document, the charts).
- statements outside either run on their own (autocommit).

The schema is written once, in SQLite's types; ``postgres_ddl`` maps them (INTEGER is 64-bit and REAL is
double precision in SQLite, so BIGINT and DOUBLE PRECISION, not PostgreSQL's 32-bit namesakes).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from coordinator.errors import FailedPrecondition, Unavailable

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key of the ledger's single writer (any fixed 64-bit number; "hvfl" in ASCII)
WRITE_LOCK_KEY = 0x6876666C


class Connection(Protocol):
    """What the concept modules use: ``execute`` returns a cursor (iterable, ``fetchone``, ``fetchall``,
    ``rowcount``) whose rows index by position and by column name."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> Any: ...


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(POSTGRES_SCHEMES)


def redact(location: str | Path) -> str:
    """The location with any password replaced, for logs and error messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(location))


def open_backend(location: str | Path) -> SqliteBackend | PostgresBackend:
    """An SQLite path (or ``:memory:``), or a ``postgresql://`` URL."""
    return PostgresBackend(str(location)) if is_postgres(location) else SqliteBackend(str(location))


class SqliteBackend:
    name = "sqlite"
    transient: tuple[type[Exception], ...] = ()  # a locked file waits busy_timeout; anything else is a bug
    PRAGMAS = (
        "PRAGMA journal_mode=WAL",  # readers (status, dashboard) never block the writer
        "PRAGMA busy_timeout=10000",  # the keeper and the server share the file: wait, don't fail
        "PRAGMA foreign_keys=ON",
        "PRAGMA synchronous=NORMAL",  # safe with WAL; a power cut loses at most the last transactions
    )

    def __init__(self, path: str):
        self.location = path
        # isolation_level=None: no implicit transactions; the ledger says BEGIN itself
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self.conn.row_factory = sqlite3.Row
        for pragma in self.PRAGMAS:
            self.conn.execute(pragma)

    def begin_write(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def begin_snapshot(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def ensure_open(self) -> None:
        pass  # a file does not go away under a connection

    def ddl(self, statement: str) -> str:
        return statement

    def close(self) -> None:
        self.conn.close()


class PostgresBackend:
    name = "postgresql"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise FailedPrecondition("a postgresql:// ledger needs psycopg: pip install 'hivefold[postgresql]'"
                                     ) from None
        self._psycopg = psycopg
        self.transient = (psycopg.OperationalError,)  # the server went away, restarted, or the link dropped
        self.location = url
        self.conn = _PgConnection(self._connect())

    def _connect(self):
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.location, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except psycopg.Error as e:
            raise FailedPrecondition(f"cannot reach the PostgreSQL ledger at {redact(self.location)}: "
                                     f"{str(e).strip()}") from None
        # SUM over BIGINT columns is NUMERIC in PostgreSQL: read it back as the int (or float) SQLite gives
        conn.adapters.register_loader("numeric", _numeric_loader())
        return conn

    def ensure_open(self) -> None:
        """Reconnect after the server restarted or the connection broke (the failed call raised already)."""
        if self.conn.raw.closed or self.conn.raw.broken:
            try:
                self.conn = _PgConnection(self._connect())
            except FailedPrecondition as e:  # only the first connection, at start, is a configuration error
                raise Unavailable(f"{e}; retry shortly") from None

    def begin_write(self) -> None:
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))

    def begin_snapshot(self) -> None:
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if not self.conn.raw.closed:
            self.conn.execute("ROLLBACK")

    def ddl(self, statement: str) -> str:
        return postgres_ddl(statement)

    def close(self) -> None:
        self.conn.raw.close()


def postgres_ddl(statement: str) -> str:
    """SQLite's column types as PostgreSQL's of the same range."""
    statement = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                       statement)
    for sqlite_type, pg_type in (("INTEGER", "BIGINT"), ("REAL", "DOUBLE PRECISION"), ("BLOB", "BYTEA")):
        statement = re.sub(rf"\b{sqlite_type}\b", pg_type, statement)
    return statement


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the ledger's SQL has no ``?`` inside string literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConnection:
    """A psycopg connection that takes the ledger's SQL as it is written."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql: str, args: Sequence[Any] = ()):
        return self.raw.execute(_pg_sql(sql), args or None, prepare=False)

    def executemany(self, sql: str, args: Iterable[Sequence[Any]]):
        cur = self.raw.cursor()
        cur.executemany(_pg_sql(sql), list(args))
        return cur


class Row(tuple):
    """A row that indexes by position and by column name, as ``sqlite3.Row`` does."""

    __slots__ = ()
    _index: dict[str, int]

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor):
    if cursor.description is None:
        return tuple
    cls = _row_class(tuple(d.name for d in cursor.description))
    return cls


@functools.cache
def _numeric_loader() -> type:
    from psycopg.types.numeric import NumericLoader

    class IntOrFloatLoader(NumericLoader):
        def load(self, data):
            value = super().load(data)
            return int(value) if value == value.to_integral_value() else float(value)

    return IntOrFloatLoader
