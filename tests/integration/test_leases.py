"""Leases sized to the peer and extended on request: a slow peer that is alive asks for more time
before its lease runs out, gets it against its progress, and its results are accepted in time."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.conftest import Processes, wait_for

pytestmark = pytest.mark.integration

RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--shard-sequences", "768", "--inner-steps", "16", "--warmup-steps", "2"]


def test_a_slow_peer_asks_for_more_time_and_gets_it(tmp_path):
    procs = Processes(tmp_path)
    try:
        workdir = tmp_path / "coordinator"
        # the shortest lease (3 s) is far less than a 768-sequence shard takes on one thread (~6 s unloaded): the
        # first lease, issued before the peer's throughput is known, must be extended to be finished in time
        procs.start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http", "",
                    "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", "--lease-seconds", "3",
                    "--heartbeat-interval", "0.5", *RUN_FLAGS)
        path = workdir / "coordinator.json"
        info = wait_for(lambda: path.exists() and json.loads(path.read_text()), timeout=180,
                        what="the coordinator to serve", procs=procs)
        procs.start("slowpoke", "peer", "--coordinator", info["grpc"], "--workdir", str(tmp_path / "peer"),
                    "--name", "slowpoke", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress")
        db = f"file:{workdir / 'ledger.sqlite'}?mode=ro"

        def results():
            with sqlite3.connect(db, uri=True) as c:
                return c.execute("SELECT r.detail, l.extensions, l.allotted_s FROM results r JOIN leases l "
                                 "USING (lease_id) ORDER BY r.submitted_at").fetchall()

        rows = wait_for(lambda: len(r := results()) >= 2 and r, timeout=240, what="two results", procs=procs)
        assert all(detail == "accepted" for detail, _, _ in rows), rows  # in time, none after expiry
        assert rows[0][1] >= 1, rows  # the first lease needed more time, and got it
        with sqlite3.connect(db, uri=True) as c:
            expired = c.execute("SELECT COUNT(*) FROM leases WHERE state = 'expired'").fetchone()[0]
            # leases issued once the peer had reported its throughput are sized to it: longer than the 3 s floor
            allotted = [r[0] for r in c.execute("SELECT allotted_s FROM leases ORDER BY issued_at")]
        assert expired == 0
        assert len(allotted) >= 3 and max(allotted[2:]) > 3.0, allotted
    finally:
        procs.close()
