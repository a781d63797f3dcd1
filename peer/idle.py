"""``--idle-only``: is the rest of the machine busy? Measured from /proc, this peer's own processes left out.

Once a second the peer takes a :class:`CpuSample`: the kernel's CPU time counters for the whole
machine (``/proc/stat``: clock ticks summed over every CPU, busy and in total) and for each of its
own processes (``/proc/<pid>/stat``: this process and its descendants, i.e. hivemind's helper
processes and the libp2p daemon). Between two samples, the busy ticks that were not this peer's,
as a share of every CPU's ticks, is what the rest of the machine used (:func:`others_share`).
:class:`IdleDetector` pauses when that share exceeds SHARE over the last ``WINDOW_S`` seconds and
resumes once it stayed at most SHARE over the last ``CALM_S`` seconds, so a short burst does not
flap training on and off. The arithmetic is pure (testable on recorded samples); only
:func:`sample_cpu` reads /proc. Linux only.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from hivefold.errors import ConfigError

WINDOW_S = 5.0  # others above SHARE over this long pauses the peer
CALM_S = 15.0  # others at most SHARE over this long resumes it
PROC = Path("/proc")


@dataclass(frozen=True)
class CpuSample:
    at: float  # monotonic seconds when taken
    total: int  # clock ticks of every CPU since boot, busy or idle
    busy: int  # of which not idle (iowait counts as idle: a process waiting on the disk leaves the CPU free)
    own: dict[int, int] = field(default_factory=dict)  # pid -> CPU ticks of each of this peer's processes


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``(total, busy)`` ticks from /proc/stat's aggregate ``cpu`` line."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user/nice]
            ticks = [int(v) for v in line.split()[1:9]]
            ticks += [0] * (8 - len(ticks))
            total = sum(ticks)
            return total, total - ticks[3] - ticks[4]
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def parse_pid_stat(text: str) -> tuple[int, int]:
    """``(ppid, ticks)`` from /proc/<pid>/stat; ticks: user + system time, its reaped children's included."""
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17
    return int(rest[1]), sum(int(v) for v in rest[11:15])


def others_share(before: CpuSample, after: CpuSample) -> float:
    """The share (0 to 1) of every CPU's capacity that processes other than this peer's used between two samples.

    Per process: one that appeared since ``before`` counts in full (it started in between, as far
    as we know), one that is gone counts nothing (its last moments are lost; a helper exiting is rare).
    """
    total = after.total - before.total
    if total <= 0:
        return 0.0
    own = sum(max(0, ticks - before.own.get(pid, 0)) for pid, ticks in after.own.items())
    others = (after.busy - before.busy) - own
    return min(1.0, max(0.0, others / total))


class IdleDetector:
    """Busy or not, from a stream of samples: busy once others exceed ``share`` over ``window`` seconds,
    idle again once they stayed at most ``share`` over ``calm`` seconds."""

    def __init__(self, share: float, *, window: float = WINDOW_S, calm: float = CALM_S):
        self.share, self.window, self.calm = share, window, calm
        self.busy = False
        self.last_share: float | None = None  # over the window, at the latest sample
        self._samples: deque[CpuSample] = deque()

    def update(self, sample: CpuSample) -> bool:
        """Add a sample; returns whether the machine counts as busy now."""
        self._samples.append(sample)
        horizon = max(self.window, self.calm)
        while len(self._samples) > 2 and self._samples[1].at <= sample.at - horizon:
            self._samples.popleft()  # keep one sample at or before the horizon
        recent = self._since(sample.at - self.window)
        if recent is None:  # not enough history yet to judge
            return self.busy
        self.last_share = others_share(recent, sample)
        if not self.busy:
            self.busy = self.last_share > self.share
        else:
            calm = self._since(sample.at - self.calm)
            self.busy = calm is None or others_share(calm, sample) > self.share
        return self.busy

    def _since(self, at: float) -> CpuSample | None:
        """The newest sample taken at or before ``at``."""
        found = None
        for s in self._samples:
            if s.at > at:
                break
            found = s
        return found


def own_processes(root: int) -> list[int]:
    """``root`` and its living descendants (hivemind's helpers, the libp2p daemon)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += _children(pid)
    return out


def _children(pid: int) -> list[int]:
    """From /proc/<pid>/task/<tid>/children (one small read per thread); [] for a process gone meanwhile."""
    kids: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            try:
                kids += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        return []
    return kids


def sample_cpu(pids: list[int], clock=time.monotonic) -> CpuSample:
    """The machine's CPU counters and those of ``pids`` (from :func:`own_processes`) now."""
    total, busy = parse_proc_stat((PROC / "stat").read_text())
    own = {}
    for pid in pids:
        try:
            own[pid] = parse_pid_stat((PROC / str(pid) / "stat").read_text())[1]
        except (OSError, ValueError, IndexError):
            continue  # exited between the listing and the read
    return CpuSample(at=clock(), total=total, busy=busy, own=own)


def check_supported(root: int = 0) -> None:
    """ConfigError unless /proc has what the measurement reads (Linux, with per-task children lists)."""
    root = root or os.getpid()
    if not (PROC / "stat").exists() or not (PROC / str(root) / "task" / str(root) / "children").exists():
        raise ConfigError("--idle-only measures the machine's CPU use from Linux's /proc, which this system lacks; "
                          "run without --idle-only (or pause the peer yourself: hivefold peer pause)")
