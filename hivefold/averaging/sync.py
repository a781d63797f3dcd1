"""The ``sync`` averaging mode: hivemind's Optimizer, gradients all-reduced every swarm step.

Peers accumulate gradients until the swarm has ``target_batch_size`` samples, all-reduce them and
take one AdamW step together. Every step is a matchmaking and all-reduce round, so the device idles
between rounds unless the target batch is large; prefer ``diloco`` unless the model is tiny and the
links are fast. The all-reduces are guarded against hostile members (sync_members.py).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import hivemind
import torch

from hivefold.averaging.guard import total_norm
from hivefold.averaging.guarded import Caught
from hivefold.averaging.sync_members import GuardedOptimizer
from hivefold.model import GPT
from hivefold.spec import RunSpec
from hivefold.training import lr_lambda, param_groups

log = logging.getLogger(__name__)


class SyncAveraging:
    """See ``hivefold.averaging`` for the interface. Must be built in a process's main thread."""

    _loads = 0  # state downloads tried (``version``)
    refused_out = 0  # micro-batches whose gradients were not finite, so not sent
    # hivemind's optimizer replaces the parameters inside its step, unhooked; a proof's segment that such a step
    # ends ends at its start state (hivefold.proof), as parameters do not move between steps here
    before_change = None

    def __init__(self, spec: RunSpec, model: GPT, dht: hivemind.DHT, *, client_mode: bool = False,
                 trains: bool = True, swarm_key: bytes | None = None):
        self.spec, self.model = spec, model
        self.caught = Caught()  # members the guarded all-reduces flagged (sync_members.py)
        cfg = spec.optimizer
        # Matchmaking requests must time out before the matchmaking window closes (hivemind warns otherwise);
        # hivemind 1.1.12 forwards averager_opts to the state averager only, so the gradient averager gets it here.
        request_timeout = min(3.0, spec.averaging.matchmaking_time / 2)
        self.opt = GuardedOptimizer(
            swarm_key=swarm_key, grad_clip=cfg.grad_clip,
            dht=dht, run_id=spec.run_id, params=param_groups(model, cfg.weight_decay),
            optimizer=partial(torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=partial(lr_lambda, cfg=cfg)),
            batch_size_per_step=spec.micro_batch, target_batch_size=spec.target_batch_size,
            matchmaking_time=spec.averaging.matchmaking_time, averaging_timeout=spec.averaging.averaging_timeout,
            average_state_every=spec.averaging.average_state_every, client_mode=client_mode,
            averager_opts=dict(request_timeout=request_timeout),
            grad_averager_opts=dict(request_timeout=request_timeout))

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    @property
    def version(self) -> tuple[int, int]:
        """Changes when the parameters change other than by training: a swarm step, a state download."""
        return self.opt.local_epoch, self._loads

    @property
    def global_epoch(self) -> int:
        return max(self.opt.tracker.global_epoch, self.opt.local_epoch)

    def step(self, samples: int) -> None:
        """Turn gradients summed over ``samples`` sequences into a mean, clip, and hand them to the swarm."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for g in grads:
            g.div_(samples)
        if self.spec.optimizer.grad_clip:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optimizer.grad_clip))
        else:
            norm = total_norm(grads)
        if math.isfinite(norm):
            self.opt.step(batch_size=samples)  # may block for the swarm's all-reduce
        else:  # the others would flag it (sync_members.py); these samples add nothing
            self.refused_out += 1
            log.warning("not sending this micro-batch's gradients to the swarm: they are not finite")
        self.opt.zero_grad()
        self._collect_flags(f"swarm step {self.opt.local_epoch}")

    def _collect_flags(self, where: str) -> None:
        """(training thread) The members the averagers caught, to report; and both averagers told of each."""
        self.caught.collect(self.opt.take_flags(), where)
        self.opt.forward_exclusions()

    @property
    def flagged(self) -> dict[str, str]:
        """libp2p peer id -> why: members the guarded all-reduces caught."""
        return self.caught.flagged

    def take_flags(self) -> list[tuple[str, str]]:
        """Members caught poisoning an all-reduce since the last call: ``(libp2p peer id, why)``, to report (also
        while training is paused and ``step`` is not called)."""
        self.caught.collect(self.opt.take_flags(), f"swarm step {self.opt.local_epoch}")
        return self.caught.take()

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """One bounded attempt (hivemind's own ``Optimizer.load_state_from_peers`` retries forever)."""
        before = self.opt.local_epoch
        self._loads += 1  # a download may replace the parameters even when the epoch stays
        try:
            self.opt.state_averager.load_state_from_peers(timeout=timeout)
        except FutureTimeout:  # no state, not a crash (see hivefold.averaging)
            return False
        finally:  # a member that served a bad state is reported
            self._collect_flags("state download")
        if self.opt.local_epoch <= before:
            return False
        self.opt.tracker.report_local_progress(self.opt.local_epoch, 0)
        self.opt.state_averager.state_sharing_priority = self.opt.local_epoch
        return True

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint, the LR schedule and state-sharing priority moved to its epoch."""
        self.opt.load_state_dict(state)
        self.opt.state_averager._update_scheduler()  # noqa: SLF001 - no public API for this in hivemind 1.1.12
        self.opt.state_averager.state_sharing_priority = self.opt.local_epoch

    def stats(self) -> dict:
        return {"flagged": len(self.caught.flagged), "refused_out": self.refused_out}

    def settle(self, final: bool = False) -> None:
        """Nothing runs in the background between steps in this mode (gradients short of a swarm step stay local)."""

    def shutdown(self) -> None:
        self.opt.shutdown()
