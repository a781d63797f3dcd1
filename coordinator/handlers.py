"""The coordinator's RPC logic as plain functions ``(request, ctx, now) -> response``.

No gRPC here beyond the message types: handlers raise ``coordinator.errors`` exceptions, which the
servicer maps to status codes. That keeps every rule testable without a server. What they share is the
run's ``Context`` (``coordinator.context``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from coordinator.config import MAX_PROOF_SEGMENTS
from coordinator.context import Context
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from coordinator.ledger import Verdict
from coordinator.run import SHARD_DIR
from hivefold.identity import peer_id_from_public_key, register_message, verify_signature
from hivefold.shards import shard_filename
from protos import coordinator_pb2 as pb

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # stays well under gRPC's default 4 MiB message limit
INLINE_MAX_BYTES = 4 << 20  # the largest shard sent inline in a LeaseShard answer, whatever the peer accepts
MAX_CLOCK_SKEW_S = 300.0  # a signed Register older or newer than this is refused (replay protection)
COUNT_MAX = 2**53  # counters and steps from peers: beyond this they are nonsense (and overflow SQL integers)
NAME_MAX = 64
TEAM_MAX = 32
LEASE_SLACK = 3.0  # a lease lasts this many times the work's expected time (a busy machine, a hiccup)
MADDRS_MAX, MADDR_CHARS = 16, 256  # bounds on the addresses a peer may announce
HELD_MAX = 256  # lease ids a peer may list as held (its outbox can hold results from a long outage)
NO_WORK_RETRY_S = 1.0  # when a peer may ask again for work after none was free
MICRO_BATCH_MAX = 65536  # sequences per forward/backward a peer may report
RATE_MAX = 1e7  # sequences per second a peer may report: far beyond any device; more is a lie that sizes leases
COMPUTE_SECONDS_MAX = 1e7  # about four months on one work unit
LOSS_MAX = 1e6  # a reported loss beyond this is nonsense (cross-entropy at init is ~ln(vocab))
DHT_KEY_MAX_BYTES = 2048  # an RSA public key in OpenSSH format (hivemind's are 2048-bit: ~380 bytes)
PAUSE_REASON_CHARS = 200  # of a paused peer's reason that the ledger keeps
POISON_REPORTS_MAX, LIBP2P_ID_CHARS = 16, 100  # bounds on the poisoning reports one heartbeat carries

VERDICT_TO_PB = {Verdict.ACCEPTED: pb.RESULT_VERDICT_ACCEPTED, Verdict.REJECTED_LATE: pb.RESULT_VERDICT_REJECTED_LATE,
                 Verdict.PENDING: pb.RESULT_VERDICT_PENDING_VERIFICATION, Verdict.INVALID: pb.RESULT_VERDICT_INVALID}
PROOF_CHUNK_MAX = 512 << 10


def _epoch(value: int) -> int:
    """A swarm step as a peer reports it: far beyond any real run's is refused (the ledger bounds jumps too)."""
    if value > COUNT_MAX:
        raise InvalidArgument(f"epoch {value} is out of range (at most {COUNT_MAX})")
    return int(value)


def _auth(auth: pb.PeerAuth, ctx: Context) -> str:
    if not auth.peer_id or not ctx.ledger.check_token(auth.peer_id, auth.token):
        if auth.peer_id and ctx.ledger.is_banned(auth.peer_id):
            raise PermissionDenied(f"peer {auth.peer_id} is banned from this run")
        raise Unauthenticated("unknown peer id or session token; call Register again")
    if auth.spec_hash != ctx.spec_hash:
        raise FailedPrecondition(f"this coordinator runs spec {ctx.spec_hash[:12]}, the peer trains under "
                                 f"{auth.spec_hash[:12] or '(none)'}; restart the peer to fetch the current spec")
    return auth.peer_id


def register(request: pb.RegisterRequest, ctx: Context, now: float) -> pb.RegisterResponse:
    name = request.name.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        raise InvalidArgument(f"name must be 1-{NAME_MAX} printable characters, got {request.name!r}")
    if len(request.public_key) != 32:
        raise InvalidArgument("public_key must be a raw 32-byte Ed25519 key")
    if not math.isfinite(request.timestamp) or abs(now - request.timestamp) > MAX_CLOCK_SKEW_S:
        raise PermissionDenied(f"signed timestamp is {request.timestamp - now:+.0f}s from the coordinator's clock; "
                               "fix this machine's clock (NTP) and retry")
    if not verify_signature(request.public_key, register_message(request.name, request.timestamp),
                            request.signature):
        raise PermissionDenied("signature does not match public_key; the peer's identity file may be damaged")
    if request.expected_spec_hash and request.expected_spec_hash != ctx.spec_hash:
        raise FailedPrecondition(
            f"this coordinator runs spec {ctx.spec_hash[:12]}, but this peer's workdir trained under "
            f"{request.expected_spec_hash[:12]}; use a fresh --workdir to join this run")
    team = request.team.strip()
    if len(team) > TEAM_MAX or not team.isprintable():
        raise InvalidArgument(f"team must be at most {TEAM_MAX} printable characters, got {request.team!r}")
    peer_id = peer_id_from_public_key(request.public_key)
    device = request.device
    if len(request.invite) > 128:
        raise InvalidArgument("invite must be at most 128 characters")
    token = ctx.ledger.register_peer(peer_id=peer_id, name=name, public_key=request.public_key,
                                     device_kind=device.kind[:16], device_name=device.name[:128],
                                     memory_bytes=min(device.memory_bytes, COUNT_MAX), team=team, now=now,
                                     invite_only=ctx.config.invite_only, invite=request.invite)
    log.info("peer %s registered as %r (%s, %.1f GiB)", peer_id, name, device.kind or "?",
             device.memory_bytes / 2**30)
    if device.kind == "cuda" and ctx.verify.enabled:
        log.warning("peer %s trains on a GPU while results are checked by replay: a GPU's bf16 training may replay "
                    "too far from the peer's own for long segments, which fails honest results and bans their peer "
                    "(README, \"Verified work\"); run GPU swarms with --verify-ceiling 0 until this is resolved",
                    peer_id)
    return pb.RegisterResponse(peer_id=peer_id, token=token, spec_json=ctx.spec_json, spec_hash=ctx.spec_hash,
                               dht_maddrs=ctx.dht_maddrs, heartbeat_interval_s=ctx.config.heartbeat_interval,
                               swarm_maddrs=_swarm_maddrs(ctx, peer_id, now),
                               receipt_public_key=ctx.signer.key.public_key, lease_seconds=ctx.config.lease_seconds,
                               proof_segments=ctx.verify.segments if ctx.verify.enabled else 0)


def _online_seconds(ctx: Context) -> float:
    return 3 * ctx.config.heartbeat_interval


def lease_seconds(ctx: Context, sequences: int, rate: float) -> float:
    """A lease's time: ``LEASE_SLACK`` x the work at the peer's reported throughput, within the operator's bounds.

    A peer not measured yet (rate 0) gets ``--lease-seconds``; a slow laptop gets longer than a GPU.
    """
    if rate <= 0:
        return ctx.config.lease_seconds
    return min(max(LEASE_SLACK * sequences / rate, ctx.config.lease_seconds), ctx.config.lease_max_seconds)


def extend_lease(request: pb.ExtendLeaseRequest, ctx: Context, now: float) -> pb.ExtendLeaseResponse:
    peer_id = _auth(request.auth, ctx)
    if not request.lease_id:
        raise InvalidArgument("lease_id is required")
    left = max(ctx.shard_sequences - int(request.samples_done), 1)
    granted, deadline, detail = ctx.ledger.extend_lease(
        peer_id, request.lease_id, samples_done=int(request.samples_done),
        seconds=lease_seconds(ctx, left, ctx.ledger.peer_rate(peer_id)), max_life_s=ctx.config.lease_max_seconds,
        now=now)
    log.info("peer %s asked for more time on lease %s (%d done): %s", peer_id, request.lease_id,
             request.samples_done, detail)
    return pb.ExtendLeaseResponse(granted=granted, deadline=deadline, detail=detail)


def _swarm_maddrs(ctx: Context, peer_id: str, now: float) -> list[str]:
    return ctx.ledger.swarm_maddrs(exclude_peer=peer_id, online_seconds=_online_seconds(ctx), now=now)


def lease_shard(request: pb.LeaseShardRequest, ctx: Context, now: float) -> pb.LeaseShardResponse:
    peer_id = _auth(request.auth, ctx)
    held = list(request.held_lease_ids)
    if len(held) > HELD_MAX or any(len(h) > 64 for h in held):
        raise InvalidArgument(f"held_lease_ids: at most {HELD_MAX} lease ids")
    rate = ctx.ledger.peer_rate(peer_id)
    # sized in the ledger's transaction, by how many leases this one waits behind on the peer
    outcome = ctx.ledger.lease_shard(
        peer_id, lease_seconds=lambda queued: lease_seconds(ctx, ctx.shard_sequences * (queued + 1), rate),
        now=now, held=held)
    if outcome.run_complete:
        return pb.LeaseShardResponse(run_complete=True)
    if outcome.lease is None:
        # Nothing to lease (a pass's last shards are still out, or the peer holds its limit): a GPU trains a
        # shard in well under a second, so ask again soon rather than idle at every pass boundary.
        return pb.LeaseShardResponse(retry_after_s=NO_WORK_RETRY_S)
    lease = outcome.lease
    log.debug("peer %s leased shard %d (lease %s, pass %d)", peer_id, lease.shard_id, lease.lease_id,
             lease.data_pass)
    data = b""
    if lease.byte_size <= min(request.inline_max_bytes, INLINE_MAX_BYTES):
        try:  # one round trip per work unit; a missing file is reported by the FetchShard the peer falls back to
            data = (ctx.workdir / SHARD_DIR / shard_filename(lease.shard_id)).read_bytes()
        except OSError:
            data = b""
    return pb.LeaseShardResponse(work=pb.WorkUnit(
        shard_id=lease.shard_id, lease_id=lease.lease_id, deadline=lease.deadline, byte_size=lease.byte_size,
        sha256=lease.sha256, num_sequences=lease.num_sequences, data_pass=lease.data_pass, data=data))


def fetch_shard(request: pb.FetchShardRequest, ctx: Context, now: float) -> Iterator[pb.DataChunk]:
    peer_id = _auth(request.auth, ctx)
    lease = ctx.ledger.active_lease_for(peer_id, request.lease_id, now=now)
    return stream_file(ctx.workdir / SHARD_DIR / shard_filename(lease.shard_id))


def stream_file(path: Path) -> Iterator[pb.DataChunk]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise NotFound(f"{path.name} is missing on the coordinator") from None
    total = path.stat().st_size

    def chunks() -> Iterator[pb.DataChunk]:
        with f:
            offset = 0
            while data := f.read(CHUNK_BYTES):
                yield pb.DataChunk(data=data, offset=offset, total_size=total)
                offset += len(data)

    return chunks()


def submit_result(request: pb.SubmitResultRequest, ctx: Context, now: float) -> pb.SubmitResultResponse:
    peer_id = _auth(request.auth, ctx)
    if not request.lease_id:
        raise InvalidArgument("lease_id is required")
    # Each peer trains at its own micro-batch (reported in heartbeats); one loss per micro-batch at most.
    # The smaller of the two: results trained before a restart at another size stay acceptable.
    micro_batch = min(ctx.ledger.peer_micro_batch(peer_id) or ctx.spec.micro_batch, ctx.spec.micro_batch)
    max_batches = math.ceil(request.samples / micro_batch) if request.samples else 0
    if len(request.losses) > max_batches:
        raise InvalidArgument(f"{len(request.losses)} losses for {request.samples} samples; at most one per "
                              f"micro-batch of {micro_batch}")
    losses = [(float(x.loss), _epoch(x.epoch)) for x in request.losses]
    if any(not math.isfinite(loss) or not 0 <= loss <= LOSS_MAX for loss, _ in losses):
        raise InvalidArgument(f"losses must be finite, non-negative and at most {LOSS_MAX:g}")
    if not math.isfinite(request.compute_seconds) or not 0 <= request.compute_seconds <= COMPUTE_SECONDS_MAX:
        raise InvalidArgument(f"compute_seconds must be finite, >= 0 and at most {COMPUTE_SECONDS_MAX:g}")
    if len(request.state_changes) > len(losses) + 1 or any(c > len(losses) for c in request.state_changes):
        raise InvalidArgument("state_changes name micro-batch boundaries: at most one per micro-batch, each at most "
                              "the number of losses")
    most = 3 * (MAX_PROOF_SEGMENTS + len(request.state_changes))  # hivefold.proof.proof_bounds: 3 per segment
    if len(request.proof_digests) > most or any(len(d) != 32 for d in request.proof_digests):
        raise InvalidArgument(f"proof_digests holds at most {most} sha256 digests of 32 bytes each (three per "
                              "segment)")
    outcome = ctx.ledger.submit(peer_id, request.lease_id, samples=request.samples, losses=losses,
                                compute_seconds=request.compute_seconds, credit_per_sample=ctx.credit_per_sample,
                                now=now, qrb_k=ctx.config.qrb_k, qrb_deadline_s=ctx.config.lease_seconds,
                                sign_receipt=ctx.signer.sign_result, verify=ctx.verify,
                                digests=list(request.proof_digests), state_changes=list(request.state_changes))
    # per work unit: debug (hundreds a second on a busy coordinator); the ledger's events keep every one
    log.debug("peer %s submitted lease %s: %s (%.3f points)", peer_id, request.lease_id, outcome.detail,
             outcome.credit)
    segment = ctx.ledger.proof_wanted(request.lease_id) if outcome.verdict is Verdict.PENDING else 0
    return pb.SubmitResultResponse(verdict=VERDICT_TO_PB[outcome.verdict], credit=outcome.credit,
                                   detail=outcome.detail, receipt=outcome.receipt, proof_segment=segment,
                                   proof_max_bytes=ctx.proof_max_bytes)


def submit_proof(request: pb.SubmitProofRequest, ctx: Context, now: float) -> pb.SubmitProofResponse:
    peer_id = _auth(request.auth, ctx)
    if not request.lease_id:
        raise InvalidArgument("lease_id is required")
    if request.total_size == 0 and not request.data:  # the peer has none (it restarted since it trained)
        ctx.ledger.decline_proof(peer_id, request.lease_id, why="it restarted since it trained the shard", now=now)
        return pb.SubmitProofResponse(received=0, complete=True)
    if not request.data or len(request.data) > PROOF_CHUNK_MAX:
        raise InvalidArgument(f"a proof chunk holds 1 to {PROOF_CHUNK_MAX} bytes, not {len(request.data)}")
    received, complete = ctx.ledger.receive_proof(
        peer_id, request.lease_id, segment=request.segment, offset=request.offset, total=request.total_size,
        data=request.data, max_bytes=ctx.proof_max_bytes, now=now)
    if complete:
        log.info("peer %s sent the proof for lease %s (%d bytes); queued for the keeper", peer_id, request.lease_id,
                 received)
    return pb.SubmitProofResponse(received=received, complete=complete)


def release_lease(request: pb.ReleaseLeaseRequest, ctx: Context, now: float) -> pb.ReleaseLeaseResponse:
    peer_id = _auth(request.auth, ctx)
    released = ctx.ledger.release(peer_id, request.lease_id, reason=request.reason[:200] or "released", now=now)
    log.info("peer %s released lease %s (%s): %s", peer_id, request.lease_id, request.reason,
             "ok" if released else "was not active")
    return pb.ReleaseLeaseResponse(released=released)


def heartbeat(request: pb.HeartbeatRequest, ctx: Context, now: float) -> pb.HeartbeatResponse:
    peer_id = _auth(request.auth, ctx)
    loss = float(request.recent_loss)
    rate = float(request.samples_per_second)
    maddrs = list(request.dht_maddrs)
    if len(maddrs) > MADDRS_MAX or any(not m.startswith("/") or len(m) > MADDR_CHARS for m in maddrs):
        raise InvalidArgument(f"dht_maddrs must be at most {MADDRS_MAX} multiaddrs of at most {MADDR_CHARS} "
                              "characters, each starting with '/'")
    ids, step = ctx.ledger.heartbeat(
        peer_id, epoch=_epoch(request.epoch), samples=min(int(request.samples_trained), COUNT_MAX),
        recent_loss=loss if math.isfinite(loss) and 0 < loss <= LOSS_MAX else None,
        samples_per_second=min(rate, RATE_MAX) if math.isfinite(rate) and rate >= 0 else 0.0,
        now=now, dht_maddrs=maddrs,
        utilization=min(1.0, max(0.0, util)) if math.isfinite(util := float(request.compute_utilization)) else 0.0,
        micro_batch=min(int(request.micro_batch), MICRO_BATCH_MAX),  # a heartbeat is never refused: leases live on it
        pause_reason=(request.pause_reason[:PAUSE_REASON_CHARS] or "paused") if request.paused else None)
    if request.poison_reports:
        _poison_reports(peer_id, request.poison_reports, ctx, now)
    return pb.HeartbeatResponse(active_lease_ids=ids, global_step=step,
                                swarm_maddrs=_swarm_maddrs(ctx, peer_id, now))


def _poison_reports(peer_id: str, reports, ctx: Context, now: float) -> None:
    """Record the members a peer caught poisoning the averaging; ban those enough peers caught."""
    if len(reports) > POISON_REPORTS_MAX or any(len(r.libp2p_peer_id) > LIBP2P_ID_CHARS for r in reports):
        raise InvalidArgument(f"poison_reports must be at most {POISON_REPORTS_MAX} reports, each naming a libp2p "
                              f"peer id of at most {LIBP2P_ID_CHARS} characters")
    min_valid = 1 if ctx.verify.enabled else 0  # see coordinator/ledger/reports.py: good standing
    for banned in ctx.ledger.report_poisoners(peer_id, [(r.libp2p_peer_id, r.reason) for r in reports],
                                              threshold=ctx.config.ban_after_reports, now=now, min_valid=min_valid):
        log.warning("banned peer %s: at least %d peers caught it poisoning the averaging", banned,
                    ctx.config.ban_after_reports)


def swarm_token(request: pb.SwarmTokenRequest, ctx: Context, now: float) -> pb.SwarmTokenResponse:
    """Admit the peer's DHT node to the swarm for ``--swarm-token-seconds`` (hivefold.swarm_access)."""
    from hivemind.p2p import PeerID
    from hivemind.utils.crypto import RSAPublicKey

    from hivefold.swarm_access import issue_token

    peer_id = _auth(request.auth, ctx)
    if ctx.ledger.is_banned(peer_id):  # read afresh: a ban must stop renewals at once, not after a cache expires
        raise PermissionDenied(f"peer {peer_id} is banned from this run")
    try:
        libp2p_id = PeerID.from_base58(request.libp2p_peer_id).to_base58()
        if len(request.dht_public_key) > DHT_KEY_MAX_BYTES:
            raise ValueError("too long")
        RSAPublicKey.from_bytes(request.dht_public_key)
    except Exception:  # noqa: BLE001 - whatever fails to parse is the peer's mistake
        raise InvalidArgument("libp2p_peer_id must be a base58 libp2p peer id and dht_public_key an RSA public key "
                              f"in OpenSSH format of at most {DHT_KEY_MAX_BYTES} bytes") from None
    expires = now + ctx.config.swarm_token_seconds
    ctx.ledger.bind_swarm_id(libp2p_id, peer_id, now=now)  # poison reports name members by their libp2p id
    token = issue_token(ctx.signer.key, member=peer_id, libp2p_id=libp2p_id,
                        dht_public_key=request.dht_public_key, expires_at=expires)
    return pb.SwarmTokenResponse(token=token.SerializeToString(), expires_at=expires)


def leave(request: pb.LeaveRequest, ctx: Context, now: float) -> pb.LeaveResponse:
    """Mark the peer offline at once; ask it to stay reachable while only it holds state newer than the checkpoint."""
    peer_id = _auth(request.auth, ctx)
    ctx.ledger.leave(peer_id, epoch=_epoch(request.epoch), reason=request.reason[:200] or "left", now=now)
    latest = ctx.ledger.latest_checkpoint()
    hold = ctx.config.keeper and ctx.ledger.handover_needed(peer_id, online_seconds=_online_seconds(ctx), now=now)
    if hold:
        log.info("peer %s leaves at step %d, ahead of the latest checkpoint (%s): asking it to wait for the keeper",
                 peer_id, request.epoch, latest[0] if latest else "none")
    return pb.LeaveResponse(hold=hold, retry_after_s=1.0 if hold else 0.0, checkpoint_step=latest[0] if latest else 0)


def status_document(ctx: Context, now: float) -> dict:
    """The ledger's status, the run's summary (for watchers), and what a volunteer's ``hivefold doctor``
    checks itself against: the DHT bootstrap addresses (the ones Register hands out, so no peer has to
    register to learn them) and the coordinator's software versions (read from package metadata:
    nothing is imported for them)."""
    from importlib import metadata
    from platform import python_version

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    doc = ctx.ledger.status(now=now, online_seconds=_online_seconds(ctx), seq_len=ctx.spec.seq_len)
    doc["run"] = ctx.run_summary
    doc["dht_initial_peers"] = list(ctx.dht_maddrs)
    doc["receipt_public_key"] = ctx.signer.public_key_hex
    doc["software"] = {"python": python_version(),
                       **{d: version(d) for d in ("hivefold", "torch", "hivemind", "protobuf", "grpcio")}}
    return doc


def record_history(ctx: Context, now: float, min_interval: float = 0.0) -> None:
    """One sample of the swarm for the dashboard's charts (the coordinator calls this every few seconds)."""
    ctx.ledger.record_history(now=now, online_seconds=_online_seconds(ctx), min_interval=min_interval)


def get_status(request: pb.GetStatusRequest, ctx: Context, now: float) -> pb.GetStatusResponse:
    return pb.GetStatusResponse(status_json=json.dumps(status_document(ctx, now), sort_keys=True))


def fetch_checkpoint(request: pb.FetchCheckpointRequest, ctx: Context, now: float) -> Iterator[pb.DataChunk]:
    latest = ctx.ledger.latest_checkpoint(on_disk=True)
    if latest is None:
        raise NotFound("no checkpoint has been written yet (on this coordinator's disk)")
    step, path = latest
    if step < request.min_step:
        raise NotFound(f"the latest checkpoint is at step {step}, older than the requested {request.min_step}")
    return stream_file(Path(path))

