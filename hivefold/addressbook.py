"""Direct links between swarm members, from the addresses the coordinator hands out.

Why this exists: hivemind's DHT stores peer ids only, and opening a stream to a peer id makes the
libp2p daemon look its addresses up in libp2p's own Kademlia DHT. That lookup fails whenever the
bootstrap node reached the peer over an address that libp2p counts as neither private nor public
(a documentation or carrier range on a multi-homed host; on the internet, a public address of a
peer whose own addresses are private): the dual DHT's LAN table only admits peers reached over
private or loopback addresses, its WAN table only peers that advertise a public one, so the peer
lands in neither and ``routing: not found`` follows. Which address the dial happens to use is a
race, so the failure comes and goes. Each member therefore reports its own multiaddrs to the
coordinator, which hands out the book; a member connects to the others before it needs them, and
an open connection needs no routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from functools import partial

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def own_maddrs(dht: hivemind.DHT) -> list[str]:
    """This member's reachable multiaddrs, each ending in ``/p2p/<peer id>`` (empty for a client-mode DHT)."""
    return [str(m) for m in dht.get_visible_maddrs()]


def group_by_peer(maddrs: Iterable[str]) -> dict[str, list[str]]:
    """``{peer id: [transport addresses]}`` from full multiaddrs; entries without ``/p2p/`` are dropped."""
    out: dict[str, list[str]] = {}
    for m in maddrs:
        transport, sep, peer = m.partition("/p2p/")
        if sep and peer and transport:
            out.setdefault(peer.split("/")[0], []).append(transport)
    return out


def connect(dht: hivemind.DHT, maddrs: Iterable[str], *, timeout: float = CONNECT_TIMEOUT_S) -> int:
    """Open connections to the members in ``maddrs`` not yet connected and make sure this node's DHT routing
    table holds them; returns how many are connected and in the table now.

    Never raises and never blocks much longer than ``timeout``: it runs on the heartbeat thread, which
    must keep the peer's leases alive whatever the DHT process does (hivemind can lose a coroutine's
    task, which then never answers, or answers with GeneratorExit), and which may still be here while
    the peer shuts its DHT down (the pipe to it is closed then).
    """
    future = None
    try:
        book = group_by_peer(maddrs)
        book.pop(str(dht.peer_id), None)
        if not book:
            return 0
        future = dht.run_coroutine(partial(_connect_all, book, timeout), return_future=True)
        return future.result(timeout=timeout + 5.0)
    except (Exception, GeneratorExit) as e:  # noqa: BLE001 - see the docstring
        if future is not None:
            future.cancel()
        log.debug("connecting to the swarm's members failed: %r", e)
        return 0


async def _connect_all(book: dict[str, list[str]], timeout: float, _dht, node) -> int:
    connected = {str(p.peer_id) for p in await node.p2p.list_peers()}

    async def link(peer: str, addrs: list[str]) -> bool:
        peer_id = PeerID.from_base58(peer)
        if peer not in connected:
            await node.p2p._client.connect(peer_id, [Multiaddr(a) for a in addrs])
        # hivemind's DHT drops a node from its routing table after one unanswered request and never bootstraps
        # again: a member whose requests all failed while the coordinator restarted has an empty table and is
        # cut off from the swarm for good (it trains alone, and nobody can download its state). A ping puts the
        # member in this node's table and this node in the member's.
        if node.protocol.routing_table.get(peer_id=peer_id) is not None:
            return True
        return await node.protocol.call_ping(peer_id) is not None

    async def one(peer: str, addrs: list[str]) -> bool:
        try:
            return await asyncio.wait_for(link(peer, addrs), timeout)
        except Exception as e:  # noqa: BLE001 - any failure to reach one member is logged, never fatal
            log.debug("cannot link to %s at %s: %r", peer, addrs, e)
            return False

    return sum(await asyncio.gather(*(one(p, a) for p, a in book.items())))
