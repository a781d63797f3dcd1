"""This peer's membership in the run: joining (register, DHT, trainer, the swarm's state) and leaving.

A :class:`Session` holds what the work loop and the heartbeats share: the identity, the coordinator
client, the outbox, the run spec, the DHT and the trainer. Joining registers (refused when the
workdir trained another run), starts the DHT, builds the trainer and loads the swarm's current
state; leaving tells the coordinator, stays reachable while the keeper still needs this peer's
state, and hands leases back on the way out.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import contextmanager

import grpc
import hivemind

from hivefold import addressbook
from hivefold.client import CoordinatorClient, describe_rpc_error
from hivefold.dht import BootstrapFailed, join_dht
from hivefold.errors import HivefoldError, IntegrityError
from hivefold.identity import Identity
from hivefold.receipts import ReceiptBook
from hivefold.retry import Stopped
from hivefold.spec import RunSpec, verify_spec
from hivefold.swarm_access import publish
from peer.config import PeerConfig
from peer.device import describe_device, limit_memory, resolve_device
from peer.leases import LeaseClock
from peer.outbox import Outbox
from peer.proofs import Proofs
from peer.swarm_pass import SwarmPass
from peer.trainer import Trainer
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

STATE_FILE = "state.json"  # {"spec_hash": ...}: the run this workdir trains for
HANDOVER_WAIT_S = 90.0  # on a clean leave, how long to stay reachable for the keeper to take this peer's state
DHT_JOIN_ATTEMPTS = 6  # the bootstrap node is the coordinator's: tries (2, 4, ... 30 s apart) while it restarts
LEASE_SECONDS_DEFAULT = 120.0  # a coordinator too old to say how long its leases last: its default
PARKED_POLL_S = 10.0  # how often to ask about results pending verification


class Session:
    def __init__(self, config: PeerConfig, stop: threading.Event):
        self.config, self.stop = config, stop
        self.banned: str | None = None  # why the coordinator banned this peer, once it said so
        self.workdir = config.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(self.workdir)
        self.client = CoordinatorClient(config.coordinator, trust=config.trust, stop=stop,
                                        retry_cap=config.retry_cap)
        self.outbox = Outbox(self.workdir / "outbox")
        self.device = resolve_device(config.device)
        self.memory_fraction = limit_memory(config.gpu_memory_fraction, self.device)
        self.trainer: Trainer | None = None
        self.dht: hivemind.DHT | None = None
        self.spec: RunSpec | None = None
        self.heartbeat_interval = 10.0
        self.lease_seconds = LEASE_SECONDS_DEFAULT  # how long a lease outlives the last heartbeat (from Register)
        self.metrics_server = None
        self.leases = LeaseClock()  # deadlines of the leases held, and progress in each (for ExtendLease)
        self.run_complete = False  # the coordinator said the run is over (token budget or data passes spent)
        self.receipts = ReceiptBook(self.workdir)
        self.receipt_key = b""  # the coordinator's receipt-signing key, from Register
        self.proofs = Proofs()  # what sampled results need to prove their training (peer.proofs)
        self.bootstrap_maddrs: list[str] = []  # the coordinator's DHT node, from Register
        self.swarm_pass: SwarmPass | None = None  # the token that admits this peer's DHT node (swarm_pass.py)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # --- joining ------------------------------------------------------------------------------

    def join(self) -> None:
        state_path = self.workdir / STATE_FILE
        try:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HivefoldError(f"{state_path} is damaged; delete it to join the coordinator's current run") from None
        log.info("peer %s (%s) registering with %s", self.peer_id, self.config.name, self.config.coordinator)
        try:
            resp = self.client.register(self.identity, name=self.config.name, device=describe_device(self.device),
                                        expected_spec_hash=state.get("spec_hash", ""), team=self.config.team,
                                        invite=self.config.invite)
        except grpc.RpcError as e:
            raise HivefoldError(f"the coordinator refused to register this peer: {describe_rpc_error(e)}") from None
        self.spec = verify_spec(resp.spec_json, resp.spec_hash)
        self.receipt_key = bytes(resp.receipt_public_key)
        if state.get("spec_hash") != resp.spec_hash:
            self.outbox.clear()
            state_path.write_text(json.dumps({"spec_hash": resp.spec_hash, "run_id": self.spec.run_id}))
        self.heartbeat_interval = resp.heartbeat_interval_s or 10.0
        self.lease_seconds = resp.lease_seconds or LEASE_SECONDS_DEFAULT
        self.proofs.segments = resp.proof_segments
        log.info("peer %s joined run %s (spec %s), %d shards; DHT %s", resp.peer_id, self.spec.run_id,
                 resp.spec_hash[:12], len(self.spec.shards), " ".join(resp.dht_maddrs))
        resp = self._join_dht(resp)
        self.bootstrap_maddrs = list(resp.dht_maddrs)
        self.trainer = Trainer(self.spec, self.dht, device=self.device, client_mode=self.config.client_mode,
                               step_interval=self.config.step_interval, micro_batch=self.config.micro_batch,
                               memory_fraction=self.memory_fraction, swarm_key=self.receipt_key)
        if self.config.metrics_port:
            self._start_metrics()
        # Direct links to the swarm's members first: the state download below needs one (see hivefold.addressbook).
        addressbook.connect(self.dht, resp.swarm_maddrs)
        source = self.trainer.load_swarm_state(
            lambda: self.client.fetch_checkpoint(self.workdir / "checkpoint.pt", min_step=1))
        log.info("peer %s starts at step %d from %s", self.peer_id, self.trainer.epoch, source)

    def _start_metrics(self) -> None:
        from peer.metrics import start_metrics

        try:
            self.metrics_server, port = start_metrics(self.config.metrics_port, self.trainer, self.client.traffic)
        except OSError as e:
            raise HivefoldError(f"--metrics-port {self.config.metrics_port}: cannot listen there ({e}); pick a free "
                                "port") from None
        log.info("metrics at http://%s:%d/metrics", self.metrics_server.server_address[0], port)

    def _join_dht(self, resp: pb.RegisterResponse) -> pb.RegisterResponse:
        """Join the DHT through the coordinator's bootstrap node, set ``self.dht``; returns the latest Register answer.

        If the coordinator went down between Register and now, its node does not answer: register again (that
        waits until the coordinator is back, and it starts its node before it serves) and retry, instead of dying.
        """
        attempt = 1
        while True:
            try:
                self.swarm_pass = SwarmPass(self.workdir, self.receipt_key)
                self.authed(lambda: self.swarm_pass.obtain(self.client))
                self.dht = join_dht(initial_peers=list(resp.dht_maddrs), host_maddrs=list(self.config.dht_listen),
                                    announce_maddrs=list(self.config.dht_announce) or None,
                                    client_mode=self.config.client_mode, **self.swarm_pass.dht_kwargs())
                publish(self.dht, self.swarm_pass.token)
                return resp
            except BootstrapFailed as e:
                if attempt >= DHT_JOIN_ATTEMPTS:
                    raise HivefoldError(f"could not join the swarm's DHT through {' '.join(resp.dht_maddrs)} "
                                        f"({attempt} tries: {e}); check that this machine can reach it "
                                        "(hivefold doctor tests it)") from None
                delay = min(2.0 ** attempt, 30.0)
                log.warning("peer %s: the swarm's bootstrap node did not answer (%s); the coordinator may be "
                            "restarting: registering again in %.0fs", self.peer_id, e, delay)
                if self.stop.wait(delay):
                    raise Stopped("stopped while joining the DHT") from None
                resp = self.reregister()
                attempt += 1

    def reregister(self) -> pb.RegisterResponse:
        """After UNAUTHENTICATED (e.g. a token replaced by a second login): get a fresh token."""
        resp = self.client.register(self.identity, name=self.config.name, device=describe_device(self.device),
                                    expected_spec_hash=self.spec.hash, team=self.config.team,
                                    invite=self.config.invite)
        if resp.spec_hash != self.spec.hash:
            raise HivefoldError("the coordinator now runs a different spec; restart the peer with a fresh --workdir")
        return resp

    def authed(self, call):
        """Run ``call``; on UNAUTHENTICATED (token replaced, ledger restored) register again once and retry.
        A ban (PERMISSION_DENIED saying so) stops the peer: ``banned`` says why, and the daemon exits 2."""
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED and "is banned from this run" in (e.details() or ""):
                self.banned = e.details()
                log.error("peer %s: %s; stopping", self.peer_id, self.banned)
                self.stop.set()
                raise Stopped(self.banned) from None
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.warning("peer %s: %s; registering again", self.peer_id, e.details())
            self.reregister()
            return call()

    # --- leaving ------------------------------------------------------------------------------

    @contextmanager
    def quick_client(self):
        """A client that gives up after 5 s and ignores the stop event: for the last calls on the way out."""
        client = CoordinatorClient(self.config.coordinator, trust=self.config.trust, give_up_after=5.0)
        client.adopt(self.client)
        client.traffic = self.client.traffic  # one count of what this peer sent (--upload-cap, metrics)
        try:
            yield client
        finally:
            client.close()

    def lease(self, held: list[str]) -> pb.LeaseShardResponse:
        resp = self.authed(lambda: self.client.lease(held))
        if resp.HasField("work"):
            # the lease id and sha256 name files in this workdir: a coordinator must not steer them elsewhere
            if not SAFE_ID.fullmatch(resp.work.lease_id) or not SHA256_HEX.fullmatch(resp.work.sha256):
                raise HivefoldError(f"the coordinator sent a malformed work unit (lease id {resp.work.lease_id[:80]!r},"
                                    f" sha256 {resp.work.sha256[:80]!r})")
            self.leases.track(resp.work.lease_id, resp.work.deadline)
        return resp

    def ask_for_time(self) -> None:
        """Leases near their deadline: ask for more time, reporting progress (the coordinator never extends
        silently); a refusal is logged, and the lease may expire and go to another peer."""
        for lease_id, done in self.leases.due(time.time(), margin=2.5 * self.heartbeat_interval):
            try:
                resp = self.client.extend_lease(lease_id, done)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    self.leases.forget(lease_id)
                log.warning("asking for more time on lease %s failed: %s", lease_id, describe_rpc_error(e))
                continue
            if resp.granted:
                self.leases.extended(lease_id, resp.deadline)
                log.info("lease %s extended (%d samples done): %s", lease_id, done, resp.detail)
            else:
                log.warning("lease %s not extended (%d samples done): %s", lease_id, done, resp.detail)

    def release(self, work: pb.WorkUnit, reason: str) -> None:
        """Hand a lease back so its shard goes straight back to the pool; a failure only means it will expire."""
        self.leases.forget(work.lease_id)
        try:
            with self.quick_client() as client:
                released = client.release(work.lease_id, reason)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not hand back lease %s (%s); it will expire", work.lease_id, e)
            return
        if released:
            log.info("peer %s handed back lease %s (%s)", self.peer_id, work.lease_id, reason)
        else:
            log.warning("peer %s: lease %s had already ended", self.peer_id, work.lease_id)

    def flush_outbox_once(self) -> None:
        """On the way out: one quick try, results stay in the outbox for the next start otherwise."""
        try:
            with self.quick_client() as client:
                for request in self.outbox.pending():
                    self.submitted(client, request, client.submit(request))
                self.poll_parked(client, every=0.0)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not submit results on exit (%s); they will be sent on the next start", e)

    def submitted(self, client, request: pb.SubmitResultRequest, resp: pb.SubmitResultResponse) -> None:
        """The coordinator answered for a result: keep the receipt, or answer its verification and park it."""
        lease_id = request.lease_id
        self.leases.forget(lease_id)
        if resp.verdict != pb.RESULT_VERDICT_PENDING_VERIFICATION:
            self.keep_receipt(resp)
            self.outbox.done(lease_id)
            self.outbox.unpark(lease_id)
            self.proofs.drop(lease_id)
            return
        self.proofs.answer(client, lease_id, resp)
        self.outbox.park(request)

    def poll_parked(self, client, every: float = PARKED_POLL_S) -> None:
        """Ask again about results pending verification (at most every ``every`` seconds) for their verdicts."""
        for request, resp in self.proofs.poll(client, self.outbox.parked(), every):
            if resp is None:
                self.outbox.unpark(request.lease_id)
            elif resp.verdict != pb.RESULT_VERDICT_PENDING_VERIFICATION:
                log.info("result for lease %s verified: %s (credit %.3f)", request.lease_id, resp.detail, resp.credit)
                self.keep_receipt(resp)
                self.outbox.unpark(request.lease_id)

    def keep_receipt(self, resp: pb.SubmitResultResponse) -> None:
        """The coordinator's signed receipt goes to the workdir: the volunteer's proof of credit."""
        if resp.receipt:
            try:
                self.receipts.add(resp.receipt, self.receipt_key)
            except IntegrityError as e:
                log.warning("the coordinator's receipt does not verify (%s); not kept", e)

    def leave(self, reason: str) -> None:
        """Tell the coordinator we are gone; stay in the swarm while the keeper still needs our state."""
        self.trainer.averaging.settle(final=self.run_complete)
        deadline = time.monotonic() + HANDOVER_WAIT_S
        try:
            with self.quick_client() as client:
                while True:
                    resp = client.leave(self.trainer.epoch, reason)
                    if not resp.hold:
                        break
                    if time.monotonic() > deadline:
                        log.warning("peer %s: the keeper did not take this peer's state (step %d) within %.0fs; "
                                    "leaving anyway", self.peer_id, self.trainer.epoch, HANDOVER_WAIT_S)
                        return
                    log.info("peer %s: waiting for the keeper to checkpoint step %d, which only this peer holds "
                             "(second Ctrl-C leaves now)", self.peer_id, self.trainer.epoch)
                    time.sleep(resp.retry_after_s or 1.0)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not tell the coordinator this peer leaves (%s)", e)
            return
        log.info("peer %s leaves at step %d; the latest checkpoint is at step %d", self.peer_id,
                 self.trainer.epoch, resp.checkpoint_step)

    def sent_bytes(self) -> int:
        """Bytes this peer sent since it started: to the coordinator, and the all-reduce's estimate (diloco)."""
        averaged = self.trainer.averaging.stats().get("bytes_sent", 0) if self.trainer is not None else 0
        return int(self.client.traffic["sent"] + averaged)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.trainer is not None:
            self.trainer.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        self.client.close()
