"""Heartbeats: tell the coordinator this peer is alive (which keeps its leases), what it trains at, and where
the swarm can reach it; keep direct links to the swarm's members the coordinator lists."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from hivefold import addressbook
from hivefold.client import describe_rpc_error
from peer.gate import Gate
from peer.session import Session
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")

RELINK_EVERY_S = 60.0  # how often a peer re-checks its direct links to the members it already reached


def heartbeat_loop(session: Session, left: threading.Event, gate: Gate) -> None:
    """Heartbeat every ``session.heartbeat_interval`` until ``left`` is set.

    Runs until the peer has left, not merely until it was asked to stop: the last micro-batch's
    all-reduce can take a while, and the lease must stay alive until it is handed back. Paused
    (halted in ``gate``), it keeps beating, says so, and reports no throughput.
    """
    trainer = session.trainer
    own = [] if session.config.client_mode else addressbook.own_maddrs(session.dht)
    linked: set[str] = set()  # members connected to at the last check
    checked_at = -float("inf")
    # Members the averaging caught poisoning, reported in every heartbeat (16 at a time, in turn): a report counts
    # towards a ban only once this peer has a verified result (coordinator/ledger/reports.py)
    caught: dict[str, str] = {}
    while True:
        m = trainer.meter
        paused = gate.halted
        caught.update(trainer.averaging.take_flags())
        reports = [pb.PoisonReport(libp2p_peer_id=peer, reason=why) for peer, why in list(caught.items())[:16]]
        try:
            resp = session.client.heartbeat(pb.HeartbeatRequest(
                epoch=trainer.epoch, samples_trained=m.samples_total, recent_loss=m.loss,
                samples_per_second=0.0 if paused else m.samples_per_second, dht_maddrs=own,
                compute_utilization=m.utilization, micro_batch=trainer.micro_batch, paused=paused,
                pause_reason="; ".join(gate.reasons()) if paused else "", poison_reports=reports))
            for r in reports:  # to the back of the queue
                caught[r.libp2p_peer_id] = caught.pop(r.libp2p_peer_id)
            # Each check is a round trip through the DHT process: only when a member is new, else once a minute.
            # The coordinator's bootstrap node too: newcomers join the DHT through it (see addressbook.connect).
            members = [*resp.swarm_maddrs, *session.bootstrap_maddrs]
            book = set(addressbook.group_by_peer(members))
            if not book <= linked or time.monotonic() - checked_at > RELINK_EVERY_S:
                others = book - {str(session.dht.peer_id)}
                if addressbook.connect(session.dht, members) >= len(others):
                    linked, checked_at = book, time.monotonic()
            session.swarm_pass.renew_if_due(session.client, session.dht)
        except grpc.RpcError as e:
            log.warning("heartbeat failed: %s", describe_rpc_error(e))
            linked = set()  # the coordinator may be restarting: relink once it answers again
        session.ask_for_time()
        if left.wait(session.heartbeat_interval):
            return
