"""A hostile volunteer, for tests and benchmarks/poisoning.py: the real ``hivefold peer``, except that every
pseudo-gradient it sends into the ``diloco`` all-reduce is multiplied by ``$POISON_SCALE`` (default -16: flipped
and scaled), its own update guard bypassed.

    python -m tests.integration.poison_peer peer --coordinator ... (the arguments of ``hivefold peer``)
"""

import os
import sys

from hivefold.averaging.diloco import DiLoCo

_honest_init = DiLoCo.__init__


def _hostile_init(self, *args, **kwargs) -> None:
    _honest_init(self, *args, **kwargs)
    scale = float(os.environ.get("POISON_SCALE", "-16"))
    self.guard.check_outgoing = lambda own: ([d.mul_(scale) for d in own], (0.0, None))[1]


DiLoCo.__init__ = _hostile_init

if __name__ == "__main__":
    from hivefold.cli import main

    sys.exit(main())
