"""DiLoCo's outer state: global parameters, outer momentum and outer step. What a member shares, installs,
downloads (consensus.py: whose) and checkpoints; :class:`~hivefold.averaging.diloco.DiLoCo` runs the rounds."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hivefold.averaging import agreement

log = logging.getLogger(__name__)

CATCH_UP_TRIES = 10  # state downloads tried while a round is in flight elsewhere (see load_state_from_peers)


class OuterState:
    """Mixed into ``DiLoCo``, whose ``__init__`` sets what these use: ``params``, ``global_params``, ``momentum``,
    ``epoch``, ``version``, ``before_change``, ``samples_in_round``, ``tracker``, ``averager``, ``client_mode``,
    ``_lock``, ``_pending``, ``_downloads``, ``_global_sample``, ``guard``."""

    def load_state_from_peers(self, timeout: float | None = None, *, accept_equal: bool = False,
                              sources: list[str] | None = None) -> bool:
        """Download the newest outer state (from ``sources``, libp2p peer ids, if given; else the one most of the
        newest members hold: consensus.py); True if it moved this one forward.

        While a round is in flight elsewhere the newest state is about to change: a state taken then
        would miss that round's update forever, so it retries until the state matches the swarm's step.
        """
        if self._pending is not None:
            self._land_round(block=True)
        for attempt in range(CATCH_UP_TRIES):
            epoch, tensors, in_flight = self._downloads.fetch(timeout, sources, (self.epoch, self._global_sample))
            if in_flight and attempt + 1 < CATCH_UP_TRIES:
                time.sleep(0.5)  # a round is in flight there, or just landed: take the state once it has
                continue
            if tensors is None and epoch is not None:  # the members agree on the state this one holds: as if loaded
                log.info("this peer holds the swarm's outer state at step %d already: nothing to download", epoch)
                return self.epoch == 0 or accept_equal
            if epoch is None:
                return False
            if epoch < self.epoch or (epoch == self.epoch and self.epoch > 0 and not accept_equal):
                return False
            n = len(self.global_params)
            refused = self.guard.check_state(tensors[:n], self.global_params)
            if refused:
                log.error("refusing the outer state a peer served: %s", refused)
                return False
            self._install(epoch, tensors[:n], tensors[n:])
            return True
        return False

    def state_dict(self) -> dict:
        """The outer state for a checkpoint (the model's own parameters are the global ones there)."""
        with self._lock:
            return {"mode": "diloco", "epoch": self.epoch,
                    "momentum": [m.detach().cpu().clone() for m in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint: ``model`` already holds the checkpoint's (global) parameters."""
        if state.get("mode") != "diloco":
            raise ValueError("the checkpoint was written by another averaging mode")
        self._install(int(state["epoch"]), [p.detach().float().cpu() for p in self.params], state["momentum"])

    def _install(self, epoch: int, global_params, momentum) -> None:
        if self.before_change is not None:
            self.before_change()
        with self._lock, torch.no_grad():
            for dst, src in zip(self.global_params, global_params, strict=True):
                dst.copy_(src)
            for dst, src in zip(self.momentum, momentum, strict=True):
                dst.copy_(src)
            for p, g in zip(self.params, self.global_params, strict=True):
                p.copy_(g.to(device=p.device, dtype=p.dtype))
            self.epoch = epoch
            self.version += 1
        self.samples_in_round = 0
        if self.tracker:
            with self.tracker.pause_updates():
                self.tracker.update_epoch(epoch)
        self._set_lr()
        self._share_priority()

    def _shared_state(self):
        with self._lock:
            return ({"epoch": self.epoch, "in_flight": self._pending is not None},
                    [t.detach().cpu().clone() for t in self.global_params + self.momentum])

    def _share_priority(self) -> np.ndarray:
        """Newcomers and members that fell behind download from the member with the highest priority = step +
        fingerprint (members out of sync with their round download from its consensus: agreement.to_follow)."""
        with self._lock:
            self._global_sample = agreement.sample(self.global_params)
        if not self.client_mode:
            self.averager.state_sharing_priority = self.epoch + agreement.fingerprint(self._global_sample)
            self.averager.publish_sample(self.epoch, self._global_sample)  # what downloaders compare (consensus.py)
        return self._global_sample
