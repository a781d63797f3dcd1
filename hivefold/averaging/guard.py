"""Bounds on what enters and leaves each outer all-reduce, so one bad or hostile peer cannot wreck the model.

Before this peer sends its pseudo-gradient, the guard refuses one with non-finite values or a norm far beyond
the recent outer updates (a diverged local model, a bug): the peer then takes part with nothing and starts the
next round from the global parameters. After the all-reduce, it refuses an averaged update with non-finite
values or such a norm (a member sent NaNs or a huge tensor): the peer applies its own pseudo-gradient instead,
as if no group had formed, and says so. The recent range is the median norm of the last accepted updates;
until there are a few, a bound relative to this peer's own pseudo-gradient applies. Whatever the range, no
update may exceed the :func:`update_ceiling`: the most any member's inner optimizer can move the model in the
samples it may claim (without it, a member that had just reloaded the state, with no history and nothing of
its own, would accept any finite average). A downloaded outer state (a resync, a newcomer) is refused when it
has non-finite values or parameters far larger than this peer's (a member that applied a huge update would
otherwise hand it on). Sign flips and subtler poison are the robust all-reduce's to catch (robust.py): it sees
each member's slice, where this guard sees only the average.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

NORM_FACTOR = 10.0  # an update more than this many times the recent median norm is refused
STATE_FACTOR = 10.0  # a downloaded state whose parameters' norm is over this many times this peer's is refused
HISTORY = 16  # accepted update norms remembered
WARMUP = 3  # below this many, the bound is relative to this peer's own pseudo-gradient


ADAM_MARGIN = 2.0  # over the largest move of one AdamW step per parameter


def update_ceiling(lr: float, betas: tuple[float, float], steps: float, params: list[torch.Tensor]) -> float:
    """The largest norm an honest pseudo-gradient can have after ``steps`` inner AdamW steps at peak learning rate
    ``lr`` from ``params``: an Adam step moves each parameter by at most about lr × max(1, (1-β1)/sqrt(1-β2))
    (Kingma & Ba, 2015, section 2.1), and decoupled weight decay at most shrinks it to zero."""
    per_step = lr * max(1.0, (1 - betas[0]) / math.sqrt(1 - betas[1])) * ADAM_MARGIN
    numel = sum(p.numel() for p in params)
    return per_step * steps * math.sqrt(numel) + total_norm(params)


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm over all tensors (inf or nan if any value is)."""
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


class UpdateGuard:
    def __init__(self, factor: float = NORM_FACTOR):
        self.factor = factor
        self.ceiling = math.inf  # no update may be larger (update_ceiling), whatever the recent range
        self.norms: deque[float] = deque(maxlen=HISTORY)
        self.refused_out = 0
        self.refused_in = 0

    def recent_norm(self) -> float:
        """The median norm of the recently accepted updates; 0.0 until there are a few."""
        return statistics.median(self.norms) if len(self.norms) >= WARMUP else 0.0

    def _limit(self, reference: float | None) -> float | None:
        if len(self.norms) >= WARMUP:
            limit = self.factor * statistics.median(self.norms)
        else:
            limit = self.factor * reference if reference else math.inf
        limit = min(limit, self.ceiling)
        return None if limit == math.inf else limit

    def check_outgoing(self, own: list[torch.Tensor]) -> tuple[float, str | None]:
        """(norm, None) if ``own`` may be sent, else (norm, why not)."""
        norm = total_norm(own)
        if not math.isfinite(norm):
            self.refused_out += 1
            return norm, "it has non-finite values"
        limit = self._limit(None)
        if limit is not None and norm > limit:
            self.refused_out += 1
            return norm, f"its norm {norm:.3g} is over {self.factor:.0f}x the recent outer updates' ({limit:.3g})"
        return norm, None

    def check_incoming(self, update: list[torch.Tensor], own_norm: float) -> str | None:
        """None if the averaged ``update`` may be applied (and it is remembered), else why not."""
        norm = total_norm(update)
        limit = self._limit(own_norm if math.isfinite(own_norm) else None)
        if not math.isfinite(norm):
            why = "it has non-finite values"
        elif limit is not None and norm > limit:
            why = f"its norm {norm:.3g} is over the bound {limit:.3g}"
        else:
            if norm > 0:  # a round where nobody trained says nothing about the range
                self.norms.append(norm)
            return None
        self.refused_in += 1
        return why

    @staticmethod
    def check_state(params: list[torch.Tensor], own: list[torch.Tensor]) -> str | None:
        """None if a downloaded state's global ``params`` may replace this peer's ``own``, else why not."""
        theirs, mine = total_norm(params), total_norm(own)
        if not math.isfinite(theirs):
            return "it has non-finite values"
        if math.isfinite(mine) and mine > 0 and theirs > STATE_FACTOR * mine:
            return f"its parameters' norm {theirs:.3g} is over {STATE_FACTOR:.0f}x this peer's ({mine:.3g})"
        return None

    def accept_own(self, norm: float) -> None:
        """This peer applied its own update (no group): its norm counts towards the recent range."""
        if math.isfinite(norm) and norm > 0:
            self.norms.append(norm)
