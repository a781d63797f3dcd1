"""One workdir, one coordinator: a second one is refused and changes nothing; a crash frees the workdir.

The lock is an OS file lock, so SIGKILL releases it; the keeper notices its coordinator is gone and
exits by itself, so nothing is left behind and the next coordinator can take the workdir over.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Processes, wait_for
from tests.integration.test_keeper import _keepers
from tests.integration.test_swarm import RUN_FLAGS

pytestmark = pytest.mark.integration


def test_second_coordinator_is_refused_and_a_crash_frees_the_workdir(tmp_path: Path, processes: Processes):
    workdir = tmp_path / "coordinator"
    service = ["--workdir", str(workdir), "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--keeper-poll", "1"]
    first = processes.start("first", "coordinator", "--listen", "127.0.0.1:0", *service, *RUN_FLAGS)
    endpoints = workdir / "coordinator.json"
    wait_for(endpoints.exists, timeout=180, what="the first coordinator to serve", procs=processes)
    wait_for(lambda: list(_keepers(workdir)), timeout=60, what="the keeper to start", procs=processes)
    before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file()}

    r = subprocess.run([sys.executable, "-m", "hivefold", "coordinator", "--listen", "127.0.0.1:0", *service],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"in use by another coordinator (pid {first.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads(endpoints.read_text())["pid"] == first.pid
    after = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file() and p.name in before}
    unchanged = {"coordinator.json", "spec.json", "dht.key", "coordinator.lock"}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert first.poll() is None

    # A crash (SIGKILL of the coordinator alone, as an OOM killer would): its keeper must not linger.
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: not list(_keepers(workdir)), timeout=60, what="the orphaned keeper to exit", procs=processes)
    second = processes.start("second", "coordinator", "--listen", "127.0.0.1:0", *service)
    wait_for(lambda: endpoints.exists() and json.loads(endpoints.read_text())["pid"] == second.pid, timeout=180,
             what="a new coordinator to take the workdir over", procs=processes)
    assert processes.stop(second, timeout=90) == 0
