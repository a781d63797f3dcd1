"""Retrying transient gRPC failures with exponential backoff and full jitter."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from hivefold.errors import HivefoldError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes that mean "try again later": the server is down, restarting, overloaded or slow.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


class Stopped(HivefoldError):
    """The caller's stop event was set while waiting to retry."""


class Unreachable(HivefoldError):
    """The coordinator did not answer within the retry budget."""


def backoff_delays(base: float, cap: float, rng: random.Random | None = None):
    """Infinite delays: full jitter over an exponentially growing window (AWS architecture blog style)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * 2 ** attempt))
        attempt += 1


def call_with_retry(fn: Callable[[], T], *, what: str, stop: threading.Event | None = None, base: float = 0.5,
                    cap: float = 30.0, give_up_after: float | None = None) -> T:
    """Call ``fn`` until it succeeds or fails with a non-transient code.

    ``give_up_after`` (seconds) raises :class:`Unreachable`; ``stop`` raises :class:`Stopped`.
    """
    start = time.monotonic()
    delays = backoff_delays(base, cap)
    warned = False
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code not in TRANSIENT_CODES:
                raise
            elapsed = time.monotonic() - start
            if give_up_after is not None and elapsed >= give_up_after:
                raise Unreachable(f"{what}: no answer after {elapsed:.0f}s ({code.name}: {e.details()})") from None
            delay = next(delays)
            if give_up_after is not None:
                delay = min(delay, max(0.0, give_up_after - elapsed))
            (log.warning if not warned else log.debug)("%s failed (%s: %s); retrying in %.1fs", what, code.name,
                                                         e.details(), delay)
            warned = True
            if stop is not None:
                if stop.wait(delay):
                    raise Stopped(f"{what}: stopped while retrying") from None
            else:
                time.sleep(delay)
