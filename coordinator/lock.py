"""An exclusive lock on a coordinator's workdir, held for the life of the process that owns the run.

It is an OS file lock (``flock``) on ``workdir/coordinator.lock``: the kernel drops it when the
holder dies, however it dies, so a crash never leaves a stale lock behind (a pid file would). The
keeper inherits the locked descriptor, so the workdir stays locked until the coordinator *and* its
keeper are gone. The file's text names the holder, for the message a second coordinator prints.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from hivefold.errors import ConfigError

LOCK_FILE = "coordinator.lock"
KEEPER_EXIT_WAIT_S = 90.0  # a dead coordinator's keeper finishes its final checkpoint (bounded), then exits

log = logging.getLogger(__name__)


class WorkdirLock:
    """``with WorkdirLock(workdir):`` or ``acquire()`` / ``release()``; ``fd`` can be passed to children."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, *, wait_for_keeper: float = KEEPER_EXIT_WAIT_S, **info) -> "WorkdirLock":
        """Take the lock or raise ConfigError naming the holder.

        When the recorded holder is dead, the lock is still held by its keeper, which is taking a
        final checkpoint and exits by itself: wait up to ``wait_for_keeper`` seconds for it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_for_keeper
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if _alive(holder.get("pid")) or time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"workdir {self.path.parent} is in use by another coordinator "
                                      f"({_describe(holder)}); stop that one first, or use another --workdir") from None
                log.info("waiting for the keeper of a stopped coordinator (pid %s) to release %s", holder.get("pid"),
                         self.path.parent)
                time.sleep(1.0)
        self.fd = fd
        self.describe(**info)
        return self

    def describe(self, **info) -> None:
        """Record who holds the lock (pid, host, start time and whatever ``info`` adds, e.g. the gRPC address)."""
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **info})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing our descriptor drops the lock unless a child still holds a copy
            self.fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unknown holder: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    where = f", serving {info['grpc']}" if info.get("grpc") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {since}{where}"
