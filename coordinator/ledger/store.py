"""The ledger's plumbing: one connection behind a lock, write transactions, migrations, meta and events.

Every concept module (peers, leases, progress, status) subclasses ``LedgerStore`` and builds on
``_tx`` (one write transaction: one writer at a time for the whole run, see ``backend.py``),
``_snapshot`` (one consistent read) and ``_read``; the helpers at the bottom run inside a transaction.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.errors import FailedPrecondition, Unavailable
from coordinator.ledger import schema
from coordinator.ledger.backend import Connection, open_backend, redact


class LedgerStore:
    """The connection to the ledger (an SQLite path or ``:memory:``, or a ``postgresql://`` URL) and its
    lock; ``Ledger`` adds the concepts.

    ``silent_seconds``: an active lease also expires once its peer has not been heard from (no heartbeat)
    for this long, counted from no earlier than the lease's issue and the last coordinator start: a
    crashed peer's shard goes back to the pool in a few heartbeats, not at a deadline sized for its work.
    The coordinator sets it from its heartbeat interval; other users of the ledger leave it off.
    """

    silent_seconds: float = math.inf

    def __init__(self, location: str | Path):
        self.path = str(location)  # the location as given (a URL keeps its password: log ``where`` instead)
        self.where = redact(location)
        self._backend = open_backend(location)
        self.backend = self._backend.name
        self._lock = threading.RLock()
        self._peer_cache: dict[str, tuple[str, bool, float, int, float]] = {}  # peers.py: _peer
        self._public_keys: dict[str, bytes] = {}  # peers.py: public_key_of
        self._migrate()

    @property
    def _conn(self) -> Connection:
        return self._backend.conn

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One write transaction (the run's only writer while it lasts); rolls back on any exception."""
        with self._lock, self._transient_is_unavailable():
            self._backend.ensure_open()
            self._backend.begin_write()
            committed = False
            try:
                yield self._conn
                committed = True
            finally:
                self._backend.commit() if committed else self._backend.rollback()

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """Several reads that see one consistent state of the ledger."""
        with self._lock, self._transient_is_unavailable():
            self._backend.ensure_open()
            self._backend.begin_snapshot()
            try:
                yield self._conn
            finally:
                self._backend.commit()

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock, self._transient_is_unavailable():
            self._backend.ensure_open()
            return self._conn.execute(sql, args).fetchall()

    @contextmanager
    def _transient_is_unavailable(self) -> Iterator[None]:
        """A lost database connection fails the call in flight as ``Unavailable`` (peers retry it; the
        next call reconnects), not as an internal error."""
        try:
            yield
        except self._backend.transient as e:
            raise Unavailable(f"the ledger at {self.where} cannot be reached ({str(e).strip()[:200]}); "
                              "retry shortly") from e

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(schema.MIGRATIONS):
                raise FailedPrecondition(f"ledger {self.where} has schema version {version}, newer than this "
                                         f"hivefold ({len(schema.MIGRATIONS)}); upgrade hivefold")
            for script in schema.MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(self._backend.ddl(statement))
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


def _meta(c: Connection, key: str) -> str:
    return c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def _set_meta(c: Connection, key: str, value: str) -> None:
    c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _event(c: Connection, now: float, kind: str, *, peer_id: str | None = None,
           shard_id: int | None = None, detail: str = "") -> None:
    c.execute("INSERT INTO events (at, kind, peer_id, shard_id, detail) VALUES (?, ?, ?, ?, ?)",
              (now, kind, peer_id, shard_id, detail))

