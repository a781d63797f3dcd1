"""The pipelined work loop's helpers: work fetched ahead, results submitted behind.

The device never waits on the coordinator. While a shard trains, :class:`Prefetcher` leases the
next one and downloads and verifies its bytes (cached by sha256); :class:`Submitter` sends
finished results from the on-disk outbox, which stays the source of truth, in the background. On
a stop, prefetched leases are handed back at once instead of being left to expire.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from hivefold.client import describe_rpc_error
from hivefold.errors import IntegrityError
from hivefold.retry import Stopped
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")

CACHE_SHARDS = 64  # shard files kept in workdir/shards
FETCH_ATTEMPTS = 3  # sha256 mismatches tolerated per lease before handing it back
ERROR_PAUSE_S = 10.0  # after an unexpected answer from the coordinator
COMPLETE = "complete"  # queued when the run has no more work


class ShardCache:
    """Shard files by sha256 under ``directory``; the ``CACHE_SHARDS`` newest are kept."""

    def __init__(self, directory: Path, fetch: Callable[[pb.WorkUnit], bytes]):
        self.dir, self.fetch = directory, fetch

    def load(self, work: pb.WorkUnit, decode: Callable[[bytes], np.ndarray]) -> np.ndarray:
        """The shard's sequences, from the cache or the coordinator; IntegrityError after repeated bad bytes."""
        cache = self.dir / f"{work.sha256}.npy"
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            if cache.exists():
                data = cache.read_bytes()
                if hashlib.sha256(data).hexdigest() == work.sha256:
                    return decode(data)
                cache.unlink()
            try:
                data = self.fetch(work)
            except IntegrityError as e:
                log.warning("shard %d attempt %d/%d: %s; fetching again", work.shard_id, attempt, FETCH_ATTEMPTS, e)
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cache)
            self._prune()
            return decode(data)
        raise IntegrityError(f"shard {work.shard_id} failed its sha256 check {FETCH_ATTEMPTS} times")

    def _prune(self) -> None:
        """A long run must not fill the volunteer's disk."""
        files = sorted(self.dir.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        for old in files[:-CACHE_SHARDS]:
            old.unlink(missing_ok=True)


class Prefetcher:
    """Keeps ``ahead`` work units leased and loaded in a background thread; ``next()`` hands them out.

    ``lease(held_ids)`` asks for a work unit (``held_ids``: every lease this peer still holds, so the
    coordinator can tell a prefetch from a restart); ``load(work)`` returns its sequences;
    ``release(work, reason)`` hands one back; ``may_lease()`` False holds off leasing more (while the peer
    pauses or finishes).
    """

    def __init__(self, *, lease, load, release, held: Callable[[], list[str]], stop: threading.Event,
                 ahead: int = 1, may_lease: Callable[[], bool] = lambda: True):
        self._lease, self._load, self._release, self._held = lease, load, release, held
        self._may_lease = may_lease
        self.stop = stop
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Semaphore(ahead)  # free slots ahead
        self._waiting: dict[str, pb.WorkUnit] = {}  # leased, not yet handed out
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def held_ids(self) -> list[str]:
        with self._lock:
            return list(self._waiting)

    def next(self, cancel: Callable[[], bool] = lambda: False,
             take: Callable[[pb.WorkUnit], None] = lambda work: None) -> tuple[pb.WorkUnit, np.ndarray] | None:
        """The next loaded work unit; None once the run is complete, the peer stops or ``cancel()`` says so.

        ``take(work)`` makes the caller hold it (``held`` lists it from then on): called in one step with
        the prefetcher letting go of it, so the leases this peer reports as held never miss it, and the
        coordinator never mistakes it for an orphan of an earlier run and issues it a second time."""
        while not self.stop.is_set() and not cancel():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item == COMPLETE:
                return None
            work, sequences = item
            with self._lock:
                take(work)
                self._waiting.pop(work.lease_id, None)
            self._ready.release()
            return work, sequences
        return None

    def close(self, reason: str = "peer stopping (prefetched)") -> None:
        """Stop prefetching and hand back every lease fetched ahead."""
        self._closed.set()
        self._ready.release()
        self._thread.join(timeout=30.0)
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for work in waiting:
            self._release(work, reason)

    def _run(self) -> None:
        while not self._closed.is_set() and not self.stop.is_set():
            self._ready.acquire()
            while not self._may_lease() and not self._closed.is_set():
                self.stop.wait(0.25)
            if self._closed.is_set() or self.stop.is_set():
                return
            try:
                if not self._fetch_one():
                    return
            except Stopped:
                return
            except grpc.RpcError as e:
                # Transient codes were already retried; anything else is logged and tried again later,
                # so one bad answer does not end a volunteer's daemon.
                log.error("coordinator answered %s; trying again in %.0fs", describe_rpc_error(e), ERROR_PAUSE_S)
                self._ready.release()
                self.stop.wait(ERROR_PAUSE_S)
            except Exception:  # noqa: BLE001 - a dead prefetcher would leave the device idle for good
                log.exception("fetching the next work unit failed; trying again in %.0fs", ERROR_PAUSE_S)
                self._ready.release()
                self.stop.wait(ERROR_PAUSE_S)

    def _fetch_one(self) -> bool:
        """Lease and load one work unit into the queue; False when the run is complete."""
        while True:
            with self._lock:  # each lease is either still here or taken by the caller: never in neither
                held = self._held() + list(self._waiting)
            resp = self._lease(held)
            if resp.run_complete:
                self._queue.put(COMPLETE)
                return False
            if resp.HasField("work"):
                break
            if self.stop.wait(resp.retry_after_s or 5.0) or self._closed.is_set():
                self._ready.release()
                return True
        work = resp.work
        with self._lock:
            self._waiting[work.lease_id] = work
        try:
            sequences = self._load(work)
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - damaged bytes, a failed download: the lease must not stay held here
            log.error("shard %d: %s; handing the lease back", work.shard_id, e)
            with self._lock:
                self._waiting.pop(work.lease_id, None)
            self._release(work, f"integrity: {e}" if isinstance(e, IntegrityError) else f"load failed: {e!r}")
            self._ready.release()
            self.stop.wait(5.0)
            return True
        if self._closed.is_set():  # closed while loading: close() hands it back
            return False
        self._queue.put((work, sequences))
        return True


class Submitter:
    """Flushes the outbox in a background thread whenever ``kick()`` is called (and every ``interval``)."""

    def __init__(self, flush: Callable[[], None], stop: threading.Event, interval: float = 30.0):
        self._flush, self.stop, self.interval = flush, stop, interval
        self._kick = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="submit", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def close(self) -> None:
        self._done.set()
        self._kick.set()
        self._thread.join(timeout=30.0)

    def _run(self) -> None:
        while not self._done.is_set():
            self._kick.wait(self.interval)
            self._kick.clear()
            if self._done.is_set() or self.stop.is_set():
                return
            try:
                self._flush()
            except Stopped:
                return
            except grpc.RpcError as e:
                log.error("submitting results failed (%s); they stay in the outbox", describe_rpc_error(e))
