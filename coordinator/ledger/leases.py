"""The work pool: a run's shards and their leases to peers (the results submitted under them: ``results.py``).

A shard is leased to one peer at a time, for a time sized to its work and the peer's throughput; a
lease that passes its deadline (extended only when the peer asks, against progress), or whose peer
goes silent, goes back to the pool.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import numpy as np

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from coordinator.ledger.backend import Connection
from coordinator.ledger.schema import (
    MAX_UNVERIFIED,
    CheckState,
    Lease,
    LeaseOutcome,
    LeaseState,
    ShardState,
    Verdict,
)
from coordinator.ledger.store import LedgerStore, _event, _meta, _set_meta
from hivefold.spec import ShardInfo

MAX_ACTIVE_LEASES = 3  # per peer: the work unit training, one fetched ahead, one whose result awaits its ack


class ShardLeases(LedgerStore):
    """Setting up a run's shards and leasing them (``LedgerStore.silent_seconds``: when a silent peer's leases
    expire)."""

    def init_run(self, *, run_id: str, spec_hash: str, shards: list[ShardInfo], seed: int, data_passes: int,
                 now: float) -> None:
        """Record a new run's shards (first pass in a seeded shuffled order). Refuses a second run."""
        with self._tx() as c:
            existing = c.execute("SELECT value FROM meta WHERE key = 'spec_hash'").fetchone()
            if existing is not None:
                if existing[0] != spec_hash:
                    raise FailedPrecondition(f"ledger already holds run {existing[0][:12]}; use a fresh workdir")
                return
            for k, v in (("run_id", run_id), ("spec_hash", spec_hash), ("seed", str(seed)), ("data_pass", "0"),
                         ("data_passes", str(data_passes)), ("global_step", "0"), ("created_at", repr(now))):
                c.execute("INSERT INTO meta VALUES (?, ?)", (k, v))
            order = _pass_order(len(shards), seed, 0)
            c.executemany(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?)",
                [(s.shard_id, s.sha256, s.byte_size, s.num_sequences, ShardState.PENDING.value, int(order[i]))
                 for i, s in enumerate(shards)],
            )
            _event(c, now, "run_created", detail=f"{len(shards)} shards")

    def lease_shard(self, peer_id: str, *, lease_seconds: float | Callable[[int], float], now: float,
                    held: list[str] = ()) -> LeaseOutcome:
        """Lease the next pending shard to ``peer_id``.

        ``held``: the leases the peer knows it holds. An active lease of the peer not among them is from an
        earlier run of the peer and is handed back to it instead of being stranded; otherwise a peer may hold
        up to ``MAX_ACTIVE_LEASES`` at once (one training, one fetched ahead, one awaiting its ack).
        """
        with self._tx() as c:
            _expire(c, now, self.silent_seconds)
            _not_banned(c, peer_id)  # here, not only at the token check: a ban from another process is cached a while
            active = [r[0] for r in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ? "
                                              "ORDER BY issued_at", (peer_id, LeaseState.ACTIVE.value))]
            orphans = [lease_id for lease_id in active if lease_id not in set(held)]
            # a callable sizes the lease by how many of the peer's leases it waits behind
            seconds = lease_seconds(len(active)) if callable(lease_seconds) else lease_seconds
            if orphans:
                c.execute("UPDATE leases SET deadline = ? WHERE lease_id = ?", (now + seconds, orphans[0]))
                return LeaseOutcome(_get_lease(c, orphans[0]))
            if len(active) >= MAX_ACTIVE_LEASES:
                return LeaseOutcome(None)
            unverified = c.execute("SELECT COUNT(*) FROM verifications WHERE peer_id = ? AND state IN (?, ?)",
                                   (peer_id, CheckState.AWAITING.value, CheckState.QUEUED.value)).fetchone()[0]
            if unverified >= MAX_UNVERIFIED:  # a cheater's free work is bounded by the keeper's pace, not its own
                return LeaseOutcome(None)
            meta = dict(c.execute("SELECT key, value FROM meta WHERE key IN ('sample_budget', 'data_pass', "
                                  "'data_passes')").fetchall())
            budget = int(meta.get("sample_budget", "0"))
            if budget:
                # Stop handing out work once what is done and what is out covers the budget; the run is
                # complete when the accepted work alone does (an expired lease's shard goes out again).
                done = c.execute("SELECT COALESCE(SUM(samples), 0) FROM results WHERE verdict = ?",
                                 (Verdict.ACCEPTED.value,)).fetchone()[0]
                if done >= budget:
                    _complete(c, now, f"token budget spent ({done} sequences trained)")
                    return LeaseOutcome(None, run_complete=True)
                out = c.execute("SELECT COALESCE(SUM(s.num_sequences), 0) FROM leases l JOIN shards s USING "
                                "(shard_id) WHERE l.state = ?", (LeaseState.ACTIVE.value,)).fetchone()[0]
                out += c.execute("SELECT COALESCE(SUM(samples), 0) FROM results WHERE verdict = ?",
                                 (Verdict.PENDING.value,)).fetchone()[0]  # done, unless its check fails
                if done + out >= budget:
                    return LeaseOutcome(None)
            data_pass = int(meta["data_pass"])
            row = _take_next_shard(c)
            if row is None:
                busy = c.execute("SELECT COUNT(*) FROM shards WHERE state = ?", (ShardState.LEASED.value,)).fetchone()
                checking = c.execute("SELECT COUNT(*) FROM results WHERE verdict = ? AND data_pass = ?",
                                     (Verdict.PENDING.value, data_pass)).fetchone()
                if busy[0] or checking[0]:
                    # every shard is out, or waits for its check (a failed one is trained again in this pass)
                    return LeaseOutcome(None)
                passes = int(meta["data_passes"])
                if passes and data_pass + 1 >= passes:
                    _complete(c, now, f"{passes} data passes done")
                    return LeaseOutcome(None, run_complete=True)
                data_pass = _start_next_pass(c, data_pass + 1, now)
                row = _take_next_shard(c)
            # the leases table is the record of every issue (no event row: hundreds a second on a busy run)
            lease_id = secrets.token_hex(12)
            c.execute("INSERT INTO leases (lease_id, shard_id, peer_id, data_pass, state, issued_at, deadline, "
                      "allotted_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (lease_id, row[0], peer_id, data_pass, LeaseState.ACTIVE.value, now, now + seconds, seconds))
            return LeaseOutcome(Lease(lease_id, row[0], peer_id, data_pass, LeaseState.ACTIVE, now + seconds, row[1],
                                      row[2], row[3]))

    def extend_lease(self, peer_id: str, lease_id: str, *, samples_done: int, seconds: float, max_life_s: float,
                     now: float) -> tuple[bool, float, str]:
        """A peer alive but slow asks for more time: granted against progress, never past ``max_life_s``.

        Progress is ``samples_done`` in this shard, higher than at the last request; a lease still queued
        on the peer (0 done) progresses with the work ahead of it (a lease issued before it still active,
        or a result since it was issued). Returns (granted, the deadline now, why).
        """
        with self._tx() as c:
            lease = _owned_lease(c, peer_id, lease_id, now, self.silent_seconds)
            if lease.state is not LeaseState.ACTIVE:
                return False, lease.deadline, f"lease {lease.state.value}"
            issued, progress = c.execute("SELECT issued_at, progress FROM leases WHERE lease_id = ?",
                                         (lease_id,)).fetchone()
            moving = samples_done > progress
            if not moving and samples_done == 0:
                # Queued on the peer (fetched ahead): it moves when the work ahead of it does: a lease issued
                # before it is still being trained, or a result came in since it was issued.
                ahead = c.execute("SELECT COUNT(*) FROM leases WHERE peer_id = ? AND state = ? AND issued_at < ?",
                                  (peer_id, LeaseState.ACTIVE.value, issued)).fetchone()[0]
                done = c.execute("SELECT COUNT(*) FROM results WHERE peer_id = ? AND submitted_at >= ?",
                                 (peer_id, issued)).fetchone()[0]
                moving = ahead + done > 0
            if not moving:
                return False, lease.deadline, f"no progress since the last extension ({progress} samples done)"
            if samples_done > lease.num_sequences:
                raise InvalidArgument(f"samples_done={samples_done} but the shard holds {lease.num_sequences}")
            deadline = min(max(lease.deadline, now + seconds), issued + max_life_s)
            if deadline <= lease.deadline:
                return False, lease.deadline, f"the lease reached its longest life ({max_life_s:.0f}s)"
            c.execute("UPDATE leases SET deadline = ?, progress = ?, extensions = extensions + 1 WHERE lease_id = ?",
                      (deadline, max(progress, samples_done), lease_id))
            return True, deadline, f"extended by {deadline - lease.deadline:.0f}s"

    def get_lease(self, lease_id: str) -> Lease:
        with self._snapshot() as c:
            return _get_lease(c, lease_id)

    def active_lease_for(self, peer_id: str, lease_id: str, *, now: float) -> Lease:
        """The lease, if it is active and held by ``peer_id``; raises otherwise (for FetchShard). A read: a
        lease past its deadline counts as expired whether or not a write has marked it so yet."""
        with self._snapshot() as c:
            lease = _get_lease(c, lease_id)
        if lease.peer_id != peer_id:
            raise PermissionDenied(f"lease {lease_id} belongs to another peer")
        state = LeaseState.EXPIRED if lease.state is LeaseState.ACTIVE and lease.deadline < now else lease.state
        if state is not LeaseState.ACTIVE:
            raise FailedPrecondition(f"lease {lease_id} is {state.value}; lease a new shard")
        return lease

    def release(self, peer_id: str, lease_id: str, *, reason: str, now: float) -> bool:
        with self._tx() as c:
            lease = _owned_lease(c, peer_id, lease_id, now, self.silent_seconds)
            if lease.state is not LeaseState.ACTIVE:
                return False
            _close_lease(c, lease, LeaseState.RELEASED, reason, now)
            return True

    def resume_leases(self, *, lease_seconds: float, now: float) -> int:
        """At the coordinator's start: every active lease gets a full lease from ``now`` (at least ``lease_seconds``).

        Its holder could not heartbeat while the coordinator was down. Without this, each lease whose deadline
        ran out during the outage expired on the first call after the restart, and its shard (first in the
        pass's order) went to the next peer that asked while the holder was still training it, whose result
        was then rejected. Returns how many leases were active.
        """
        with self._tx() as c:
            # a full lease again: the time it was given at issue (sized to its work and peer), at least lease_seconds
            active = c.execute("SELECT lease_id, deadline, allotted_s FROM leases WHERE state = ?",
                               (LeaseState.ACTIVE.value,)).fetchall()
            c.executemany("UPDATE leases SET deadline = ? WHERE lease_id = ?",
                          [(max(deadline, now + max(allotted, lease_seconds)), lease_id)
                           for lease_id, deadline, allotted in active])
            n = len(active)
            _set_meta(c, "leases_resumed_at", repr(now))  # nobody could be heard from before now
            if n:
                _event(c, now, "leases_resumed", detail=f"{n} active leases: {lease_seconds:.0f}s from the restart")
            return n

    def expire_leases(self, now: float) -> int:
        with self._tx() as c:
            return _expire(c, now, self.silent_seconds)

def _pass_order(n: int, seed: int, data_pass: int) -> np.ndarray:
    """Position of each shard in a pass's lease order: a fresh seeded shuffle per pass."""
    order = np.empty(n, dtype=np.int64)
    order[np.random.default_rng([seed, data_pass]).permutation(n)] = np.arange(n)
    return order


def _start_next_pass(c: Connection, data_pass: int, now: float) -> int:
    seed = int(_meta(c, "seed"))
    ids = [r[0] for r in c.execute("SELECT shard_id FROM shards ORDER BY shard_id")]
    order = _pass_order(len(ids), seed, data_pass)
    c.executemany("UPDATE shards SET state = ?, position = ? WHERE shard_id = ?",
                  [(ShardState.PENDING.value, int(order[i]), sid) for i, sid in enumerate(ids)])
    c.execute("UPDATE meta SET value = ? WHERE key = 'data_pass'", (str(data_pass),))
    _event(c, now, "data_pass_started", detail=str(data_pass))
    return data_pass


def _not_banned(c: Connection, peer_id: str) -> None:
    row = c.execute("SELECT banned FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is not None and row[0]:
        raise PermissionDenied(f"peer {peer_id} is banned from this run")


def _take_next_shard(c: Connection):
    """Mark the first pending shard of the pass leased; its (shard_id, sha256, byte_size, num_sequences) or None."""
    return c.execute("UPDATE shards SET state = ? WHERE shard_id = (SELECT shard_id FROM shards WHERE state = ? "
                     "ORDER BY position LIMIT 1) RETURNING shard_id, sha256, byte_size, num_sequences",
                     (ShardState.LEASED.value, ShardState.PENDING.value)).fetchone()


def _get_lease(c: Connection, lease_id: str) -> Lease:
    return _lease_of(c.execute("SELECT l.*, s.sha256, s.byte_size, s.num_sequences FROM leases l "
                               "JOIN shards s USING (shard_id) WHERE lease_id = ?", (lease_id,)).fetchone(), lease_id)


def _lease_of(row, lease_id: str) -> Lease:
    if row is None:
        raise NotFound(f"unknown lease id {lease_id!r}; lease a shard first")
    return Lease(row["lease_id"], row["shard_id"], row["peer_id"], row["data_pass"], LeaseState(row["state"]),
                 row["deadline"], row["sha256"], row["byte_size"], row["num_sequences"])


def _owned_lease(c: Connection, peer_id: str, lease_id: str, now: float, silent_seconds: float) -> Lease:
    """Expire overdue leases, then return ``lease_id`` if ``peer_id`` holds it (in any state)."""
    _expire(c, now, silent_seconds)
    lease = _get_lease(c, lease_id)
    if lease.peer_id != peer_id:
        raise PermissionDenied(f"lease {lease_id} belongs to another peer")
    return lease


def _close_lease(c: Connection, lease: Lease, state: LeaseState, reason: str, now: float) -> None:
    c.execute("UPDATE leases SET state = ?, closed_at = ?, close_reason = ? WHERE lease_id = ?",
              (state.value, now, reason, lease.lease_id))
    c.execute("UPDATE shards SET state = ? WHERE shard_id = ? AND state = ?",
              (ShardState.PENDING.value, lease.shard_id, ShardState.LEASED.value))
    _event(c, now, "lease_" + state.value, peer_id=lease.peer_id, shard_id=lease.shard_id, detail=reason)


def _expire(c: Connection, now: float, silent_seconds: float = math.inf) -> int:
    """Expire the active leases past their deadline, and those whose peer went silent (``ShardLeases``)."""
    overdue = [(r[0], "deadline passed") for r in c.execute(
        "SELECT lease_id FROM leases WHERE state = ? AND deadline < ?", (LeaseState.ACTIVE.value, now))]
    since = now - silent_seconds
    resumed = c.execute("SELECT value FROM meta WHERE key = 'leases_resumed_at'").fetchone()
    if math.isfinite(silent_seconds) and (resumed is None or float(resumed[0]) < since):
        why = f"its peer was silent for over {silent_seconds:.0f}s"
        overdue += [(r[0], why) for r in c.execute(
            "SELECT l.lease_id FROM leases l JOIN peers p USING (peer_id) WHERE l.state = ? AND l.deadline >= ? "
            "AND l.issued_at < ? AND p.last_seen < ?", (LeaseState.ACTIVE.value, now, since, since))]
    for lease_id, why in overdue:
        _close_lease(c, _get_lease(c, lease_id), LeaseState.EXPIRED, why, now)
    return len(overdue)


def _complete(c: Connection, now: float, why: str) -> None:
    """Mark the run complete (once): the status document and the dashboard say so, peers are told to finish."""
    if c.execute("SELECT 1 FROM meta WHERE key = 'completed_at'").fetchone() is None:
        _set_meta(c, "completed_at", repr(now))
        _set_meta(c, "completed_why", why)
        _event(c, now, "run_complete", detail=why)
