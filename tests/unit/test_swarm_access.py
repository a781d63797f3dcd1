"""Swarm access tokens: what the coordinator signs, what a member accepts, and the SwarmToken RPC."""

from __future__ import annotations

import time

import grpc
import pytest
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.server import start_server
from hivefold.client import CoordinatorClient
from hivefold.identity import Identity
from hivefold.swarm_access import (
    SwarmAuthorizer,
    expires_at,
    issue_token,
    member_of,
    new_dht_identity,
    token_problem,
)
from protos import coordinator_pb2 as pb
from tests.conftest import serve_tls, small_run

LIBP2P_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_a_token_admits_its_member_until_it_expires_and_nothing_else(tmp_path):
    coordinator, other = Identity.load_or_create(tmp_path / "c"), Identity.load_or_create(tmp_path / "o")
    dht_key = RSAPrivateKey().get_public_key().to_bytes()
    now = time.time()
    token = issue_token(coordinator, member="3f9a0c2e7b1d4e58", libp2p_id=LIBP2P_ID, dht_public_key=dht_key,
                        expires_at=now + 60)
    assert token_problem(token, coordinator.public_key, now) is None
    assert member_of(token) == ("3f9a0c2e7b1d4e58", LIBP2P_ID) and expires_at(token) == pytest.approx(now + 60)
    assert token_problem(token, coordinator.public_key, now + 61) == "expired"
    assert token_problem(token, other.public_key, now) == "not signed by this run's coordinator"
    for field, value in (("username", f"3f9a0c2e7b1d4e58@{LIBP2P_ID[:-1]}x"), ("expiration_time", f"{now + 1e6}"),
                         ("public_key", RSAPrivateKey().get_public_key().to_bytes())):
        forged = AccessToken()
        forged.CopyFrom(token)
        setattr(forged, field, value)  # anything changed after signing: someone else's node, a longer life
        assert token_problem(forged, coordinator.public_key, now) == "not signed by this run's coordinator", field
    forged = issue_token(other, member="3f9a0c2e7b1d4e58", libp2p_id=LIBP2P_ID, dht_public_key=dht_key,
                         expires_at=now + 60)
    assert token_problem(forged, coordinator.public_key, now) is not None


def test_the_authorizer_checks_each_token_once_but_every_field_and_the_expiry_every_time(tmp_path):
    coordinator = Identity.load_or_create(tmp_path / "c")
    dht_key = RSAPrivateKey()
    token = issue_token(coordinator, member="3f9a0c2e7b1d4e58", libp2p_id=LIBP2P_ID,
                        dht_public_key=dht_key.get_public_key().to_bytes(), expires_at=time.time() + 1.5)
    auth = SwarmAuthorizer(dht_key, coordinator.public_key, lambda: token)
    assert auth.is_token_valid(token) and auth.is_token_valid(token)  # the second from the cache
    for field, value in (("username", f"3f9a0c2e7b1d4e58@{LIBP2P_ID[:-1]}x"),
                         ("public_key", RSAPrivateKey().get_public_key().to_bytes())):
        forged = AccessToken()
        forged.CopyFrom(token)
        setattr(forged, field, value)  # a verified signature moved onto other fields
        assert not auth.is_token_valid(forged), field
    time.sleep(1.6)
    assert not auth.is_token_valid(token)  # verified before, expired now


@pytest.fixture
def served(tmp_path):
    ctx = small_run(tmp_path / "coordinator")
    server, port = start_server(ctx, "127.0.0.1:0", tls=serve_tls(ctx.config.workdir)[0])
    yield ctx, f"127.0.0.1:{port}"
    server.stop(0)
    ctx.ledger.close()


def test_the_rpc_issues_tokens_to_registered_peers_and_not_to_banned_ones(served, tmp_path):
    ctx, address = served
    client = CoordinatorClient(address, give_up_after=5)
    reg = client.register(Identity.load_or_create(tmp_path / "peer"), name="p", device=pb.DeviceReport(kind="cpu"))
    libp2p_id = new_dht_identity(tmp_path / "dht.key")
    dht_key = RSAPrivateKey().get_public_key().to_bytes()
    raw, expires = client.swarm_token(libp2p_id, dht_key)
    token = AccessToken.FromString(raw)
    assert token_problem(token, reg.receipt_public_key, time.time()) is None  # checked with Register's key
    assert member_of(token) == (reg.peer_id, libp2p_id) and token.public_key == dht_key
    assert expires == pytest.approx(time.time() + ctx.config.swarm_token_seconds, abs=5)
    with pytest.raises(grpc.RpcError) as info:
        client.swarm_token("not-a-peer-id", dht_key)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "base58 libp2p peer id" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.swarm_token(libp2p_id, b"ssh-rsa garbage")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ctx.ledger.ban(reg.peer_id, reason="poisoned the averaging", now=time.time())
    with pytest.raises(grpc.RpcError) as info:
        client.swarm_token(libp2p_id, dht_key, give_up_after=2)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in info.value.details()
    client.close()


def test_peers_that_caught_a_member_poisoning_report_it_and_it_is_banned(served, tmp_path):
    """Heartbeats carry what each peer's robust all-reduce caught; the coordinator knows whose libp2p id it is
    from the token it signed, and bans it once --ban-after-reports (2) distinct peers caught it."""
    ctx, address = served
    clients, libp2p = {}, {}
    for name in ("honest-1", "honest-2", "poisoner"):
        client = CoordinatorClient(address, give_up_after=5)
        client.register(Identity.load_or_create(tmp_path / name), name=name, device=pb.DeviceReport(kind="cpu"))
        libp2p[name] = new_dht_identity(tmp_path / f"{name}.dht")
        client.swarm_token(libp2p[name], RSAPrivateKey().get_public_key().to_bytes())
        clients[name] = client
    poisoner = clients["poisoner"].auth.peer_id

    def report(name, *reports):
        return clients[name].heartbeat(pb.HeartbeatRequest(poison_reports=[
            pb.PoisonReport(libp2p_peer_id=i, reason=why) for i, why in reports]))

    # the poisoner accuses an honest peer (one report proves nothing), then the first honest peer catches it
    report("poisoner", (libp2p["honest-1"], "as a sender: made up"))
    report("honest-1", (libp2p["poisoner"], "as a sender: its slice lies 38x further from the others' center"))
    assert not ctx.ledger.is_banned(poisoner) and not ctx.ledger.is_banned(clients["honest-1"].auth.peer_id)
    report("honest-2", (libp2p["poisoner"], "as a reducer: it returned non-finite values"))
    assert ctx.ledger.is_banned(poisoner)
    with pytest.raises(grpc.RpcError) as info:  # its token is not renewed: it falls out of the swarm
        clients["poisoner"].swarm_token(libp2p["poisoner"], RSAPrivateKey().get_public_key().to_bytes(),
                                        give_up_after=2)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = {p["name"]: p for p in clients["honest-1"].status()["peers"]}
    assert status["poisoner"]["banned"] and "caught by 2 peers" in status["poisoner"]["ban_reason"]
    assert status["honest-1"]["poison_reports"] == 1 and not status["honest-1"]["banned"]
    with pytest.raises(grpc.RpcError) as info:  # a heartbeat with too many reports is refused, and says why
        report("honest-1", *[(libp2p["poisoner"], "x")] * 17)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16 reports" in info.value.details()
    for client in clients.values():
        client.close()
