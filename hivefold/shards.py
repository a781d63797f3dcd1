"""Shards: fixed-size blocks of token sequences, stored as ``.npy`` files pinned by sha256.

A shard is a ``uint16`` array of shape ``(num_sequences, seq_len + 1)``: each row holds the inputs
and, shifted by one, the targets of one training sequence. The corpus is split by document into a
held-out validation set (never leased) and the training set; training sequences are shuffled with
the run's seed before being cut into shards, so each shard is a sample of the whole corpus.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from hivefold.errors import CorpusError, IntegrityError
from hivefold.spec import ShardInfo
from hivefold.tokenizer import Tokenizer

DTYPE = np.uint16  # holds every id of a vocabulary up to 65,536


def encode_shard(sequences: np.ndarray) -> bytes:
    """Serialize a ``(n, seq_len + 1)`` array as ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sequences, dtype=DTYPE), allow_pickle=False)
    return buf.getvalue()


def decode_shard(data: bytes, *, sha256: str, seq_len: int, vocab_size: int) -> np.ndarray:
    """Parse and validate shard bytes; raise IntegrityError if they are not the pinned shard."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise IntegrityError(f"shard sha256 mismatch: got {actual[:12]}, expected {sha256[:12]}")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise IntegrityError(f"shard is not a valid .npy array: {e}") from e
    if arr.dtype != DTYPE or arr.ndim != 2 or arr.shape[1] != seq_len + 1 or arr.shape[0] == 0:
        raise IntegrityError(f"shard has dtype {arr.dtype} shape {arr.shape}; expected {np.dtype(DTYPE)} "
                             f"(n, {seq_len + 1})")
    if int(arr.max()) >= vocab_size:
        raise IntegrityError(f"shard holds token id {int(arr.max())} >= vocab size {vocab_size}")
    return arr


def _sequences(docs: list[str], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """Concatenate documents (each followed by end-of-text) and cut into rows of ``seq_len + 1``."""
    parts = []
    for doc in docs:
        parts.append(tokenizer.encode(doc))
        parts.append(np.array([tokenizer.eot_id], dtype=DTYPE))
    stream = np.concatenate(parts).astype(DTYPE) if parts else np.zeros(0, dtype=DTYPE)
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_shards(docs: list[str], tokenizer: Tokenizer, *, seq_len: int, shard_sequences: int,
                 val_fraction: float, max_val_sequences: int, seed: int,
                 out_dir: Path) -> tuple[list[ShardInfo], ShardInfo]:
    """Tokenize ``docs`` into shard files under ``out_dir``; return (training shards, validation shard)."""
    if shard_sequences < 1:
        raise CorpusError(f"shard_sequences must be >= 1, got {shard_sequences}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    total_chars = sum(len(d) for d in docs)
    val_budget = max(1, int(total_chars * val_fraction))
    val_docs, train_docs, taken = [], [], 0
    for i in order:
        # Hold out whole documents so validation text is never seen in training.
        if taken < val_budget and len(order) > 1 and len(val_docs) < len(order) - 1:
            val_docs.append(docs[i])
            taken += len(docs[i])
        else:
            train_docs.append(docs[i])
    if len(docs) == 1:  # a single file: hold out its tail instead
        cut = int(len(docs[0]) * (1 - val_fraction))
        train_docs, val_docs = [docs[0][:cut]], [docs[0][cut:]]
    train = _sequences(train_docs, tokenizer, seq_len)
    val = _sequences(val_docs, tokenizer, seq_len)[:max_val_sequences]
    if len(train) == 0 or len(val) == 0:
        raise CorpusError(f"corpus too small: it gives {len(train)} training and {len(val)} validation sequences "
                          f"of {seq_len + 1} tokens; add text or lower --seq-len")
    train = train[rng.permutation(len(train))]
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard_id, start in enumerate(range(0, len(train), shard_sequences)):
        block = train[start:start + shard_sequences]
        data = encode_shard(block)
        _write_atomic(out_dir / shard_filename(shard_id), data)
        infos.append(ShardInfo(shard_id, hashlib.sha256(data).hexdigest(), len(data), len(block)))
    data = encode_shard(val)
    _write_atomic(out_dir / VAL_FILENAME, data)
    return infos, ShardInfo(-1, hashlib.sha256(data).hexdigest(), len(data), len(val))


VAL_FILENAME = "validation.npy"


def shard_filename(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.npy"
