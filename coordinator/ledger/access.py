"""Who may take part: invites for invite-only runs, and bans.

An invite is a random token the operator hands out (``hivefold coordinator invite``); the ledger keeps
only its sha256, so a copy of the ledger does not give invites away. A new peer redeems one at
registration, in the same transaction that admits it: an invite with one use left admits exactly one
peer however many race for it. A peer once admitted re-registers without one. A banned peer's token
stops working within ``TOKEN_CACHE_S`` on every coordinator, its active leases go back to the pool,
and it cannot register again until it is unbanned.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from coordinator.errors import InvalidArgument, NotFound, PermissionDenied
from coordinator.ledger.backend import Connection
from coordinator.ledger.leases import _close_lease, _get_lease
from coordinator.ledger.schema import LeaseState
from coordinator.ledger.store import LedgerStore, _event

INVITE_PREFIX = "hfinv-"


def invite_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


class PeerAccess(LedgerStore):
    def create_invite(self, *, uses: int, expires_at: float, now: float, note: str = "") -> str:
        """A new invite token (shown once; only its sha256 is stored)."""
        if uses < 1:
            raise ValueError(f"an invite needs at least one use, got {uses}")
        token = INVITE_PREFIX + secrets.token_urlsafe(24)
        with self._tx() as c:
            c.execute("INSERT INTO invites VALUES (?, ?, ?, ?, ?)", (invite_digest(token), uses, expires_at, now, note))
            _event(c, now, "invite_created", detail=f"{uses} uses, {note}".strip(", "))
        return token

    def resolve_peer(self, given: str) -> str:
        """The whole id of the one peer whose id starts with ``given`` (at least 8 of its 16 hex digits, as
        ``hivefold status`` shows them), or NotFound / InvalidArgument saying why not."""
        text = given.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,16}", text):
            raise InvalidArgument(f"{given!r} is not a peer id: give its 16 hex digits, or the first 8 or more, as "
                                  "`hivefold status` and the peer's log show them")
        rows = self._read("SELECT peer_id FROM peers WHERE substr(peer_id, 1, ?) = ? ORDER BY peer_id LIMIT 2",
                          (len(text), text))
        if not rows:
            raise NotFound(f"no peer {given!r} in this run; peer ids are the hex digits `hivefold status` and the "
                           "peer's log show")
        if len(rows) > 1:
            raise InvalidArgument(f"{given!r} starts more than one peer's id: give more of its 16 hex digits")
        return rows[0][0]

    def ban(self, peer_id: str, *, reason: str, now: float) -> int:
        """Ban ``peer_id``: its active leases are released at once. Returns how many."""
        with self._tx() as c:
            _known(c, peer_id)
            released = ban_in(c, peer_id, reason, now)
        self._peer_cache.pop(peer_id, None)
        return released

    def unban(self, peer_id: str, *, now: float) -> None:
        with self._tx() as c:
            _known(c, peer_id)
            c.execute("UPDATE peers SET banned = 0, ban_reason = NULL WHERE peer_id = ?", (peer_id,))
            _event(c, now, "peer_unbanned", peer_id=peer_id)
        self._peer_cache.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        hit = self._peer(peer_id)  # peers.py: cached for TOKEN_CACHE_S
        return bool(hit and hit[1])


def ban_in(c: Connection, peer_id: str, reason: str, now: float) -> int:
    """Inside a write transaction: ban a known peer and release its active leases; how many were released.
    The caller drops the peer from ``_peer_cache`` once the transaction has committed."""
    c.execute("UPDATE peers SET banned = 1, ban_reason = ? WHERE peer_id = ?", (reason, peer_id))
    active = c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ?",
                       (peer_id, LeaseState.ACTIVE.value)).fetchall()
    for row in active:
        _close_lease(c, _get_lease(c, row[0]), LeaseState.RELEASED, "peer banned", now)
    _event(c, now, "peer_banned", peer_id=peer_id, detail=reason)
    return len(active)


def redeem_invite(c: Connection, invite: str, now: float) -> str:
    """Inside a registration's transaction: use one use of ``invite``; its digest prefix, or PermissionDenied."""
    if not invite:
        raise PermissionDenied("this run is invite-only: ask its operator for an invite and start the peer with "
                               "--invite TOKEN")
    digest = invite_digest(invite)
    row = c.execute("SELECT uses_left, expires_at FROM invites WHERE token_sha256 = ?", (digest,)).fetchone()
    if row is None:
        raise PermissionDenied("unknown invite: check the token you were given (it starts with "
                               f"{INVITE_PREFIX!r}), or ask the operator for a new one")
    if row[1] < now:
        raise PermissionDenied("this invite has expired; ask the operator for a new one")
    if row[0] <= 0:
        raise PermissionDenied("this invite is used up; ask the operator for a new one")
    c.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE token_sha256 = ?", (digest,))
    return digest[:12]


def _known(c: Connection, peer_id: str) -> None:
    if c.execute("SELECT 1 FROM peers WHERE peer_id = ?", (peer_id,)).fetchone() is None:
        raise NotFound(f"no peer {peer_id!r} in this run; peer ids are the 16 hex digits the peer's log shows "
                       "(`hivefold status` shows their first 8)")
