"""The work loop: lease → fetch (verify sha256, cache by hash) → train → submit, shard after shard.

The next work unit is leased and fetched while the current one trains, and results are submitted
behind (see ``peer.pipeline``); finished results wait in ``workdir/outbox`` until the coordinator
acknowledges them. A stop mid-shard hands the lease back.

The volunteer's controls act through the gate (``peer.gate``): a pause halts training at the next
micro-batch (or, for the upload cap, after the shard) while heartbeats keep the leases alive; once a
pause has lasted as long as a lease would without heartbeats, the peer hands its leases back (the
shard goes to someone else) and leases afresh when it resumes. Finishing completes the current
shard, hands back the one fetched ahead, and ends the loop.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hivefold.client import describe_rpc_error
from hivefold.logs import log_to_console
from hivefold.shards import decode_shard
from peer.gate import Gate
from peer.pipeline import Prefetcher, ShardCache, Submitter
from peer.session import Session
from peer.trainer import ShardResult
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")


DONE, STOPPED, HANDED_BACK = "done", "stopped", "handed back"  # how training a work unit ended


class WorkLoop:
    def __init__(self, session: Session, stop: threading.Event, gate: Gate | None = None):
        self.session, self.stop = session, stop
        self.gate = gate if gate is not None else Gate(session.peer_id)
        self.config = session.config
        self.shards_done = 0
        self.current: str | None = None  # the lease being trained

    @property
    def peer_id(self) -> str:
        return self.session.peer_id

    def pause_budget(self) -> float:
        """How long a pause may last before the leases held must be handed back: until the earliest one's
        deadline, less two heartbeats (a paused peer makes no progress, so it gets no more time)."""
        s = self.session
        earliest = s.leases.earliest_deadline()
        if earliest is None:
            return s.lease_seconds
        return max(1.0, earliest - time.time() - 2 * s.heartbeat_interval)

    @property
    def paused_too_long(self) -> str:
        return "paused past its leases' deadlines"

    def flush_outbox(self) -> None:
        s = self.session
        for request in s.outbox.pending():
            try:
                resp = s.authed(lambda request=request: s.client.submit(request))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("dropping result for lease %s: %s", request.lease_id, describe_rpc_error(e))
                    s.outbox.done(request.lease_id)
                    s.leases.forget(request.lease_id)
                    continue
                raise
            log.info("peer %s result for lease %s: %s (credit %.3f)", self.peer_id, request.lease_id,
                     resp.detail, resp.credit)
            s.authed(lambda request=request, resp=resp: s.submitted(s.client, request, resp))
        s.authed(lambda: s.poll_parked(s.client))

    def load(self, cache: ShardCache, work: pb.WorkUnit):
        spec = self.session.spec
        return cache.load(work, lambda data: decode_shard(data, sha256=work.sha256, seq_len=spec.seq_len,
                                                          vocab_size=spec.model.vocab_size))

    def _train(self, work: pb.WorkUnit, sequences, progress: Progress | None) -> ShardResult:
        trainer = self.session.trainer
        task = None
        if progress is not None:
            task = progress.add_task(f"shard {work.shard_id}", total=len(sequences), loss=float("nan"),
                                     step=trainer.global_step, rate=0.0)

        done = [0]

        def on_batch(n: int) -> None:
            done[0] += n
            self.session.leases.progress(work.lease_id, done[0])
            if progress is not None:
                progress.update(task, advance=n, loss=trainer.meter.loss, step=trainer.global_step,
                                rate=trainer.meter.samples_per_second)

        try:
            recorder = self.session.proofs.recorder(work.lease_id, -(-len(sequences) // trainer.micro_batch),
                                                    trainer.micro_batch)
            return trainer.train_shard(sequences, self.stop, on_batch, pause=_MidShard(self), recorder=recorder)
        finally:
            if progress is not None:
                progress.remove_task(task)

    def _prefetcher(self, cache: ShardCache) -> Prefetcher:
        s, gate = self.session, self.gate
        return Prefetcher(lease=s.lease,
                          load=lambda work: self.load(cache, work), release=s.release, held=self._held_ids,
                          stop=self.stop, may_lease=lambda: gate.finishing is None and not gate.holds(mid_shard=False))

    def run(self, progress: Progress | None) -> None:
        """Train shard after shard; the next one is leased and fetched meanwhile, results are sent behind."""
        s, gate = self.session, self.gate
        cache = ShardCache(s.workdir / "shards", s.client.shard_bytes)
        prefetch: Prefetcher | None = None
        submitter = Submitter(self.flush_outbox, self.stop)
        gate.start()
        try:
            while not self.stop.is_set():
                if self.config.max_shards and self.shards_done >= self.config.max_shards:
                    log.info("peer %s finished its %d shards; leaving", self.peer_id, self.shards_done)
                    break
                if gate.finishing is not None:
                    log.info("peer %s finished (%s) after %d shards; leaving", self.peer_id, gate.finishing,
                             self.shards_done)
                    break
                if gate.holds(mid_shard=False):  # paused between shards: keep what was fetched ahead for a while
                    timeout = self.pause_budget() if prefetch is not None else None
                    if not gate.wait(self.stop, mid_shard=False, timeout=timeout) and not self.stop.is_set():
                        self._hand_back(prefetch)
                        prefetch = None
                    continue
                if prefetch is None:
                    prefetch = self._prefetcher(cache)
                item = prefetch.next(cancel=lambda: gate.finishing is not None or gate.holds(mid_shard=False),
                                     take=self._take)
                if item is None:
                    if self.stop.is_set() or gate.finishing is not None or gate.holds(mid_shard=False):
                        continue
                    log.info("the run is complete; peer %s leaves", self.peer_id)
                    self.session.run_complete = True
                    break
                work, sequences = item  # self.current is set: taken in one step with the prefetcher
                outcome = self.train_one(work, sequences, progress)
                self.current = None
                if outcome == STOPPED:
                    break
                if outcome == HANDED_BACK:
                    self._hand_back(prefetch)
                    prefetch = None
                    continue
                submitter.kick()
        finally:
            submitter.close()
            if prefetch is not None:
                prefetch.close("peer stopping (prefetched)" if self.stop.is_set() or gate.finishing is None
                               else "peer finishing (prefetched)")
        s.flush_outbox_once()

    def _hand_back(self, prefetch: Prefetcher | None) -> None:
        """A pause outlasted the leases: give back those fetched ahead, so their shards go to someone else."""
        if prefetch is not None:
            if prefetch.held_ids():
                log.info("peer %s %s: handing back the work fetched ahead", self.peer_id, self.paused_too_long)
            prefetch.close(f"{self.paused_too_long} (prefetched)")

    def _take(self, work: pb.WorkUnit) -> None:
        self.current = work.lease_id

    def _held_ids(self) -> list[str]:
        """Leases this peer still holds: the one training and those whose results wait in the outbox."""
        return ([self.current] if self.current else []) + [r.lease_id for r in self.session.outbox.pending()]

    def train_one(self, work: pb.WorkUnit, sequences, progress: Progress | None) -> str:
        """Train one work unit and put its result in the outbox: DONE, or STOPPED / HANDED_BACK (lease given back)."""
        trainer = self.session.trainer
        log.info("peer %s training shard %d (lease %s, %d sequences) at step %d", self.peer_id,
                 work.shard_id, work.lease_id, len(sequences), trainer.global_step)
        result = self._train(work, sequences, progress)
        if result.interrupted:
            self.session.proofs.drop(work.lease_id)
            if self.stop.is_set():
                self.session.release(work, "peer stopping")
                return STOPPED
            log.info("peer %s %s: handing back shard %d after %d of %d sequences", self.peer_id,
                     self.paused_too_long, work.shard_id, result.samples, len(sequences))
            self.session.release(work, self.paused_too_long)
            return HANDED_BACK
        request = pb.SubmitResultRequest(
            lease_id=work.lease_id, samples=result.samples, compute_seconds=result.compute_seconds,
            losses=[pb.MicroBatchLoss(loss=loss, epoch=epoch) for loss, epoch in result.losses],
            proof_digests=result.proof_digests, state_changes=result.state_changes)
        self.session.outbox.put(request)  # survives a coordinator outage or a crash before the ack
        self.shards_done += 1
        first, last = result.losses[0][0], result.losses[-1][0]
        log.info("peer %s finished shard %d: %d samples, loss %.3f -> %.3f, step %d", self.peer_id,
                 work.shard_id, result.samples, first, last, trainer.global_step)
        return DONE


class _MidShard:
    """What the trainer asks at each micro-batch boundary (see ``Trainer.train_shard``)."""

    def __init__(self, loop: WorkLoop):
        self.loop = loop

    def requested(self) -> bool:
        return self.loop.gate.holds(mid_shard=True)

    def wait(self) -> bool:
        """Until the pause lifts (True), or it has lasted a lease's length or the peer stops (False)."""
        return self.loop.gate.wait(self.loop.stop, mid_shard=True, timeout=self.loop.pause_budget())


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
