"""Training pieces shared by peers, the keeper and the benchmarks: the inner optimizer and its LR
schedule, micro-batches, evaluation. Everything that must match across the swarm comes from the run
spec and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from hivefold.model import GPT
from hivefold.spec import OptimizerConfig, RunSpec


def lr_lambda(step: int, *, cfg: OptimizerConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` over ``decay_steps`` (a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def inner_optimizer(spec: RunSpec, model: GPT) -> torch.optim.AdamW:
    """AdamW over the model's parameters (no decay on biases and gains); fused kernels where the device has them."""
    cfg = spec.optimizer
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=fused)


def micro_batches(sequences: np.ndarray, micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, targets) int64 tensors of shape (<= micro_batch, seq_len); the last may be smaller."""
    for start in range(0, len(sequences), micro_batch):
        block = torch.from_numpy(sequences[start:start + micro_batch].astype(np.int64))
        yield block[:, :-1], block[:, 1:]


@torch.no_grad()
@torch.inference_mode()  # no autograd graph: the keeper evaluates beside training peers, on a shared CPU
def evaluate(model: GPT, sequences: np.ndarray, *, batch_size: int = 16, device: str = "cpu") -> float:
    """Mean cross-entropy (nats per token) of ``model`` on ``sequences``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        block = torch.from_numpy(sequences[start:start + batch_size].astype(np.int64)).to(device)
        with autocast(device):
            _, loss = model(block[:, :-1], block[:, 1:])
        total += float(loss) * len(block)
        count += len(block)
    model.train(was_training)
    return total / max(count, 1)


def autocast(device: str, bf16: bool | None = None):
    """bf16 autocast on CUDA; a no-op context elsewhere.

    ``bf16=True`` on a CPU: the CPU's bf16 autocast, for a keeper without a GPU that replays what a GPU
    peer trained in bf16 (closer to the peer's arithmetic than fp32).
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if bf16 is None:
        bf16 = kind == "cuda"
    return torch.autocast(kind, dtype=torch.bfloat16) if bf16 else torch.autocast(kind, enabled=False)
