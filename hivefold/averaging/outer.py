"""DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient, and the wire compressions.

The pseudo-gradient of a round is ``global - local``: how far the swarm's average moved the
parameters, as a gradient would point (arXiv 2311.08105). With ``buf = mu * buf + g`` the update
is ``global -= lr * (g + mu * buf)``, PyTorch's SGD(nesterov=True) with dampening 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.compression import serialization as _wire
from hivemind.proto import runtime_pb2


@torch.no_grad()
def nesterov_outer_step(params: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor],
                        pseudo_grads: Sequence[torch.Tensor], *, lr: float, mu: float) -> None:
    """In place: ``momentum = mu * momentum + g``; ``params -= lr * (g + mu * momentum)``."""
    for p, buf, g in zip(params, momentum, pseudo_grads, strict=True):
        buf.mul_(mu).add_(g)
        p.sub_(g.add(buf, alpha=mu), alpha=lr)


class Int8(Uniform8BitQuantization):
    """hivemind's 8-bit codec, readable with NumPy 2.4.

    hivemind 1.1.12 reads the codebook size with ``int()`` of a one-element array, which NumPy 2.4
    refuses; the bytes on the wire are unchanged, so peers on either NumPy interoperate.
    """

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized]


# hivemind decodes by wire type through this table, in whichever process receives a part.
_wire._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Int8()


def compression(name: str) -> CompressionBase:
    """hivemind's codec for a run spec's ``compression`` (fp32 | fp16 | int8)."""
    return {"fp32": NoCompression, "fp16": Float16Compression, "int8": Int8}[name]()
