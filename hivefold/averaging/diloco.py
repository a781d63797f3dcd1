"""DiLoCo: each peer trains alone with AdamW; every round the swarm averages how far it moved.

A round ends when the swarm has trained ``spec.round_samples`` sequences (hivemind's
``ProgressTracker`` counts them across peers, so a fast peer simply takes more inner steps). Each
peer then puts its pseudo-gradient ``global - local`` into a ``DecentralizedAverager``, which
all-reduces it (weighted by the peer's samples, compressed as the spec says), and every peer applies
the same outer Nesterov step to the same global parameters (see ``outer.py``). A peer alone in the
swarm applies its own pseudo-gradient at once. The outer state lives on the training device; only the
pseudo-gradient goes through the averager's host buffers.

The all-reduce never stalls the device: it runs in the background while the next round's inner
steps go on, and its outer update lands one round late (the eager / streaming variants of DiLoCo):
``local = new_global + (local - local_when_sent)`` keeps the steps taken meanwhile. A peer waits
only when the network is slower than a whole round.

The outer state (global parameters, momentum, outer step) is what newcomers and the keeper
download (consensus.py: whose they take); it is served by the same averager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import hivemind
import numpy as np
import torch
from hivemind.averaging.control import StepControl
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from hivefold.averaging import agreement, consensus
from hivefold.averaging.diloco_state import OuterState
from hivefold.averaging.guard import UpdateGuard, update_ceiling
from hivefold.averaging.guarded import Caught
from hivefold.averaging.members import OuterStateAverager
from hivefold.averaging.outer import WIRE_BYTES, compression, nesterov_outer_step
from hivefold.model import GPT
from hivefold.spec import RunSpec
from hivefold.training import inner_optimizer, lr_lambda

log = logging.getLogger(__name__)

# How often a peer tells the swarm's progress tracker its samples, and reads the swarm's: every 2 s near a round's
# end, at most every 15 s far from it. Each is a signed DHT record sent to (or read from) every other member; on a
# 20 Mbit/s link with rounds of minutes, reports every 2 s were a steady ~5 KB/s per peer next to the all-reduce.
REPORT_EVERY_S = 2.0
REPORT_AT_MOST_EVERY_S = 15.0
ROUND_GRACE_S = 15.0  # past hivemind's own round timeout, before a blocked caller gives the round up


@dataclass
class _Round:
    """An outer round whose all-reduce is still in flight."""

    epoch: int  # the outer step this round produces, minus one
    control: StepControl | None  # None: nobody to average with, the peer's own update applies at once
    sent_local: list[torch.Tensor]  # the local parameters when the pseudo-gradient was taken (on the device)
    own: list[torch.Tensor]  # this peer's pseudo-gradient: applied alone if no group forms
    started: float
    own_norm: float = 0.0
    refused: bool = False  # the guard refused to send ``own`` (non-finite, far too large): restart from global
    deadline: float = float("inf")  # perf_counter time by which hivemind must have ended the round


def round_result(control: StepControl, deadline: float, epoch: int) -> dict | None:
    """What a round's all-reduce gathered from its members, or None if it failed. Waits until ``deadline``
    (``time.perf_counter()``; 0: not at all): hivemind ends a round by its own timeout, and should it not (a
    group that never forms nor fails), the round is given up then instead of stalling the device for good."""
    try:
        return control.result(timeout=max(0.0, deadline - time.perf_counter()))
    except Exception as e:  # noqa: BLE001 - a failed round (timeout, peer gone) must not stop training
        if not control.done():
            log.warning("outer round %d: hivemind did not end it by its timeout; giving it up", epoch)
            control.cancel()
        log.debug("outer round %d failed: %r", epoch, e)
        return None


class DiLoCo(OuterState):
    """The ``diloco`` averaging mode (see ``hivefold.averaging``).

    ``epoch`` counts outer steps applied to the global parameters; ``trains=False`` (the keeper)
    follows and serves the outer state without taking part in rounds.
    """

    def __init__(self, spec: RunSpec, model: GPT, dht: hivemind.DHT, *, client_mode: bool = False,
                 trains: bool = True, swarm_key: bytes | None = None):
        self.spec, self.model, self.trains, self.client_mode = spec, model, trains, client_mode
        a = spec.averaging
        self.params = list(model.parameters())
        # The outer state stays on the training device: a round then moves only the pseudo-gradient to the host
        # (the all-reduce's buffers) and the averaged update back, and the outer step runs where the model is.
        self.global_params = [p.detach().float().clone() for p in self.params]
        self.momentum = [torch.zeros_like(g) for g in self.global_params]
        self.epoch = 0  # outer steps applied to global_params
        self.version = 0  # counts every change of the local parameters from outside the inner steps (hivefold.proof)
        self.before_change: Callable[[], None] | None = None  # called just before such a change (hivefold.proof)
        self.samples_in_round = 0
        self.rounds_ok = self.rounds_alone = 0
        self.last_round_seconds = 0.0  # how long the latest all-reduce took, matchmaking included
        self.wait_seconds = 0.0  # time the device waited for an all-reduce (the network was slower than a round)
        # All-reduce payload this peer sent and received, estimated: in hivemind's butterfly all-reduce each of n
        # members sends (n-1)/n of its compressed tensors to the others and as much of the averaged result back.
        self.bytes_sent = self.bytes_received = 0
        self._payload_bytes = sum(g.numel() for g in self.global_params) * WIRE_BYTES[a.compression]
        self._lock = threading.Lock()  # the outer state is read by the averager's state-sharing thread
        self._pending: _Round | None = None
        self._reported_at = -float("inf")
        self._resync = False  # set when this member's global parameters turned out to differ from its group's
        self._sources: list[str] | None = None  # ... and then the members to download them from (None: any)
        # a sample of global_params, retaken whenever they change (_share_priority); and the one sent with a round
        self._global_sample = agreement.sample(self.global_params)
        self._sent_sample = self._global_sample
        self.agreement = agreement.Agreement()
        self.guard = UpdateGuard()  # what enters and leaves each all-reduce (guard.py)
        self.caught = Caught()  # members the robust all-reduce flagged (robust.py)
        self.inner = inner_optimizer(spec, model) if trains else None
        self._set_lr()
        self.averager = OuterStateAverager(
            averaged_tensors=[torch.zeros_like(g, device="cpu") for g in self.global_params], dht=dht, start=True,
            prefix=f"{spec.run_id}_diloco", state_fn=self._shared_state, min_matchmaking_time=a.matchmaking_time,
            request_timeout=min(3.0, a.matchmaking_time / 2), allreduce_timeout=a.averaging_timeout,
            compression=compression(a.compression), state_compression=NoCompression(), client_mode=client_mode,
            declare_state_period=10.0, swarm_key=swarm_key, max_weight=2.0 * spec.round_samples,
            sample_size=len(self._global_sample))
        self._downloads = consensus.StateDownloads(
            self.averager, f"{spec.run_id}_diloco", [g.shape for g in self.global_params + self.momentum],
            lambda: self.tracker.global_epoch if self.tracker else None)
        # Peers count the swarm's samples to end rounds together; the keeper follows the ledger instead, so it
        # never counts as a peer that might average.
        self.tracker = ProgressTracker(dht, f"{spec.run_id}_diloco", spec.round_samples, client_mode=client_mode,
                                       start=True, min_refresh_period=REPORT_EVERY_S,
                                       max_refresh_period=REPORT_AT_MOST_EVERY_S) if trains else None
        self._share_priority()  # what this member holds, for downloaders to compare (consensus.py)

    # --- the interface shared with sync ----------------------------------------------------------

    @property
    def global_epoch(self) -> int:
        """The swarm's outer step as far as this member knows (a round in flight counts as not yet applied)."""
        return max(self.epoch, self.tracker.global_epoch - 1) if self.tracker else self.epoch

    def step(self, samples: int) -> None:
        """One inner step on gradients summed over ``samples`` sequences; starts or lands outer rounds."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, float(samples))  # one fused launch instead of one per tensor
        if self.spec.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.optimizer.grad_clip)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        self.samples_in_round += samples
        self._set_lr()
        now = time.monotonic()
        # Reporting is a DHT store (a round trip, a signed record, a store on every node): every few seconds will
        # do, as the tracker extrapolates. Whether a round is due is checked at every step: peers start together.
        if now - self._reported_at >= self._report_interval():
            self._reported_at = now
            self.tracker.report_local_progress(self._round_index, self.samples_in_round)
        if self._pending is not None and self._pending.control.done():
            self._land_round()
        if self.tracker.ready_to_update_epoch:
            self._start_round()

    def _report_interval(self) -> float:
        """An eighth of the time the tracker expects until the round ends, within [2 s, 15 s]: the tracker
        extrapolates each peer's samples from its rate, so far from a round's end a report changes nothing."""
        eta = self.tracker.global_progress.eta_next_epoch - get_dht_time()
        return float(np.clip(eta / 8, REPORT_EVERY_S, REPORT_AT_MOST_EVERY_S))

    def settle(self, final: bool = False) -> None:
        """Land the round in flight, so the state this peer shares (say, to the keeper as it leaves) includes it.

        ``final``: the run is over, no round will come after this one: what this peer trained since the last
        round goes into one more, averaged with the peers finishing at the same time (alone: applied as is),
        so that the run's last checkpoint keeps it.
        """
        if self._pending is not None:
            self._land_round(block=True)
        if final and self.trains and self.samples_in_round > 0:
            log.info("the run is over: a last outer round for the %d samples trained since the previous one",
                     self.samples_in_round)
            self._start_round(final=True)
            if self._pending is not None:
                self._land_round(block=True)

    def shutdown(self) -> None:
        if self._pending is not None and self._pending.control is not None:
            self._pending.control.cancel()
        if self.tracker:
            self.tracker.shutdown()
        self.averager.shutdown()

    def stats(self) -> dict:
        return {"rounds_ok": self.rounds_ok, "rounds_alone": self.rounds_alone, "wait_seconds": self.wait_seconds,
                "last_round_seconds": self.last_round_seconds, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "flagged": len(self.flagged)}

    # --- rounds --------------------------------------------------------------------------------

    @property
    def _round_index(self) -> int:
        """The tracker's epoch: rounds started (one more than applied while a round is in flight)."""
        return self.epoch + (self._pending is not None)

    def _start_round(self, final: bool = False) -> None:
        if self._pending is not None:  # the previous all-reduce is slower than a whole round: wait for it
            t0 = time.perf_counter()
            self._land_round(block=True)
            self.wait_seconds += time.perf_counter() - t0
        if self.tracker.global_epoch > self.epoch + 1 or self._resync:
            log.info("this peer is behind or out of sync with the swarm (outer step %d, swarm %d); loading its state",
                     self.epoch, self.tracker.global_epoch)
            sources, self._resync, self._sources = self._sources, False, None
            self.load_state_from_peers(timeout=self.spec.averaging.averaging_timeout, accept_equal=True,
                                       sources=sources)
        samples = self.samples_in_round
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.epoch + 1)
        self.samples_in_round = 0
        # Nobody to average with: no matchmaking to wait for. A final round always tries (peers finishing together
        # may not have seen each other's progress yet); alone, it costs the matchmaking window.
        alone = not final and self.tracker.global_progress.num_peers <= 1
        with torch.no_grad():
            sent_local = [p.detach().clone() for p in self.params]
            own = [torch.sub(g, p.float()) for g, p in zip(self.global_params, sent_local, strict=True)]
            o = self.spec.optimizer  # a member claims at most two rounds' samples, at worst one per step
            self.guard.ceiling = update_ceiling(o.lr, o.betas, 2.0 * self.spec.round_samples, self.global_params)
            own_norm, refused = self.guard.check_outgoing(own)
            self.averager.set_range(self.guard.recent_norm(), self.guard.ceiling)
            if refused:
                log.error("outer round %d: not sending this peer's pseudo-gradient: %s; it takes part with nothing "
                          "and restarts from the global parameters", self.epoch, refused)
                own = [torch.zeros_like(d) for d in own]
                samples = 0
            if not alone:
                with self.averager.get_tensors() as buffers:
                    for buf, d in zip(buffers, own, strict=True):
                        buf.copy_(d)
        a = self.spec.averaging
        timeout = 2 * a.matchmaking_time + 2 * a.averaging_timeout
        self._sent_sample = self._global_sample
        if alone:
            control = None
        else:
            # A group forms within the matchmaking window or not at all; the all-reduce has its own timeout.
            # Every member takes part in every round, even with nothing to add (it just joined or reloaded):
            # skipping one would leave its global parameters an outer update behind for good.
            gather = (self.epoch, agreement.fingerprint(self._sent_sample), self._sent_sample.tobytes())
            control = self.averager.step(gather=gather, weight=float(samples) or 1e-6, wait=False, timeout=timeout)
        started = time.perf_counter()
        # hivemind's timeout bounds the search for a group; a group found just before it still has the
        # all-reduce's own timeout to finish
        self._pending = _Round(self.epoch, control, sent_local, own, started, own_norm, bool(refused),
                               deadline=started + timeout + a.averaging_timeout + ROUND_GRACE_S)
        if control is None:
            self._land_round()

    @property
    def flagged(self) -> dict[str, str]:
        """libp2p peer id -> why: members the robust all-reduce caught."""
        return self.caught.flagged

    def take_flags(self) -> list[tuple[str, str]]:
        """Members caught poisoning an all-reduce since the last call: ``(libp2p peer id, why)``, to report."""
        return self.caught.take()

    def _land_round(self, block: bool = False) -> None:
        r = self._pending
        gathered = round_result(r.control, r.deadline if block else 0.0, r.epoch) if r.control else None
        self.caught.collect(self.averager.take_flags(), f"outer round {r.epoch}")
        update = None
        if gathered:
            with self.averager.get_tensors() as buffers:
                update = [b.clone() for b in buffers]
            poisoned = self.guard.check_incoming(update, r.own_norm)
            if poisoned:
                log.error("outer round %d: refusing the swarm's averaged update (%s): a member sent bad values; "
                          "this peer applies its own update instead", r.epoch, poisoned)
                gathered, update = None, r.own
        if gathered:
            self.rounds_ok += 1
            n = len(gathered)
            self.bytes_sent += int(2 * self._payload_bytes * (n - 1) / n)
            self.bytes_received += int(2 * self._payload_bytes * (n - 1) / n)
            # Members of a round started it from the same global parameters (up to rounding) unless they drifted
            # apart (a round formed a group for some only). One caught poisoning this round is not to be followed.
            mine = (r.epoch, agreement.fingerprint(self._sent_sample), self._sent_sample.tobytes())
            follow = agreement.to_follow(mine, {str(p): g for p, g in gathered.items() if p != self.averager.peer_id
                                                and str(p) not in self.flagged}, self.agreement)
            if follow is not None:
                log.warning("outer round %d: this peer's global parameters differ from the swarm's; reloading "
                            "them from the %d member(s) that agree", r.epoch, len(follow))
                self._resync, self._sources = True, follow
        else:
            if r.control is not None and update is None:
                log.warning("outer round %d: no group formed; this peer applies its own update", r.epoch)
            update = r.own
            self.guard.accept_own(r.own_norm)
            self.rounds_alone += 1
        self.last_round_seconds = time.perf_counter() - r.started
        a = self.spec.averaging
        update = [u.to(g.device) for u, g in zip(update, self.global_params, strict=True)]
        before = self._global_sample
        if self.before_change is not None:
            self.before_change()
        with self._lock, torch.no_grad():
            nesterov_outer_step(self.global_params, self.momentum, update, lr=a.outer_lr, mu=a.outer_momentum)
            self.epoch = r.epoch + 1
            # Keep the inner steps taken since the pseudo-gradient was sent, on top of the new global parameters.
            for p, g, sent in zip(self.params, self.global_params, r.sent_local, strict=True):
                if r.refused:  # the local model went bad: start over from the global parameters
                    p.copy_(g.to(dtype=p.dtype))
                else:
                    p.sub_(sent).add_(g.to(dtype=p.dtype))
            if r.refused and self.inner is not None:
                self.inner.state.clear()  # its moments went bad with the parameters: AdamW starts them afresh
            self.version += 1
        self._pending = None
        self.agreement.note_step(before, self._share_priority())
        if r.control is not None:
            log.info("outer step %d: %d peers, %.1fs for the all-reduce", self.epoch, len(gathered or {}) or 1,
                     self.last_round_seconds)

    def _set_lr(self) -> None:
        """The inner schedule follows the swarm's progress: ``inner_steps`` per outer step, plus this round's.

        Counted in the spec's micro-batches, so a peer training at a larger micro-batch follows the same schedule.
        """
        if self.inner is None:
            return
        step = self.epoch * self.spec.averaging.inner_steps + self.samples_in_round // self.spec.micro_batch
        lr = self.spec.optimizer.lr * lr_lambda(step, cfg=self.spec.optimizer)
        for group in self.inner.param_groups:
            group["lr"] = lr
