"""Checkpoints: model + optimizer + run spec + step in one torch file, written atomically.

Files are loaded with ``torch.load(weights_only=True)`` only: a checkpoint downloaded from a
coordinator can hold tensors and plain containers, never pickled code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hivefold.errors import ConfigError
from hivefold.spec import RunSpec

# Keys of the checkpoint dict.
KEY_MODEL = "model"
KEY_OPTIMIZER = "optimizer"
KEY_SPEC = "spec_json"
KEY_STEP = "step"
KEY_VAL_LOSS = "val_loss"


@dataclass
class Checkpoint:
    spec: RunSpec
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    val_loss: float | None


def checkpoint_filename(step: int) -> str:
    return f"step-{step:08d}.pt"


def newest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (names zero-pad the step, so they sort by it)."""
    files = sorted(directory.glob("step-*.pt"))
    return files[-1] if files else None


def save_checkpoint(path: Path, *, spec: RunSpec, step: int, model: dict, optimizer: dict | None,
                    val_loss: float | None) -> None:
    """Write to a temp file then ``os.replace``: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({KEY_MODEL: model, KEY_OPTIMIZER: optimizer, KEY_SPEC: spec.to_json(), KEY_STEP: step,
                KEY_VAL_LOSS: val_loss}, tmp)
    os.replace(tmp, path)
    # The spec also lives beside the checkpoint in plain text, for humans and other tools.
    spec_path = path.parent / "spec.json"
    if not spec_path.exists():
        spec_path.write_text(spec.to_json())


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(spec=RunSpec.from_json(raw[KEY_SPEC]), step=int(raw[KEY_STEP]), model=raw[KEY_MODEL],
                          optimizer=raw.get(KEY_OPTIMIZER), val_loss=raw.get(KEY_VAL_LOSS))
    except (RuntimeError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{path} is not a hivefold checkpoint: {e}") from e
