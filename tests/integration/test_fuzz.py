"""Hostile input: hypothesis throws malformed, oversized and out-of-range messages at every RPC of a running
coordinator (a real process), signed and unsigned. Each gets a status code (never an unhandled error), the
process stays up, and the ledger stays consistent."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivefold import rpcsign
from hivefold.client import CHANNEL_OPTIONS, CoordinatorClient
from hivefold.identity import Identity
from hivefold.tls import Trust, open_channel
from protos import coordinator_pb2 as pb
from tests.conftest import Processes, wait_for

pytestmark = pytest.mark.integration

SERVICE = rpcsign.SERVICE
METHODS = {f"/{SERVICE.full_name}/{m.name}": m for m in SERVICE.methods}
EXAMPLES = int(os.environ.get("HIVEFOLD_FUZZ_EXAMPLES", "1000"))
FD = pb.DESCRIPTOR.message_types_by_name["RegisterRequest"].fields[0].__class__  # FieldDescriptor
INT_RANGES = {FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_INT64: (-2**63, 2**63 - 1),
              FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_ENUM: (0, 5), FD.TYPE_BOOL: (0, 1)}
TALLY = {"sent": 0, "codes": {}, "methods": {}, "live_lease": 0}
LEASES: list[str] = []  # lease ids the fuzzer's peer holds: the lease paths are fuzzed past their lookup too


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    procs = Processes(root)
    workdir = root / "coordinator"
    proc = procs.start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0",
                       "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", "--corpus", str(corpus),
                       "--seq-len", "32", "--micro-batch", "4", "--target-batch-size", "16", "--shard-sequences", "8",
                       "--rpc-rate", "100000")  # the fuzzer is one peer sending thousands a second: no rate limit
    path = workdir / "coordinator.json"
    address = wait_for(lambda: path.exists() and json.loads(path.read_text())["grpc"], timeout=180,
                       what="the coordinator to serve", procs=procs)
    trust = Trust(fingerprint=json.loads(path.read_text())["fingerprint"])
    identity = Identity.load_or_create(root / "fuzzer")
    client = CoordinatorClient(address, trust=trust, give_up_after=10)
    client.register(identity, name="fuzzer", device=pb.DeviceReport(kind="cpu"))
    LEASES.append(client.lease().work.lease_id)
    channel = open_channel(address, trust, CHANNEL_OPTIONS)  # raw: the fuzzer writes every byte itself
    yield proc, workdir, client, channel
    channel.close()
    client.close()
    procs.close()


def field_value(field, draw, auth: pb.PeerAuth):
    if field.type == FD.TYPE_MESSAGE:
        if field.message_type.name == "PeerAuth" and draw(st.booleans()):
            return auth  # valid credentials, to get past authentication into each handler's checks
        return message(field.message_type, draw, auth, depth=1)
    if field.type in INT_RANGES:
        lo, hi = INT_RANGES[field.type]
        value = draw(st.one_of(st.integers(lo, min(hi, 1000)), st.integers(lo, hi), st.sampled_from([lo, hi])))
        return bool(value % 2) if field.type == FD.TYPE_BOOL else value
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return draw(st.floats(allow_nan=True, allow_infinity=True, width=64 if field.type == FD.TYPE_DOUBLE else 32))
    if field.type == FD.TYPE_STRING:
        if field.name in ("lease_id", "held_lease_ids", "active_lease_ids") and draw(st.booleans()):
            # a real lease of this peer: past the lookup, into the checks (drawn as an index: what is drawn must
            # not depend on the list, which grows, or hypothesis cannot replay a case)
            TALLY["live_lease"] += 1
            return LEASES[draw(st.integers(0, 63)) % len(LEASES)]
        long = st.builds(lambda c, n: c * n, st.characters(exclude_categories=("Cs",)),  # protobuf: no surrogates
                             st.integers(100, 5000))  # cheap to generate
        return draw(st.one_of(st.text(max_size=40), long, st.just("../" * 20 + "etc/passwd")))
    return draw(st.one_of(st.binary(max_size=64), st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255),
                                                            st.integers(100, 5000))))


def message(descriptor, draw, auth: pb.PeerAuth, depth: int = 0):
    cls = getattr(pb, descriptor.name)
    msg = cls()
    for field in descriptor.fields:
        if depth > 2 or not draw(st.booleans()):
            continue
        if field.is_repeated:
            values = [field_value(field, draw, auth) for _ in range(draw(st.integers(0, 6)))]
            if draw(st.integers(0, 20)) == 0 and field.type != FD.TYPE_MESSAGE:
                values = values[:1] * 5000  # oversized
            getattr(msg, field.name).extend(values)
        elif field.type == FD.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(field_value(field, draw, auth))
        else:
            setattr(msg, field.name, field_value(field, draw, auth))
    return msg


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_every_rpc_answers_hostile_input_with_a_status_code(coordinator, data):
    proc, _, client, channel = coordinator
    method = data.draw(st.sampled_from(sorted(METHODS)))
    raw = data.draw(st.booleans())
    if raw:  # bytes that are not a valid message of the method's type (or, by chance, are)
        oversized = data.draw(st.integers(0, 9)) == 0  # past the 1 MiB request limit, now and then
        body = data.draw(st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(1_050_000, 1_200_000))
                         if oversized else st.binary(max_size=200))
    else:
        body = message(METHODS[method].input_type, data.draw, client.auth).SerializeToString()
    metadata = []
    if method in rpcsign.SIGNED_METHODS and data.draw(st.integers(0, 9)) > 0:
        metadata = rpcsign.sign_metadata(method, body, peer_id=client.auth.peer_id, sign=client.identity.sign)
    stream = METHODS[method].server_streaming
    call = (channel.unary_stream if stream else channel.unary_unary)(method)
    TALLY["sent"] += 1
    t0 = time.monotonic()
    try:
        response = call(body, metadata=metadata, timeout=20)
        if stream:
            for _ in response:
                pass
        elif method.endswith("/LeaseShard"):  # a new lease for the fuzzer's peer: fuzz it too
            work = pb.LeaseShardResponse.FromString(response).work
            if work.lease_id:
                LEASES.append(work.lease_id)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        # UNKNOWN: an unhandled exception in a handler; INTERNAL: only for bytes that do not parse
        assert code != grpc.StatusCode.UNKNOWN, (method, e.details())
        assert code != grpc.StatusCode.INTERNAL or raw, (method, e.details())
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (method, "the coordinator hung")
    TALLY["codes"][code.name] = TALLY["codes"].get(code.name, 0) + 1
    TALLY["methods"][method] = TALLY["methods"].get(method, 0) + 1
    TALLY["slowest"] = max(TALLY.get("slowest", 0.0), time.monotonic() - t0)
    assert proc.poll() is None, "the coordinator died"


def test_after_the_fuzzing_the_coordinator_serves_and_its_ledger_is_consistent(coordinator):
    proc, workdir, client, _ = coordinator
    assert TALLY["sent"] >= EXAMPLES, TALLY  # runs after the fuzz test (file order)
    print(f"fuzzed messages: {TALLY['sent']}, answers: {TALLY['codes']}, slowest {TALLY.get('slowest', 0):.2f}s, "
          f"{TALLY['live_lease']} naming a live lease, {len(LEASES)} leases taken")
    assert set(TALLY["methods"]) == set(METHODS), set(METHODS) - set(TALLY["methods"])  # every RPC was fuzzed
    assert TALLY["live_lease"] >= EXAMPLES // 20, TALLY
    assert proc.poll() is None
    assert client.status()["run"]["shards"] > 0
    lease = client.lease()  # still leases and accepts work
    assert lease.HasField("work")
    with sqlite3.connect(f"file:{workdir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        # every leased shard has exactly one active lease, and no other shard has any
        assert db.execute("SELECT COUNT(*) FROM shards s WHERE (s.state = 'leased') != ((SELECT COUNT(*) FROM leases "
                          "l WHERE l.shard_id = s.shard_id AND l.state = 'active') = 1)").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM (SELECT shard_id FROM leases WHERE state = 'active' GROUP BY shard_id "
                          "HAVING COUNT(*) > 1)").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM (SELECT shard_id, data_pass FROM results WHERE verdict = 'accepted' "
                          "GROUP BY shard_id, data_pass HAVING COUNT(*) > 1)").fetchone()[0] == 0
        # nothing non-finite or absurd was stored
        for sql in ("SELECT MAX(ABS(loss)) FROM losses", "SELECT MAX(ABS(credit)) FROM results",
                    "SELECT MAX(compute_seconds) FROM results", "SELECT MAX(recent_loss) FROM peers",
                    "SELECT MAX(samples_per_second) FROM peers", "SELECT MAX(utilization) FROM peers",
                    "SELECT CAST(value AS REAL) FROM meta WHERE key = 'global_step'"):
            value = db.execute(sql).fetchone()[0]
            assert value is None or (value == value and abs(value) < 1e12), (sql, value)
