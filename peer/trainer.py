"""The peer's trainer: the model, the swarm's hivemind optimizer, and training one shard.

Every micro-batch runs forward and backward and calls ``hivemind.Optimizer.step()``, which adds
the gradients to the swarm's running count; when the swarm reaches the run's target batch size,
peers all-reduce their gradients and take one optimizer step together (the swarm's global step).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import numpy as np
import torch

from hivefold.checkpoint import load_checkpoint
from hivefold.model import build_model
from hivefold.spec import RunSpec
from hivefold.training import autocast, make_optimizer, micro_batches, sync_scheduler

log = logging.getLogger("hivefold.peer")

EMA = 0.1  # smoothing of the reported loss and throughput


@dataclass
class ShardResult:
    samples: int = 0
    losses: list[tuple[float, int]] = field(default_factory=list)  # (loss, hivemind epoch) per micro-batch
    compute_seconds: float = 0.0
    interrupted: bool = False


@dataclass
class Meter:
    """Live figures the heartbeat thread reads (plain floats: atomic enough across threads)."""

    samples_total: int = 0
    loss: float = 0.0
    samples_per_second: float = 0.0

    def update(self, samples: int, seconds: float) -> None:
        self.samples_total += samples
        self.samples_per_second = _ema(self.samples_per_second, samples / max(seconds, 1e-9))

    def update_loss(self, loss: float) -> None:
        self.loss = _ema(self.loss, loss)


def _ema(old: float, new: float) -> float:
    """Exponential moving average that starts at the first value (0 means no value yet)."""
    return new if old == 0 else (1 - EMA) * old + EMA * new


class Trainer:
    def __init__(self, spec: RunSpec, dht: hivemind.DHT, *, device: str, client_mode: bool,
                 step_interval: float = 1.0):
        self.spec, self.device, self.step_interval = spec, device, step_interval
        self.model = build_model(spec.model, spec.seed).to(device)
        self.opt = make_optimizer(spec, self.model, dht, client_mode=client_mode)
        self.meter = Meter()
        log.info("model: %.2fM parameters on %s", self.model.num_parameters() / 1e6, device)

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    @property
    def global_step(self) -> int:
        return max(self.opt.tracker.global_epoch, self.opt.local_epoch)

    def load_swarm_state(self, fetch_checkpoint) -> str:
        """Join at the swarm's current state: from peers, else the coordinator's checkpoint, else the init."""
        self.opt.load_state_from_peers()
        if self.opt.local_epoch > 0:
            return f"peers (step {self.opt.local_epoch})"
        path: Path | None = fetch_checkpoint()
        if path is None:
            return "the run's initial weights"
        ckpt = load_checkpoint(path)
        if ckpt.spec.hash != self.spec.hash:
            log.warning("ignoring checkpoint %s: it belongs to another run spec", path)
            return "the run's initial weights"
        self.model.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            self.opt.load_state_dict(ckpt.optimizer)
            sync_scheduler(self.opt)
        return f"the coordinator's checkpoint (step {ckpt.step})"

    def train_shard(self, sequences: np.ndarray, stop: threading.Event, on_batch=None) -> ShardResult:
        """Train on every sequence of the shard; stops early (``interrupted``) when ``stop`` is set.

        Gradients of consecutive micro-batches are summed locally for ``step_interval`` seconds before
        one ``hivemind.Optimizer.step()``: each step call publishes progress to the DHT, and doing that
        for every micro-batch costs a small CPU a noticeable share of its time.
        """
        result = ShardResult()
        self.model.train()
        pending, window_start = 0, time.perf_counter()
        batches = list(micro_batches(sequences, self.spec.micro_batch))
        for i, (inputs, targets) in enumerate(batches):
            if stop.is_set():
                result.interrupted = True
                break
            t0 = time.perf_counter()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.device):
                _, loss = self.model(inputs, targets)
            (loss * len(inputs)).backward()  # summed here, divided by the sample count at the step
            value = float(loss.detach())
            result.compute_seconds += time.perf_counter() - t0
            result.samples += len(inputs)
            result.losses.append((value, self.opt.local_epoch))
            pending += len(inputs)
            last = i == len(batches) - 1
            if last or stop.is_set() or time.perf_counter() - window_start >= self.step_interval:
                self._step(pending)
                elapsed = time.perf_counter() - window_start
                self.meter.update(pending, elapsed)
                pending, window_start = 0, time.perf_counter()
            self.meter.update_loss(value)
            if on_batch is not None:
                on_batch(len(inputs), value)
        return result

    def _step(self, samples: int) -> None:
        """Turn the summed gradients into a mean over ``samples``, clip, and hand them to the swarm."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(samples)
        if self.spec.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optimizer.grad_clip)
        self.opt.step(batch_size=samples)  # may block for the swarm's all-reduce
        self.opt.zero_grad()

    def shutdown(self) -> None:
        self.opt.shutdown()
