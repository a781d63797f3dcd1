"""The deadlines of the leases a peer holds, and when to ask for more time.

Leases are sized by the coordinator to the work at this peer's throughput and are never extended
silently: a peer that is alive but slower than expected asks (``ExtendLease``) before one runs out,
reporting how far it got. The heartbeat thread asks for the leases :meth:`LeaseClock.due` returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

ASK_AT_FRACTION = 1 / 3  # ask once less than this share of a lease's time is left


@dataclass
class _Held:
    deadline: float  # coordinator time (the clocks agree within Register's skew window)
    granted_at: float  # when this peer got it, or its latest extension
    samples_done: int = 0


class LeaseClock:
    """Thread-safe: the work loop records leases and progress, the heartbeat thread asks for time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}

    def track(self, lease_id: str, deadline: float, now: float | None = None) -> None:
        with self._lock:
            self._held[lease_id] = _Held(deadline, time.time() if now is None else now)

    def progress(self, lease_id: str, samples_done: int) -> None:
        with self._lock:
            if lease_id in self._held:
                self._held[lease_id].samples_done = samples_done

    def extended(self, lease_id: str, deadline: float, now: float | None = None) -> None:
        with self._lock:
            if lease_id in self._held:
                self._held[lease_id].deadline = deadline
                self._held[lease_id].granted_at = time.time() if now is None else now

    def forget(self, lease_id: str) -> None:
        with self._lock:
            self._held.pop(lease_id, None)

    def earliest_deadline(self) -> float | None:
        with self._lock:
            return min((h.deadline for h in self._held.values()), default=None)

    def due(self, now: float, margin: float) -> list[tuple[str, int]]:
        """(lease id, samples done) of the leases to ask more time for: within ``margin`` seconds of their
        deadline (a couple of heartbeats) or past the last third of their time."""
        with self._lock:
            return [(lease_id, h.samples_done) for lease_id, h in self._held.items()
                    if h.deadline - now < max(margin, ASK_AT_FRACTION * (h.deadline - h.granted_at))]
