"""The peer's trainer: the model, the run's averaging mode, and training one shard fast.

Per micro-batch: forward and backward (bf16 autocast on CUDA), then the averaging mode's step
(``sync``: gradients are summed locally for ``step_interval`` seconds per hivemind step call;
``diloco``: one inner AdamW step). The device path never waits on the host: inputs go through
pinned memory with non-blocking copies on CUDA, and losses stay on the device until the shard is
done, when they are read back once.
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

from hivefold.averaging import make_averaging
from hivefold.checkpoint import load_checkpoint
from hivefold.model import build_model
from hivefold.proof import ShardRecorder
from hivefold.spec import RunSpec
from hivefold.training import autocast
from peer.device import choose_micro_batch

log = logging.getLogger("hivefold.peer")

EMA = 0.1  # smoothing of the reported loss and throughput


@dataclass
class ShardResult:
    samples: int = 0
    losses: list[tuple[float, int]] = field(default_factory=list)  # (loss, swarm step) per micro-batch
    compute_seconds: float = 0.0
    interrupted: bool = False
    proof_digests: list[bytes] = field(default_factory=list)  # commitments to the states kept (hivefold.proof)
    state_changes: list[int] = field(default_factory=list)  # where the swarm replaced the parameters mid-shard


@dataclass
class Meter:
    """Live figures the heartbeat thread reads (plain floats: atomic enough across threads)."""

    samples_total: int = 0
    loss: float = 0.0
    samples_per_second: float = 0.0
    busy_seconds: float = 0.0  # in forward, backward and the optimizer; not waiting for the network or coordinator
    started: float = field(default_factory=time.monotonic)

    def update(self, samples: int, seconds: float) -> None:
        self.samples_total += samples
        self.samples_per_second = _ema(self.samples_per_second, samples / max(seconds, 1e-9))

    def update_loss(self, loss: float) -> None:
        self.loss = _ema(self.loss, loss)

    @property
    def utilization(self) -> float:
        """Share of wall time since the peer started training spent computing."""
        return min(1.0, self.busy_seconds / max(time.monotonic() - self.started, 1e-9))


def _ema(old: float, new: float) -> float:
    """Exponential moving average that starts at the first value (0 means no value yet)."""
    return new if old == 0 else (1 - EMA) * old + EMA * new


class Trainer:
    def __init__(self, spec: RunSpec, dht: hivemind.DHT, *, device: str, client_mode: bool,
                 step_interval: float = 1.0, micro_batch: int = 0, memory_fraction: float = 1.0,
                 swarm_key: bytes | None = None):
        self.spec, self.device, self.step_interval = spec, device, step_interval
        self.model = build_model(spec.model, spec.seed).to(device)
        self.micro_batch, why = choose_micro_batch(micro_batch, run_micro_batch=spec.micro_batch, model=self.model,
                                                   device=device, seq_len=spec.seq_len, memory_fraction=memory_fraction)
        log.info("micro-batch %d (%s)", self.micro_batch, why)
        self.averaging = make_averaging(spec, self.model, dht, client_mode=client_mode, swarm_key=swarm_key)
        self.meter = Meter()
        self.diloco = spec.averaging.mode == "diloco"
        log.info("model: %.2fM parameters on %s, %s averaging", self.model.num_parameters() / 1e6, device,
                 spec.averaging.mode)

    @property
    def epoch(self) -> int:
        return self.averaging.epoch

    @property
    def global_step(self) -> int:
        return self.averaging.global_epoch

    def load_swarm_state(self, fetch_checkpoint, timeout: float = 60.0) -> str:
        """Join at the swarm's current state: from peers, else the coordinator's checkpoint, else the init."""
        if self.averaging.load_state_from_peers(timeout=timeout):
            return f"peers (step {self.epoch})"
        path: Path | None = fetch_checkpoint()
        if path is None:
            return "the run's initial weights"
        ckpt = load_checkpoint(path)
        if ckpt.spec.hash != self.spec.hash:
            log.warning("ignoring checkpoint %s: it belongs to another run spec", path)
            return "the run's initial weights"
        self.model.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            self.averaging.load_state_dict(ckpt.optimizer)
        return f"the coordinator's checkpoint (step {ckpt.step})"

    def train_shard(self, sequences: np.ndarray, stop: threading.Event, on_batch=None, pause=None,
                    recorder: ShardRecorder | None = None) -> ShardResult:
        """Train on every sequence of the shard; stops early (``interrupted``) when ``stop`` is set.

        ``recorder`` keeps what a proof of training needs (``hivefold.proof``), at each segment's start.

        ``pause``, at each micro-batch boundary: ``pause.requested()`` says the volunteer's controls want
        training to halt; the gradients summed so far are stepped first (they would be stale after the
        pause), then ``pause.wait()`` blocks until it lifts (True) or the shard must be given up (False).
        """
        result = ShardResult()
        self.model.train()
        mb = self.micro_batch
        data = torch.from_numpy(sequences.astype(np.int64))
        cuda = self.device.startswith("cuda")
        if cuda:
            data = data.pin_memory()
        losses: list[torch.Tensor] = []
        epochs: list[int] = []
        versions: list = []  # the averaging's parameter version at each micro-batch (hivefold.proof)
        pending, window_start = 0, time.perf_counter()

        def step() -> float:
            """Hand the ``pending`` samples' gradients to the averaging mode; returns the compute seconds spent."""
            nonlocal pending, window_start
            t1 = time.perf_counter()
            waited = self.averaging.stats().get("wait_seconds", 0.0)
            self.averaging.step(pending)
            busy = 0.0
            if self.diloco:  # the inner step is compute; a wait for a slow all-reduce is not
                busy = time.perf_counter() - t1 - (self.averaging.stats()["wait_seconds"] - waited)
            self.meter.update(pending, time.perf_counter() - window_start)
            pending, window_start = 0, time.perf_counter()
            return busy

        starts = range(0, len(data), mb)
        params = list(self.model.parameters())
        inner = getattr(self.averaging, "inner", None) if self.diloco else None
        # where the swarm replaces the parameters, a segment ends at what training left (a finished record ignores it)
        self.averaging.before_change = (lambda: recorder.before_change(params)) if recorder is not None else None
        for i, start in enumerate(starts):
            if pause is not None and pause.requested():
                if pending:
                    step()
                if not pause.wait():
                    result.interrupted = True
                    break
                window_start = time.perf_counter()
            if stop.is_set():
                result.interrupted = True
                break
            if recorder is not None:
                changed = bool(versions) and self.averaging.version != versions[-1]
                recorder.before_batch(i, params, inner, changed=changed)
            t0 = time.perf_counter()
            block = data[start:start + mb].to(self.device, non_blocking=cuda)
            with autocast(self.device):
                _, loss = self.model(block[:, :-1], block[:, 1:])
            (loss * len(block)).backward()  # summed here, divided by the sample count at the step
            losses.append(loss.detach())
            epochs.append(self.averaging.epoch)
            versions.append(self.averaging.version)
            result.samples += len(block)
            pending += len(block)
            busy = time.perf_counter() - t0
            last = i == len(starts) - 1
            if self.diloco or last or stop.is_set() or time.perf_counter() - window_start >= self.step_interval:
                if recorder is not None:
                    recorder.record_lr(inner)
                busy += step()
            result.compute_seconds += busy
            self.meter.busy_seconds += busy
            if on_batch is not None:
                on_batch(len(block))
        t0 = time.perf_counter()
        values = torch.stack(losses).float().tolist() if losses else []  # one device-to-host sync per shard
        self.meter.busy_seconds += time.perf_counter() - t0  # queued device work finishing
        result.losses = list(zip(values, epochs, strict=True))
        versions.append(self.averaging.version)
        result.state_changes = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
        if recorder is not None:
            recorder.finish(params)
            result.proof_digests = recorder.digests(result.state_changes)
        for value in values[-8:]:
            self.meter.update_loss(value)
        return result

    def shutdown(self) -> None:
        self.averaging.shutdown()
