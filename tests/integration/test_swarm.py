"""A real sync-mode swarm on loopback: a coordinator (with its keeper) and two peer processes training together.

The tests in this module share one swarm and run in order: first it trains to global step 3 and the
run's bookkeeping is checked, then one peer is killed with SIGKILL mid-shard and the other must pick
up its shard once the lease expires.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hivefold.client import CoordinatorClient
from tests.conftest import REPO, Processes, wait_for

pytestmark = pytest.mark.integration

LEASE_SECONDS = 8
# The default averaging mode (diloco), rounds of 20 micro-batches; this module's swarm runs sync instead.
RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--target-batch-size", "64", "--shard-sequences", "48", "--matchmaking-time", "1",
             "--averaging-timeout", "15", "--warmup-steps", "2", "--lr", "3e-3", "--inner-steps", "20"]
SYNC_FLAGS = [*RUN_FLAGS, "--averaging", "sync"]


class Swarm:
    def __init__(self, root: Path, procs: Processes):
        self.root, self.procs = root, procs
        self.workdir = root / "coordinator"
        self.coordinator = procs.start(
            "coordinator", "coordinator", "--workdir", str(self.workdir), "--listen", "127.0.0.1:0", "--http",
            "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--lease-seconds", str(LEASE_SECONDS),
            "--heartbeat-interval", "2", "--checkpoint-every", "2", "--keeper-poll", "1", *SYNC_FLAGS)
        endpoints = wait_for(lambda: self._endpoints(), timeout=180, what="the coordinator to serve", procs=procs)
        self.address = endpoints["grpc"]
        self.http = endpoints["http"]
        self.pin = endpoints["fingerprint"]  # peers started here outlive the test that starts them: pinned
        self.peers = {name: self.start_peer(name) for name in ("alice", "bob")}

    def _endpoints(self):
        path = self.workdir / "coordinator.json"
        if self.coordinator.poll() is not None:
            pytest.fail("coordinator exited:\n" + self.procs.tail())
        return json.loads(path.read_text()) if path.exists() else None

    def start_peer(self, name: str) -> subprocess.Popen:
        return self.procs.start(name, "peer", "--coordinator", self.address, "--coordinator-fingerprint", self.pin,
                                "--workdir", str(self.root / name), "--name", name, "--dht-listen",
                                "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress")

    def status(self) -> dict:
        client = CoordinatorClient(self.address, give_up_after=10)
        try:
            return client.status()
        finally:
            client.close()

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.workdir / 'ledger.sqlite'}?mode=ro", uri=True)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    procs = Processes(root)
    try:
        yield Swarm(root, procs)
    finally:
        procs.close()


def peer_ids(status: dict) -> dict[str, str]:
    return {p["name"]: p["peer_id"] for p in status["peers"]}


def test_two_peers_train_to_step_3(swarm):
    def reached():
        s = swarm.status()
        done = {p["name"]: p["shards_done"] for p in s["peers"]}
        return s if s["global_step"] >= 3 and done.get("alice", 0) > 0 and done.get("bob", 0) > 0 else None

    status = wait_for(reached, timeout=420, interval=2, what="global step 3 with both peers' shards",
                      procs=swarm.procs)
    assert {p["name"] for p in status["peers"]} == {"alice", "bob"}
    assert all(p["online"] and p["samples"] > 0 for p in status["peers"])
    assert status["shards"]["done"] >= 2 and status["shards"]["total"] == sum(
        status["shards"][k] for k in ("pending", "leased", "done"))
    assert status["tokens_trained"] == status["samples_trained"] * 64 > 0

    with swarm.db() as db:
        # Every shard marked done has exactly one accepted result in the current pass, and no shard ever more.
        current = int(db.execute("SELECT value FROM meta WHERE key = 'data_pass'").fetchone()[0])
        done = {r[0] for r in db.execute("SELECT shard_id FROM shards WHERE state = 'done'")}
        # (or pending verification: done, its credit waiting for the keeper's check)
        accepted = dict(db.execute("SELECT shard_id, COUNT(*) FROM results WHERE verdict IN ('accepted', "
                                   "'pending_verification') AND data_pass = ? GROUP BY shard_id",
                                   (current,)).fetchall())
        assert done and all(accepted.get(s) == 1 for s in done)
        assert db.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM results WHERE verdict = 'accepted' "
                          "GROUP BY shard_id, data_pass)").fetchone()[0] == 1
        # The training loss falls: the first swarm step's micro-batches against all later ones. (Not against the
        # latest step's alone: it may hold a shard or two, and one shard's loss differs from another's by more than
        # the 0.3 asked here: 3.99 and 5.61 two shards apart in one run, at the same step.)
        by_epoch = db.execute("SELECT epoch, AVG(loss), COUNT(*) FROM losses GROUP BY epoch ORDER BY epoch").fetchall()
    later = sum(mean * n for _, mean, n in by_epoch[1:]) / max(1, sum(n for _, _, n in by_epoch[1:]))
    assert len(by_epoch) >= 2 and later < by_epoch[0][1] - 0.3, by_epoch

    # The keeper wrote checkpoints and validation losses; generate loads the latest one.
    ckpt = wait_for(lambda: (s := swarm.status())["checkpoint"] and s["checkpoint"]["step"] >= 2 and s["checkpoint"],
                    timeout=120, what="a checkpoint at step >= 2", procs=swarm.procs)
    assert Path(ckpt["path"]).is_file()
    status = swarm.status()
    assert status["val_loss"] < status["val_loss_first"]
    r = subprocess.run([sys.executable, "-m", "hivefold", "generate", "--checkpoint", ckpt["path"], "--prompt",
                        "def ", "--tokens", "40"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout) > 10

    # The status command's JSON carries the documented fields.
    r = subprocess.run([sys.executable, "-m", "hivefold", "status", "--coordinator", swarm.address, "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("run_id", "global_step", "shards", "peers", "train_loss", "val_loss", "tokens_trained", "checkpoint"):
        assert key in doc
    for key in ("peer_id", "name", "online", "shards_done", "samples", "last_seen"):
        assert key in doc["peers"][0]


def test_killed_peer_loses_its_lease_and_the_other_trains_the_shard(swarm):
    ids = peer_ids(swarm.status())
    alice, bob = ids["alice"], ids["bob"]

    def fresh_lease():
        # Kill right after alice starts a shard, so the kill lands mid-shard.
        with swarm.db() as db:
            row = db.execute("SELECT lease_id, shard_id, data_pass, issued_at FROM leases WHERE peer_id = ? AND "
                             "state = 'active' ORDER BY issued_at DESC LIMIT 1", (alice,)).fetchone()
        return row if row and time.time() - row[3] < 1.0 else None

    lease_id, shard_id, data_pass, _ = wait_for(fresh_lease, timeout=120, interval=0.05,
                                                what="alice to start a shard", procs=swarm.procs)
    Processes.kill_group(swarm.peers["alice"], signal.SIGKILL)
    swarm.peers["alice"].wait()

    def trained_by_bob():
        with swarm.db() as db:
            state = db.execute("SELECT state FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()[0]
            row = db.execute("SELECT peer_id FROM results WHERE shard_id = ? AND data_pass = ? AND "
                             "verdict = 'accepted'", (shard_id, data_pass)).fetchone()
        return (state, row[0]) if row else None

    state, winner = wait_for(trained_by_bob, timeout=240, interval=1, what="bob to train alice's shard",
                             procs=swarm.procs)
    assert state == "expired" and winner == bob
    status = swarm.status()
    assert {p["name"]: p["online"] for p in status["peers"]} == {"alice": False, "bob": True}
    # Alice comes back (same workdir, same identity), so the next test's swarm is whole again: a sync step
    # waits up to the averaging timeout (15 s, longer than a lease) for a killed peer the DHT still lists.
    done = {p["name"]: p["shards_done"] for p in status["peers"]}["alice"]
    swarm.peers["alice"] = swarm.start_peer("alice")
    wait_for(lambda: (p := {q["name"]: q for q in swarm.status()["peers"]}["alice"])["online"]
             and p["shards_done"] > done, timeout=240, interval=1, what="alice back, training", procs=swarm.procs)


def test_ctrl_c_hands_the_lease_and_the_prefetched_one_back_and_leaves(swarm):
    """SIGINT (Ctrl-C) after the peer joined: hivemind sets SIGINT to SIG_IGN when its averagers start, and the
    peer must take it back, finish the micro-batch, release its lease and the one it fetched ahead, and exit."""
    bob = swarm.peers["bob"]
    bob_id = peer_ids(swarm.status())["bob"]

    def active_leases():
        with swarm.db() as db:
            rows = db.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = 'active'",
                              (bob_id,)).fetchall()
        return [r[0] for r in rows] if len(rows) >= 2 else None  # one training, one fetched ahead

    # (a peer with 4 results waiting for the keeper's check gets no new lease until it catches up)
    held = wait_for(active_leases, timeout=150, interval=0.1, what="bob to train and hold a prefetched lease",
                    procs=swarm.procs)
    bob.send_signal(signal.SIGINT)
    assert bob.wait(90) == 0, swarm.procs.tail()
    log = bob.log.read_text()
    assert "received SIGINT" in log and "left the swarm" in log
    with swarm.db() as db:
        # Handed back, or (if the signal came after the shard's last micro-batch) submitted: never left to expire.
        states = dict(db.execute(f"SELECT lease_id, state FROM leases WHERE lease_id IN ({','.join('?' * len(held))})",
                                 held).fetchall())
        reasons = [r[0] for r in db.execute("SELECT close_reason FROM leases WHERE peer_id = ?", (bob_id,))]
        active = db.execute("SELECT COUNT(*) FROM leases WHERE peer_id = ? AND state = 'active'",
                            (bob_id,)).fetchone()[0]
    assert set(states.values()) <= {"released", "completed"} and active == 0, states
    assert "peer stopping (prefetched)" in reasons, reasons
