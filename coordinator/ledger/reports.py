"""Members caught poisoning the averaging: who reported whom, and the ban that follows enough reports.

A peer's robust all-reduce (``hivefold/averaging/robust.py``) names the members it caught by their
libp2p peer id; the coordinator knows which peer each id belongs to because it signed that peer's swarm
token for it (``bind_swarm_id``). A report alone proves nothing (a hostile peer can report an honest
one), so a peer is banned only once ``threshold`` distinct peers in good standing reported it; each
reporter counts once per suspect, a peer cannot report itself, and reports of unknown ids are dropped.

Good standing: not banned, and, where the run checks results, at least ``min_valid`` results that passed a
check. Registering is free, so without that an attacker who starts two peers could have any honest peer
banned; with it, each of its peers must first do real, verified work (BOINC gates trust on validated
results too). Peers repeat their reports while they exclude the member, so a report made before its
reporter's first verified result counts once that result is in.
"""

from __future__ import annotations

from coordinator.ledger.access import ban_in
from coordinator.ledger.store import LedgerStore, _event

REASON_CHARS = 300


class PoisonReports(LedgerStore):
    def bind_swarm_id(self, libp2p_id: str, peer_id: str, *, now: float) -> None:
        """Remember that ``libp2p_id`` is ``peer_id``'s DHT node (called as its swarm token is signed)."""
        with self._tx() as c:
            c.execute("INSERT INTO swarm_ids VALUES (?, ?, ?) ON CONFLICT (libp2p_id) DO UPDATE SET "
                      "peer_id = excluded.peer_id, issued_at = excluded.issued_at", (libp2p_id, peer_id, now))

    def report_poisoners(self, reporter: str, reports: list[tuple[str, str]], *, threshold: int,
                         now: float, min_valid: int = 0) -> list[str]:
        """Record ``reporter``'s ``(libp2p id, why)`` reports; the peers banned because of them.

        ``threshold`` distinct reporters in good standing (not banned, ``min_valid`` verified results) ban a
        peer (0: never).
        """
        banned = []
        with self._tx() as c:
            row = c.execute("SELECT banned FROM peers WHERE peer_id = ?", (reporter,)).fetchone()
            if row is None or row[0]:
                return []  # a banned peer's word counts for nothing
            for libp2p_id, why in reports:
                hit = c.execute("SELECT peer_id FROM swarm_ids WHERE libp2p_id = ?", (libp2p_id,)).fetchone()
                if hit is None or hit[0] == reporter:
                    continue
                suspect, why = hit[0], why[:REASON_CHARS]
                fresh = c.execute("INSERT INTO poison_reports VALUES (?, ?, ?, ?) ON CONFLICT (reporter, suspect) "
                                  "DO NOTHING", (reporter, suspect, why, now)).rowcount
                if fresh:
                    _event(c, now, "poisoning_reported", peer_id=suspect, detail=f"by {reporter}: {why}")
                reporters = c.execute(
                    "SELECT COUNT(*) FROM poison_reports r JOIN peers p ON p.peer_id = r.reporter "
                    "WHERE r.suspect = ? AND p.banned = 0 AND p.results_valid >= ?", (suspect, min_valid)).fetchone()[0]
                is_banned = c.execute("SELECT banned FROM peers WHERE peer_id = ?", (suspect,)).fetchone()[0]
                if threshold and reporters >= threshold and not is_banned:
                    ban_in(c, suspect, f"poisoning the averaging: caught by {reporters} peers ({why})", now)
                    banned.append(suspect)
        for peer in banned:
            self._peer_cache.pop(peer, None)
        return banned

    def poison_reports(self, suspect: str) -> list[tuple[str, str, float]]:
        """``(reporter, why, when)`` for each peer that reported ``suspect``, oldest first."""
        return [tuple(r) for r in self._read("SELECT reporter, reason, at FROM poison_reports WHERE suspect = ? "
                                             "ORDER BY at", (suspect,))]
