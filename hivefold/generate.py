"""``hivefold generate``: sample text from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from hivefold.checkpoint import load_checkpoint
from hivefold.errors import ConfigError
from hivefold.model import build_model
from hivefold.tokenizer import get_tokenizer


def generate_text(checkpoint: Path, prompt: str, *, tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 40, seed: int = 0) -> str:
    """Return ``prompt`` followed by ``tokens`` sampled tokens, decoded."""
    if tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    ckpt = load_checkpoint(checkpoint)
    tokenizer = get_tokenizer(ckpt.spec.tokenizer)
    model = build_model(ckpt.spec.model, ckpt.spec.seed)
    model.load_state_dict(ckpt.model)
    model.eval()
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    idx = torch.tensor([list(ids)], dtype=torch.long)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(seed))
    return prompt + tokenizer.decode(out[0, idx.shape[1]:].tolist())
