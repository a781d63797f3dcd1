"""The peer's lease clock: which leases to ask more time for, and when."""

from peer.leases import LeaseClock


def test_a_lease_is_due_in_its_last_third_or_within_the_margin():
    clock = LeaseClock()
    clock.track("a", deadline=100.0, now=40.0)  # 60 s granted: due once fewer than 20 s are left
    clock.track("b", deadline=100.0, now=97.0)  # 3 s granted: due within the margin
    assert clock.due(now=70.0, margin=5.0) == []
    clock.progress("a", 12)
    assert clock.due(now=81.0, margin=5.0) == [("a", 12)]
    assert clock.due(now=96.0, margin=5.0) == [("a", 12), ("b", 0)]
    clock.extended("a", deadline=160.0, now=96.0)  # granted: not due again until its last third
    clock.forget("b")
    assert clock.due(now=96.0, margin=5.0) == []
    assert clock.due(now=141.0, margin=5.0) == [("a", 12)]
    clock.progress("gone", 5)  # progress of a lease no longer held is ignored
    assert [lease for lease, _ in clock.due(now=1000.0, margin=5.0)] == ["a"]
