"""The results peers submit under their leases: accepted once per shard and data pass, idempotently by lease id,
credited (or held for a check, ``verification.py``), and the run's budget and shard counts they move."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from coordinator.credit import quick_return_points
from coordinator.errors import InvalidArgument, PermissionDenied
from coordinator.ledger.leases import ShardLeases, _expire, _lease_of
from coordinator.ledger.progress import _raise_global_step
from coordinator.ledger.schema import LeaseState, ShardState, SubmitOutcome, Verdict
from coordinator.ledger.store import _event, _set_meta

if TYPE_CHECKING:
    from coordinator.ledger.verification import VerifyPolicy


class ShardResults(ShardLeases):
    """Recording results, and what they count towards."""

    def submit(self, peer_id: str, lease_id: str, *, samples: int, losses: list[tuple[float, int]],
               compute_seconds: float, credit_per_sample: float, now: float, qrb_k: float = 0.0,
               qrb_deadline_s: float = 0.0, sign_receipt: Callable[..., str] | None = None,
               verify: VerifyPolicy | None = None, digests: list[bytes] = (),
               state_changes: list[int] = ()) -> SubmitOutcome:
        """Record a result. Idempotent: a second submission of a lease returns the first outcome.

        Accepted results earn ``samples × credit_per_sample`` points, times the quick-return bonus
        (``coordinator.credit``) when ``qrb_k`` > 0; ``sign_receipt(**fields)`` signs the receipt, which
        is stored with the result in the same transaction. ``verify`` may sample the result for a check
        (``verification.py``): it is then pending, with its credit held and no receipt yet.
        """
        with self._tx() as c:
            _expire(c, now, self.silent_seconds)
            row = c.execute(
                "SELECT l.*, s.sha256, s.byte_size, s.num_sequences, s.state AS shard_state, r.verdict, r.credit, "
                "r.detail, r.receipt, (SELECT value FROM meta WHERE key = 'data_pass') AS current_pass, "
                "(SELECT banned FROM peers p WHERE p.peer_id = l.peer_id) AS banned FROM leases l "
                "JOIN shards s USING (shard_id) LEFT JOIN results r USING (lease_id) WHERE l.lease_id = ?",
                (lease_id,)).fetchone()
            lease = _lease_of(row, lease_id)
            if lease.peer_id != peer_id:
                raise PermissionDenied(f"lease {lease_id} belongs to another peer")
            if row["banned"]:
                raise PermissionDenied(f"peer {peer_id} is banned from this run; its results earn nothing")
            if row["verdict"] is not None:  # submitted before: the first answer again
                return SubmitOutcome(Verdict(row["verdict"]), row["credit"], row["detail"], row["receipt"])
            if samples != lease.num_sequences:
                raise InvalidArgument(f"samples={samples} but shard {lease.shard_id} holds {lease.num_sequences} "
                                      "sequences; submit only whole shards and release unfinished ones")
            late_but_free = (lease.state is not LeaseState.ACTIVE and lease.data_pass == int(row["current_pass"])
                             and row["shard_state"] == ShardState.PENDING.value)
            receipt = ""
            if lease.state is LeaseState.ACTIVE or late_but_free:
                issued_at, allotted = row["issued_at"], row["allotted_s"]
                verdict = Verdict.ACCEPTED
                # the deadline the lease was given at issue (sized to the work and this peer), else the default
                credit = quick_return_points(samples * credit_per_sample, deadline_s=allotted or qrb_deadline_s,
                                             elapsed_s=now - issued_at, k=qrb_k)
                detail = "accepted" if lease.state is LeaseState.ACTIVE else "accepted after lease expiry"
                segment, unverifiable = self.sample_for_verification(
                    c, peer_id, lease_id, shard_id=lease.shard_id, data_pass=lease.data_pass, losses=losses,
                    digests=list(digests), state_changes=list(state_changes), credit=credit,
                    compute_seconds=compute_seconds, policy=verify, now=now)
                if unverifiable:  # no credit; the shard is trained again
                    verdict, credit, detail = Verdict.INVALID, 0.0, f"invalid: {unverifiable}"
                elif segment:
                    verdict, credit = Verdict.PENDING, 0.0
                    detail = "pending verification: the shard counts, its credit waits for the keeper's check"
                elif sign_receipt is not None:
                    receipt = sign_receipt(peer_id=peer_id, lease_id=lease_id, shard_id=lease.shard_id,
                                           samples=samples, points=credit, accepted_at=now)
                if lease.state is LeaseState.ACTIVE:
                    c.execute("UPDATE leases SET state = ?, closed_at = ?, close_reason = 'result' "
                              "WHERE lease_id = ?", (LeaseState.COMPLETED.value, now, lease_id))
                else:
                    c.execute("UPDATE leases SET state = ?, close_reason = 'late result' WHERE lease_id = ?",
                              (LeaseState.COMPLETED.value, lease_id))
                c.execute("UPDATE shards SET state = ? WHERE shard_id = ?",
                          ((ShardState.PENDING if unverifiable else ShardState.DONE).value, lease.shard_id))
            else:
                verdict, credit = Verdict.REJECTED_LATE, 0.0
                detail = f"lease {lease.state.value} and shard {lease.shard_id} was reassigned"
            c.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (lease_id, lease.shard_id, peer_id, lease.data_pass, verdict.value, samples, compute_seconds,
                       credit, now, detail, receipt))
            c.executemany("INSERT INTO losses VALUES (?, ?, ?, ?)",
                          [(lease_id, i, epoch, loss) for i, (loss, epoch) in enumerate(losses)])
            if losses:
                _raise_global_step(c, max(epoch for _, epoch in losses))
            if verdict in (Verdict.REJECTED_LATE,):  # the results table (and verifications) record the others
                _event(c, now, "result_" + verdict.value, peer_id=peer_id, shard_id=lease.shard_id, detail=lease_id)
            return SubmitOutcome(verdict, credit, detail, receipt)

    def set_sample_budget(self, sequences: int) -> None:
        """The operator's budget (``--token-budget`` in sequences; 0 = none), written at every start: it may change."""
        with self._tx() as c:
            _set_meta(c, "sample_budget", str(max(0, sequences)))
            if sequences and c.execute("SELECT value FROM meta WHERE key = 'completed_at'").fetchone():
                done = c.execute("SELECT COALESCE(SUM(samples), 0) FROM results WHERE verdict = 'accepted'"
                                 ).fetchone()[0]
                if done < sequences:  # a raised budget reopens a run that had spent the old one
                    c.execute("DELETE FROM meta WHERE key IN ('completed_at', 'completed_why')")

    def shard_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in ShardState}
        for row in self._read("SELECT state, COUNT(*) FROM shards GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def accepted_results_per_shard(self, data_pass: int) -> dict[int, int]:
        rows = self._read("SELECT shard_id, COUNT(*) FROM results WHERE verdict = ? AND data_pass = ? "
                          "GROUP BY shard_id", (Verdict.ACCEPTED.value, data_pass))
        return {r[0]: r[1] for r in rows}
