"""DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient, and the wire compressions.

The pseudo-gradient of a round is ``global - local``: how far the swarm's average moved the
parameters, as a gradient would point (arXiv 2311.08105). With ``buf = mu * buf + g`` the update
is ``global -= lr * (g + mu * buf)``, PyTorch's SGD(nesterov=True) with dampening 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
)
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
        # copies: the wire buffer is read-only, and torch warns about tensors over non-writable memory
        quantized = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
        codebook = torch.from_numpy(codebook.copy()).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized]


class Int4(CompressionBase):
    """4.25 bits a value: blocks of 64 values scaled by their largest magnitude, each value the nearest of
    the 16 NF4 levels (QLoRA's quantiles of a normal distribution, which a pseudo-gradient's block roughly
    is), two to a byte, plus one bfloat16 scale per block. Streaming DiLoCo (arXiv 2501.18512) sends
    pseudo-gradients at 4 bits without loss; this is half of int8's bytes.

    hivemind's wire format names codecs by a closed enum, so this one travels as ``BLOCKWISE_8BIT``,
    hivemind's bitsandbytes codec, which hivefold never uses (it needs bitsandbytes and a GPU build):
    every hivefold process decodes that wire type with this class instead (the table below).
    """

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT
    BLOCK = 64
    BITS = 4 + 16 / BLOCK  # per value: its level, and its share of the block's bfloat16 scale
    LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
    _EDGES = (LEVELS[1:] + LEVELS[:-1]) / 2  # a value goes to the level whose interval holds it

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        if not torch.is_floating_point(tensor):
            raise ValueError(f"int4 does not support {tensor.dtype} tensors")
        flat = tensor.detach().reshape(-1).float().cpu()
        n_blocks = -(-flat.numel() // self.BLOCK)  # view(-1, ...) would refuse a tensor of no values
        blocks = torch.nn.functional.pad(flat, (0, n_blocks * self.BLOCK - flat.numel())).view(n_blocks, self.BLOCK)
        # the scale as the receiver will read it (bfloat16), so that the largest value lands on a level exactly
        scale = blocks.abs().amax(dim=1).to(torch.bfloat16)
        codes = torch.bucketize((blocks / _safe(scale)).clamp_(-1.0, 1.0), self._EDGES).to(torch.uint8).view(-1)
        packed = (codes[0::2] << 4) | codes[1::2]
        buffer = scale.view(torch.int16).numpy().astype("<i2").tobytes() + packed.numpy().tobytes()
        return runtime_pb2.Tensor(
            compression=self.compression_type, buffer=buffer,
            size=tensor.shape, dtype="bfloat16" if tensor.dtype == torch.bfloat16 else tensor.data.numpy().dtype.name,
            requires_grad=tensor.requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized_tensor.size)
        numel = int(np.prod(shape, dtype=np.int64))
        n_blocks = -(-numel // self.BLOCK)
        buffer = serialized_tensor.buffer
        if len(buffer) != 2 * n_blocks + n_blocks * self.BLOCK // 2:
            raise ValueError(f"int4: {len(buffer)} bytes do not hold a tensor of shape {shape}")
        scale = np.frombuffer(buffer, dtype="<i2", count=n_blocks).astype(np.int16)  # bfloat16 bits, little-endian
        scale = torch.from_numpy(scale).view(torch.bfloat16)
        packed = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=2 * n_blocks).copy())
        codes = torch.stack([packed >> 4, packed & 15], dim=1).view(n_blocks, self.BLOCK).long()
        values = (self.LEVELS[codes] * _safe(scale)).view(-1)[:numel]
        return values.reshape(shape).to(getattr(torch, serialized_tensor.dtype)).requires_grad_(
            serialized_tensor.requires_grad)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.BITS / torch.finfo(info.descriptor.dtype).bits


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as both ends use them: float32, never below its smallest normal (no division by zero)."""
    return scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]


# hivemind decodes by wire type through this table, in whichever process receives a part.
_wire._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Int8()
_wire._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"] = Int4()

WIRE_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": Int4.BITS / 8}  # bytes per value sent


def compression(name: str) -> CompressionBase:
    """hivemind's codec for a run spec's ``compression`` (fp32 | fp16 | int8 | int4)."""
    return {"fp32": NoCompression, "fp16": Float16Compression, "int8": Int8, "int4": Int4}[name]()
