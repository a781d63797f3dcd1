"""hivefold.addressbook between real hivemind DHT nodes on loopback (each with its libp2p daemon)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time

from hivefold import addressbook
from hivefold.dht import SwarmDHT

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _routing_table_size(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def test_a_member_cut_off_while_the_bootstrap_node_restarted_is_linked_back(tmp_path: Path):
    """Found by benchmarks/chaos.py: hivemind's DHT drops a node from its routing table after one unanswered
    request and never bootstraps again, so a peer whose DHT requests failed while the coordinator (the bootstrap
    node) restarted was cut off for good: it trained alone, newcomers and the keeper never saw it, and its state
    was lost when it left. Linking to the restarted node must put it back in the swarm's DHT."""
    port = _free_port()

    def bootstrap_node() -> SwarmDHT:  # the coordinator's: same identity and port across restarts
        return SwarmDHT(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], identity_path=str(tmp_path / "dht.key"),
                        start=True)

    nodes = []
    try:
        nodes.append(first := bootstrap_node())
        maddrs = [str(m) for m in first.get_visible_maddrs()]
        nodes.append(member := SwarmDHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        first.shutdown()
        first.join(10)
        member.store("before", "x", get_dht_time() + 60)  # unanswered: the bootstrap node leaves the table
        assert member.run_coroutine(_routing_table_size) == 0
        nodes.append(bootstrap_node())
        nodes.append(newcomer := SwarmDHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        member.store("cut-off", "x", get_dht_time() + 60)
        assert newcomer.get("cut-off", latest=True) is None  # the member is cut off

        deadline = time.monotonic() + 60  # libp2p backs off from dialling an address that failed; retry as the
        while addressbook.connect(member, maddrs) < 1:  # heartbeat loop does
            assert time.monotonic() < deadline, "never linked to the restarted bootstrap node"
            time.sleep(1.0)
        member.store("linked", "x", get_dht_time() + 60)
        assert newcomer.get("linked", latest=True) is not None
        newcomer.store("from-newcomer", "y", get_dht_time() + 60)
        assert member.get("from-newcomer", latest=True) is not None
    finally:
        for node in reversed(nodes):
            node.shutdown()
