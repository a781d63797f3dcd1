"""The volunteer's controls, applied to the gate from one background thread.

Four sources pause, resume or finish the peer: commands from ``hivefold peer pause|resume|finish``
(the control channel, looked at every ``POLL_S``), ``--idle-only`` (the rest of the machine's CPU
use, sampled every second), ``--upload-cap`` (today's bytes sent, checked every second; the cap
pauses between shards until the next UTC day) and ``--max-hours`` (time spent training). The thread
runs from before the peer joins until it has left, so a command is answered even while the peer
is still loading the swarm's state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from peer.config import PeerConfig
from peer.control import POLL_S, ControlChannel
from peer.gate import BUSY, UPLOAD_CAP, VOLUNTEER, Gate
from peer.idle import IdleDetector, own_processes, sample_cpu
from peer.upload import UploadBudget, human_bytes

log = logging.getLogger("hivefold.peer")

CHECK_EVERY_S = 1.0  # idle sampling, upload count and --max-hours
TREE_EVERY_S = 10.0  # how often the list of this peer's own processes is refreshed


class Governor:
    def __init__(self, config: PeerConfig, gate: Gate, channel: ControlChannel, *, sent_bytes: Callable[[], int]):
        """``sent_bytes()``: bytes this process has sent so far (for ``--upload-cap``)."""
        self.config, self.gate, self.channel, self.sent_bytes = config, gate, channel, sent_bytes
        self.idle = IdleDetector(config.idle_only) if config.idle_only is not None else None
        self.budget = UploadBudget(config.upload_cap, config.workdir) if config.upload_cap else None
        self._capped = False  # the upload cap holds (logged once per day)
        self._tree: list[int] = []
        self._tree_at = -float("inf")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controls", daemon=True)

    def start(self) -> "Governor":
        self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)
        if self.budget is not None:
            self.budget.save()

    # --- commands -----------------------------------------------------------------------------

    def apply(self, command: str) -> tuple[bool, str]:
        """One command from ``hivefold peer``; returns ``(ok, message)`` for the sender to print."""
        peer = f"peer {self.gate.peer_id}"
        others = [r for r in self.gate.reasons() if r != VOLUNTEER]
        if command == "pause":
            if not self.gate.pause(VOLUNTEER):
                return True, f"{peer} was already paused"
            return True, (f"{peer} pauses at the next micro-batch and stays online; if the pause outlasts a lease, "
                          "it hands its leases back. `hivefold peer resume` continues")
        if command == "resume":
            if not self.gate.resume(VOLUNTEER):
                return True, f"{peer} was not paused by you" + (f"; it waits: {'; '.join(others)}" if others else "")
            return True, f"{peer} resumes" + (f", once these lift: {'; '.join(others)}" if others else "")
        if command == "finish":
            if self.gate.finishing is not None:
                return True, f"{peer} is already finishing ({self.gate.finishing})"
            self.gate.finish("asked by the volunteer")
            return True, (f"{peer} completes and submits its current shard, hands back any fetched ahead, then leaves"
                          + (f" (it waits first: {'; '.join(others)})" if others else ""))
        return False, f"unknown command {command!r}"

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_check = time.monotonic()
        while not self._done.wait(POLL_S):
            try:
                self.channel.poll(self.apply)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_EVERY_S
                    self._check()
            except Exception:  # noqa: BLE001 - a dead controls thread would leave the volunteer without pause
                log.exception("peer %s: applying the volunteer's controls failed; trying again", self.gate.peer_id)

    def _check(self) -> None:
        if self.idle is not None:
            self._check_idle()
        if self.budget is not None:
            self._check_upload()
        hours = self.config.max_hours
        if hours and self.gate.finishing is None and self.gate.active_seconds() >= hours * 3600:
            self.gate.finish(f"trained for --max-hours {hours:g}")

    def _check_idle(self) -> None:
        now = time.monotonic()
        if now - self._tree_at >= TREE_EVERY_S:
            self._tree, self._tree_at = own_processes(os.getpid()), now
        was = self.idle.busy
        busy = self.idle.update(sample_cpu(self._tree))
        if busy != was:
            log.info("peer %s: other processes use %.0f%% of this machine's CPU (--idle-only %.0f%%): %s",
                     self.gate.peer_id, 100 * (self.idle.last_share or 0.0), 100 * self.idle.share,
                     "pausing" if busy else "idle again")
        self.gate.set(BUSY, busy)

    def _check_upload(self) -> None:
        was, over = self._capped, self.budget.update(self.sent_bytes())
        self._capped = over
        if over and not was:
            left = self.budget.seconds_to_next_day()
            log.info("peer %s sent %s today (UTC), its --upload-cap of %s: finishing the current shard, then pausing "
                     "until 00:00 UTC (in %dh %02dm)", self.gate.peer_id, human_bytes(self.budget.used),
                     human_bytes(self.budget.cap), left // 3600, left % 3600 // 60)
        elif was and not over:
            log.info("peer %s: a new UTC day, the upload count starts again", self.gate.peer_id)
        self.gate.set(UPLOAD_CAP, over, mid_shard=False)
