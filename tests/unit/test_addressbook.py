"""hivefold.addressbook without a swarm (tests/integration/test_addressbook.py links real DHT nodes)."""

from hivefold import addressbook

MEMBER = "/ip4/127.0.0.1/tcp/4001/p2p/QmPeerA"


class _ShutDownDHT:
    """A DHT the peer is shutting down while its heartbeat thread links: the pipe to its process is closed."""

    peer_id = "QmSelf"

    def run_coroutine(self, *args, **kwargs):
        raise OSError("handle is closed")


def test_group_by_peer_drops_addresses_without_a_peer_id():
    assert addressbook.group_by_peer([MEMBER, "/ip4/127.0.0.1/tcp/4002/p2p/QmPeerA", "/ip4/10.0.0.1/tcp/1"]) == {
        "QmPeerA": ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002"]}


def test_connect_never_raises_even_while_the_dht_shuts_down():
    """Found by tests/integration/test_chaos.py: a peer that left as soon as it joined (the run was complete)
    shut its DHT down under its heartbeat thread, which died of the OSError."""
    assert addressbook.connect(_ShutDownDHT(), [MEMBER]) == 0
