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


class Trainer:
    def __init__(self, spec: RunSpec, dht: hivemind.DHT, *, device: str, client_mode: bool):
        self.spec, self.device = spec, device
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
        """Train on every sequence of the shard; stops early (``interrupted``) when ``stop`` is set."""
        result = ShardResult()
        self.model.train()
        clip = self.spec.optimizer.grad_clip
        for inputs, targets in micro_batches(sequences, self.spec.micro_batch):
            if stop.is_set():
                result.interrupted = True
                break
            t0 = time.perf_counter()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.device):
                _, loss = self.model(inputs, targets)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            epoch = self.opt.local_epoch
            value = float(loss.detach())
            compute = time.perf_counter() - t0
            self.opt.step(batch_size=len(inputs))  # may block for the swarm's all-reduce
            self.opt.zero_grad()
            elapsed = time.perf_counter() - t0
            result.samples += len(inputs)
            result.losses.append((value, epoch))
            result.compute_seconds += compute
            m = self.meter
            m.samples_total += len(inputs)
            m.loss = value if m.loss == 0 else (1 - EMA) * m.loss + EMA * value
            rate = len(inputs) / max(elapsed, 1e-9)
            m.samples_per_second = rate if m.samples_per_second == 0 else (1 - EMA) * m.samples_per_second + EMA * rate
            if on_batch is not None:
                on_batch(len(inputs), value)
        return result

    def shutdown(self) -> None:
        self.opt.shutdown()
