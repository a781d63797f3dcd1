"""Choosing the training device and describing it to the coordinator."""

from __future__ import annotations

import os
import platform

import torch

from hivefold.errors import ConfigError
from protos import coordinator_pb2 as pb


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
