"""The keeper keeps the run durable, with the README's own setup (DHT on all interfaces).

One swarm, in order: a peer trains and the keeper checkpoints past the initial state; the last peer
leaves cleanly and its final state is checkpointed before it exits; a newcomer loads the swarm's
state from the keeper; SIGINT to the coordinator's whole process group ends it within 30 s with a
final checkpoint and nothing of it left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from hivefold.client import CoordinatorClient
from tests.conftest import Processes, wait_for
from tests.integration.test_swarm import RUN_FLAGS

pytestmark = pytest.mark.integration

CHECKPOINT_EVERY = 3


class Run:
    def __init__(self, root: Path, procs: Processes):
        self.root, self.procs = root, procs
        self.workdir = root / "coordinator"
        # The README's setup: the DHT listens on every interface (port 0 only so parallel runs cannot collide).
        self.coordinator = procs.start(
            "coordinator", "coordinator", "--workdir", str(self.workdir), "--listen", "127.0.0.1:0", "--http", "",
            "--dht-listen", "/ip4/0.0.0.0/tcp/0", "--lease-seconds", "20", "--heartbeat-interval", "2",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--keeper-poll", "1", *RUN_FLAGS)
        path = self.workdir / "coordinator.json"
        self.address = wait_for(lambda: path.exists() and json.loads(path.read_text())["grpc"], timeout=180,
                                what="the coordinator to serve", procs=procs)
        self.pin = json.loads(path.read_text())["fingerprint"]  # peers outlive the test that starts them: pinned

    def peer(self, name: str, *extra: str):
        # The README's peer: default DHT listen address (all interfaces).
        return self.procs.start(name, "peer", "--coordinator", self.address, "--coordinator-fingerprint", self.pin,
                                "--workdir", str(self.root / name), "--name", name, "--threads", "1",
                                "--no-progress", *extra)

    def status(self) -> dict:
        client = CoordinatorClient(self.address, give_up_after=10)
        try:
            return client.status()
        finally:
            client.close()

    def checkpoints(self) -> list[int]:
        with sqlite3.connect(f"file:{self.workdir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
            return [r[0] for r in db.execute("SELECT step FROM checkpoints ORDER BY step")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("keeper")
    procs = Processes(root)
    try:
        yield Run(root, procs)
    finally:
        procs.close()


def test_keeper_checkpoints_a_peer_on_all_interfaces(run):
    run.alice = run.peer("alice")
    # Within a bounded number of swarm steps: the first periodic checkpoint is due at step CHECKPOINT_EVERY.
    status = wait_for(lambda: (s := run.status())["checkpoint"] and s["checkpoint"]["step"] >= CHECKPOINT_EVERY
                      and s, timeout=300, interval=1, what="a checkpoint past the initial state", procs=run.procs)
    assert status["global_step"] <= status["checkpoint"]["step"] + 2 * CHECKPOINT_EVERY, status
    keeper = status["keeper"]
    assert keeper["last_download_step"] >= CHECKPOINT_EVERY and keeper["warning"] is None, keeper
    log = (run.root / "coordinator.log").read_text()
    assert "routing: not found" not in log and "Traceback" not in log


def test_last_peer_leaving_cleanly_is_checkpointed(run):
    wait_for(lambda: run.status()["global_step"] >= CHECKPOINT_EVERY + 1, timeout=240, what="training to go on",
             procs=run.procs)
    os.killpg(run.alice.pid, signal.SIGINT)  # Ctrl-C in alice's terminal: her whole process group
    assert run.alice.wait(150) == 0, run.procs.tail()
    log = run.alice.log.read_text()
    final, reported = map(int, re.search(r"leaves at step (\d+); the latest checkpoint is at step (\d+)", log).groups())
    assert reported >= final and max(run.checkpoints()) >= final > CHECKPOINT_EVERY, (final, run.checkpoints())
    # hivemind's leftovers on the way out (a pending task of its event loop) are one info line, never an error
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    status = run.status()
    assert [p["online"] for p in status["peers"]] == [False]  # offline at once, not after missed heartbeats


def test_newcomer_starts_from_the_keepers_state(run):
    latest = max(run.checkpoints())
    run.bob = run.peer("bob")
    line = wait_for(lambda: re.search(r"starts at step (\d+) from (.*)", run.bob.log.read_text()), timeout=240,
                    what="bob to load the swarm's state", procs=run.procs)
    assert int(line.group(1)) >= latest, line.group(0)
    assert "Traceback" not in run.bob.log.read_text()


def test_ctrl_c_to_the_coordinators_group_ends_it_with_a_final_checkpoint(run):
    before = max(run.checkpoints())
    wait_for(lambda: run.status()["global_step"] > before + 1, timeout=240, what="bob to train past the checkpoint",
             procs=run.procs)
    t0 = time.monotonic()
    os.killpg(run.coordinator.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: every process of the group
    assert run.coordinator.wait(30) == 0, run.procs.tail()
    elapsed = time.monotonic() - t0
    assert max(run.checkpoints()) > before, run.procs.tail()
    log = (run.root / "coordinator.log").read_text()
    assert re.search(r"checkpoint at step \d+ \(final\)", log) and "coordinator stopped" in log
    with pytest.raises(ProcessLookupError):
        os.killpg(run.coordinator.pid, 0)  # nothing of its group is left
    assert not list(_keepers(run.workdir)), "the keeper outlived its coordinator"
    print(f"coordinator exited {elapsed:.1f}s after SIGINT")


def _keepers(workdir: Path):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"coordinator.keeper" in cmd and str(workdir).encode() in cmd:
            yield int(pid)
