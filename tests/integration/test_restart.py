"""The coordinator goes down and comes back on the same workdir: the run resumes, nothing is lost.

While it is down the peers keep their finished results and retry; when it is back they submit them,
the run continues from its ledger and checkpoints, and a newcomer starts from the swarm's state.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hivefold.client import CoordinatorClient
from tests.conftest import REPO, Processes, wait_for
from tests.integration.test_swarm import RUN_FLAGS

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_restart_resumes_the_run(tmp_path: Path, processes: Processes):
    address = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "coordinator"
    service = ["--workdir", str(workdir), "--listen", address, "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0",
               "--lease-seconds", "30", "--heartbeat-interval", "2", "--checkpoint-every", "2", "--keeper-poll", "1"]

    def status():
        client = CoordinatorClient(address, give_up_after=5)
        try:
            return client.status()
        finally:
            client.close()

    def serving():
        return (workdir / "coordinator.json").exists()

    first = processes.start("coordinator-1", "coordinator", *service, *RUN_FLAGS)
    wait_for(serving, timeout=180, what="the coordinator to serve", procs=processes)
    peers = {name: processes.start(name, "peer", "--coordinator", address, "--workdir", str(tmp_path / name),
                                   "--name", name, "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                                   "--no-progress", "--retry-cap", "2")
             for name in ("alice", "bob")}
    before = wait_for(lambda: (s := status())["checkpoint"] and s["checkpoint"]["step"] >= 2
                      and s["shards"]["done"] >= 2 and s, timeout=400, interval=2,
                      what="a checkpoint at step 2", procs=processes)

    assert processes.stop(first, timeout=150) == 0  # SIGTERM: the keeper's final checkpoint, then exit
    assert not serving()
    # Peers finish shards meanwhile and must hold on to the results. Within seconds, usually; a round starting just
    # as the coordinator (the DHT's bootstrap node) went away held both peers for 8 s once, on a busy machine.
    wait_for(lambda: any("retrying" in p.log.read_text() for p in peers.values()), timeout=60,
             what="a peer to hold a result while the coordinator is down", procs=processes)
    assert all(p.poll() is None for p in peers.values())

    # Reopening with a conflicting run flag is refused with advice; no flags resumes the run.
    r = subprocess.run([sys.executable, "-m", "hivefold", "coordinator", *service, "--seq-len", "32"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "drop the flag to resume" in r.stderr
    processes.start("coordinator-2", "coordinator", *service)
    wait_for(serving, timeout=180, what="the coordinator to serve again", procs=processes)
    after = status()
    assert after["run_id"] == before["run_id"]
    assert after["shards"]["done"] >= before["shards"]["done"]
    assert after["checkpoint"]["step"] >= before["checkpoint"]["step"]

    # The peers' held results arrive and training continues past where it stopped.
    wait_for(lambda: (s := status())["shards"]["done"] > before["shards"]["done"] + 2
             and s["global_step"] > before["global_step"], timeout=240, interval=2,
             what="training to continue after the restart", procs=processes)
    wait_for(lambda: not any(f for n in peers for f in (tmp_path / n / "outbox").glob("*.pb")), timeout=60,
             what="the peers' outboxes to drain", procs=processes)

    # A newcomer starts from the swarm's current state, not from scratch.
    carol = processes.start("carol", "peer", "--coordinator", address, "--workdir", str(tmp_path / "carol"),
                            "--name", "carol", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                            "--no-progress", "--max-shards", "1")
    line = wait_for(lambda: re.search(r"starts at step (\d+) from (.*)", carol.log.read_text()), timeout=240,
                    what="carol to load the swarm's state", procs=processes)
    assert int(line.group(1)) > 0, line.group(0)
    assert json.loads((tmp_path / "carol" / "state.json").read_text())["run_id"] == before["run_id"]
