"""Volunteer controls on a real coordinator and one real peer at a time: pause, a pause that outlasts the lease,
resume, finish, a command for a workdir where no peer runs; --upload-cap and --max-hours.

Leases last 6 s past the last heartbeat (one a second), so a pause hands its leases back within seconds.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from hivefold.client import CoordinatorClient
from tests.conftest import Processes, hivefold, wait_for

pytestmark = pytest.mark.integration

LEASE_SECONDS = 6
# diloco (the default), 24 micro-batches a shard, a few seconds each. A peer that left stays in the swarm's progress
# records for a while, so the next peer may look for a group in vain: short matchmaking and averaging timeouts.
RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--target-batch-size", "64", "--shard-sequences", "192", "--inner-steps", "20", "--warmup-steps", "2",
             "--matchmaking-time", "1", "--averaging-timeout", "5"]


class Run:
    def __init__(self, root: Path, procs: Processes):
        self.root, self.procs = root, procs
        self.workdir = root / "coordinator"
        self.coordinator = procs.start(
            "coordinator", "coordinator", "--workdir", str(self.workdir), "--listen", "127.0.0.1:0", "--http", "",
            "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--lease-seconds", str(LEASE_SECONDS), "--heartbeat-interval",
            "1", "--checkpoint-every", "2", "--keeper-poll", "1", *RUN_FLAGS)
        path = self.workdir / "coordinator.json"
        wait_for(lambda: path.exists() or self.coordinator.poll() is not None, timeout=180,
                 what="the coordinator to serve", procs=procs)
        assert self.coordinator.poll() is None, procs.tail()
        self.address = json.loads(path.read_text())["grpc"]
        self.pin = json.loads(path.read_text())["fingerprint"]  # peers outlive the test that starts them: pinned

    def start_peer(self, name: str, *flags: str):
        return self.procs.start(name, "peer", "--coordinator", self.address, "--coordinator-fingerprint", self.pin,
                                "--workdir", str(self.root / name), "--name", name, "--dht-listen",
                                "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress", *flags)

    def me(self, name: str) -> dict | None:
        client = CoordinatorClient(self.address, give_up_after=10)
        try:
            return next((p for p in client.status()["peers"] if p["name"] == name), None)
        finally:
            client.close()

    def leases(self, peer_id: str) -> list[tuple[str, str, str | None, float]]:
        """(lease id, state, close reason, issued at) of the peer's leases, oldest first (the ledger, read-only)."""
        with sqlite3.connect(f"file:{self.workdir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT lease_id, state, close_reason, issued_at FROM leases WHERE peer_id = ? "
                              "ORDER BY issued_at", (peer_id,)).fetchall()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    procs = Processes(root)
    try:
        yield Run(root, procs)
    finally:
        procs.close()


def test_pause_resume_finish_from_another_terminal(run: Run):
    processes = run.procs
    workdir = run.root / "vol"
    peer = run.start_peer("vol", "--upload-cap", "1G", "--max-hours", "5")
    me = wait_for(lambda: (p := run.me("vol")) and p["samples"] > 0 and p, timeout=240, interval=1,
                  what="the peer to train a shard", procs=processes)
    peer_id = me["peer_id"]

    # pause: training stops at the next micro-batch; the peer stays online and says it is paused.
    r = hivefold("peer", "pause", "--workdir", str(workdir))
    assert r.returncode == 0 and "pauses at the next micro-batch" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: (p := run.me("vol")) and p["paused"] and p["online"], timeout=20, interval=0.5,
             what="the status to show the peer paused", procs=processes)
    doc = json.loads(hivefold("status", "--coordinator", run.address, "--json").stdout)
    (shown,) = [p for p in doc["peers"] if p["name"] == "vol"]
    assert shown["paused"] and shown["pause_reason"] == "paused by the volunteer" and shown["samples_per_second"] == 0
    table = hivefold("status", "--coordinator", run.address).stdout
    assert re.search(r"vol .* paused ", table), table
    time.sleep(1.5)  # a result finished just before the pause may still be on its way
    samples = run.me("vol")["samples"]

    # ... and once the pause has lasted a lease's length, its leases go back to the pool.
    def handed_back():
        leases = run.leases(peer_id)
        return leases if not any(state == "active" for _, state, _, _ in leases) else None

    leases = wait_for(handed_back, timeout=LEASE_SECONDS + 20, interval=0.5, what="the paused peer to hand back its "
                      "leases", procs=processes)
    reasons = [reason for _, state, reason, _ in leases if state == "released"]
    assert any(r.startswith("paused past its leases' deadlines") for r in reasons), leases
    released_at = time.time()
    assert not any(state == "expired" for _, state, _, _ in leases), leases  # handed back, not left to expire
    time.sleep(2)
    now = run.me("vol")
    assert now["online"] and now["paused"] and now["samples"] == samples, now  # no progress, still heartbeating

    # resume: it leases afresh and trains on.
    r = hivefold("peer", "resume", "--workdir", str(workdir))
    assert r.returncode == 0 and "resumes" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: (p := run.me("vol")) and p["samples"] > samples and not p["paused"], timeout=90, interval=1,
             what="the resumed peer to submit a shard", procs=processes)
    assert any(issued > released_at for *_, issued in run.leases(peer_id))

    # finish: the shard in training is completed and submitted, the one fetched ahead is handed back, exit 0.
    def mid_shard():
        active = [lease for lease, state, _, _ in run.leases(peer_id) if state == "active"]
        return active if len(active) == 2 else None  # one in training, one fetched ahead

    wait_for(mid_shard, timeout=60, interval=0.2, what="the peer to train with a lease fetched ahead", procs=processes)
    r = hivefold("peer", "finish", "--workdir", str(workdir))
    assert r.returncode == 0 and "completes and submits its current shard" in r.stdout, r.stdout + r.stderr
    log_at_finish = peer.log.read_text()
    current = re.findall(r"training shard \d+ \(lease (\w+)", log_at_finish)[-1]
    assert peer.wait(150) == 0, processes.tail()
    states = {lease: (state, reason) for lease, state, reason, _ in run.leases(peer_id)}
    assert states[current][0] == "completed", states  # trained to the end and accepted (or submitted just before)
    assert all(state != "active" for state, _ in states.values()), states
    for state, reason in states.values():
        assert state != "released" or reason.startswith(("paused past its leases' deadlines", "peer finishing")), states
    log = peer.log.read_text()
    for line in ("will pause at the next micro-batch: paused by the volunteer", "paused: paused by the volunteer",
                 "pause lifted (paused by the volunteer)", "resumes after",
                 "finishing (asked by the volunteer)", "finished (asked by the volunteer)", "left the swarm"):
        assert line in log, line
    assert json.loads((workdir / "upload.json").read_text())["bytes"] > 0  # the --upload-cap count ran

    # No peer runs in the workdir any more: a command says so and fails.
    r = hivefold("peer", "pause", "--workdir", str(workdir))
    assert r.returncode == 2 and "no peer is running in" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_upload_cap_finishes_the_shard_then_pauses_until_tomorrow(run: Run):
    """A 1-byte cap: the first heartbeat reaches it; a shard already in training is still finished and submitted."""
    peer = run.start_peer("capped", "--upload-cap", "1")
    me = wait_for(lambda: (p := run.me("capped")) and p["paused"] and p, timeout=240, interval=0.5,
                  what="the capped peer to pause", procs=run.procs)
    assert me["online"] and me["pause_reason"] == "daily upload cap reached (--upload-cap)"
    time.sleep(3)
    log = peer.log.read_text()
    assert "its --upload-cap of 1 B: finishing the current shard, then pausing until 00:00 UTC" in log, log
    started, finished = log.count("training shard"), log.count("finished shard")
    assert started == finished <= 1 and run.me("capped")["shards_done"] == finished, log  # finished, then no more
    r = hivefold("peer", "finish", "--workdir", str(run.root / "capped"))
    assert r.returncode == 0 and "completes and submits" in r.stdout, r.stdout + r.stderr
    assert peer.wait(150) == 0, run.procs.tail()
    assert json.loads((run.root / "capped" / "upload.json").read_text())["bytes"] >= 1


def test_max_hours_finishes_and_leaves_by_itself(run: Run):
    peer = run.start_peer("timed", "--max-hours", "0.003")  # 10.8 s of training
    assert peer.wait(240) == 0, run.procs.tail()
    log = peer.log.read_text()
    assert "finishing (trained for --max-hours 0.003)" in log and "left the swarm" in log, log
    me = run.me("timed")
    assert me["shards_done"] >= 1 and not me["online"]
