"""The peer's trainer path against a plain torch loop, on one device, same model and settings.

    python benchmarks/device_throughput.py [--device auto|cpu|cuda|mps] [--models tiny small] [--seconds 20]
                                           [--threads N] [--json PATH]

For each model, in one run: (1) a plain loop, the best a user could write (forward and backward
under the same autocast, gradient clipping, AdamW, fused on CUDA), and (2) the peer's own path,
``peer.trainer.Trainer.train_shard`` with its averaging mode (``diloco``, one peer alone in its
swarm, so a round is a local outer step) over shards of the same batches. Prints samples/s, tokens/s,
peak memory (CUDA: max allocated; CPU: peak RSS) and ``trainer_ratio`` = trainer / plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivefold.dht import SwarmDHT  # noqa: E402
from hivefold.model import build_model  # noqa: E402
from hivefold.spec import (  # noqa: E402
    AveragingConfig,
    ModelConfig,
    OptimizerConfig,
    RunSpec,
    ShardInfo,
    model_config_from_name,
)
from hivefold.training import autocast, inner_optimizer  # noqa: E402
from peer.device import resolve_device  # noqa: E402
from peer.trainer import Trainer  # noqa: E402

SHARD = 256  # sequences per shard handed to the trainer


def _spec(model: ModelConfig, seq_len: int, micro_batch: int) -> RunSpec:
    return RunSpec(run_id=f"bench-{time.time_ns()}", seed=0, tokenizer="bytes", seq_len=seq_len,
                   micro_batch=micro_batch, target_batch_size=micro_batch, model=model,
                   optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0),
                   averaging=AveragingConfig(mode="diloco", inner_steps=100),
                   shards=(ShardInfo(0, "0" * 64, 1, 1),), validation=ShardInfo(-1, "0" * 64, 1, 1))


def _peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plain(spec: RunSpec, device: str, seconds: float) -> dict:
    model = build_model(spec.model, 0).to(device)
    opt = inner_optimizer(spec, model)
    x = torch.randint(0, spec.model.vocab_size, (spec.micro_batch, spec.seq_len + 1), device=device)
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
        n += spec.micro_batch
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"samples_s": n / elapsed, "peak_bytes": _peak(device)}


def trainer_path(spec: RunSpec, device: str, seconds: float, dht: SwarmDHT) -> dict:
    trainer = Trainer(spec, dht, device=device, client_mode=False, micro_batch=spec.micro_batch)
    rng = np.random.default_rng(0)
    shard = rng.integers(0, spec.model.vocab_size, (SHARD, spec.seq_len + 1)).astype(np.uint16)
    stop = threading.Event()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train_shard(shard[: 3 * spec.micro_batch], stop)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += trainer.train_shard(shard, stop).samples  # ends with a device sync (the shard's losses)
    elapsed = time.perf_counter() - t0
    peak = _peak(device)
    trainer.shutdown()
    return {"samples_s": n / elapsed, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = torch.cuda.get_device_name(0) if device == "cuda" else f"{device}, {torch.get_num_threads()} threads"
    print(f"device {label}, torch {torch.__version__}, seq_len {args.seq_len}, micro-batch {args.micro_batch}"
          f"{', bf16 autocast' if device == 'cuda' else ''}")
    dht = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    rows = []
    try:
        for name in args.models:
            spec = _spec(model_config_from_name(name, vocab_size=257, max_seq_len=args.seq_len), args.seq_len,
                         args.micro_batch)
            base = plain(spec, device, args.seconds)
            ours = trainer_path(dataclasses.replace(spec, run_id=f"{spec.run_id}-{name}"), device, args.seconds, dht)
            row = {"model": name, "params": build_model(spec.model, 0).num_parameters(), "device": label,
                   "plain_samples_s": base["samples_s"], "trainer_samples_s": ours["samples_s"],
                   "trainer_ratio": ours["samples_s"] / base["samples_s"],
                   "tokens_s": ours["samples_s"] * args.seq_len, "plain_peak_bytes": base["peak_bytes"],
                   "trainer_peak_bytes": ours["peak_bytes"]}
            rows.append(row)
            print(f"{name:>6}: {row['params'] / 1e6:6.2f}M params  plain {base['samples_s']:8.1f} samples/s  "
                  f"trainer {ours['samples_s']:8.1f} samples/s  trainer_ratio {row['trainer_ratio']:.3f}  "
                  f"peak {ours['peak_bytes'] / 2**20:8.1f} MiB")
    finally:
        dht.shutdown()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
