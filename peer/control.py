"""The control channel: ``hivefold peer pause|resume|finish --workdir DIR`` talks to the peer running there.

Plain files in the workdir, so it works wherever the workdir does (a bind mount into a container,
a network home directory, any path length), with no port and no socket:

- ``peer.lock``: the running peer holds a POSIX record lock on it (``lockf``) for its whole life and
  writes its pid there. The kernel drops the lock when the process dies, however it dies, and a
  forked helper (hivemind's DHT and averagers) does not inherit it. So a command can tell "no peer
  runs here" at once, and a second peer on the same workdir (same identity, same outbox) is refused.
- ``control/<id>.cmd``: one command per file, written atomically (a temporary file, then
  ``os.replace``), so concurrent senders never overwrite each other. The peer looks every
  ``POLL_S`` seconds, claims each (renames it, so a sender that gave up cannot withdraw it
  half-applied) and applies them in the order they were sent.
- ``control/<id>.ack``: the peer's answer to that command (``{"ok": ..., "message": ...}``); the
  sender waits for it, prints it and deletes it.

Standard library only: the ``hivefold peer pause`` path must not load torch. The peer process
must not open ``peer.lock`` a second time: closing any descriptor of a file drops a POSIX lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from hivefold.errors import ConfigError, HivefoldError

log = logging.getLogger("hivefold.peer")

LOCK_FILE = "peer.lock"
CONTROL_DIR = "control"
COMMANDS = ("pause", "resume", "finish")
POLL_S = 0.25  # how often the running peer looks for commands
ACK_TIMEOUT_S = 10.0  # how long a command waits for the peer's answer


class ControlChannel:
    """The running peer's end: holds the workdir lock and answers commands (``poll`` from one thread)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.dir = workdir / CONTROL_DIR
        self._fd: int | None = None

    def open(self) -> "ControlChannel":
        """Take the workdir's lock (ConfigError naming the holder if another peer has it) and drop stale commands."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self.workdir)
            os.close(fd)
            raise ConfigError(f"workdir {self.workdir} is in use by another peer ({_describe(holder)}); stop that "
                              "one first, or give this one its own --workdir") from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.dir.mkdir(exist_ok=True)
        for stale in self.dir.iterdir():  # sent to an earlier process, or answers nobody collected
            stale.unlink(missing_ok=True)
        return self

    def poll(self, apply: Callable[[str], tuple[bool, str]]) -> None:
        """Apply each waiting command in the order sent: ``apply(command) -> (ok, message)``, then answer it."""
        try:
            waiting = sorted(self.dir.glob("*.cmd"))
        except OSError:
            return
        for path in waiting:
            taken = path.with_suffix(".taken")
            try:
                os.replace(path, taken)  # claimed: from now on the sender cannot withdraw it
            except FileNotFoundError:  # withdrawn by a sender that gave up
                continue
            try:
                command = json.loads(taken.read_text()).get("command")
            except (OSError, ValueError, AttributeError):
                command = None
            taken.unlink(missing_ok=True)
            if command in COMMANDS:
                ok, message = apply(command)
            else:
                ok, message = False, f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}"
            _write_atomically(path.with_suffix(".ack"), {"ok": ok, "message": message, "pid": os.getpid()})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None


def running_peer(workdir: Path) -> dict | None:
    """The lock holder's record (``pid``, ``host``, ``since``) if a peer runs in ``workdir``, else None."""
    try:
        fd = os.open(workdir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only possible while nobody holds the exclusive lock
    except OSError:
        return _read_holder(workdir) or {"pid": None}
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return None


def send_command(workdir: Path, command: str, *, timeout: float = ACK_TIMEOUT_S) -> tuple[bool, str]:
    """Ask the peer running in ``workdir`` to ``command``; its answer ``(ok, message)``.

    Raises HivefoldError when no peer runs there or it does not answer within ``timeout`` seconds.
    """
    if command not in COMMANDS:
        raise HivefoldError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    holder = running_peer(workdir)
    if holder is None:
        raise HivefoldError(f"no peer is running in {workdir}; start one with `hivefold peer --coordinator HOST:PORT "
                            f"--workdir {workdir}` (or pass the --workdir of the running peer)")
    name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
    cmd, ack = workdir / CONTROL_DIR / f"{name}.cmd", workdir / CONTROL_DIR / f"{name}.ack"
    try:
        _write_atomically(cmd, {"command": command, "sent": time.time(), "pid": os.getpid()})
    except OSError as e:
        raise HivefoldError(f"cannot leave a command in {cmd.parent} ({e.strerror}); run this as the user the peer "
                            "runs as") from None
    answer = _await(ack, timeout)
    if answer is None:
        try:
            cmd.unlink()  # withdrawn, so it is not applied long after this command said it failed
        except FileNotFoundError:  # the peer claimed it just now: its answer follows
            answer = _await(ack, ACK_TIMEOUT_S)
        if answer is None:
            raise HivefoldError(f"the peer in {workdir} ({_describe(holder)}) did not answer within {timeout:.0f}s "
                                "and the command was withdrawn; is the process stopped or overloaded? See its log")
    return answer


def _await(ack: Path, timeout: float) -> tuple[bool, str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ack.exists():
            try:
                answer = json.loads(ack.read_text())
            except ValueError:  # written atomically, so never torn; damaged on disk reads as a refusal
                answer = {"ok": False, "message": f"the peer's answer in {ack} is unreadable"}
            ack.unlink(missing_ok=True)
            return bool(answer.get("ok")), str(answer.get("message", ""))
        time.sleep(0.05)
    return None


def _write_atomically(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_holder(workdir: Path) -> dict:
    try:
        info = json.loads((workdir / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')} since {since}"
