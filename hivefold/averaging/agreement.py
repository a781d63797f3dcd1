"""Do the members of a round hold the same global parameters? Equal up to rounding, but never a round apart.

hivemind's all-reduce hands each member the average as a delta it adds to its own part, and a compressed
round quantizes that delta: after a round, members agree only up to rounding (fp32) or the codec's error
(fp16, int8). An exact checksum would then see a difference after almost every round and make a member
download the whole outer state again. What must be caught is a real drift: a member that applied a round
alone, or missed one. Such a drift is as large as an outer step, while rounding stays a small fraction of one.

So each member sends a small sample of its global parameters (a few values, evenly spaced, from every tensor)
with its round, and two members agree when their samples differ by less than a tenth of the latest outer
step (root mean square over the sample), plus a relative 1e-6 for fp32 rounding.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

SAMPLES_PER_TENSOR = 8
STEP_FRACTION = 0.1  # members further apart than this share of the latest outer step have drifted
ROUNDING = 1e-6  # relative: what fp32 rounding may leave between members that averaged together


def sample(tensors: list[torch.Tensor]) -> np.ndarray:
    """A few evenly spaced values from every tensor, as float32 on the host."""
    picks = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        picks.append(flat[::stride][:SAMPLES_PER_TENSOR].float())
    return torch.cat(picks).cpu().numpy().astype(np.float32) if picks else np.zeros(0, np.float32)


def fingerprint(values: np.ndarray) -> float:
    """A number in [0, 0.5) that differs, almost surely, between two different samples."""
    return zlib.crc32(values.tobytes()) / 2**33


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


class Agreement:
    """Tells rounding from drift, scaled by the latest outer step this member applied."""

    def __init__(self):
        self.step_rms = 0.0

    def note_step(self, before: np.ndarray, after: np.ndarray) -> None:
        """Record how far the latest outer step moved the sampled values."""
        if before.shape == after.shape:
            self.step_rms = _rms(after - before)

    def tolerance(self, values: np.ndarray) -> float:
        return STEP_FRACTION * self.step_rms + ROUNDING * _rms(values)

    def agrees(self, mine: np.ndarray, theirs: np.ndarray) -> bool:
        """True if ``theirs`` is ``mine`` up to rounding; False for a different shape or a real drift."""
        if mine.shape != theirs.shape or not np.all(np.isfinite(theirs)):
            return False
        return _rms(mine - theirs) <= self.tolerance(mine)
