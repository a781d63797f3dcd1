"""A run with a token budget ends by itself: no work is handed out past it, every peer exits 0, the
keeper's final checkpoint holds the swarm's newest state, and status, events and /metrics say so."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from hivefold.tls import client_ssl_context
from tests.conftest import Processes, wait_for

pytestmark = pytest.mark.integration

SEQ_LEN, SHARD = 64, 32
BUDGET_SHARDS = 6
RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", str(SEQ_LEN),
             "--micro-batch", "8", "--shard-sequences", str(SHARD), "--inner-steps", "8", "--matchmaking-time", "1",
             "--averaging-timeout", "15", "--warmup-steps", "2"]


def test_a_token_budget_ends_the_run_with_a_final_checkpoint(tmp_path):
    budget = BUDGET_SHARDS * SHARD * SEQ_LEN - 100  # not a whole number of shards: rounds up to one more
    procs = Processes(tmp_path)
    try:
        workdir = tmp_path / "coordinator"
        coordinator = procs.start(
            "coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http",
            "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat-interval", "2",
            "--checkpoint-every", "1000", "--keeper-poll", "1", "--token-budget", str(budget), *RUN_FLAGS)
        path = workdir / "coordinator.json"
        info = wait_for(lambda: path.exists() and json.loads(path.read_text()), timeout=180,
                        what="the coordinator to serve", procs=procs)
        https = client_ssl_context(Path(info["cert"]).read_bytes())
        peers = [procs.start(name, "peer", "--coordinator", info["grpc"], "--workdir", str(tmp_path / name),
                             "--name", name, "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                             "--no-progress") for name in ("alice", "bob")]
        wait_for(lambda: all(p.poll() is not None for p in peers), timeout=400, what="both peers to finish",
                 procs=procs)
        assert [p.returncode for p in peers] == [0, 0], procs.tail()
        # what the peers trained since their last round went into a last one instead of being dropped (a peer
        # whose last shard ended exactly on a round has nothing left over)
        assert any("the run is over: a last outer round" in p.log.read_text() for p in peers), procs.tail()

        def status():
            with urllib.request.urlopen(f"https://{info['http']}/api/status", timeout=10, context=https) as r:
                return json.load(r)

        # the keeper took the swarm's final state over from the last peer to leave
        s = wait_for(lambda: (st := status())["checkpoint"] and st["checkpoint"]["step"] == st["global_step"]
                     and st, timeout=60, what="a final checkpoint at the swarm's last step", procs=procs)
        assert s["run_complete"] and "token budget spent" in s["run_complete"]["why"]
        assert s["global_step"] >= 1 and s["token_budget"]["fraction"] == 1.0
        assert s["tokens_trained"] >= budget
        with sqlite3.connect(f"file:{workdir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
            accepted = db.execute("SELECT COUNT(*) FROM results WHERE verdict = 'accepted'").fetchone()[0]
            done_at = db.execute("SELECT at FROM events WHERE kind = 'run_complete'").fetchall()
            late_leases = db.execute("SELECT COUNT(*) FROM leases WHERE issued_at > ?", (done_at[0][0],)).fetchone()[0]
        assert accepted == BUDGET_SHARDS  # exactly the shards the budget covers, none beyond
        assert len(done_at) == 1 and late_leases == 0
        with urllib.request.urlopen(f"https://{info['http']}/metrics", timeout=10, context=https) as r:
            metrics = r.read().decode()
        assert "hivefold_run_complete 1.0" in metrics
        assert coordinator.poll() is None  # the coordinator stays up: status, dashboard and checkpoints stay served
    finally:
        procs.close()
