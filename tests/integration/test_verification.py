"""Verified work in a real run: coordinator, keeper and `hivefold peer` processes. An honest peer's sampled results
are replayed by the keeper and credited with a receipt; a peer that reports losses without training
(cheat_peer.py) is caught, earns nothing and is banned within a bounded number of shards."""

from __future__ import annotations

import sqlite3

import pytest

from hivefold.client import CoordinatorClient
from hivefold.receipts import ReceiptBook
from hivefold.tls import Trust
from tests.conftest import Processes, start_coordinator, wait_for
from tests.integration.test_swarm import RUN_FLAGS, SYNC_FLAGS

pytestmark = pytest.mark.integration


def test_a_cheater_is_caught_and_banned_while_an_honest_peer_is_verified_and_credited(tmp_path):
    procs = Processes(tmp_path)
    try:
        endpoints = start_coordinator(procs, tmp_path / "coordinator", "--heartbeat-interval", "2",
                                      "--keeper-poll", "1", *RUN_FLAGS)

        def peer(name, **kwargs):
            return procs.start(name, "peer", "--coordinator", endpoints["grpc"], "--coordinator-fingerprint",
                               endpoints["fingerprint"], "--workdir", str(tmp_path / name), "--name", name,
                               "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress", **kwargs)

        peer("alice")
        peer("mallory", module="tests.integration.cheat_peer")
        client = CoordinatorClient(endpoints["grpc"], trust=Trust(fingerprint=endpoints["fingerprint"]),
                                   give_up_after=10)

        def by_name():
            return {p["name"]: p for p in client.status()["peers"]}

        mallory = wait_for(lambda: by_name().get("mallory", {}).get("banned") and by_name()["mallory"],
                           timeout=300, what="the cheater's ban", procs=procs)
        assert mallory["ban_reason"].startswith("invalid work: 2 results failed verification"), mallory
        assert mallory["credit"] == 0 and mallory["results_valid"] == 0 and mallory["results_invalid"] == 2
        # A new peer's every result is checked, so the cheater's first two results were its last.
        assert mallory["shards_done"] == 0

        def alice_verified():
            a = by_name()["alice"]
            return a["results_valid"] >= 2 and a["credit"] > 0 and a
        alice = wait_for(alice_verified, timeout=300, what="two of alice's results verified", procs=procs)
        assert not alice["banned"] and alice["results_invalid"] == 0 and alice["reputation"] == 1.0
        assert alice["contribution_score"] is not None
        summary = client.status()["verification"]
        assert summary["valid"] >= 2 and summary["invalid"] >= 2 and summary["keeper_seconds_per_check"] > 0
        # The verified results' receipts reached alice (asked again after the keeper's verdict).
        book = ReceiptBook(tmp_path / "alice")
        wait_for(lambda: book.summary()["receipts"] >= 2, timeout=60, what="alice's receipts for verified results",
                 procs=procs)
        assert book.summary()["invalid"] == []
        client.close()
    finally:
        procs.close()


def test_an_honest_sync_peer_is_verified_though_swarm_steps_replace_its_parameters_mid_shard(tmp_path):
    """Sync results went unchecked: hivemind's Optimizer replaces the parameters at each swarm step, a few times per
    shard, and a segment holding such a change could not be replayed. Changes now cut segments (hivefold.proof):
    here a swarm step every 3 micro-batches of a 6-micro-batch shard, and the checked results replay."""
    procs = Processes(tmp_path)
    try:
        endpoints = start_coordinator(procs, tmp_path / "coordinator", "--heartbeat-interval", "2",
                                      "--keeper-poll", "1", *SYNC_FLAGS, "--target-batch-size", "24")
        procs.start("bob", "peer", "--coordinator", endpoints["grpc"], "--coordinator-fingerprint",
                    endpoints["fingerprint"], "--workdir", str(tmp_path / "bob"), "--name", "bob",
                    "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress",
                    "--step-interval", "0")  # a hivemind step after every micro-batch: swarm steps mid-shard
        ledger = tmp_path / "coordinator" / "ledger.sqlite"

        def checks():
            db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT state, state_changes, detail FROM verifications").fetchall()
            finally:
                db.close()
            inside = [state for state, changes, _ in rows if any(0 < int(c) < 6 for c in changes.split(",") if c)]
            return inside.count("valid") >= 2 and rows

        rows = wait_for(checks, timeout=300, what="two checked sync results with swarm steps inside", procs=procs)
        assert all(state != "invalid" for state, _, _ in rows), rows
    finally:
        procs.close()
