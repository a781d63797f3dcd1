"""The ledger contract, run against SQLite ``:memory:``, an SQLite file and a real PostgreSQL server."""

import threading

import pytest

from coordinator import ledger as ledger_module
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from coordinator.ledger import LeaseState, Ledger, ShardState, Verdict
from coordinator.ledger import schema as ledger_schema
from hivefold.spec import ShardInfo
from tests.unit.ledger_cases import LEASE_S, SHARDS, lease, location, submit


def test_schema_is_versioned_and_pragmas_apply(ledger):
    assert ledger.schema_version() == len(ledger_module.MIGRATIONS) == 11
    if ledger.backend == "sqlite":
        assert ledger._read("PRAGMA foreign_keys")[0][0] == 1
    else:  # SQLite's 64-bit INTEGER and double REAL keep their range: GPU memory sizes, timestamps to the µs
        types = dict(ledger._read("SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                                  "WHERE table_schema = current_schema()"))
        assert types["peers.memory_bytes"] == "bigint" and types["leases.deadline"] == "double precision"
        assert types["peers.public_key"] == "bytea" and types["events.id"] == "bigint"
    assert ledger.register_peer(peer_id="big", name="big", public_key=b"g" * 32, device_kind="cuda", device_name="",
                                memory_bytes=80 * 2**30, now=1234567890.123456)
    row = ledger._read("SELECT memory_bytes, registered_at FROM peers WHERE peer_id = 'big'")[0]
    assert (row["memory_bytes"], row["registered_at"]) == (80 * 2**30, 1234567890.123456)


@pytest.mark.parametrize("kind", ["file", "postgresql"])
def test_an_older_ledger_is_migrated_in_place(kind, request, tmp_path, monkeypatch):
    path = location(kind, request, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(ledger_schema, "MIGRATIONS", ledger_schema.MIGRATIONS[:1])  # the store reads it when it opens a file
        old = Ledger(path)
        old.init_run(run_id="run", spec_hash="h" * 64, shards=SHARDS, seed=7, data_passes=0, now=0.0)
        # as version 1's code registered a peer (today's register_peer writes columns added since)
        old._conn.execute("INSERT INTO peers (peer_id, name, public_key, token, device_kind, device_name, "
                          "memory_bytes, registered_at, last_seen) VALUES ('a', 'a', ?, 't', 'cpu', '', 0, 0, 0)",
                          (b"a" * 32,))
        assert old.schema_version() == 1
        old.close()
    new = Ledger(path)
    assert new.schema_version() == 11
    assert [p["name"] for p in new.status(now=1.0, online_seconds=30, seq_len=8)["peers"]] == ["a"]
    new.heartbeat("a", epoch=3, samples=0, recent_loss=None, samples_per_second=0.0, now=2.0,
                  dht_maddrs=["/ip4/1.2.3.4/tcp/5/p2p/QmA"], micro_batch=64)
    assert new.swarm_maddrs(exclude_peer=None, online_seconds=30, now=3.0) == ["/ip4/1.2.3.4/tcp/5/p2p/QmA"]
    assert new.peer_micro_batch("a") == 64  # the columns of every migration exist
    new.heartbeat("a", epoch=3, samples=0, recent_loss=None, samples_per_second=0.0, now=2.5,
                  pause_reason="paused by the volunteer")
    (a,) = new.status(now=3.0, online_seconds=30, seq_len=8)["peers"]
    assert a["paused"] and a["pause_reason"] == "paused by the volunteer"
    new.close()


def test_address_book_lists_online_peers_and_the_keeper(ledger):
    ledger.set_keeper_maddrs(["/ip4/9.9.9.9/tcp/1/p2p/QmK"])
    for name, now in (("a", 10.0), ("b", 20.0)):
        ledger.heartbeat(name, epoch=1, samples=0, recent_loss=None, samples_per_second=0.0,
                         now=now, dht_maddrs=[f"/ip4/10.0.0.1/tcp/1/p2p/Qm{name}"])
    assert ledger.swarm_maddrs(exclude_peer="a", online_seconds=30, now=21.0) == [
        "/ip4/9.9.9.9/tcp/1/p2p/QmK", "/ip4/10.0.0.1/tcp/1/p2p/Qmb"]
    # a, silent for 35 s, is offline and not handed out; a peer that left is not either
    assert ledger.swarm_maddrs(exclude_peer=None, online_seconds=30, now=45.0) == [
        "/ip4/9.9.9.9/tcp/1/p2p/QmK", "/ip4/10.0.0.1/tcp/1/p2p/Qmb"]
    ledger.leave("b", epoch=1, reason="test", now=46.0)
    assert ledger.swarm_maddrs(exclude_peer=None, online_seconds=30, now=47.0) == ["/ip4/9.9.9.9/tcp/1/p2p/QmK"]


def test_a_clean_leave_releases_leases_goes_offline_and_asks_for_a_handover(ledger):
    held = lease(ledger, "a")
    ledger.heartbeat("b", epoch=4, samples=0, recent_loss=None, samples_per_second=0.0,
                     now=5.0)
    ledger.record_checkpoint(2, "/ckpt-2", 5.0, now=5.0)
    ledger.leave("a", epoch=5, reason="stopped", now=6.0)
    assert ledger.get_lease(held.lease_id).state is LeaseState.RELEASED
    assert ledger.shard_counts()["leased"] == 0
    online = {p["name"]: p["online"] for p in ledger.status(now=6.0, online_seconds=30, seq_len=8)["peers"]}
    assert online == {"a": False, "b": True}  # at once, not after missed heartbeats
    # b is online but behind (step 4 < 5): only a holds step 5, so the keeper must take it from a.
    assert ledger.handover_needed("a", online_seconds=30, now=6.0)
    assert [(p, e) for p, e, _ in ledger.handovers_wanted(since=0.0, online_seconds=30, now=6.0)] == [("a", 5)]
    ledger.heartbeat("b", epoch=5, samples=0, recent_loss=None, samples_per_second=0.0,
                     now=7.0)
    assert not ledger.handover_needed("a", online_seconds=30, now=7.0)  # b holds it too
    ledger.heartbeat("b", epoch=4, samples=0, recent_loss=None, samples_per_second=0.0,
                     now=8.0)
    ledger.record_checkpoint(5, "/ckpt-5", 4.0, now=8.0)
    assert not ledger.handover_needed("a", online_seconds=30, now=8.0)  # checkpointed
    assert ledger.handovers_wanted(since=0.0, online_seconds=30, now=8.0) == []
    ledger.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="cpu", device_name="",
                         memory_bytes=0, now=9.0)
    assert {p["name"]: p["online"] for p in ledger.status(now=9.0, online_seconds=30, seq_len=8)["peers"]}["a"]


def test_lease_submit_marks_done_and_credits(ledger):
    a = lease(ledger, "a")
    assert a.state is LeaseState.ACTIVE and a.deadline == 1.0 + LEASE_S
    assert ledger.shard_counts() == {"pending": 3, "leased": 1, "done": 0}
    out = submit(ledger, "a", a)
    assert out.verdict is Verdict.ACCEPTED and out.credit == 4.0
    assert ledger.get_lease(a.lease_id).state is LeaseState.COMPLETED
    assert ledger.shard_counts()["done"] == 1


def test_each_peer_holds_one_lease_and_gets_it_back(ledger):
    a1, a2 = lease(ledger, "a"), lease(ledger, "a", now=5.0)
    assert a1.lease_id == a2.lease_id and a2.deadline == 5.0 + LEASE_S
    b = lease(ledger, "b")
    assert b.shard_id != a1.shard_id


def test_submit_is_idempotent(ledger):
    a = lease(ledger, "a")
    first, second = submit(ledger, "a", a), submit(ledger, "a", a, now=3.0)
    assert first == second
    assert ledger.accepted_results_per_shard(0) == {a.shard_id: 1}


def test_expired_lease_returns_the_shard_to_the_pool(ledger):
    a = lease(ledger, "a")
    assert ledger.expire_leases(now=1.0 + LEASE_S + 1) == 1
    assert ledger.get_lease(a.lease_id).state is LeaseState.EXPIRED
    b = lease(ledger, "b", now=100.0)
    assert b.shard_id == a.shard_id  # the expired shard keeps its place at the front of the pass
    late = submit(ledger, "a", a, now=101.0)
    assert late.verdict is Verdict.REJECTED_LATE and late.credit == 0
    assert submit(ledger, "b", b, now=102.0).verdict is Verdict.ACCEPTED
    assert ledger.accepted_results_per_shard(0) == {a.shard_id: 1}


def test_late_result_is_accepted_when_nobody_took_the_shard(ledger):
    a = lease(ledger, "a")
    ledger.expire_leases(now=1.0 + LEASE_S + 1)
    out = submit(ledger, "a", a, now=200.0)
    assert out.verdict is Verdict.ACCEPTED and "after lease expiry" in out.detail
    assert ledger.shard_counts()["done"] == 1
    assert lease(ledger, "b", now=201.0).shard_id != a.shard_id


def test_a_coordinator_restart_gives_active_leases_a_full_lease_again(ledger):
    """Found by benchmarks/chaos.py: half the results rejected as late in a 100-fault run were from peers that
    trained on through a coordinator restart; their leases ran out while no heartbeat could reach it, expired
    on the first call after the restart, and the shards went straight to other peers."""
    a = lease(ledger, "a")  # deadline 1 + LEASE_S; the coordinator goes down, comes back at 100
    assert ledger.resume_leases(lease_seconds=LEASE_S, now=100.0) == 1
    b = lease(ledger, "b", now=101.0)
    assert b.shard_id != a.shard_id  # the restart did not hand a's shard to b
    assert submit(ledger, "a", a, now=102.0).detail == "accepted"
    assert ledger.expire_leases(now=101.0 + LEASE_S + 1) == 1  # b's: a lease's life as usual
    assert ledger.resume_leases(lease_seconds=1.0, now=200.0) == 0


def test_heartbeat_keeps_a_peer_alive_but_never_extends_its_leases(ledger):
    a = lease(ledger, "a")
    ids, step = ledger.heartbeat("a", epoch=5, samples=10, recent_loss=2.0, samples_per_second=3.0, now=50.0)
    assert ids == [a.lease_id] and step == 5
    _, step = ledger.heartbeat("a", epoch=3, samples=10, recent_loss=None, samples_per_second=0, now=51.0)
    assert step == 5  # a stale report never moves the swarm's step back
    assert ledger.expire_leases(now=1.0 + LEASE_S + 1) == 1  # alive is not enough: the lease ran out


def test_a_silent_peer_loses_its_leases_long_before_their_deadline(ledger):
    """Found by the chaos run: a restarted peer's first heartbeats report a low rate, its lease is sized for it
    (minutes), then it is killed; its shard waited out that deadline. A silent peer's leases expire instead."""
    ledger.silent_seconds = 10.0
    a = ledger.lease_shard("a", lease_seconds=1000.0, now=1.0).lease
    b = ledger.lease_shard("b", lease_seconds=1000.0, now=1.0).lease
    for t in (5.0, 10.0):  # b heartbeats, a is silent from registration (t=0) on
        ledger.heartbeat("b", epoch=0, samples=0, recent_loss=None, samples_per_second=1.0, now=t)
    assert ledger.expire_leases(now=10.5) == 0  # silent, but not for 10 s since its lease was issued
    assert ledger.expire_leases(now=11.5) == 1  # a's, 990 s before its deadline
    ids, _ = ledger.heartbeat("b", epoch=0, samples=0, recent_loss=None, samples_per_second=1.0, now=11.6)
    assert ids == [b.lease_id]
    again = ledger.lease_shard("b", lease_seconds=1000.0, now=12.0, held=[b.lease_id]).lease
    assert again.shard_id == a.shard_id  # a's shard is back in the pool
    assert submit(ledger, "a", a, now=13.0).detail != "accepted"  # someone else holds it now

    # A coordinator restart: nobody could heartbeat while it was down, so silence counts from the restart.
    assert ledger.resume_leases(lease_seconds=1000.0, now=100.0) == 2
    assert ledger.expire_leases(now=109.0) == 0
    ledger.heartbeat("b", epoch=0, samples=0, recent_loss=None, samples_per_second=1.0, now=109.0)
    assert ledger.expire_leases(now=111.0) == 0  # b beat again in time
    assert ledger.expire_leases(now=120.0) == 2  # b went silent too

def test_a_lease_is_extended_on_request_against_progress_up_to_its_longest_life(ledger):
    a = lease(ledger, "a", now=0.0)  # deadline LEASE_S
    b = ledger.lease_shard("a", lease_seconds=LEASE_S, now=1.0, held=[a.lease_id]).lease  # queued behind a
    ok, deadline, why = ledger.extend_lease("a", a.lease_id, samples_done=3, seconds=80, max_life_s=100, now=10.0)
    assert ok and deadline == 90.0 and "extended" in why
    ok, same, why = ledger.extend_lease("a", a.lease_id, samples_done=3, seconds=80, max_life_s=100, now=20.0)
    assert not ok and same == 90.0 and "no progress" in why  # alive but stuck: no more time
    ok, _, _ = ledger.extend_lease("a", b.lease_id, samples_done=0, seconds=80, max_life_s=100, now=20.0)
    assert ok  # queued behind a lease that progresses
    ok, capped, _ = ledger.extend_lease("a", a.lease_id, samples_done=6, seconds=500, max_life_s=100, now=30.0)
    assert ok and capped == 100.0  # never past the longest life
    ok, _, why = ledger.extend_lease("a", a.lease_id, samples_done=7, seconds=500, max_life_s=100, now=40.0)
    assert not ok and "longest life" in why
    with pytest.raises(PermissionDenied):
        ledger.extend_lease("b", a.lease_id, samples_done=8, seconds=50, max_life_s=100, now=41.0)
    assert ledger.expire_leases(now=101.0) >= 1


def test_release(ledger):
    a = lease(ledger, "a")
    with pytest.raises(PermissionDenied):
        ledger.release("b", a.lease_id, reason="x", now=2.0)
    assert ledger.release("a", a.lease_id, reason="stopping", now=2.0) is True
    assert ledger.release("a", a.lease_id, reason="stopping", now=2.0) is False
    assert ledger.shard_counts()["pending"] == 4


def test_bad_submissions(ledger):
    a = lease(ledger, "a")
    with pytest.raises(NotFound, match="unknown lease id"):
        ledger.submit("a", "nope", samples=8, losses=[], compute_seconds=0, credit_per_sample=1, now=2.0)
    with pytest.raises(PermissionDenied):
        submit(ledger, "b", a)
    with pytest.raises(InvalidArgument, match="samples=3"):
        submit(ledger, "a", a, samples=3)
    assert ledger.get_lease(a.lease_id).state is LeaseState.ACTIVE  # nothing was lost


def test_passes_roll_over_in_a_new_order(ledger):
    orders = []
    for data_pass in range(2):
        order = []
        for i in range(len(SHARDS)):
            got = lease(ledger, "a", now=10.0 * data_pass + i)
            assert got.data_pass == data_pass
            order.append(got.shard_id)
            submit(ledger, "a", got, now=10.0 * data_pass + i)
        orders.append(order)
        assert sorted(order) == [s.shard_id for s in SHARDS]
    assert ledger.accepted_results_per_shard(1) == {s.shard_id: 1 for s in SHARDS}


def test_nothing_to_do_and_run_complete(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.init_run(run_id="r", spec_hash="x", shards=SHARDS[:1], seed=0, data_passes=1, now=0.0)
    for p in ("a", "b"):
        led.register_peer(peer_id=p, name=p, public_key=p.encode() * 32, device_kind="", device_name="",
                          memory_bytes=0, now=0.0)
    a = lease(led, "a")
    nothing = led.lease_shard("b", lease_seconds=LEASE_S, now=1.0)
    assert nothing.lease is None and not nothing.run_complete
    submit(led, "a", a)
    assert led.lease_shard("b", lease_seconds=LEASE_S, now=3.0).run_complete


def test_reopen_keeps_state_and_refuses_another_run(tmp_path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    led.init_run(run_id="r", spec_hash="x", shards=SHARDS, seed=0, data_passes=0, now=0.0)
    led.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="", device_name="", memory_bytes=0,
                      now=0.0)
    a = lease(led, "a")
    led.close()
    led = Ledger(path)
    led.init_run(run_id="r", spec_hash="x", shards=SHARDS, seed=0, data_passes=0, now=5.0)  # no-op
    assert led.get_lease(a.lease_id).state is LeaseState.ACTIVE
    with pytest.raises(FailedPrecondition, match="fresh workdir"):
        led.init_run(run_id="r2", spec_hash="y", shards=SHARDS, seed=0, data_passes=0, now=5.0)
    led.close()


def test_register_refuses_a_different_key_for_an_id(ledger):
    with pytest.raises(PermissionDenied, match="another key"):
        ledger.register_peer(peer_id="a", name="a", public_key=b"z" * 32, device_kind="", device_name="",
                             memory_bytes=0, now=1.0)
    token = ledger.register_peer(peer_id="a", name="a2", public_key=b"a" * 32, device_kind="", device_name="",
                                 memory_bytes=0, now=1.0)
    assert ledger.check_token("a", token) and not ledger.check_token("a", "wrong")


@pytest.mark.parametrize("kind", ["file", "postgresql"])
def test_racing_peers_never_share_a_shard(kind, request, tmp_path):
    """Eight connections (as the server's threads, the keeper, or several coordinators have) lease concurrently."""
    path = location(kind, request, tmp_path)
    setup = Ledger(path)
    setup.init_run(run_id="r", spec_hash="x", shards=[ShardInfo(i, "0" * 64, 1, 8) for i in range(40)], seed=0,
                   data_passes=1, now=0.0)
    peers = [f"p{i}" for i in range(8)]
    for p in peers:
        setup.register_peer(peer_id=p, name=p, public_key=p.encode().ljust(32, b"."), device_kind="", device_name="",
                            memory_bytes=0, now=0.0)
    got: list[int] = []
    lock = threading.Lock()

    def worker(peer):
        led = Ledger(path)
        for i in range(10):
            lease_obj = led.lease_shard(peer, lease_seconds=LEASE_S, now=1.0 + i).lease
            if lease_obj is None:
                break
            with lock:
                got.append(lease_obj.shard_id)
            led.submit(peer, lease_obj.lease_id, samples=8, losses=[], compute_seconds=0, credit_per_sample=1,
                       now=1.0 + i)
        led.close()

    threads = [threading.Thread(target=worker, args=(p,)) for p in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(40))
    assert setup.shard_counts()[ShardState.DONE.value] == 40
    assert setup.accepted_results_per_shard(0) == {i: 1 for i in range(40)}
    setup.close()


def test_status_document(ledger):
    a = lease(ledger, "a")
    submit(ledger, "a", a)
    ledger.record_evaluation(0, 5.5, now=3.0)
    ledger.record_evaluation(2, 4.0, now=4.0)
    ledger.record_checkpoint(2, "/x/step-2.pt", 4.0, now=4.0)
    status = ledger.status(now=10.0, online_seconds=30.0, seq_len=16)
    assert status["run_id"] == "run" and status["global_step"] == 2
    assert status["shards"] == {"total": 4, "pending": 3, "leased": 0, "done": 1}
    assert status["tokens_trained"] == 8 * 16 and status["samples_trained"] == 8
    assert (status["val_loss_first"], status["val_loss"]) == (5.5, 4.0)
    assert status["train_loss"] == pytest.approx((2.0 + 1.5) / 2)
    assert status["checkpoint"] == {"step": 2, "path": "/x/step-2.pt", "val_loss": 4.0}
    peer_a = next(p for p in status["peers"] if p["peer_id"] == "a")
    assert peer_a["shards_done"] == 1 and peer_a["samples"] == 8 and peer_a["online"]


def test_a_peer_may_lease_ahead_and_a_restarted_peer_gets_its_orphans_back(ledger):
    a = ledger.lease_shard("a", lease_seconds=LEASE_S, now=1.0).lease
    b = ledger.lease_shard("a", lease_seconds=LEASE_S, now=1.0, held=[a.lease_id]).lease
    c = ledger.lease_shard("a", lease_seconds=LEASE_S, now=1.0, held=[a.lease_id, b.lease_id]).lease
    assert len({a.shard_id, b.shard_id, c.shard_id}) == 3
    full = ledger.lease_shard("a", lease_seconds=LEASE_S, now=1.0, held=[a.lease_id, b.lease_id, c.lease_id])
    assert full.lease is None and not full.run_complete  # at most MAX_ACTIVE_LEASES at once
    # a restarted peer knows none of them: it gets the oldest back, not a fourth shard
    again = ledger.lease_shard("a", lease_seconds=LEASE_S, now=2.0, held=[])
    assert again.lease.lease_id == a.lease_id
    assert ledger.lease_shard("a", lease_seconds=LEASE_S, now=2.0, held=[a.lease_id]).lease.lease_id == b.lease_id


def test_a_ledger_location_that_cannot_work_says_why(tmp_path):
    from pathlib import Path

    from coordinator.config import CoordinatorConfig
    from hivefold.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--ledger takes an SQLite file path or a postgresql:// URL, got mysql://"):
        CoordinatorConfig(workdir=Path("w"), ledger="mysql://u:pw@host/db")
    # nothing listens on port 1: refused at once, and the password stays out of the message
    with pytest.raises(FailedPrecondition, match=r"cannot reach the PostgreSQL ledger at "
                                                 r"postgresql://hive:\*\*\*@127.0.0.1:1/run") as e:
        Ledger("postgresql://hive:s3cret@127.0.0.1:1/run")
    assert "s3cret" not in str(e.value)


def test_a_broken_postgresql_connection_is_reopened(postgres_url, postgres):
    led = Ledger(postgres_url)
    led.init_run(run_id="run", spec_hash="h" * 64, shards=SHARDS, seed=7, data_passes=0, now=0.0)
    pid = led._read("SELECT pg_backend_pid()")[0][0]
    postgres.sql(f"SELECT pg_terminate_backend({pid})")  # as a server restart or a dropped link would
    with pytest.raises(Unavailable, match="the ledger at postgresql://.* cannot be reached"):
        led.shard_counts()  # the call in flight fails as UNAVAILABLE, which peers retry
    assert led.shard_counts()[ShardState.PENDING.value] == 4  # the next one reconnects
    led.close()
