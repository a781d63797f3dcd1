"""Verified work: which results are checked before they earn credit, their proofs, and the verdicts.

Sampling is adaptive, as BOINC's: a peer with ``n`` consecutive valid results is checked with
probability ``1/n`` (every result of a new peer), kept between the operator's floor and ceiling; one
invalid result resets ``n``. A sampled result is *pending*: its shard counts as done, its credit is
held, and the peer uploads the proof its answer names (``receive_proof``). The keeper replays it
(``hivefold.proof``) and records the verdict (``record_verification``): valid releases the credit
with a signed receipt; invalid gives none, puts the shard back in the pool if its pass is still
running, and bans the peer at the operator's threshold. A proof not uploaded in time makes the result
invalid without counting against the peer (it may have crashed), but its streak starts over.

    result  pending_verification ──proof replayed, matches──▶ accepted  (credit + receipt)
                      │            ──contradicts, or no proof──▶ invalid (no credit; shard trained again)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NoReturn

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from coordinator.ledger.access import ban_in
from coordinator.ledger.schema import CheckState, ShardState, Verdict
from coordinator.ledger.store import LedgerStore, _event
from hivefold.proof import proof_bounds

AWAITING, QUEUED, VALID, INVALID = (s.value for s in CheckState)
CHUNK_GRACE_S = 60.0  # each proof chunk received keeps the deadline at least this far ahead


@dataclass
class VerifyPolicy:
    """The operator's settings (``--verify-floor``, ``--verify-ceiling``, ``--proof-segments``...)."""

    floor: float = 0.05  # the least share of a trusted peer's results still checked
    ceiling: float = 1.0  # the share of a new (or just caught) peer's results checked
    segments: int = 4  # proof-of-training segments per shard; 0 turns verification off
    proof_seconds: float = 120.0  # how long a peer has to upload a proof
    rng: random.Random = field(default_factory=random.SystemRandom)

    @property
    def enabled(self) -> bool:
        return self.segments > 0 and self.ceiling > 0

    def probability(self, valid_streak: int) -> float:
        return min(self.ceiling, max(self.floor, 1.0 / max(1, valid_streak)))

    def choose(self, n_losses: int, digests: list[bytes], state_changes: list[int]) -> tuple[int, int, str]:
        """``(segment, segments, why not)``: the segment to check (1-based; in proportion to its micro-batches,
        so a peer can neither steer the check nor dilute it by claiming state changes) and the run's segment
        count, with why the result cannot be checked ('' if it can)."""
        bounds = proof_bounds(n_losses, self.segments, state_changes)
        if not bounds or len(digests) != 3 * len(bounds):
            return 1, self.segments, "the result carries no commitments to its training states (proof_digests)"
        segment = self.rng.choices(range(1, len(bounds) + 1), weights=[b - a for a, b in bounds])[0]
        return segment, self.segments, ""


@dataclass(frozen=True)
class ProofTask:
    """A proof waiting for the keeper."""

    lease_id: str
    peer_id: str
    shard_id: int
    segment: int
    segments: int
    losses: list[tuple[float, int]]
    digests: list[bytes]  # the result's commitments to the states its proof must show (hivefold.proof)
    state_changes: list[int]  # where the swarm replaced the peer's parameters mid-shard
    proof: bytes
    train_seconds: float
    device_kind: str = ""  # the device the peer registered with ("cuda": it trained in bf16)


class Verifications(LedgerStore):
    def sample_for_verification(self, c, peer_id: str, lease_id: str, *, shard_id: int, data_pass: int,
                                losses: list[tuple[float, int]], digests: list[bytes], state_changes: list[int],
                                credit: float, compute_seconds: float, policy: VerifyPolicy | None,
                                now: float) -> tuple[int, str]:
        """Inside ``submit``'s transaction, before the result is recorded: ``(0, '')`` if not checked, else the
        segment the result must prove and, when it cannot be checked at all, why (it is then invalid at once,
        without counting against the peer; its streak starts over)."""
        if policy is None or not policy.enabled:
            return 0, ""
        streak = c.execute("SELECT valid_streak FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()[0]
        if policy.rng.random() >= policy.probability(streak):
            return 0, ""
        segment, segments, why = policy.choose(len(losses), digests, state_changes)
        c.execute("INSERT INTO verifications (lease_id, peer_id, shard_id, data_pass, segment, segments, state, "
                  "held_credit, train_seconds, requested_at, proof_deadline, digests, state_changes, detail) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (lease_id, peer_id, shard_id, data_pass, segment, segments, INVALID if why else AWAITING, credit,
                   compute_seconds, now, now + policy.proof_seconds, b"".join(digests),
                   ",".join(map(str, state_changes)), why))
        if why:
            c.execute("UPDATE peers SET valid_streak = 0 WHERE peer_id = ?", (peer_id,))
            _event(c, now, "result_invalid", peer_id=peer_id, shard_id=shard_id, detail=f"{lease_id}: {why}"[:300])
        return segment, why

    def proof_wanted(self, lease_id: str) -> int:
        """The segment whose proof a pending result still waits for; 0 if none (received, or not sampled)."""
        rows = self._read("SELECT segment FROM verifications WHERE lease_id = ? AND state = ?", (lease_id, AWAITING))
        return rows[0][0] if rows else 0

    def receive_proof(self, peer_id: str, lease_id: str, *, segment: int, offset: int, total: int, data: bytes,
                      max_bytes: int, now: float) -> tuple[int, bool]:
        """Append one chunk of a proof; ``(bytes received, complete)``. Chunks come in order from offset 0."""
        if not 0 < total <= max_bytes:
            raise InvalidArgument(f"a proof is 1 to {max_bytes} bytes for this run's model, not {total}")
        with self._tx() as c:
            row = c.execute("SELECT peer_id, segment, state, proof_deadline, proof_bytes FROM verifications "
                            "WHERE lease_id = ?", (lease_id,)).fetchone()
            if row is None:
                _no_proof_asked(c, peer_id, lease_id)
            if row[0] != peer_id:
                raise PermissionDenied(f"lease {lease_id} belongs to another peer")
            have = row[4]
            if segment == row[1] and offset + len(data) <= have and row[2] in (AWAITING, QUEUED):
                return have, row[2] == QUEUED  # a chunk sent again (its answer was lost): already in
            if row[2] != AWAITING:
                raise FailedPrecondition(f"the proof for lease {lease_id} is no longer awaited ({row[2]})")
            if now > row[3]:
                raise FailedPrecondition(f"the proof for lease {lease_id} came too late (due {now - row[3]:.0f}s ago)")
            if segment != row[1]:
                raise InvalidArgument(f"segment {segment} was not asked for; lease {lease_id} must prove segment "
                                      f"{row[1]}")
            if offset != have:
                raise InvalidArgument(f"proof chunk at offset {offset}, but {have} bytes are in: send chunks in order")
            if offset + len(data) > total:
                raise InvalidArgument(f"the chunk runs past the proof's total_size {total}")
            if offset == 0:
                c.execute("DELETE FROM proof_chunks WHERE lease_id = ?", (lease_id,))
            c.execute("INSERT INTO proof_chunks VALUES (?, ?, ?)", (lease_id, offset, data))
            have += len(data)
            complete = have == total
            # a proof still arriving keeps its deadline a minute ahead: a slow uplink is not a missing proof
            c.execute("UPDATE verifications SET proof_bytes = ?, state = ?, proof_deadline = ? WHERE lease_id = ?",
                      (have, QUEUED if complete else AWAITING, max(row[3], now + CHUNK_GRACE_S), lease_id))
            return have, complete

    def next_proof(self) -> ProofTask | None:
        """The oldest proof waiting for the keeper, if any."""
        rows = self._read("SELECT v.lease_id, v.peer_id, v.shard_id, v.segment, v.segments, v.train_seconds, "
                          "v.digests, v.state_changes, COALESCE(p.device_kind, '') FROM verifications v "
                          "LEFT JOIN peers p ON p.peer_id = v.peer_id WHERE v.state = ? ORDER BY v.requested_at "
                          "LIMIT 1", (QUEUED,))
        if not rows:
            return None
        r = rows[0]
        losses = [(x[0], x[1]) for x in self._read("SELECT loss, epoch FROM losses WHERE lease_id = ? ORDER BY "
                                                   "idx", (r[0],))]
        proof = b"".join(bytes(x[0]) for x in self._read("SELECT data FROM proof_chunks WHERE lease_id = ? "
                                                         "ORDER BY byte_offset", (r[0],)))
        packed = bytes(r[6])
        digests = [packed[i:i + 32] for i in range(0, len(packed), 32)]
        changes = [int(x) for x in r[7].split(",") if x]
        return ProofTask(r[0], r[1], r[2], r[3], r[4], losses, digests, changes, proof, r[5], r[8])

    def record_verification(self, lease_id: str, *, valid: bool, detail: str, now: float, score: float | None = None,
                            keeper_seconds: float | None = None, ban_after: int = 0, strike: bool = True,
                            sign_receipt=None) -> bool:
        """The keeper's verdict on a pending result; True if it banned the peer.

        ``sign_receipt(peer_id=, lease_id=, shard_id=, samples=, points=, accepted_at=)`` signs a valid
        result's receipt; ``strike=False`` (no proof came) makes the result invalid without counting
        against the peer beyond resetting its streak.
        """
        banned = False
        with self._tx() as c:
            v = c.execute("SELECT v.peer_id, v.shard_id, v.data_pass, v.held_credit, v.state, r.samples FROM "
                          "verifications v JOIN results r USING (lease_id) WHERE v.lease_id = ?",
                          (lease_id,)).fetchone()
            if v is None or v[4] in (VALID, INVALID):
                return False
            peer_id, shard_id, _, credit, _, samples = v
            c.execute("UPDATE verifications SET checked_at = ?, keeper_seconds = ?, score = ? WHERE lease_id = ?",
                      (now, keeper_seconds, score, lease_id))
            if valid:
                c.execute("UPDATE verifications SET state = ?, detail = ? WHERE lease_id = ?",
                          (VALID, detail[:300], lease_id))
                c.execute("DELETE FROM proof_chunks WHERE lease_id = ?", (lease_id,))
                receipt = sign_receipt(peer_id=peer_id, lease_id=lease_id, shard_id=shard_id, samples=samples,
                                       points=credit, accepted_at=now) if sign_receipt else ""
                c.execute("UPDATE results SET verdict = ?, credit = ?, detail = ?, receipt = ? WHERE lease_id = ?",
                          (Verdict.ACCEPTED.value, credit, "accepted, verified", receipt, lease_id))
                c.execute("UPDATE peers SET valid_streak = valid_streak + 1, results_valid = results_valid + 1 "
                          "WHERE peer_id = ?", (peer_id,))
                return False
            _invalidate(c, lease_id, detail, now, strike=strike)
            row = c.execute("SELECT results_invalid, banned FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            if strike and ban_after and row[0] >= ban_after and not row[1]:
                ban_in(c, peer_id, f"invalid work: {row[0]} results failed verification ({detail})"[:300], now)
                banned = True
                # the rest of its unchecked results earn nothing either; their shards go back to the pool
                for (other,) in c.execute("SELECT lease_id FROM verifications WHERE peer_id = ? AND state IN (?, ?)",
                                          (peer_id, AWAITING, QUEUED)).fetchall():
                    _invalidate(c, other, "the peer was banned before this result was checked", now)
        if banned:
            self._peer_cache.pop(peer_id, None)
        return banned

    def expire_proofs(self, now: float, online_seconds: float = math.inf) -> list[str]:
        """Results whose proof did not come in time, or whose peer went offline before sending any of it, become
        invalid (no strike: it may have crashed); their lease ids."""
        late = [r[0] for r in self._read(
            "SELECT v.lease_id FROM verifications v JOIN peers p USING (peer_id) WHERE v.state = ? AND "
            "(v.proof_deadline < ? OR (v.proof_bytes = 0 AND p.last_seen < ? AND p.last_seen < v.requested_at))",
            (AWAITING, now, now - online_seconds))]
        for lease_id in late:
            self.record_verification(lease_id, valid=False, detail="no proof came (the peer went away, or took too "
                                     "long)", now=now, strike=False)
        return late

    def decline_proof(self, peer_id: str, lease_id: str, *, why: str, now: float) -> None:
        """The peer has no proof to send (it restarted since it trained the shard): invalid at once, no strike."""
        rows = self._read("SELECT peer_id, state FROM verifications WHERE lease_id = ?", (lease_id,))
        if not rows:
            with self._tx() as c:
                _no_proof_asked(c, peer_id, lease_id)
        if rows[0][0] != peer_id:
            raise PermissionDenied(f"lease {lease_id} belongs to another peer")
        if rows[0][1] == AWAITING:
            self.record_verification(lease_id, valid=False, detail=f"the peer has no proof: {why}"[:200], now=now,
                                     strike=False)

    def verification_summary(self) -> dict:
        with self._snapshot() as c:
            return verification_summary(c)


def _invalidate(c, lease_id: str, detail: str, now: float, *, strike: bool = False) -> None:
    """Inside a write transaction: a pending result earns nothing, and its shard is trained again if its pass runs."""
    peer_id, shard_id, data_pass = c.execute("SELECT peer_id, shard_id, data_pass FROM verifications "
                                             "WHERE lease_id = ?", (lease_id,)).fetchone()
    c.execute("UPDATE verifications SET state = ?, detail = ? WHERE lease_id = ?", (INVALID, detail[:300], lease_id))
    c.execute("DELETE FROM proof_chunks WHERE lease_id = ?", (lease_id,))
    c.execute("UPDATE results SET verdict = ?, credit = 0, detail = ? WHERE lease_id = ?",
              (Verdict.INVALID.value, f"invalid: {detail}"[:300], lease_id))
    current = c.execute("SELECT value FROM meta WHERE key = 'data_pass'").fetchone()
    if current is not None and int(current[0]) == data_pass:  # trained again by someone else in this pass
        c.execute("UPDATE shards SET state = ? WHERE shard_id = ? AND state = ?",
                  (ShardState.PENDING.value, shard_id, ShardState.DONE.value))
    c.execute("UPDATE peers SET valid_streak = 0, results_invalid = results_invalid + ? WHERE peer_id = ?",
              (1 if strike else 0, peer_id))
    _event(c, now, "result_invalid", peer_id=peer_id, shard_id=shard_id, detail=f"{lease_id}: {detail}"[:300])


def verification_summary(c) -> dict:
    """Checks by state, the share of results checked, and the keeper's time per check against the training
    time of the shard it checked (the status document's ``verification``)."""
    counts = {s: 0 for s in (AWAITING, QUEUED, VALID, INVALID)}
    for state, n in c.execute("SELECT state, COUNT(*) FROM verifications GROUP BY state").fetchall():
        counts[state] = n
    row = c.execute("SELECT COALESCE(SUM(keeper_seconds), 0), COALESCE(SUM(train_seconds), 0), COUNT(*) "
                    "FROM verifications WHERE keeper_seconds IS NOT NULL").fetchone()
    results = c.execute("SELECT COUNT(*) FROM results WHERE verdict IN (?, ?, ?)",
                        (Verdict.ACCEPTED.value, Verdict.PENDING.value, Verdict.INVALID.value)).fetchone()[0]
    checked = sum(counts.values())
    return {**counts, "checked": checked, "results": results,
            "share_checked": round(checked / results, 4) if results else 0.0,
            "keeper_seconds_per_check": round(row[0] / row[2], 4) if row[2] else None,
            "train_seconds_per_check": round(row[1] / row[2], 4) if row[2] else None}


def reputation(valid: int, invalid: int) -> float:
    """1 for a peer never caught; each invalid result weighs four valid ones."""
    return round((valid + 1) / (valid + 1 + 4 * invalid), 3)


def _no_proof_asked(c, peer_id: str, lease_id: str) -> NoReturn:
    """Raise for a proof of a lease without a check: another peer's lease is not this peer's business."""
    owner = c.execute("SELECT peer_id FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
    if owner is not None and owner[0] != peer_id:
        raise PermissionDenied(f"lease {lease_id} belongs to another peer")
    raise NotFound(f"no proof was asked for lease {lease_id}")
