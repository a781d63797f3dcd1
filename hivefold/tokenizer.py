"""Tokenizers behind one small interface; byte-level by default (needs no download).

A tokenizer maps text to integer ids below ``vocab_size`` and back. The run spec names the
tokenizer, so every peer decodes the same way; a trained BPE can be added by implementing
:class:`Tokenizer` and registering it in ``TOKENIZERS``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from hivefold.errors import ConfigError


class Tokenizer(Protocol):
    """What the corpus builder, trainer and sampler need from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int  # separates documents

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: "np.ndarray | list[int]") -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus one end-of-text token (256)."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: "np.ndarray | list[int]") -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


TOKENIZERS = {ByteTokenizer.name: ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise ConfigError(f"unknown tokenizer {name!r}; available: {', '.join(TOKENIZERS)}") from None
