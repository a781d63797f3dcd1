"""Verified work in the ledger (coordinator/ledger/verification.py), on every backend: adaptive sampling, held
credit, proofs uploaded in chunks, verdicts, requeued shards and bans."""

import random

import pytest

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from coordinator.ledger import ShardState, Verdict, VerifyPolicy
from tests.unit.ledger_cases import SHARDS, lease

DIGESTS = [bytes([i]) * 32 for i in range(12)]  # 4 segments of 8 micro-batches, 3 commitments each


def always(**kw):
    return VerifyPolicy(floor=1.0, ceiling=1.0, segments=4, rng=random.Random(0), **kw)


def submit(led, peer, lease_obj, policy, now=2.0):
    return led.submit(peer, lease_obj.lease_id, samples=8, losses=[(2.0, 0)] * 8, compute_seconds=1.0,
                      credit_per_sample=0.5, now=now, verify=policy, digests=DIGESTS,
                      sign_receipt=lambda **f: f"receipt {f['lease_id']} {f['points']}")


def peer(led, name):
    return next(p for p in led.status(now=3.0, online_seconds=1e9, seq_len=16)["peers"] if p["peer_id"] == name)


def test_the_sampling_rate_follows_the_streak_between_floor_and_ceiling():
    policy = VerifyPolicy(floor=0.05, ceiling=1.0)
    assert [policy.probability(n) for n in (0, 1, 2, 10, 100)] == [1.0, 1.0, 0.5, 0.1, 0.05]
    assert VerifyPolicy(floor=0.0, ceiling=0.3).probability(0) == 0.3
    assert not VerifyPolicy(ceiling=0.0).enabled and not VerifyPolicy(segments=0).enabled


def test_the_segment_is_chosen_in_proportion_to_its_micro_batches_and_state_changes_cut_segments():
    """Found in the time-to-loss benchmark: 3 of 97 honest results were refused as "unverifiable" (an outer step
    had landed inside the checked segment), and each reset the peer's streak. Changes now cut segments instead."""
    policy = VerifyPolicy(segments=4, rng=random.Random(1))
    assert {policy.choose(8, DIGESTS, [])[0] for _ in range(60)} == {1, 2, 3, 4}  # the last one too
    cut = [bytes([i]) * 32 for i in range(15)]  # a change at 3 cuts [2, 4) into [2, 3) and [3, 4): 5 segments
    picks = [policy.choose(8, cut, [3]) for _ in range(5000)]
    assert all(why == "" and segments == 4 for _, segments, why in picks)
    share = {k: sum(seg == k for seg, _, _ in picks) / len(picks) for k in range(1, 6)}
    assert abs(share[2] - 1 / 8) < 0.025 and abs(share[3] - 1 / 8) < 0.025 and abs(share[1] - 2 / 8) < 0.03
    assert "no commitments" in policy.choose(8, DIGESTS, [3])[2]  # 12 commitments do not fit 5 segments
    assert "no commitments" in policy.choose(8, [], [])[2] and "no commitments" in policy.choose(0, DIGESTS, [])[2]
    assert "no commitments" in policy.choose(8, DIGESTS[:9], [])[2]  # the old layout (2 per segment + 1)


def test_a_result_that_cannot_be_checked_earns_nothing_at_once_without_a_strike(ledger):
    work = lease(ledger, "a")
    out = ledger.submit("a", work.lease_id, samples=8, losses=[(2.0, 0)] * 8, compute_seconds=1.0,
                        credit_per_sample=0.5, now=2.0, verify=always(), digests=[])
    assert out.verdict is Verdict.INVALID and out.credit == 0 and "no commitments" in out.detail
    assert ledger.proof_wanted(work.lease_id) == 0 and ledger.shard_counts()["pending"] == len(SHARDS)
    a = peer(ledger, "a")
    assert a["results_invalid"] == 0 and not ledger.is_banned("a")


def test_a_sampled_result_holds_its_credit_until_a_valid_proof(ledger):
    work = lease(ledger, "a")
    out = submit(ledger, "a", work, always())
    assert out.verdict is Verdict.PENDING and out.credit == 0 and out.receipt == ""
    assert ledger.shard_counts()[ShardState.DONE.value] == 1  # nobody else trains it meanwhile
    segment = ledger.proof_wanted(work.lease_id)
    assert 1 <= segment <= 4
    assert submit(ledger, "a", work, always()).verdict is Verdict.PENDING  # a repeat: the same answer
    proof = bytes(range(256)) * 10
    assert ledger.receive_proof("a", work.lease_id, segment=segment, offset=0, total=len(proof), data=proof[:1000],
                                max_bytes=10_000, now=3.0) == (1000, False)
    assert ledger.next_proof() is None  # not complete yet
    assert ledger.receive_proof("a", work.lease_id, segment=segment, offset=0, total=len(proof), data=proof[:1000],
                                max_bytes=10_000, now=3.0) == (1000, False)  # sent again (a lost answer): no-op
    assert ledger.receive_proof("a", work.lease_id, segment=segment, offset=1000, total=len(proof),
                                data=proof[1000:], max_bytes=10_000, now=3.0) == (len(proof), True)
    assert ledger.receive_proof("a", work.lease_id, segment=segment, offset=1000, total=len(proof),
                                data=proof[1000:], max_bytes=10_000, now=3.0) == (len(proof), True)
    assert ledger.proof_wanted(work.lease_id) == 0
    task = ledger.next_proof()
    assert task.proof == proof and task.digests == DIGESTS and task.segment == segment and len(task.losses) == 8
    assert task.state_changes == [] and task.segments == 4
    assert not ledger.record_verification(work.lease_id, valid=True, detail="ok", now=4.0, score=0.01,
                                          keeper_seconds=0.2, sign_receipt=lambda **f: f"signed {f['points']:.1f}")
    final = submit(ledger, "a", work, always())
    assert final.verdict is Verdict.ACCEPTED and final.credit == pytest.approx(4.0) and final.receipt == "signed 4.0"
    a = peer(ledger, "a")
    assert (a["results_valid"], a["results_invalid"], a["valid_streak"]) == (1, 0, 1)
    assert ledger.next_proof() is None
    summary = ledger.verification_summary()
    assert summary["valid"] == 1 and summary["keeper_seconds_per_check"] == pytest.approx(0.2)


def test_proof_chunks_are_checked(ledger):
    work = lease(ledger, "a")
    submit(ledger, "a", work, always())
    segment = ledger.proof_wanted(work.lease_id)
    kw = dict(segment=segment, offset=0, total=100, data=b"x" * 10, max_bytes=1000, now=3.0)
    with pytest.raises(PermissionDenied):
        ledger.receive_proof("b", work.lease_id, **kw)
    with pytest.raises(NotFound):
        ledger.receive_proof("a", "no-such-lease", **kw)
    with pytest.raises(InvalidArgument, match="1 to 1000 bytes"):
        ledger.receive_proof("a", work.lease_id, **{**kw, "total": 5000})
    with pytest.raises(InvalidArgument, match="was not asked"):
        ledger.receive_proof("a", work.lease_id, **{**kw, "segment": segment % 4 + 1})
    with pytest.raises(InvalidArgument, match="in order"):
        ledger.receive_proof("a", work.lease_id, **{**kw, "offset": 50})
    with pytest.raises(InvalidArgument, match="past"):
        ledger.receive_proof("a", work.lease_id, **{**kw, "data": b"x" * 101})
    with pytest.raises(FailedPrecondition, match="too late"):
        ledger.receive_proof("a", work.lease_id, **{**kw, "now": 1e6})


def test_an_invalid_result_earns_nothing_requeues_its_shard_and_bans_at_the_threshold(ledger):
    policy = always()
    for i in range(2):
        work = lease(ledger, "b", now=1.0 + i)
        assert submit(ledger, "b", work, policy, now=2.0 + i).verdict is Verdict.PENDING
        banned = ledger.record_verification(work.lease_id, valid=False, detail="micro-batch 3: reported 2.0, "
                                            "replayed 5.5", now=5.0 + i, ban_after=2)
        assert banned == (i == 1)
        final = submit(ledger, "b", work, policy) if i == 0 else None
        if final is not None:
            assert final.verdict is Verdict.INVALID and final.credit == 0 and "replayed 5.5" in final.detail
        assert ledger.shard_counts()["pending"] >= 1  # the shard went back to the pool, to be trained again
    b = peer(ledger, "b")
    assert b["results_invalid"] == 2 and b["valid_streak"] == 0 and ledger.is_banned("b")
    assert b["ban_reason"].startswith("invalid work: 2 results failed verification")
    assert b["credit"] == 0 and b["reputation"] < 0.5


def test_a_missing_proof_makes_the_result_invalid_without_a_strike(ledger):
    work = lease(ledger, "a")
    submit(ledger, "a", work, always(proof_seconds=10.0))
    assert ledger.expire_proofs(now=5.0) == []
    assert ledger.expire_proofs(now=30.0) == [work.lease_id]
    a = peer(ledger, "a")
    assert a["results_invalid"] == 0 and not ledger.is_banned("a")
    assert submit(ledger, "a", work, always()).verdict is Verdict.INVALID


def test_unsampled_results_are_credited_at_once(ledger):
    work = lease(ledger, "a")
    out = submit(ledger, "a", work, VerifyPolicy(floor=0.0, ceiling=0.0))
    assert out.verdict is Verdict.ACCEPTED and out.credit > 0 and out.receipt.startswith("receipt")
    assert ledger.proof_wanted(work.lease_id) == 0


def test_a_peer_with_too_many_unchecked_results_waits_and_a_ban_voids_the_rest(ledger):
    """A cheater's free work is bounded by the keeper's pace: at MAX_UNVERIFIED unchecked results no new lease."""
    from coordinator.ledger.schema import MAX_UNVERIFIED

    works = []
    for i in range(MAX_UNVERIFIED):
        works.append(lease(ledger, "b", now=1.0 + i))
        assert submit(ledger, "b", works[-1], always(), now=1.5 + i).verdict is Verdict.PENDING
    assert ledger.lease_shard("b", lease_seconds=60.0, now=10.0).lease is None
    for w in works[:2]:
        ledger.record_verification(w.lease_id, valid=False, detail="forged", now=11.0, ban_after=2)
    assert ledger.is_banned("b")
    for w in works[2:]:  # never checked, but voided by the ban: no proof is awaited, no credit
        assert ledger.proof_wanted(w.lease_id) == 0
    b = peer(ledger, "b")
    assert b["results_invalid"] == 2 and b["credit"] == 0
    assert ledger.verification_summary()["invalid"] == MAX_UNVERIFIED


def test_a_pass_ends_only_once_its_checks_are_done(ledger):
    works = []
    for i, name in enumerate("aaab"):
        works.append(lease(ledger, name, now=1.0 + i))
        assert submit(ledger, name, works[-1], always(), now=1.5 + i).verdict is Verdict.PENDING
    outcome = ledger.lease_shard("b", lease_seconds=60.0, now=5.0)
    assert outcome.lease is None and not outcome.run_complete  # the pass waits: a failed check is trained again
    assert ledger.status(now=5.0, online_seconds=1e9, seq_len=16)["data_pass"] == 0
    ledger.record_verification(works[0].lease_id, valid=False, detail="forged", now=6.0)
    again = ledger.lease_shard("b", lease_seconds=60.0, now=7.0).lease
    assert again.shard_id == works[0].shard_id and again.data_pass == 0  # trained again in the same pass


def test_a_proof_that_will_not_come_is_not_waited_for(ledger):
    mine, theirs = lease(ledger, "a"), lease(ledger, "b")
    for w in (mine, theirs):
        submit(ledger, w.peer_id, w, always())
    ledger.heartbeat("b", epoch=0, samples=0, recent_loss=None, samples_per_second=0.0, now=35.0,
                     utilization=0.0, micro_batch=4)
    # a went silent before its result was sampled (it crashed): no strike, and the shard goes out again
    assert ledger.expire_proofs(now=40.0, online_seconds=30.0) == [mine.lease_id]
    ledger.decline_proof("b", theirs.lease_id, why="it restarted", now=41.0)  # b restarted and said so
    with pytest.raises(PermissionDenied):
        ledger.decline_proof("a", theirs.lease_id, why="?", now=41.0)
    for name, w in (("a", mine), ("b", theirs)):
        assert submit(ledger, name, w, always()).verdict is Verdict.INVALID
        assert peer(ledger, name)["results_invalid"] == 0
