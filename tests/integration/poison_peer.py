"""A hostile volunteer, for tests: the real ``hivefold peer``, except that every pseudo-gradient it sends into the
``diloco`` all-reduce is flipped and scaled by 16, its own update guard bypassed.

    python -m tests.integration.poison_peer peer --coordinator ... (the arguments of ``hivefold peer``)
"""

import sys

from hivefold.averaging.diloco import DiLoCo

_honest_init = DiLoCo.__init__


def _hostile_init(self, *args, **kwargs) -> None:
    _honest_init(self, *args, **kwargs)
    self.guard.check_outgoing = lambda own: ([d.mul_(-16.0) for d in own], (0.0, None))[1]


DiLoCo.__init__ = _hostile_init

if __name__ == "__main__":
    from hivefold.cli import main

    sys.exit(main())
