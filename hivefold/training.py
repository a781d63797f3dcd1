"""Training pieces shared by peers and the keeper: the hivemind optimizer, LR schedule, evaluation.

Both roles build the optimizer here so that every hivemind setting that must match across the
swarm (run id, target batch size, averaging timings, the optimizer and schedule) comes from the
run spec and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import hivemind
import numpy as np
import torch
from hivemind.optim.grad_averager import GradientAverager

from hivefold.model import GPT
from hivefold.spec import OptimizerConfig, RunSpec


def lr_lambda(step: int, *, cfg: OptimizerConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` over ``decay_steps`` (a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: GPT, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(spec: RunSpec, model: GPT, dht: hivemind.DHT, *, client_mode: bool = False,
                   verbose: bool = False) -> hivemind.Optimizer:
    """The swarm's optimizer: accumulates ``target_batch_size`` samples across peers, then steps.

    Must be called from a process's main thread (hivemind installs a signal handler).
    """
    cfg = spec.optimizer
    # Matchmaking requests must time out before the matchmaking window closes (hivemind warns otherwise);
    # hivemind 1.1.12 forwards averager_opts to the state averager only, so the gradient averager gets it here.
    request_timeout = min(3.0, spec.averaging.matchmaking_time / 2)
    return hivemind.Optimizer(
        dht=dht,
        run_id=spec.run_id,
        params=_param_groups(model, cfg.weight_decay),
        optimizer=partial(torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas),
        scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=partial(lr_lambda, cfg=cfg)),
        batch_size_per_step=spec.micro_batch,
        target_batch_size=spec.target_batch_size,
        matchmaking_time=spec.averaging.matchmaking_time,
        averaging_timeout=spec.averaging.averaging_timeout,
        average_state_every=spec.averaging.average_state_every,
        client_mode=client_mode,
        averager_opts=dict(request_timeout=request_timeout),
        grad_averager_factory=partial(GradientAverager, request_timeout=request_timeout),
        verbose=verbose,
    )


def sync_scheduler(opt: hivemind.Optimizer) -> None:
    """After ``load_state_dict`` restored ``local_epoch``, move the LR schedule to match it.

    hivemind keeps the schedule in step with the epoch only when it advances or loads from peers.
    """
    opt.state_averager._update_scheduler()  # noqa: SLF001 - no public API for this in hivemind 1.1.12
    opt.state_averager.state_sharing_priority = opt.local_epoch


def micro_batches(sequences: np.ndarray, micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, targets) int64 tensors of shape (<= micro_batch, seq_len); the last may be smaller."""
    for start in range(0, len(sequences), micro_batch):
        block = torch.from_numpy(sequences[start:start + micro_batch].astype(np.int64))
        yield block[:, :-1], block[:, 1:]


@torch.no_grad()
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


def autocast(device: str):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
