"""hivemind's DHT, started the way every hivefold process needs it."""

from __future__ import annotations

import os

import hivemind


class SwarmDHT(hivemind.DHT):
    """A ``hivemind.DHT`` whose process (and the libp2p daemon it spawns) has its own process group.

    A terminal's Ctrl-C reaches every process of the foreground group. The libp2p daemon dies of it
    at once, yet the process that owns the DHT still needs it on the way out: a peer stays reachable
    until the keeper has taken its state, and the coordinator's node serves the swarm's records
    during the keeper's final checkpoint. In its own group, the DHT stops when its owner shuts it
    down, in order. If the owner is killed, the DHT process sees its pipe close and exits, and the
    daemon follows after its idle timeout.
    """

    def run(self) -> None:
        os.setpgid(0, 0)  # runs in the forked child, before the daemon is spawned
        super().run()
