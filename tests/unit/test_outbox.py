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
