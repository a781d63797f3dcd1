"""Peers: registration and session tokens, heartbeats, clean leaves and handovers, and the swarm's address book."""

from __future__ import annotations

import json
import secrets
import time

from coordinator.errors import PermissionDenied
from coordinator.ledger.access import redeem_invite
from coordinator.ledger.leases import _close_lease, _expire, _get_lease
from coordinator.ledger.progress import _raise_global_step
from coordinator.ledger.schema import LeaseState
from coordinator.ledger.store import LedgerStore, _event

SWARM_MADDRS_LIMIT = 32  # peers handed out per answer: enough to join the swarm, small at any swarm size


TOKEN_CACHE_S = 2.0  # how long check_token trusts what it read


class PeerRegistry(LedgerStore):
    """Who takes part in the run, whether they are online, and where the swarm can reach them."""

    def register_peer(self, *, peer_id: str, name: str, public_key: bytes, device_kind: str, device_name: str,
                      memory_bytes: int, now: float, team: str = "", invite_only: bool = False,
                      invite: str = "") -> str:
        """Insert or refresh a peer; returns a new session token (older tokens stop working).

        ``invite_only``: a peer not seen before must redeem ``invite`` (``access.py``)."""
        token = secrets.token_hex(16)
        with self._tx() as c:
            row = c.execute("SELECT public_key, banned, ban_reason FROM peers WHERE peer_id = ?",
                            (peer_id,)).fetchone()
            if row is not None and bytes(row["public_key"]) != public_key:
                raise PermissionDenied(f"peer id {peer_id} belongs to another key")
            if row is not None and row["banned"]:
                why = row["ban_reason"] or "no reason given"
                raise PermissionDenied(f"peer {peer_id} is banned from this run ({why})")
            if row is None:
                used = redeem_invite(c, invite, now) if invite_only else ""
                c.execute("INSERT INTO peers (peer_id, name, public_key, token, device_kind, device_name, "
                          "memory_bytes, registered_at, last_seen, team, invite) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (peer_id, name, public_key, token, device_kind, device_name, memory_bytes, now, now, team,
                           used))
            else:
                c.execute("UPDATE peers SET name = ?, token = ?, device_kind = ?, device_name = ?, memory_bytes = ?,"
                          " last_seen = ?, left_at = NULL, team = ? WHERE peer_id = ?",
                          (name, token, device_kind, device_name, memory_bytes, now, team, peer_id))
            _event(c, now, "peer_registered", peer_id=peer_id, detail=name)
        self._peer_cache.pop(peer_id, None)
        return token

    def _peer(self, peer_id: str) -> tuple[str, bool, float, int, float] | None:
        """(token, banned, samples/s, micro-batch, when read): read at most ``TOKEN_CACHE_S`` ago. Every RPC
        after Register needs the token, and leases and results the rest, so one read serves them all."""
        now = time.monotonic()
        hit = self._peer_cache.get(peer_id)
        if hit is None or now - hit[4] > TOKEN_CACHE_S:
            rows = self._read("SELECT token, banned, samples_per_second, micro_batch FROM peers WHERE peer_id = ?",
                              (peer_id,))
            if not rows:
                return None
            token, banned, rate, micro_batch = rows[0]
            hit = self._peer_cache[peer_id] = (token, bool(banned), float(rate), int(micro_batch), now)
        return hit

    def public_key_of(self, peer_id: str) -> bytes | None:
        """The key ``peer_id`` registered (it never changes: the id is derived from it); None if unknown."""
        key = self._public_keys.get(peer_id)
        if key is None:
            rows = self._read("SELECT public_key FROM peers WHERE peer_id = ?", (peer_id,))
            if not rows:
                return None
            key = self._public_keys[peer_id] = bytes(rows[0][0])
        return key

    def peer_micro_batch(self, peer_id: str) -> int:
        """The micro-batch the peer reported (0: not reported yet)."""
        hit = self._peer(peer_id)
        return hit[3] if hit else 0

    def peer_rate(self, peer_id: str) -> float:
        """The peer's throughput from its heartbeats, sequences per second (0: not reported yet)."""
        hit = self._peer(peer_id)
        return hit[2] if hit else 0.0

    def check_token(self, peer_id: str, token: str) -> bool:
        """Every RPC after Register asks this: answered from memory for ``TOKEN_CACHE_S`` after a read, so a
        token replaced or a ban written by another process (``hivefold coordinator ban``) counts within that."""
        hit = self._peer(peer_id)
        return hit is not None and secrets.compare_digest(hit[0], token) and not hit[1]

    def heartbeat(self, peer_id: str, *, epoch: int, samples: int, recent_loss: float | None,
                  samples_per_second: float, now: float, dht_maddrs: list[str] | None = None,
                  utilization: float = 0.0, micro_batch: int = 0,
                  pause_reason: str | None = None) -> tuple[list[str], int]:
        """Mark the peer alive; returns (its active lease ids, global step). Leases are not extended here: a
        peer that needs more time asks (``extend_lease``), against the progress it made.

        ``pause_reason``: why the peer is paused (online, not training), None while it trains."""
        with self._tx() as c:
            _expire(c, now, self.silent_seconds)
            c.execute("UPDATE peers SET last_seen = ?, epoch = ?, samples_reported = ?, recent_loss = ?, "
                      "samples_per_second = ?, utilization = ?, pause_reason = ?, left_at = NULL WHERE peer_id = ?",
                      (now, epoch, samples, recent_loss, samples_per_second, utilization, pause_reason, peer_id))
            if micro_batch > 0:
                c.execute("UPDATE peers SET micro_batch = ? WHERE peer_id = ?", (micro_batch, peer_id))
            if dht_maddrs is not None:
                c.execute("UPDATE peers SET dht_maddrs = ? WHERE peer_id = ?", (json.dumps(dht_maddrs), peer_id))
            ids = [r[0] for r in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ?",
                                           (peer_id, LeaseState.ACTIVE.value))]
            step = _raise_global_step(c, epoch)
        self._peer_cache.pop(peer_id, None)  # its rate and micro-batch as just reported
        return ids, step

    def leave(self, peer_id: str, *, epoch: int, reason: str, now: float) -> None:
        """A clean leave: the peer goes offline at once and its active leases go back to the pool."""
        with self._tx() as c:
            for row in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ?",
                                 (peer_id, LeaseState.ACTIVE.value)).fetchall():
                _close_lease(c, _get_lease(c, row[0]), LeaseState.RELEASED, "peer left", now)
            c.execute("UPDATE peers SET left_at = COALESCE(left_at, ?), leaving_epoch = ?, epoch = CASE WHEN epoch > ? "
                      "THEN epoch ELSE ? END WHERE peer_id = ?", (now, epoch, epoch, epoch, peer_id))
            _raise_global_step(c, epoch)
            _event(c, now, "peer_left", peer_id=peer_id, detail=reason)

    def handover_needed(self, peer_id: str, *, online_seconds: float, now: float) -> bool:
        """True while ``peer_id`` (leaving) holds a state newer than the latest checkpoint that no online peer has."""
        with self._snapshot() as c:
            row = c.execute("SELECT leaving_epoch FROM peers WHERE peer_id = ? AND left_at IS NOT NULL",
                            (peer_id,)).fetchone()
            if row is None or row[0] is None:
                return False
            ckpt = c.execute("SELECT COALESCE(MAX(step), -1) FROM checkpoints").fetchone()[0]
            if row[0] <= ckpt:
                return False
            others = c.execute("SELECT COUNT(*) FROM peers WHERE peer_id != ? AND left_at IS NULL AND last_seen >= ? "
                               "AND epoch >= ?", (peer_id, now - online_seconds, row[0])).fetchone()[0]
            return others == 0

    def handovers_wanted(self, *, since: float, online_seconds: float, now: float) -> list[tuple[str, int, list[str]]]:
        """Peers that left since ``since`` and alone hold a state newer than the latest checkpoint, newest first:
        ``(peer id, epoch, maddrs)`` for the keeper to download from."""
        rows = self._read("SELECT peer_id, leaving_epoch, dht_maddrs FROM peers WHERE left_at >= ? "
                          "ORDER BY leaving_epoch DESC", (since,))
        return [(r[0], r[1], json.loads(r[2])) for r in rows
                if self.handover_needed(r[0], online_seconds=online_seconds, now=now)]

    def swarm_maddrs(self, *, exclude_peer: str | None, online_seconds: float, now: float) -> list[str]:
        """hivemind maddrs of the keeper and of the most recently seen online peers (see SWARM_MADDRS_LIMIT)."""
        rows = self._read("SELECT dht_maddrs FROM peers WHERE peer_id != ? AND left_at IS NULL AND last_seen >= ? "
                          "AND dht_maddrs != '[]' ORDER BY last_seen DESC LIMIT ?",
                          (exclude_peer or "", now - online_seconds, SWARM_MADDRS_LIMIT))
        keeper = json.loads(self.get_meta("keeper_maddrs", "[]"))
        return keeper + [m for r in rows for m in json.loads(r[0])]

    def set_keeper_maddrs(self, maddrs: list[str]) -> None:
        self.set_meta("keeper_maddrs", json.dumps(maddrs))

