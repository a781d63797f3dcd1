"""Signed requests' nonces, shared by every coordinator of a run on one PostgreSQL ledger.

Each coordinator remembers the nonces it has seen within the signature window (``coordinator.auth``),
but a request captured on its way to one coordinator could be replayed, once, to another one serving
the same run within that window. On a shared ledger a nonce is therefore also claimed in the ledger: an
insert that the primary key lets through exactly once, whichever coordinator tries first. It is one
autocommitted statement outside the run's write lock (the key alone decides the race), so signed
requests do not queue behind leases and results. An SQLite ledger has one coordinator (its workdir is
locked), whose memory is enough.
"""

from __future__ import annotations

from coordinator.ledger.store import LedgerStore
from hivefold.rpcsign import MAX_SKEW_S

# Kept for two windows: coordinators' clocks may differ by up to a window and still refuse the same replay.
KEEP_S = 2 * MAX_SKEW_S
PRUNE_EVERY_S = 10.0


class SharedNonces(LedgerStore):
    _nonces_pruned_at = -float("inf")

    @property
    def shares_nonces(self) -> bool:
        """Whether other coordinators may serve this run: only a PostgreSQL ledger can be shared."""
        return self.backend == "postgresql"

    def claim_nonce(self, nonce: str, signed_at: float, *, now: float) -> bool:
        """Record ``nonce`` for the whole run; False if any coordinator recorded it already."""
        with self._lock, self._transient_is_unavailable():
            self._backend.ensure_open()
            if now - self._nonces_pruned_at >= PRUNE_EVERY_S:
                self._nonces_pruned_at = now
                self._conn.execute("DELETE FROM nonces WHERE signed_at < ?", (now - KEEP_S,))
            cur = self._conn.execute("INSERT INTO nonces (nonce, signed_at) VALUES (?, ?) ON CONFLICT (nonce) "
                                     "DO NOTHING", (nonce, signed_at))
            return cur.rowcount == 1
