"""Two coordinators serving one run from one PostgreSQL ledger refuse a signed request replayed from one to
the other: a nonce is claimed in the ledger, once for all of them. Real gRPC servers on loopback, a real
PostgreSQL server."""

from __future__ import annotations

import time

import grpc
import pytest

from coordinator.context import Context
from coordinator.errors import Unavailable
from coordinator.ledger import Ledger
from coordinator.ledger.nonces import KEEP_S
from coordinator.server import start_server
from hivefold import rpcsign
from hivefold.tls import Trust, open_channel
from protos import coordinator_pb2 as pb
from protos import coordinator_pb2_grpc as pb_grpc
from tests.conftest import serve_tls, small_run
from tests.unit.test_service import code_of, registered


def test_a_nonce_is_claimed_once_across_ledger_connections_and_old_ones_are_pruned(postgres_url):
    a, b = Ledger(postgres_url), Ledger(postgres_url)  # two coordinators' connections
    try:
        assert a.shares_nonces and b.shares_nonces
        assert a.claim_nonce("n1", 100.0, now=100.0)
        assert not b.claim_nonce("n1", 100.0, now=100.5)
        assert not a.claim_nonce("n1", 100.0, now=101.0)
        assert b.claim_nonce("n2", 101.0, now=101.0)
        assert a.claim_nonce("n4", 140.0, now=140.0)
        # once both windows have passed the old nonces go (the signature window refuses such requests anyway);
        # one signed within them stays
        b._nonces_pruned_at = -float("inf")
        assert b.claim_nonce("n3", 100.0 + KEEP_S + 5, now=100.0 + KEEP_S + 5)
        assert [r[0] for r in b._read("SELECT nonce FROM nonces ORDER BY nonce")] == ["n3", "n4"]
        assert not a.claim_nonce("n4", 140.0, now=100.0 + KEEP_S + 6)
    finally:
        a.close()
        b.close()


def test_an_sqlite_ledger_keeps_nonces_in_the_coordinators_memory(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert not ledger.shares_nonces  # one coordinator per SQLite ledger (its workdir is locked)
    finally:
        ledger.close()


def test_a_request_replayed_to_another_coordinator_of_the_run_is_refused(tmp_path, postgres_url):
    base = small_run(tmp_path / "run")
    base.ledger.close()
    tls = serve_tls(base.config.workdir)[0]
    servers, addresses, ledgers = [], [], []
    try:
        for _ in range(2):
            ledger = Ledger(postgres_url)
            ledgers.append(ledger)
            ledger.init_run(run_id=base.spec.run_id, spec_hash=base.spec.hash, shards=list(base.spec.shards),
                            seed=base.spec.seed, data_passes=base.spec.data_passes, now=time.time())
            ctx = Context(config=base.config, spec=base.spec, ledger=ledger, dht_maddrs=base.dht_maddrs)
            server, port = start_server(ctx, "127.0.0.1:0", tls=tls)
            servers.append(server)
            addresses.append(f"127.0.0.1:{port}")
        client, identity = registered(addresses[0], tmp_path / "peer", "peer")
        stubs = [pb_grpc.CoordinatorStub(open_channel(a, Trust(), [])) for a in addresses]
        method = "/hivefold.v1.Coordinator/Heartbeat"
        request = pb.HeartbeatRequest(auth=client.auth, epoch=1)

        def signed():
            return rpcsign.sign_metadata(method, request.SerializeToString(), peer_id=identity.peer_id,
                                         sign=identity.sign)

        captured = signed()
        stubs[0].Heartbeat(request, metadata=captured)  # served by the first coordinator
        assert code_of(lambda: stubs[1].Heartbeat(request, metadata=captured)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "replayed request: this nonce was already used (at another coordinator of this run)")
        assert code_of(lambda: stubs[0].Heartbeat(request, metadata=captured))[0] == grpc.StatusCode.UNAUTHENTICATED
        stubs[1].Heartbeat(request, metadata=signed())  # a fresh signature is served by either
        first_at_second = signed()
        stubs[1].Heartbeat(request, metadata=first_at_second)
        assert code_of(lambda: stubs[0].Heartbeat(request, metadata=first_at_second)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "replayed request: this nonce was already used (at another coordinator of this run)")
        client.close()
    finally:
        for server in servers:
            server.stop(0)
        for ledger in ledgers:
            ledger.close()


def test_while_postgresql_cannot_be_reached_a_claim_is_unavailable_and_then_recovers(postgres):
    """Not only the call that finds the connection broken: every call until the database is back (peers retry
    UNAVAILABLE; anything else would stop them)."""
    url = postgres.create_database("nonce_outage")
    ledger = Ledger(url)
    try:
        assert ledger.claim_nonce("before", 1.0, now=1.0)
        postgres.sql('ALTER DATABASE "nonce_outage" WITH ALLOW_CONNECTIONS false')
        postgres.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'nonce_outage'")
        for i in range(2):
            with pytest.raises(Unavailable, match="cannot (be reached|reach)"):
                ledger.claim_nonce(f"during-{i}", 2.0, now=2.0)
        postgres.sql('ALTER DATABASE "nonce_outage" WITH ALLOW_CONNECTIONS true')
        assert ledger.claim_nonce("after", 3.0, now=3.0)
        assert not ledger.claim_nonce("before", 1.0, now=3.0)
    finally:
        ledger.close()


@pytest.fixture(autouse=True)
def _trust_on_first_use(known_coordinators):
    """The clients trust each coordinator's certificate on first use, in a file of this test's own."""
