"""The moderated swarm with real hivemind DHT nodes: a node without a token is not let in, and one whose token
expired (a banned peer's is not renewed) falls out of the DHT, and averagers stop serving it, while members with
valid tokens carry on."""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from hivefold.dht import SwarmDHT
from hivefold.identity import Identity
from hivefold.swarm_access import (
    MemberCheck,
    OwnPass,
    SwarmAuthorizer,
    issue_token,
    new_dht_identity,
    publish,
    token_problem,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

LIFETIME_S = 12.0


def test_no_token_or_an_expired_one_shuts_a_node_out_of_the_dht_and_the_averaging(tmp_path):
    coordinator = Identity.load_or_create(tmp_path / "credit")
    nodes = []
    try:
        boot_pass = OwnPass(coordinator, "coordinator", tmp_path / "boot.key", fresh=True)
        boot = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, **boot_pass.dht_kwargs())
        nodes.append(boot)
        maddrs = [str(m) for m in boot.get_visible_maddrs()]
        member_pass = OwnPass(coordinator, "member", tmp_path / "member.key", fresh=True)  # renews its own
        member = SwarmDHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                          **member_pass.dht_kwargs())
        nodes.append(member)
        member_pass.announce_if_due(member)
        # the banned peer: the one token it got before its ban, never renewed
        dht_key = RSAPrivateKey()
        banned_id = new_dht_identity(tmp_path / "banned.key")
        token = issue_token(coordinator, member="banned", libp2p_id=banned_id, dht_public_key=dht_key.get_public_key()
                            .to_bytes(), expires_at=time.time() + LIFETIME_S)
        banned = SwarmDHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                          identity_path=str(tmp_path / "banned.key"), check_if_identity_free=False,
                          authorizer=SwarmAuthorizer(dht_key, coordinator.public_key, lambda: token,
                                                     refresh_margin=1.0))
        nodes.append(banned)
        assert publish(banned, token)
        check = MemberCheck(member, coordinator.public_key)

        # while its token lasts, it is a member like any other
        assert banned.store("from-banned", "hello", time.time() + 120)
        assert wait_for(lambda: member.get("from-banned"), timeout=10, what="the member to see its record").value \
            == "hello"
        assert asyncio.run(check.allowed(banned.peer_id)) and asyncio.run(check.allowed(member.peer_id))

        # a node with no token at all is not let in: no member answers it, so it cannot even join
        with pytest.raises(Exception, match="none of the initial_peers responded"):  # noqa: PT011 - hivemind's type
            nodes.append(SwarmDHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))

        wait_for(lambda: token_problem(token, coordinator.public_key, time.time()) == "expired",
                 timeout=LIFETIME_S + 5, what="the token to expire")
        banned.store("after-expiry", "let me in", time.time() + 120)
        member.store("members-only", "secret", time.time() + 120)
        time.sleep(2)
        assert member.get("after-expiry") is None  # its writes no longer reach the swarm
        assert banned.get("members-only") is None  # and it reads nothing new
        assert boot.get("members-only").value == "secret"  # while members go on
        fresh = MemberCheck(member, coordinator.public_key)  # an averager that did not know it yet
        assert not asyncio.run(fresh.allowed(banned.peer_id))
        assert asyncio.run(fresh.allowed(member.peer_id))
    finally:
        for node in reversed(nodes):
            node.shutdown()
