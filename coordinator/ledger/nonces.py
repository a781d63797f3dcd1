"""Signed requests' nonces, shared by every coordinator of a run on one PostgreSQL ledger.

Each coordinator remembers the nonces it has seen within the signature window (``coordinator.auth``),
but a request captured on its way to one coordinator could be replayed, once, to another one serving
the same run within that window. On a PostgreSQL ledger a nonce is therefore also claimed in the
ledger: an insert that the primary key lets through exactly once, whichever coordinator tries first.
It runs on a connection of its own, autocommitted, so signed requests never queue behind the run's
write transactions (leases, results) or the write lock other coordinators hold. An SQLite ledger has
one coordinator (its workdir is locked), whose memory is enough.
"""

from __future__ import annotations

import threading
from pathlib import Path

from coordinator.errors import FailedPrecondition, Unavailable
from coordinator.ledger.backend import PostgresBackend
from coordinator.ledger.store import LedgerStore
from hivefold.rpcsign import MAX_SKEW_S

# Kept for two windows: coordinators' clocks may differ by up to a window and still refuse the same replay.
KEEP_S = 2 * MAX_SKEW_S
PRUNE_EVERY_S = 10.0


class SharedNonces(LedgerStore):
    def __init__(self, location: str | Path):
        super().__init__(location)
        self._nonce_lock = threading.Lock()
        self._nonce_db: PostgresBackend | None = None  # opened at the first claim
        self._nonces_pruned_at = -float("inf")

    @property
    def shares_nonces(self) -> bool:
        """Whether other coordinators may serve this run: only a PostgreSQL ledger can be shared."""
        return self.backend == "postgresql"

    def claim_nonce(self, nonce: str, signed_at: float, *, now: float) -> bool:
        """Record ``nonce`` for the whole run; False if any coordinator recorded it already. Raises
        ``Unavailable`` while the database cannot be reached."""
        with self._nonce_lock, self._transient_is_unavailable():
            if self._nonce_db is None:
                try:
                    self._nonce_db = PostgresBackend(self.path)
                except FailedPrecondition as e:  # the ledger itself connected at start: this is an outage
                    raise Unavailable(f"{e}; retry shortly") from None
            db = self._nonce_db
            db.ensure_open()
            if now - self._nonces_pruned_at >= PRUNE_EVERY_S:
                self._nonces_pruned_at = now
                db.conn.execute("DELETE FROM nonces WHERE signed_at < ?", (now - KEEP_S,))
            cur = db.conn.execute("INSERT INTO nonces (nonce, signed_at) VALUES (?, ?) ON CONFLICT (nonce) "
                                  "DO NOTHING", (nonce, signed_at))
            return cur.rowcount == 1

    def close(self) -> None:
        with self._nonce_lock:
            if self._nonce_db is not None:
                self._nonce_db.close()
        super().close()
