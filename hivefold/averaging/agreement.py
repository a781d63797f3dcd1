"""Do the members of a round hold the same global parameters? Equal up to rounding, but never a round apart.

Every member of a round takes the same decoded average (robust.py: a reducer encodes each part once for all),
so members that averaged together agree up to fp32 rounding, whatever the codec. An exact checksum would still
see that rounding after almost every round and make a member download the whole outer state again. What must
be caught is a real drift: a member that applied a round alone, or missed one. Such a drift is as large as an
outer step.

So each member sends a small sample of its global parameters (a few values, evenly spaced, from every tensor)
with its round, and two members agree when their samples differ by less than a tenth of the latest outer
step (root mean square over the sample), plus a relative 1e-6 for fp32 rounding. Not tighter: the member a
mismatch makes download is the one that follows the leader (highest step, then fingerprint), and a poisoner
that no reducer has caught yet can lead; with a thousandth of a step, honest members downloaded such a
poisoner's slightly different state (the poisoning test). A partial round (a reducer failed for one member,
which kept its own slice of those parts: a few percent of a step there) therefore goes unnoticed until it
adds up to a tenth of a step.
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
