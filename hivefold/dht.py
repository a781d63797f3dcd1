"""hivemind's DHT, started the way every hivefold process needs it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

import hivemind
from hivemind.p2p import P2PDaemonError

from hivefold.errors import HivefoldError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
REAP_TIMEOUT_S = 5.0  # a DHT process that failed to start exits by itself; wait this long before killing it


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


class BootstrapFailed(HivefoldError):
    """None of the DHT's initial peers answered (for a peer: the coordinator's node, which may be restarting)."""


def join_dht(**kwargs) -> SwarmDHT:
    """A started ``SwarmDHT(**kwargs)``; :class:`BootstrapFailed` when none of its ``initial_peers`` answered.

    hivemind reports that two ways, by where it failed: the libp2p daemon could not dial any of them
    (``P2PDaemonError``), or it dialled but no DHT node answered its pings (``RuntimeError``). Both mean
    "try again when the bootstrap node is back", which the caller decides; the failed attempt's DHT
    process is reaped either way, so retries leave nothing behind.
    """
    dht = SwarmDHT(start=False, **kwargs)
    try:
        dht.run_in_background(await_ready=True)
    except (P2PDaemonError, RuntimeError) as e:
        dht.join(REAP_TIMEOUT_S)  # it returns once the start failed
        if dht.is_alive():
            dht.kill()
            dht.join(REAP_TIMEOUT_S)
        if "bootstrap" in str(e):
            raise BootstrapFailed(str(e)) from None
        raise
    return dht


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
