"""The ledger's plumbing: one connection behind a lock, write transactions, migrations, meta and events.

Every concept module (peers, leases, progress, status) subclasses ``LedgerStore`` and builds on
``_tx`` (one ``BEGIN IMMEDIATE`` transaction) and ``_read``; the helpers at the bottom run inside
a transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.errors import FailedPrecondition
from coordinator.ledger import schema


class LedgerStore:
    """The connection to the ledger file (or ``:memory:``) and its lock; ``Ledger`` adds the concepts."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._token_cache: dict[str, tuple[str, bool, float]] = {}  # peers.py: check_token
        for pragma in schema.PRAGMAS:
            self._conn.execute(pragma)
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolls back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                yield self._conn
                committed = True
            finally:
                self._conn.execute("COMMIT" if committed else "ROLLBACK")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(schema.MIGRATIONS):
                raise FailedPrecondition(f"ledger {self.path} has schema version {version}, newer than this "
                                         f"hivefold ({len(schema.MIGRATIONS)}); upgrade hivefold")
            for script in schema.MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(statement)
            if row is None:
                c.execute("INSERT INTO schema_version VALUES (?)", (len(schema.MIGRATIONS),))
            else:
                c.execute("UPDATE schema_version SET version = ?", (len(schema.MIGRATIONS),))

    def schema_version(self) -> int:
        return self._read("SELECT version FROM schema_version")[0][0]

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            _set_meta(c, key, value)


# --- helpers that run inside a transaction -------------------------------------------------------


def _meta(c: sqlite3.Connection, key: str) -> str:
    return c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def _set_meta(c: sqlite3.Connection, key: str, value: str) -> None:
    c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _event(c: sqlite3.Connection, now: float, kind: str, *, peer_id: str | None = None,
           shard_id: int | None = None, detail: str = "") -> None:
    c.execute("INSERT INTO events (at, kind, peer_id, shard_id, detail) VALUES (?, ?, ?, ?, ?)",
              (now, kind, peer_id, shard_id, detail))

