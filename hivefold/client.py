"""A client of the coordinator's gRPC service, with retries, used by peers, ``status`` and ``demo``."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import grpc

from hivefold.errors import HivefoldError, IntegrityError
from hivefold.identity import Identity, register_message
from hivefold.netaddr import parse_host_port
from hivefold.retry import call_with_retry
from hivefold.rpcsign import SigningInterceptor
from hivefold.tls import Trust, open_channel
from protos import coordinator_pb2 as pb
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 30.0  # one unary call; streams get STREAM_TIMEOUT_S
INLINE_MAX_BYTES = 1 << 20  # shards up to this size come with their lease (one round trip instead of two)
STREAM_TIMEOUT_S = 600.0
# Register's answer holds the run spec, and with it every shard's sha256 (~130 bytes each): a run of 100,000
# shards needs ~13 MB, past gRPC's default 4 MiB. Shards and checkpoints are streamed in 1 MiB chunks.
MAX_MESSAGE_BYTES = 256 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class CoordinatorClient:
    """Talks to one coordinator. Transient failures are retried with backoff until ``give_up_after``
    seconds pass (``None``: forever, for daemons) or ``stop`` is set."""

    def __init__(self, address: str, *, trust: Trust | None = None, stop: threading.Event | None = None,
                 give_up_after: float | None = None, retry_cap: float = 30.0):
        parse_host_port(address, flag="--coordinator")
        self.address = address
        self.trust = trust or Trust()
        self.stop = stop
        self.give_up_after = give_up_after
        self.retry_cap = retry_cap
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._lock = threading.Lock()
        self.auth: pb.PeerAuth | None = None
        self.identity: Identity | None = None
        self.traffic = {"sent": 0, "received": 0}  # protobuf payload bytes of results, heartbeats, shards, checkpoints

    @property
    def stub(self) -> pb_grpc.CoordinatorStub:
        """Made on first use: deciding to trust the coordinator's certificate needs it up (until then this
        raises a retryable UNAVAILABLE error)."""
        with self._lock:
            if self._stub is None:
                self._channel = open_channel(self.address, self.trust,
                                             [("grpc.enable_retries", 0), *CHANNEL_OPTIONS])
                # every call after Register is signed with the peer's key (hivefold.rpcsign)
                self._stub = pb_grpc.CoordinatorStub(grpc.intercept_channel(self._channel,
                                                                            SigningInterceptor(self._signer)))
            return self._stub

    def _recheck_certificate(self, e: grpc.RpcError) -> None:
        """A failed TLS handshake may mean the coordinator's certificate changed: decide afresh next time
        (a certificate that must not be trusted then raises TrustError rather than retrying forever)."""
        if e.code() == grpc.StatusCode.UNAVAILABLE and any(
                s in (e.details() or "") for s in ("andshake", "CERTIFICATE_VERIFY_FAILED")):
            with self._lock:
                self._stub = None  # the old channel is closed when its last call ends

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()

    def _signer(self):
        if self.auth is None or self.identity is None:
            return None
        return self.auth.peer_id, self.identity.sign

    def adopt(self, other: CoordinatorClient) -> None:
        """Act as the peer ``other`` registered (its session token and signing key)."""
        self.auth, self.identity = other.auth, other.identity

    def _retry(self, fn, what: str, give_up_after: float | None = None):
        def attempt():
            try:
                return fn()
            except grpc.RpcError as e:
                self._recheck_certificate(e)
                raise

        return call_with_retry(attempt, what=f"{what} at {self.address}", stop=self.stop, cap=self.retry_cap,
                               give_up_after=give_up_after if give_up_after is not None else self.give_up_after)

    def register(self, identity: Identity, *, name: str, device: pb.DeviceReport,
                 expected_spec_hash: str = "", team: str = "", invite: str = "") -> pb.RegisterResponse:
        def attempt():
            ts = round(time.time(), 3)
            req = pb.RegisterRequest(public_key=identity.public_key, name=name, timestamp=ts,
                                     signature=identity.sign(register_message(name, ts)), device=device,
                                     expected_spec_hash=expected_spec_hash, team=team, invite=invite)
            return self.stub.Register(req, timeout=RPC_TIMEOUT_S)

        resp = self._retry(attempt, "Register")
        self.auth = pb.PeerAuth(peer_id=resp.peer_id, token=resp.token, spec_hash=resp.spec_hash)
        self.identity = identity
        return resp

    def lease(self, held: list[str] = (), *, inline_max_bytes: int = INLINE_MAX_BYTES) -> pb.LeaseShardResponse:
        """A work unit (its shard inline when it is at most ``inline_max_bytes``: see ``shard_bytes``)."""
        request = pb.LeaseShardRequest(auth=self.auth, held_lease_ids=list(held), inline_max_bytes=inline_max_bytes)
        resp = self._retry(lambda: self.stub.LeaseShard(request, timeout=RPC_TIMEOUT_S), "LeaseShard")
        self.traffic["received"] += len(resp.work.data)
        return resp

    def shard_bytes(self, work: pb.WorkUnit) -> bytes:
        """The work unit's shard, verified: the bytes that came inline with the lease, else (none came, or
        they fail the sha256 check) from FetchShard."""
        if work.data:
            if hashlib.sha256(work.data).hexdigest() == work.sha256:
                return bytes(work.data)
            log.warning("shard %d came inline with a bad sha256; fetching it again", work.shard_id)
        return self.fetch_shard(work.lease_id, work.sha256)

    def submit(self, request: pb.SubmitResultRequest) -> pb.SubmitResultResponse:
        request.auth.CopyFrom(self.auth)
        self.traffic["sent"] += request.ByteSize()
        return self._retry(lambda: self.stub.SubmitResult(request, timeout=RPC_TIMEOUT_S), "SubmitResult")

    def submit_proof(self, lease_id: str, segment: int, proof: bytes, *, chunk: int = 512 << 10) -> None:
        """Upload a proof of training in order, chunk by chunk (each a signed request under the 1 MiB limit);
        an empty ``proof`` says this peer has none."""
        if not proof:
            req = pb.SubmitProofRequest(auth=self.auth, lease_id=lease_id, segment=segment, total_size=0)
            self._retry(lambda: self.stub.SubmitProof(req, timeout=RPC_TIMEOUT_S), "SubmitProof")
            return
        for offset in range(0, len(proof), chunk):
            req = pb.SubmitProofRequest(auth=self.auth, lease_id=lease_id, segment=segment, offset=offset,
                                        total_size=len(proof), data=proof[offset:offset + chunk])
            self.traffic["sent"] += req.ByteSize()
            self._retry(lambda req=req: self.stub.SubmitProof(req, timeout=RPC_TIMEOUT_S), "SubmitProof")

    def release(self, lease_id: str, reason: str, *, give_up_after: float = 5.0) -> bool:
        req = pb.ReleaseLeaseRequest(auth=self.auth, lease_id=lease_id, reason=reason)
        return self._retry(lambda: self.stub.ReleaseLease(req, timeout=5.0), "ReleaseLease",
                           give_up_after=give_up_after).released

    def heartbeat(self, request: pb.HeartbeatRequest, *, timeout: float = 10.0) -> pb.HeartbeatResponse:
        """One attempt, no retry: a missed heartbeat is harmless, the next one follows."""
        request.auth.CopyFrom(self.auth)
        self.traffic["sent"] += request.ByteSize()
        return self.stub.Heartbeat(request, timeout=timeout)

    def extend_lease(self, lease_id: str, samples_done: int, *, timeout: float = 10.0) -> pb.ExtendLeaseResponse:
        """One attempt, no retry: the heartbeat thread asks again at its next beat."""
        return self.stub.ExtendLease(pb.ExtendLeaseRequest(auth=self.auth, lease_id=lease_id,
                                                           samples_done=samples_done), timeout=timeout)

    def leave(self, epoch: int, reason: str, *, timeout: float = 5.0) -> pb.LeaveResponse:
        """One attempt, no retry: used on the way out."""
        return self.stub.Leave(pb.LeaveRequest(auth=self.auth, epoch=epoch, reason=reason), timeout=timeout)

    def swarm_token(self, libp2p_peer_id: str, dht_public_key: bytes, *, give_up_after: float | None = None):
        """A token admitting this peer's DHT node to the swarm (hivefold.swarm_access), and when it expires."""
        req = pb.SwarmTokenRequest(auth=self.auth, libp2p_peer_id=libp2p_peer_id, dht_public_key=dht_public_key)
        resp = self._retry(lambda: self.stub.SwarmToken(req, timeout=RPC_TIMEOUT_S), "SwarmToken",
                           give_up_after=give_up_after)
        return resp.token, resp.expires_at

    def status(self) -> dict:
        resp = self._retry(lambda: self.stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S), "GetStatus")
        return json.loads(resp.status_json)

    def fetch_shard(self, lease_id: str, expected_sha256: str) -> bytes:
        """The shard's bytes, verified; raises IntegrityError on a sha256 mismatch (the caller refetches)."""
        def attempt() -> bytes:
            req = pb.FetchShardRequest(auth=self.auth, lease_id=lease_id)
            return _collect(self.stub.FetchShard(req, timeout=STREAM_TIMEOUT_S))

        data = self._retry(attempt, "FetchShard")
        self.traffic["received"] += len(data)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise IntegrityError(f"shard download has sha256 {actual[:12]}, lease says {expected_sha256[:12]}")
        return data

    def fetch_checkpoint(self, dest: Path, *, min_step: int = 0) -> Path | None:
        """Download the latest checkpoint to ``dest`` (atomically); None if there is none."""
        def attempt() -> bytes:
            return _collect(self.stub.FetchCheckpoint(pb.FetchCheckpointRequest(min_step=min_step),
                                                      timeout=STREAM_TIMEOUT_S))

        try:
            data = self._retry(attempt, "FetchCheckpoint")
            self.traffic["received"] += len(data)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
        return dest


def _collect(stream) -> bytes:
    parts, expected, received = [], None, 0
    for chunk in stream:
        if chunk.offset != received:
            raise HivefoldError(f"stream chunk at offset {chunk.offset} arrived out of order")
        expected = chunk.total_size
        parts.append(chunk.data)
        received += len(chunk.data)
    data = b"".join(parts)
    if expected is not None and len(data) != expected:
        raise HivefoldError(f"stream ended after {len(data)} of {expected} bytes")
    return data


def describe_rpc_error(e: grpc.RpcError) -> str:
    """One line for a user: the status code and the coordinator's message."""
    return f"{e.code().name}: {e.details()}"
