"""A hostile volunteer, for tests and benchmarks/poisoning.py: the real ``hivefold peer``, except that every
pseudo-gradient it sends into the ``diloco`` all-reduce, or every gradient into ``sync``'s, is multiplied by
``$POISON_SCALE`` (default -16: flipped and scaled), its own update guard bypassed.

    python -m tests.integration.poison_peer peer --coordinator ... (the arguments of ``hivefold peer``)
"""

import os
import sys

from hivefold.averaging.diloco import DiLoCo
from hivefold.averaging.sync_members import GuardedGradientAverager

SCALE = float(os.environ.get("POISON_SCALE", "-16"))
_honest_init = DiLoCo.__init__
_honest_load = GuardedGradientAverager.load_accumulators_into_averager_


def _hostile_init(self, *args, **kwargs) -> None:
    _honest_init(self, *args, **kwargs)
    self.guard.check_outgoing = lambda own: ([d.mul_(SCALE) for d in own], (0.0, None))[1]


def _hostile_load(self) -> None:
    _honest_load(self)
    with self.get_tensors() as tensors:
        for t in tensors:
            t.mul_(SCALE)


DiLoCo.__init__ = _hostile_init
GuardedGradientAverager.load_accumulators_into_averager_ = _hostile_load

if __name__ == "__main__":
    from hivefold.cli import main

    sys.exit(main())
