"""hivemind's DHT, started the way every hivefold process needs it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

import hivemind

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class SwarmDHT(hivemind.DHT):
    """A ``hivemind.DHT`` whose process (and the libp2p daemon it spawns) has its own process group,
    and which dies with its owner.

    A terminal's Ctrl-C reaches every process of the foreground group. The libp2p daemon dies of it
    at once, yet the process that owns the DHT still needs it on the way out: a peer stays reachable
    until the keeper has taken its state, and the coordinator's node serves the swarm's records
    during the keeper's final checkpoint. In its own group, the DHT stops when its owner shuts it
    down, in order. If the owner is killed outright, the kernel kills the DHT process too (Linux's
    parent-death signal), so it cannot linger holding the owner's port or workdir lock; the daemon
    follows after its idle timeout.
    """

    def run(self) -> None:
        # Runs in the forked child, before the daemon is spawned.
        os.setpgid(0, 0)
        _die_with_parent()
        super().run()


def die_with_parent() -> None:
    """In a forked helper process: the kernel kills it when the process that forked it dies (Linux)."""
    _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the DHT then exits once it notices its closed pipe
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the owner died before prctl took effect
        os._exit(1)
