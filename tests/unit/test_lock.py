"""The workdir lock: exclusive, names its holder, freed when the holder dies however it dies."""

import os
import signal
import subprocess
import sys
import time

import pytest

from coordinator.lock import WorkdirLock
from hivefold.errors import ConfigError

HOLD = """
import sys, time
from pathlib import Path
from coordinator.lock import WorkdirLock
WorkdirLock(Path(sys.argv[1])).acquire(grpc="10.0.0.1:7600")
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_holders_name(tmp_path):
    first = WorkdirLock(tmp_path).acquire(grpc="127.0.0.1:7600")
    try:
        with pytest.raises(ConfigError, match=rf"in use by another coordinator \(pid {os.getpid()} .*127.0.0.1:7600"):
            WorkdirLock(tmp_path).acquire(wait_for_keeper=0)
    finally:
        first.release()
    WorkdirLock(tmp_path).acquire().release()  # released: free again


def test_the_lock_dies_with_its_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {proc.pid} .*10.0.0.1:7600"):
            WorkdirLock(tmp_path).acquire(wait_for_keeper=0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    t0 = time.monotonic()
    WorkdirLock(tmp_path).acquire(wait_for_keeper=0).release()  # no stale lock after a crash
    assert time.monotonic() - t0 < 1.0
