"""DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient, and the wire compressions.

The pseudo-gradient of a round is ``global - local``: how far the swarm's average moved the
parameters, as a gradient would point (arXiv 2311.08105). With ``buf = mu * buf + g`` the update
is ``global -= lr * (g + mu * buf)``, PyTorch's SGD(nesterov=True) with dampening 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization


@torch.no_grad()
def nesterov_outer_step(params: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor],
                        pseudo_grads: Sequence[torch.Tensor], *, lr: float, mu: float) -> None:
    """In place: ``momentum = mu * momentum + g``; ``params -= lr * (g + mu * momentum)``."""
    for p, buf, g in zip(params, momentum, pseudo_grads, strict=True):
        buf.mul_(mu).add_(g)
        p.sub_(g.add(buf, alpha=mu), alpha=lr)


def compression(name: str) -> CompressionBase:
    """hivemind's codec for a run spec's ``compression`` (fp32 | fp16 | int8)."""
    return {"fp32": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}[name]()
