"""Choosing the training device and describing it to the coordinator."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import tempfile
import time

import torch

from hivefold.errors import ConfigError
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")


def resolve_device(requested: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise ConfigError("--device cuda: no CUDA device is visible to torch (is a CUDA build of torch installed?)")
    if requested == "mps" and not mps:
        raise ConfigError("--device mps: Apple's MPS backend is not available on this machine")
    return requested


def limit_memory(fraction: float | None, device: str) -> float:
    """Apply ``--gpu-memory-fraction`` on CUDA; the share of the device's memory this process may take (1: all)."""
    if fraction is None:
        return 1.0
    if not device.startswith("cuda"):
        log.warning("--gpu-memory-fraction %g is ignored on %s: it limits a CUDA device's memory only", fraction,
                    device)
        return 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("this peer may take %.0f%% of the GPU's memory (--gpu-memory-fraction)", 100 * fraction)
    return fraction


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str) -> pb.DeviceReport:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return pb.DeviceReport(kind="cuda", name=props.name, memory_bytes=props.total_memory)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return pb.DeviceReport(kind=device, name="Apple GPU" if device == "mps" else _cpu_name(), memory_bytes=memory)


AUTO_MAX_FACTOR = 32  # auto tries the run's micro-batch times 1, 2, 4, ... up to this factor
AUTO_MEMORY_SHARE = 0.5  # of the GPU's free memory the probe may fill (optimizer state, other peers need the rest)
AUTO_GOOD_ENOUGH = 0.9  # the smallest size within this share of the best throughput wins: small batches learn more


@contextlib.contextmanager
def _probe_lock():
    """Held while this process probes its GPU: one probe at a time per GPU on this machine."""
    try:
        key = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except (AttributeError, RuntimeError):
        key = str(torch.cuda.current_device())
    path = os.path.join(tempfile.gettempdir(), f"hivefold-gpu-probe-{key}.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def choose_micro_batch(requested: int, *, run_micro_batch: int, model: torch.nn.Module, device: str,
                       seq_len: int, memory_fraction: float = 1.0) -> tuple[int, str]:
    """The micro-batch this peer trains at, and why.

    ``requested`` > 0 is the volunteer's ``--micro-batch``. Auto on a CPU is the run's own: a CPU is
    about as fast per sample at any size, and smaller batches learn more per sample. Auto on CUDA times
    a few forward/backward passes at the run's micro-batch times 1, 2, 4, ... (stopping before memory
    runs short) and takes the smallest that comes within ``AUTO_GOOD_ENOUGH`` of the fastest. The probe
    leaves the model's parameters as they were. ``memory_fraction``: ``--gpu-memory-fraction`` (the probe
    stays within it).
    """
    if requested:
        return requested, "--micro-batch"
    if not device.startswith("cuda"):
        return run_micro_batch, "the run's (auto on a CPU)"
    from hivefold.training import autocast

    with _probe_lock():  # peers sharing a GPU take turns: two probes at once would halve each one's figures
        free, total = torch.cuda.mem_get_info()
        if memory_fraction < 1.0:
            free = min(free, max(0, int(memory_fraction * total) - torch.cuda.memory_reserved()))
        budget = AUTO_MEMORY_SHARE * free
        vocab = model.cfg.vocab_size
        rates: list[tuple[int, float]] = []
        mb = run_micro_batch
        while mb <= run_micro_batch * AUTO_MAX_FACTOR:
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                x = torch.randint(0, vocab, (mb, seq_len + 1), device=device)

                def once(x=x):
                    with autocast(device):
                        _, loss = model(x[:, :-1], x[:, 1:])
                    loss.backward()

                once()  # warm-up: kernels picked, memory allocated
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(3):
                    once()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() - base
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                model.zero_grad(set_to_none=True)
            rates.append((mb, 3 * mb / seconds))
            if 2 * peak > budget:  # the next size would not fit beside the optimizer state and other peers
                break
            mb *= 2
        torch.cuda.empty_cache()
    if not rates:
        return run_micro_batch, "the run's (the GPU had no memory to spare for a larger one)"
    best = max(rate for _, rate in rates)
    chosen = min(m for m, rate in rates if rate >= AUTO_GOOD_ENOUGH * best)
    table = ", ".join(f"{m}: {rate:.0f}/s" for m, rate in rates)
    return chosen, f"auto on {device}: samples/s by micro-batch {table}"
