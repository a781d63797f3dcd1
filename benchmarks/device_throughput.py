"""Training throughput and peak memory of the peer's compute path on one device.

    python benchmarks/device_throughput.py [--device auto|cpu|cuda|mps] [--models tiny small] [--seconds 20]

Runs what a peer runs per micro-batch (forward and backward under the same autocast as
``hivefold.training``, gradient clipping, AdamW) without the swarm, and prints samples/s, tokens/s
and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivefold.model import build_model  # noqa: E402
from hivefold.spec import model_config_from_name  # noqa: E402
from hivefold.training import autocast  # noqa: E402
from peer.device import resolve_device  # noqa: E402


def measure(name: str, device: str, seq_len: int, micro_batch: int, seconds: float) -> dict:
    model = build_model(model_config_from_name(name, vocab_size=257, max_seq_len=seq_len), 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 257, (micro_batch, seq_len + 1), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(device):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: kernels, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += micro_batch
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    elapsed = time.perf_counter() - t0
    return {"params": model.num_parameters(), "samples_s": n / elapsed, "tokens_s": n * seq_len / elapsed,
            "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    device = resolve_device(args.device)
    label = torch.cuda.get_device_name(0) if device == "cuda" else device
    print(f"device {label}, torch {torch.__version__}, seq_len {args.seq_len}, micro-batch {args.micro_batch}"
          f"{', bf16 autocast' if device == 'cuda' else ''}")
    for name in args.models:
        r = measure(name, device, args.seq_len, args.micro_batch, args.seconds)
        print(f"{name:>6}: {r['params'] / 1e6:6.2f}M params  {r['samples_s']:9.1f} samples/s  "
              f"{r['tokens_s']:11.0f} tokens/s  peak memory {r['peak_bytes'] / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
