"""Do the members of a round hold the same global parameters? Equal up to rounding, but never a round apart.

Every member of a round takes the same decoded average (robust.py: a reducer encodes each part once for all),
so members that averaged together agree up to fp32 rounding, whatever the codec. An exact checksum would still
see that rounding after almost every round and make a member download the whole outer state again. What must
be caught is a real drift: a member that applied a round alone, or missed one. Such a drift is as large as an
outer step.

So each member sends a small sample of its global parameters (a few values, evenly spaced, from every tensor)
with its round, and two members agree when their samples differ by less than a tenth of the latest outer
step (root mean square over the sample), plus a relative 1e-6 for fp32 rounding. Not tighter: with a
thousandth of a step, honest members downloaded the slightly different state of a poisoner no reducer had
caught yet, which led on fingerprint (the poisoning test, before :func:`to_follow` asked for a majority). A
partial round (a reducer failed for one member, which kept its own slice of those parts: a few percent of a
step there) therefore goes unnoticed until it adds up to a tenth of a step.

A member that disagrees follows the round's consensus (:func:`to_follow`): the largest set of members that
agree, and only then the newest state; it downloads the state from those members only. One hostile member
cannot lead a group of three; in a group of two, where nobody has a majority, the newer state leads.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

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


def rms(x: np.ndarray) -> float:
    """Root mean square, in float64."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


class Agreement:
    """Tells rounding from drift, scaled by the latest outer step this member applied."""

    def __init__(self):
        self.step_rms = 0.0

    def note_step(self, before: np.ndarray, after: np.ndarray) -> None:
        """Record how far the latest outer step moved the sampled values."""
        if before.shape == after.shape:
            self.step_rms = rms(after - before)

    def tolerance(self, values: np.ndarray) -> float:
        return STEP_FRACTION * self.step_rms + ROUNDING * rms(values)

    def agrees(self, mine: np.ndarray, theirs: np.ndarray) -> bool:
        """True if ``theirs`` is ``mine`` up to rounding; False for a different shape or a real drift."""
        if mine.shape != theirs.shape or not np.all(np.isfinite(theirs)):
            return False
        return rms(mine - theirs) <= self.tolerance(mine)


State = tuple[int, float, bytes]  # what a member sends with its round: (outer step, fingerprint, sample's bytes)


def _values(state: State) -> np.ndarray:
    return np.frombuffer(state[2], dtype=np.float32) if len(state[2]) % 4 == 0 else np.zeros(0, np.float32)


def largest_group(states: dict, agrees: Callable[[np.ndarray, np.ndarray], bool], rank: Callable) -> list:
    """The keys of the largest group of ``states`` (key -> (outer step, sample)) that agree with one another's
    founder (the same step, ``agrees(sample, sample)``), then the newest step, then the highest ``rank(key)``."""
    groups = {k: [j for j, (step, values) in states.items() if step == states[k][0] and agrees(states[k][1], values)]
              for k in states}
    best = max(states, key=lambda k: (len(groups[k]), states[k][0], rank(k)))
    return groups[best]


def to_follow(mine: State, others: dict[str, object], agreement: Agreement) -> list[str] | None:
    """The members whose state this member should download, or None if it holds the round's consensus.

    ``mine``: what this member sent with the round; ``others``: what each other member of the round sent, by
    libp2p peer id (malformed entries are left out). The consensus is the state that most members agree with
    (:meth:`Agreement.agrees`, at the same outer step), then the newest (step, fingerprint). A consensus at an
    older step than this member's is not followed: a download would not move it back.
    """
    me = object()  # a key no peer id equals
    states: dict[object, State] = {peer: tuple(x) for peer, x in others.items()
                                   if isinstance(x, (list, tuple)) and len(x) == 3 and isinstance(x[0], int)
                                   and isinstance(x[1], float) and isinstance(x[2], bytes)}
    states[me] = mine
    followed = largest_group({k: (s[0], _values(s)) for k, s in states.items()}, agreement.agrees,
                             rank=lambda k: states[k][1])
    if me in followed or states[followed[0]][0] < mine[0]:
        return None
    return followed
