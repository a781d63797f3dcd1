"""The peer's outbox: the on-disk source of truth for results the coordinator has not acknowledged."""

from __future__ import annotations

import peer.outbox as outbox_module
from peer.outbox import Outbox
from protos import coordinator_pb2 as pb


def _result(lease_id: str) -> pb.SubmitResultRequest:
    return pb.SubmitResultRequest(lease_id=lease_id, samples=8, losses=[pb.MicroBatchLoss(loss=1.5, epoch=2)])


def test_results_survive_until_acknowledged_and_damaged_entries_are_dropped(tmp_path):
    box = Outbox(tmp_path / "outbox")
    box.put(_result("a"))
    box.put(_result("b"))
    (box.dir / "c.pb").write_bytes(b"\xff\xff not a protobuf")
    assert [r.lease_id for r in Outbox(tmp_path / "outbox").pending()] == ["a", "b"]  # a restarted peer sees them
    assert not (box.dir / "c.pb").exists()
    box.done("a")
    assert [r.lease_id for r in box.pending()] == ["b"]
    assert box.pending()[0] == _result("b")


def test_listing_while_the_submitter_removes_an_acknowledged_result(tmp_path, monkeypatch):
    """The prefetcher lists the outbox while the submitter deletes what the coordinator acknowledged."""
    box = Outbox(tmp_path / "outbox")
    for lease_id in ("a", "b", "c"):
        box.put(_result(lease_id))

    def listing_then_ack(paths):
        listed = sorted(paths)
        box.done("b")  # acknowledged between the directory listing and the read
        return listed

    monkeypatch.setattr(outbox_module, "sorted", listing_then_ack, raising=False)
    assert [r.lease_id for r in box.pending()] == ["a", "c"]


def test_a_lease_handed_out_by_the_prefetcher_is_always_reported_held():
    """Between the prefetcher letting go of a work unit and the work loop taking it, a lease request must still
    list it, or the coordinator takes it for an orphan of an earlier run and issues it again."""
    import threading
    import time

    from peer.pipeline import Prefetcher

    stop = threading.Event()
    current: list[str] = []
    seen: list[list[str]] = []
    issued = iter(range(100))

    def lease(held):
        seen.append(list(held))
        return pb.LeaseShardResponse(work=pb.WorkUnit(lease_id=f"l{next(issued)}", shard_id=0))

    def take(work):
        time.sleep(0.3)  # a slow hand-over: the prefetcher must not lease meanwhile as if nobody held it
        current[:] = [work.lease_id]

    prefetch = Prefetcher(lease=lease, load=lambda work: None, release=lambda work, reason: None,
                          held=lambda: list(current), stop=stop, ahead=1)
    try:
        first, _ = prefetch.next(take=take)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.lease_id == "l0" and len(seen) >= 2
        assert "l0" in seen[1], seen  # the second request reports the first lease as held
    finally:
        stop.set()
        prefetch.close()
