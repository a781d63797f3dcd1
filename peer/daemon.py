"""``hivefold peer``: the volunteer's daemon loop.

register → join the DHT → load the swarm's state → loop { lease → fetch (verify sha256, cache by
hash) → train → submit }. SIGINT/SIGTERM finish the current micro-batch, hand the lease back and
leave the swarm. While the coordinator is unreachable the peer retries with backoff and jitter;
finished results wait in ``workdir/outbox`` and are submitted when it is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager

import grpc
import hivemind
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hivefold import addressbook
from hivefold.client import CoordinatorClient, describe_rpc_error
from hivefold.dht import BootstrapFailed, join_dht
from hivefold.errors import HivefoldError, IntegrityError
from hivefold.identity import Identity
from hivefold.logs import log_to_console
from hivefold.receipts import ReceiptBook
from hivefold.retry import Stopped
from hivefold.shards import decode_shard
from hivefold.signals import install_stop_handlers
from hivefold.spec import RunSpec, verify_spec
from peer.config import PeerConfig
from peer.device import describe_device, resolve_device
from peer.outbox import Outbox
from peer.pipeline import Prefetcher, ShardCache, Submitter
from peer.trainer import ShardResult, Trainer
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")

STATE_FILE = "state.json"  # {"spec_hash": ...}: the run this workdir trains for
SHUTDOWN_TIMEOUT_S = 60.0
STOP_MESSAGE = "finishing the micro-batch, then leaving"
RELINK_EVERY_S = 60.0  # how often a peer re-checks its direct links to the members it already reached
HANDOVER_WAIT_S = 90.0  # on a clean leave, how long to stay reachable for the keeper to take this peer's state
DHT_JOIN_ATTEMPTS = 6  # the bootstrap node is the coordinator's: tries (2, 4, ... 30 s apart) while it restarts


class Peer:
    def __init__(self, config: PeerConfig, stop: threading.Event):
        self.config, self.stop = config, stop
        self.workdir = config.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(self.workdir)
        self.client = CoordinatorClient(config.coordinator, stop=stop, retry_cap=config.retry_cap)
        self.outbox = Outbox(self.workdir / "outbox")
        self.device = resolve_device(config.device)
        self.trainer: Trainer | None = None
        self.dht: hivemind.DHT | None = None
        self.spec: RunSpec | None = None
        self.shards_done = 0
        self.current: str | None = None  # the lease being trained
        self.heartbeat_interval = 10.0
        self.left = threading.Event()  # set once the work loop is over
        self.metrics_server = None
        self.receipts = ReceiptBook(self.workdir)
        self.receipt_key = b""  # the coordinator's receipt-signing key, from Register
        self.bootstrap_maddrs: list[str] = []  # the coordinator's DHT node, from Register

    # --- joining ------------------------------------------------------------------------------

    def join(self) -> None:
        state_path = self.workdir / STATE_FILE
        try:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HivefoldError(f"{state_path} is damaged; delete it to join the coordinator's current run") from None
        log.info("peer %s (%s) registering with %s", self.identity.peer_id, self.config.name, self.config.coordinator)
        try:
            resp = self.client.register(self.identity, name=self.config.name, device=describe_device(self.device),
                                        expected_spec_hash=state.get("spec_hash", ""), team=self.config.team)
        except grpc.RpcError as e:
            raise HivefoldError(f"the coordinator refused to register this peer: {describe_rpc_error(e)}") from None
        self.spec = verify_spec(resp.spec_json, resp.spec_hash)
        self.receipt_key = bytes(resp.receipt_public_key)
        if state.get("spec_hash") != resp.spec_hash:
            self.outbox.clear()
            state_path.write_text(json.dumps({"spec_hash": resp.spec_hash, "run_id": self.spec.run_id}))
        self.heartbeat_interval = resp.heartbeat_interval_s or 10.0
        log.info("peer %s joined run %s (spec %s), %d shards; DHT %s", resp.peer_id, self.spec.run_id,
                 resp.spec_hash[:12], len(self.spec.shards), " ".join(resp.dht_maddrs))
        resp = self._join_dht(resp)
        self.bootstrap_maddrs = list(resp.dht_maddrs)
        self.trainer = Trainer(self.spec, self.dht, device=self.device, client_mode=self.config.client_mode,
                               step_interval=self.config.step_interval, micro_batch=self.config.micro_batch)
        if self.config.metrics_port:
            self._start_metrics()
        # Direct links to the swarm's members first: the state download below needs one (see hivefold.addressbook).
        addressbook.connect(self.dht, resp.swarm_maddrs)
        source = self.trainer.load_swarm_state(
            lambda: self.client.fetch_checkpoint(self.workdir / "checkpoint.pt", min_step=1))
        log.info("peer %s starts at step %d from %s", self.identity.peer_id, self.trainer.epoch, source)

    def _join_dht(self, resp: pb.RegisterResponse) -> pb.RegisterResponse:
        """Join the DHT through the coordinator's bootstrap node, set ``self.dht``; returns the latest Register answer.

        If the coordinator went down between Register and now, its node does not answer: register again (that
        waits until the coordinator is back, and it starts its node before it serves) and retry, instead of dying.
        """
        attempt = 1
        while True:
            try:
                self.dht = join_dht(initial_peers=list(resp.dht_maddrs), host_maddrs=list(self.config.dht_listen),
                                    announce_maddrs=list(self.config.dht_announce) or None,
                                    client_mode=self.config.client_mode)
                return resp
            except BootstrapFailed as e:
                if attempt >= DHT_JOIN_ATTEMPTS:
                    raise HivefoldError(f"could not join the swarm's DHT through {' '.join(resp.dht_maddrs)} "
                                        f"({attempt} tries: {e}); check that this machine can reach it "
                                        "(hivefold doctor tests it)") from None
                delay = min(2.0 ** attempt, 30.0)
                log.warning("peer %s: the swarm's bootstrap node did not answer (%s); the coordinator may be "
                            "restarting: registering again in %.0fs", self.identity.peer_id, e, delay)
                if self.stop.wait(delay):
                    raise Stopped("stopped while joining the DHT") from None
                resp = self.reregister()
                attempt += 1

    def _start_metrics(self) -> None:
        from peer.metrics import start_metrics

        try:
            self.metrics_server, port = start_metrics(self.config.metrics_port, self.trainer, self.client.traffic)
        except OSError as e:
            raise HivefoldError(f"--metrics-port {self.config.metrics_port}: cannot listen there ({e}); pick a free "
                                "port") from None
        log.info("metrics at http://%s:%d/metrics", self.metrics_server.server_address[0], port)

    def reregister(self) -> pb.RegisterResponse:
        """After UNAUTHENTICATED (e.g. a token replaced by a second login): get a fresh token."""
        resp = self.client.register(self.identity, name=self.config.name, device=describe_device(self.device),
                                    expected_spec_hash=self.spec.hash, team=self.config.team)
        if resp.spec_hash != self.spec.hash:
            raise HivefoldError("the coordinator now runs a different spec; restart the peer with a fresh --workdir")
        return resp

    # --- heartbeats ---------------------------------------------------------------------------

    def heartbeat_loop(self) -> None:
        # Runs until the peer has left, not merely until it was asked to stop: the last micro-batch's
        # all-reduce can take a while, and the lease must stay alive until it is handed back.
        own = [] if self.config.client_mode else addressbook.own_maddrs(self.dht)
        linked: set[str] = set()  # members connected to at the last check
        checked_at = -float("inf")
        while True:
            m = self.trainer.meter
            try:
                resp = self.client.heartbeat(pb.HeartbeatRequest(
                    epoch=self.trainer.epoch, samples_trained=m.samples_total, recent_loss=m.loss,
                    samples_per_second=m.samples_per_second, dht_maddrs=own, compute_utilization=m.utilization,
                    micro_batch=self.trainer.micro_batch))
                # Each check is a round trip through the DHT process: only when a member is new, else once a minute.
                # The coordinator's bootstrap node too: newcomers join the DHT through it (see addressbook.connect).
                members = [*resp.swarm_maddrs, *self.bootstrap_maddrs]
                book = set(addressbook.group_by_peer(members))
                if not book <= linked or time.monotonic() - checked_at > RELINK_EVERY_S:
                    others = book - {str(self.dht.peer_id)}
                    if addressbook.connect(self.dht, members) >= len(others):
                        linked, checked_at = book, time.monotonic()
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s", describe_rpc_error(e))
                linked = set()  # the coordinator may be restarting: relink once it answers again
            if self.left.wait(self.heartbeat_interval):
                return

    # --- the work loop ------------------------------------------------------------------------

    def _authed(self, call):
        """Run ``call``; on UNAUTHENTICATED (token replaced, ledger restored) register again once and retry."""
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.warning("peer %s: %s; registering again", self.identity.peer_id, e.details())
            self.reregister()
            return call()

    def flush_outbox(self) -> None:
        for request in self.outbox.pending():
            try:
                resp = self._authed(lambda request=request: self.client.submit(request))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("dropping result for lease %s: %s", request.lease_id, describe_rpc_error(e))
                    self.outbox.done(request.lease_id)
                    continue
                raise
            log.info("peer %s result for lease %s: %s (credit %.3f)", self.identity.peer_id, request.lease_id,
                     resp.detail, resp.credit)
            self._keep_receipt(resp)
            self.outbox.done(request.lease_id)

    def _keep_receipt(self, resp: pb.SubmitResultResponse) -> None:
        """The coordinator's signed receipt goes to the workdir: the volunteer's proof of credit."""
        if resp.receipt:
            try:
                self.receipts.add(resp.receipt, self.receipt_key)
            except IntegrityError as e:
                log.warning("the coordinator's receipt does not verify (%s); not kept", e)

    def _load(self, cache: ShardCache, work: pb.WorkUnit):
        return cache.load(work, lambda data: decode_shard(data, sha256=work.sha256, seq_len=self.spec.seq_len,
                                                          vocab_size=self.spec.model.vocab_size))

    def _train(self, work: pb.WorkUnit, sequences, progress: Progress | None) -> ShardResult:
        task = None
        if progress is not None:
            task = progress.add_task(f"shard {work.shard_id}", total=len(sequences), loss=float("nan"),
                                     step=self.trainer.global_step, rate=0.0)

        def on_batch(n: int) -> None:
            if progress is not None:
                progress.update(task, advance=n, loss=self.trainer.meter.loss, step=self.trainer.global_step,
                                rate=self.trainer.meter.samples_per_second)

        try:
            return self.trainer.train_shard(sequences, self.stop, on_batch)
        finally:
            if progress is not None:
                progress.remove_task(task)

    def work_loop(self, progress: Progress | None) -> None:
        """Train shard after shard; the next one is leased and fetched meanwhile, results are sent behind."""
        cache = ShardCache(self.workdir / "shards", lambda work: self.client.fetch_shard(work.lease_id, work.sha256))
        prefetch = Prefetcher(lease=lambda held: self._authed(lambda: self.client.lease(held)),
                              load=lambda work: self._load(cache, work), release=self._release,
                              held=self._held_ids, stop=self.stop)
        submitter = Submitter(self.flush_outbox, self.stop)
        try:
            while not self.stop.is_set():
                if self.config.max_shards and self.shards_done >= self.config.max_shards:
                    log.info("peer %s finished its %d shards; leaving", self.identity.peer_id, self.shards_done)
                    break
                item = prefetch.next()
                if item is None:
                    if not self.stop.is_set():
                        log.info("the run is complete; peer %s leaves", self.identity.peer_id)
                    break
                work, sequences = item
                self.current = work.lease_id
                if not self.train_one(work, sequences, progress):
                    break
                self.current = None
                submitter.kick()
        finally:
            submitter.close()
            prefetch.close()
        self.flush_outbox_once()

    def _held_ids(self) -> list[str]:
        """Leases this peer still holds: the one training and those whose results wait in the outbox."""
        return ([self.current] if self.current else []) + [r.lease_id for r in self.outbox.pending()]

    def train_one(self, work: pb.WorkUnit, sequences, progress: Progress | None) -> bool:
        """Train one work unit and put its result in the outbox; False when the peer stopped meanwhile."""
        log.info("peer %s training shard %d (lease %s, %d sequences) at step %d", self.identity.peer_id,
                 work.shard_id, work.lease_id, len(sequences), self.trainer.global_step)
        result = self._train(work, sequences, progress)
        if result.interrupted:
            self._release(work, "peer stopping")
            return False
        request = pb.SubmitResultRequest(
            lease_id=work.lease_id, samples=result.samples, compute_seconds=result.compute_seconds,
            losses=[pb.MicroBatchLoss(loss=loss, epoch=epoch) for loss, epoch in result.losses])
        self.outbox.put(request)  # survives a coordinator outage or a crash before the ack
        self.shards_done += 1
        first, last = result.losses[0][0], result.losses[-1][0]
        log.info("peer %s finished shard %d: %d samples, loss %.3f -> %.3f, step %d", self.identity.peer_id,
                 work.shard_id, result.samples, first, last, self.trainer.global_step)
        return True

    @contextmanager
    def _quick_client(self):
        """A client that gives up after 5 s and ignores the stop event: for the last calls on the way out."""
        client = CoordinatorClient(self.config.coordinator, give_up_after=5.0)
        client.auth = self.client.auth
        try:
            yield client
        finally:
            client.close()

    def flush_outbox_once(self) -> None:
        """On the way out: one quick try, results stay in the outbox for the next start otherwise."""
        try:
            with self._quick_client() as client:
                for request in self.outbox.pending():
                    self._keep_receipt(client.submit(request))
                    self.outbox.done(request.lease_id)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not submit results on exit (%s); they will be sent on the next start", e)

    def leave(self, reason: str) -> None:
        """Tell the coordinator we are gone; stay in the swarm while the keeper still needs our state."""
        self.trainer.averaging.settle()
        deadline = time.monotonic() + HANDOVER_WAIT_S
        try:
            with self._quick_client() as client:
                while True:
                    resp = client.leave(self.trainer.epoch, reason)
                    if not resp.hold:
                        break
                    if time.monotonic() > deadline:
                        log.warning("peer %s: the keeper did not take this peer's state (step %d) within %.0fs; "
                                    "leaving anyway", self.identity.peer_id, self.trainer.epoch, HANDOVER_WAIT_S)
                        return
                    log.info("peer %s: waiting for the keeper to checkpoint step %d, which only this peer holds "
                             "(second Ctrl-C leaves now)", self.identity.peer_id, self.trainer.epoch)
                    time.sleep(resp.retry_after_s or 1.0)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not tell the coordinator this peer leaves (%s)", e)
            return
        log.info("peer %s leaves at step %d; the latest checkpoint is at step %d", self.identity.peer_id,
                 self.trainer.epoch, resp.checkpoint_step)

    def _release(self, work: pb.WorkUnit, reason: str) -> None:
        try:
            with self._quick_client() as client:
                released = client.release(work.lease_id, reason)
        except (grpc.RpcError, HivefoldError) as e:
            log.warning("could not hand back lease %s (%s); it will expire", work.lease_id, e)
            return
        if released:
            log.info("peer %s handed back lease %s (%s)", self.identity.peer_id, work.lease_id, reason)
        else:
            log.warning("peer %s: lease %s had already ended", self.identity.peer_id, work.lease_id)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.trainer is not None:
            self.trainer.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        self.client.close()


def make_progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    log_to_console(console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:6.1f} samples/s"), TextColumn("loss {task.fields[loss]:.3f}"),
                    TextColumn("step {task.fields[step]}"), TimeElapsedColumn(), console=console, transient=True)


def run(config: PeerConfig, stop: threading.Event) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    peer = Peer(config, stop)
    try:
        peer.join()
        # hivemind's averagers set SIGINT to SIG_IGN in this process when they start: take Ctrl-C back.
        install_stop_handlers(stop, what=STOP_MESSAGE)
        threading.Thread(target=peer.heartbeat_loop, name="heartbeat", daemon=True).start()
        progress = make_progress(config.progress)
        if progress is not None:
            with progress:
                peer.work_loop(progress)
        else:
            peer.work_loop(None)
        peer.left.set()
        peer.leave("stopped" if stop.is_set() else "finished")
    except Stopped:
        log.info("stopped while waiting for the coordinator")
    finally:
        stop.set()
        peer.left.set()
        # hivemind's shutdown waits on its helper processes; if one died, it would wait forever.
        watchdog = threading.Timer(SHUTDOWN_TIMEOUT_S, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        peer.shutdown()
        watchdog.cancel()
        log.info("peer %s left the swarm", peer.identity.peer_id)


def _force_exit() -> None:
    log.error("shutdown did not finish in %.0fs; exiting anyway", SHUTDOWN_TIMEOUT_S)
    logging.shutdown()
    os._exit(3)
