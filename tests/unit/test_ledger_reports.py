"""Members caught poisoning the averaging: reports and the ban they bring, on every ledger backend."""

from coordinator.ledger import LeaseState
from hivefold.status_view import online_cell
from tests.unit.ledger_cases import lease


def join(ledger, name):
    ledger.register_peer(peer_id=name, name=name, public_key=name.encode() * 32, device_kind="cpu", device_name="",
                         memory_bytes=0, now=0.0)


def peers(ledger):
    return {p["peer_id"]: p for p in ledger.status(now=1.0, online_seconds=1e9, seq_len=16)["peers"]}


def test_a_member_is_banned_once_enough_distinct_peers_caught_it(ledger):
    join(ledger, "c")
    for name in ("a", "b", "c"):
        ledger.bind_swarm_id(f"12D3Koo{name}", name, now=0.0)
    active = lease(ledger, "c")
    assert ledger.report_poisoners("a", [("12D3Kooc", "as a sender: flipped")], threshold=2, now=1.0) == []
    # the same reporter again, the suspect reporting itself, an unknown id: none of them counts
    assert ledger.report_poisoners("a", [("12D3Kooc", "again")], threshold=2, now=2.0) == []
    assert ledger.report_poisoners("c", [("12D3Kooc", "me")], threshold=2, now=2.0) == []
    assert ledger.report_poisoners("b", [("12D3Koo-unknown", "?")], threshold=2, now=2.0) == []
    assert not ledger.is_banned("c") and peers(ledger)["c"]["poison_reports"] == 1
    assert online_cell(peers(ledger)["c"]).endswith(", reported 1")
    assert ledger.report_poisoners("b", [("12D3Kooc", "as a reducer: non-finite")], threshold=2, now=3.0) == ["c"]
    assert ledger.is_banned("c")
    c = peers(ledger)["c"]
    assert c["poison_reports"] == 2 and c["ban_reason"].startswith("poisoning the averaging: caught by 2 peers")
    assert ledger.get_lease(active.lease_id).state is LeaseState.RELEASED  # its work goes back to the pool at once
    assert [r[0] for r in ledger.poison_reports("c")] == ["a", "b"]
    assert online_cell(peers(ledger)["c"]) == "banned"


def test_a_banned_peers_reports_count_for_nothing(ledger):
    join(ledger, "c")
    for name in ("a", "b", "c"):
        ledger.bind_swarm_id(f"12D3Koo{name}", name, now=0.0)
    ledger.ban("c", reason="by the operator", now=0.5)
    # c was banned: it cannot get an honest peer banned, alone or with one accomplice's report
    assert ledger.report_poisoners("c", [("12D3Kooa", "lies")], threshold=1, now=1.0) == []
    assert not ledger.is_banned("a") and peers(ledger)["a"]["poison_reports"] == 0


def test_threshold_zero_records_reports_but_never_bans(ledger):
    ledger.bind_swarm_id("12D3Koob", "b", now=0.0)
    assert ledger.report_poisoners("a", [("12D3Koob", "huge")], threshold=0, now=1.0) == []
    assert not ledger.is_banned("b") and peers(ledger)["b"]["poison_reports"] == 1


def test_a_renewed_token_rebinds_the_libp2p_id(ledger):
    ledger.bind_swarm_id("12D3KooX", "a", now=0.0)
    ledger.bind_swarm_id("12D3KooX", "b", now=1.0)  # the same DHT identity, now another peer's
    assert ledger.report_poisoners("a", [("12D3KooX", "flip")], threshold=1, now=2.0) == ["b"]


def verified(ledger, name, now):
    """``name`` trains a shard and the keeper finds its result valid."""
    from tests.unit.test_ledger_verification import always, submit

    work = lease(ledger, name, now=now)
    submit(ledger, name, work, always(), now=now)
    assert not ledger.record_verification(work.lease_id, valid=True, detail="ok", now=now)


def test_where_results_are_checked_only_reporters_with_verified_work_count(ledger):
    """Registering is free: two fresh peers of one attacker must not get an honest peer banned. Reports count
    once their reporter has a verified result; honest peers repeat theirs in every heartbeat, so a report made
    before that result counts as soon as it is in."""
    for name in ("honest-1", "honest-2", "sybil-1", "sybil-2", "poisoner"):
        join(ledger, name)
        ledger.bind_swarm_id(f"12D3Koo{name}", name, now=0.0)
    for sybil in ("sybil-1", "sybil-2"):
        assert ledger.report_poisoners(sybil, [("12D3Koohonest-1", "made up")], threshold=2, now=1.0,
                                       min_valid=1) == []
    assert not ledger.is_banned("honest-1") and peers(ledger)["honest-1"]["poison_reports"] == 2
    for name in ("honest-1", "honest-2"):
        assert ledger.report_poisoners(name, [("12D3Koopoisoner", "huge")], threshold=2, now=1.0, min_valid=1) == []
    verified(ledger, "honest-1", now=2.0)
    assert ledger.report_poisoners("honest-1", [("12D3Koopoisoner", "huge")], threshold=2, now=3.0,
                                   min_valid=1) == []  # one reporter in good standing: not enough
    verified(ledger, "honest-2", now=4.0)
    assert ledger.report_poisoners("honest-2", [("12D3Koopoisoner", "huge")], threshold=2, now=5.0,
                                   min_valid=1) == ["poisoner"]
    assert not ledger.is_banned("honest-1")
    # where nothing is checked, any two registered peers in good standing suffice
    assert ledger.report_poisoners("sybil-1", [("12D3Koohonest-1", "made up")], threshold=2, now=6.0) == ["honest-1"]
