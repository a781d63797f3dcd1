"""Who may take part: invites and bans, on every ledger backend."""

import threading

import pytest

from coordinator.errors import InvalidArgument, NotFound, PermissionDenied
from coordinator.ledger import LeaseState, Ledger
from tests.unit.ledger_cases import SHARDS, lease, location, submit


def test_invites_admit_new_peers_once_each_and_say_why_not(ledger):
    token = ledger.create_invite(uses=2, expires_at=100.0, now=1.0, note="for carol")
    assert token.startswith("hfinv-") and token not in str(ledger._read("SELECT * FROM invites"))  # only its hash

    def join(name, invite, now=2.0):
        return ledger.register_peer(peer_id=name, name=name, public_key=name.encode().ljust(32, b"."),
                                    device_kind="", device_name="", memory_bytes=0, now=now, invite_only=True,
                                    invite=invite)

    for invite, why in (("", "this run is invite-only"), ("hfinv-nope", "unknown invite")):
        with pytest.raises(PermissionDenied, match=why):
            join("c", invite)
    join("c", token)
    join("c", "")  # admitted once: re-registering needs no invite
    join("d", f"  {token}\n")  # pasted with whitespace
    with pytest.raises(PermissionDenied, match="used up"):
        join("e", token)
    late = ledger.create_invite(uses=1, expires_at=10.0, now=1.0)
    with pytest.raises(PermissionDenied, match="expired"):
        join("e", late, now=11.0)
    assert ledger.register_peer(peer_id="f", name="f", public_key=b"f" * 32, device_kind="", device_name="",
                                memory_bytes=0, now=3.0)  # an open run asks for none


@pytest.mark.parametrize("kind", ["file", "postgresql"])
def test_a_one_use_invite_admits_exactly_one_of_racing_peers(kind, request, tmp_path):
    path = location(kind, request, tmp_path)
    setup = Ledger(path)
    setup.init_run(run_id="r", spec_hash="x", shards=SHARDS, seed=0, data_passes=1, now=0.0)
    token = setup.create_invite(uses=1, expires_at=1e12, now=0.0)
    admitted, refused = [], []

    def worker(i):
        led = Ledger(path)
        try:
            led.register_peer(peer_id=f"p{i}", name=f"p{i}", public_key=bytes([i]) * 32, device_kind="",
                              device_name="", memory_bytes=0, now=1.0, invite_only=True, invite=token)
            admitted.append(i)
        except PermissionDenied:
            refused.append(i)
        led.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 1 and len(refused) == 7
    setup.close()


def test_a_banned_peer_loses_its_leases_and_cannot_come_back_until_unbanned(ledger):
    token = ledger.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="", device_name="",
                                 memory_bytes=0, now=1.0)
    held = lease(ledger, "a")
    assert ledger.ban("a", reason="fake losses", now=2.0) == 1
    assert ledger.get_lease(held.lease_id).state is LeaseState.RELEASED
    assert ledger.is_banned("a") and not ledger.check_token("a", token)
    # another process's ban reaches a coordinator's token cache within seconds; leasing and submitting check it now
    with pytest.raises(PermissionDenied, match="banned"):
        lease(ledger, "a")
    with pytest.raises(PermissionDenied, match="its results earn nothing"):
        submit(ledger, "a", held, now=2.5)
    with pytest.raises(PermissionDenied, match=r"banned from this run \(fake losses\)"):
        ledger.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="", device_name="",
                             memory_bytes=0, now=3.0)
    with pytest.raises(NotFound, match="no peer 'zz' in this run"):
        ledger.ban("zz", reason="", now=3.0)
    ledger.unban("a", now=4.0)
    assert not ledger.is_banned("a")
    assert ledger.check_token("a", ledger.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="",
                                                        device_name="", memory_bytes=0, now=5.0))


def test_status_shows_who_is_banned_and_why(ledger):
    ledger.ban("b", reason="poisoned the average", now=5.0)
    peers = {p["peer_id"]: p for p in ledger.status(now=6.0, online_seconds=30, seq_len=8)["peers"]}
    assert peers["b"]["banned"] and peers["b"]["ban_reason"] == "poisoned the average"
    assert not peers["a"]["banned"] and peers["a"]["ban_reason"] is None
    from hivefold.status_view import online_cell
    assert online_cell(peers["b"]) == "banned"


def test_a_peer_is_named_by_its_id_or_the_8_digits_status_shows(ledger):
    for peer_id in ("0123456789abcdef", "0123456799999999", "fedcba9876543210"):
        ledger.register_peer(peer_id=peer_id, name=peer_id, public_key=peer_id.encode() * 2, device_kind="",
                             device_name="", memory_bytes=0, now=1.0)
    assert ledger.resolve_peer("fedcba98") == "fedcba9876543210"  # what `hivefold status` shows
    assert ledger.resolve_peer(" FEDCBA9876543210 ") == "fedcba9876543210"
    with pytest.raises(InvalidArgument, match="starts more than one peer's id: give more"):
        ledger.resolve_peer("01234567")
    assert ledger.resolve_peer("012345678") == "0123456789abcdef"
    with pytest.raises(InvalidArgument, match="is not a peer id: give its 16 hex digits, or the first 8"):
        ledger.resolve_peer("fedcba9")  # too short to be safe
    with pytest.raises(InvalidArgument, match="is not a peer id"):
        ledger.resolve_peer("fedcba98%")  # not a pattern either
    with pytest.raises(NotFound, match="no peer 'aaaaaaaa' in this run"):
        ledger.resolve_peer("aaaaaaaa")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200),
                                               ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)])
def test_invite_expiries_read_as_durations(text, seconds):
    from coordinator.admin import duration

    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1d", "7 days", "1y", "d"])
def test_a_bad_invite_expiry_says_what_is_expected(text):
    import argparse

    from coordinator.admin import duration

    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration like 30m, 12h or 7d"):
        duration(text)

