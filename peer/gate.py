"""Pausing and finishing: why this peer holds off training, and the one place its work loop waits.

Reasons to pause come from the volunteer (``hivefold peer pause``), a busy machine (``--idle-only``)
and the day's upload cap (``--upload-cap``); each is set and lifted on its own, and training goes on
once none is left. A reason applies either mid-shard (training stops at the next micro-batch
boundary) or only between shards (the current shard is finished first). Finishing (``hivefold peer
finish``, ``--max-hours``) completes the current shard and leaves; it lifts the volunteer's own pause,
since finishing a shard means training it.

The gate also keeps the time spent training (time not halted in it), which ``--max-hours`` counts.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hivefold.peer")

VOLUNTEER = "paused by the volunteer"
BUSY = "machine busy (--idle-only)"
UPLOAD_CAP = "daily upload cap reached (--upload-cap)"
WAIT_SLICE_S = 0.25  # how often a waiter looks at the stop event (it has no way to wake us)


class Gate:
    def __init__(self, peer_id: str, clock=time.monotonic):
        self.peer_id, self.clock = peer_id, clock
        self._cond = threading.Condition()
        self._reasons: dict[str, bool] = {}  # reason -> applies mid-shard
        self.finishing: str | None = None  # why the peer finishes, once asked to
        self._halted_since: float | None = None  # while the work loop waits here
        self._paused_since: float | None = None  # since the pause began, across waits (a lease handed back between)
        self._halted_total = 0.0
        self._started: float | None = None

    # --- reasons ------------------------------------------------------------------------------

    def pause(self, reason: str, *, mid_shard: bool = True) -> bool:
        """Add a reason to pause; False when it was already set."""
        with self._cond:
            if reason in self._reasons:
                return False
            self._reasons[reason] = mid_shard
        log.info("peer %s will pause %s: %s", self.peer_id,
                 "at the next micro-batch" if mid_shard else "once the current shard is done", reason)
        return True

    def resume(self, reason: str) -> bool:
        """Lift one reason; False when it was not set."""
        with self._cond:
            if self._reasons.pop(reason, None) is None:
                return False
            left = list(self._reasons)
            self._cond.notify_all()
        log.info("peer %s: pause lifted (%s)%s", self.peer_id, reason,
                 f"; still paused: {'; '.join(left)}" if left else "")
        return True

    def set(self, reason: str, on: bool, *, mid_shard: bool = True) -> None:
        """``pause(reason)`` when ``on``, else ``resume(reason)``."""
        if on:
            self.pause(reason, mid_shard=mid_shard)
        else:
            self.resume(reason)

    def finish(self, why: str) -> bool:
        """Complete the current shard, then leave; False when already finishing."""
        with self._cond:
            if self.finishing is not None:
                return False
            self.finishing = why
            self._reasons.pop(VOLUNTEER, None)
            self._cond.notify_all()
        log.info("peer %s finishing (%s): completing the current shard, handing back any fetched ahead, then leaving",
                 self.peer_id, why)
        return True

    def reasons(self) -> list[str]:
        with self._cond:
            return list(self._reasons)

    def holds(self, *, mid_shard: bool) -> bool:
        """Whether a pause applies here: mid-shard (at a micro-batch boundary) or between shards."""
        with self._cond:
            return self._holds(mid_shard)

    # --- waiting ------------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        """True while the work loop waits here: the peer is online but not training."""
        return self._halted_since is not None

    def wait(self, stop: threading.Event, *, mid_shard: bool, timeout: float | None = None) -> bool:
        """Block while a pause applies here: True once it lifts; False when ``stop`` is set or ``timeout`` passes."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            if not self._holds(mid_shard):
                return True
            self._halted_since = since = self.clock()
            if self._paused_since is None:
                self._paused_since = since
                log.info("peer %s paused: %s", self.peer_id, "; ".join(self._reasons))
            try:
                # Between shards, a request to finish ends the wait too: there is no shard to complete, the work
                # loop leaves (without this a peer paused by its upload cap waited for the next day).
                while self._holds(mid_shard) and not stop.is_set() and (mid_shard or self.finishing is None):
                    left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - self.clock())
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                if stop.is_set() or self._holds(mid_shard):
                    return False
                log.info("peer %s resumes after %.0fs paused", self.peer_id, self.clock() - self._paused_since)
                self._paused_since = None
                return True
            finally:
                self._halted_total += self.clock() - since
                self._halted_since = None

    def _holds(self, mid_shard: bool) -> bool:
        return any(now or not mid_shard for now in self._reasons.values())

    # --- time spent training ------------------------------------------------------------------

    def start(self) -> None:
        """Training begins now (after joining): the clock ``active_seconds`` reads starts."""
        self._started = self.clock()

    def active_seconds(self) -> float:
        """Seconds since ``start()`` not spent halted here (0 before it)."""
        if self._started is None:
            return 0.0
        now = self.clock()
        halted = self._halted_total + (now - self._halted_since if self._halted_since is not None else 0.0)
        return max(0.0, now - self._started - halted)
