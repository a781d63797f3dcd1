"""The chaos test: a tiny swarm trains one data pass while peers and the coordinator are killed, frozen and restarted.

The engine is ``benchmarks/chaos.py`` (the benchmark runs it for 100+ faults); here a handful of faults, one of
each kind, must leave every shard of the pass credited exactly once, every acknowledged result in the ledger,
the global step never falling, the validation loss lower, and no process dead of an uncaught exception.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from benchmarks.chaos import KINDS, Chaos, ChaosConfig
from benchmarks.chaos_report import ACCEPTED_LINE, crashes
from tests.conftest import Processes, descendants, wait_for

pytestmark = pytest.mark.integration


def test_a_pass_under_faults_is_credited_once_and_loses_nothing(tmp_path: Path, processes: Processes):
    # About 90 shards of 32 sequences: a pass takes about a minute undisturbed on 2 loaded cores.
    config = ChaosConfig(seed=1, faults=8, mean_interval=6.0, time_limit=300.0, max_corpus_mb=0.2,
                         min_coordinator_uptime=10.0,
                         schedule=("peer_stop", "coordinator_kill", "peer_kill_same", "peer_kill_fresh"))
    report = Chaos(tmp_path, processes, config).run()
    summary = json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1)
    assert report["completed"], summary + processes.tail()
    assert all(report["faults"][kind] >= 1 for kind in KINDS), summary
    assert report["double_credited"] == 0 and report["missing"] == 0, summary
    assert report["lost"] == 0 and report["receipts_invalid"] == 0 and report["acknowledged"] > 0, summary
    assert report["global_step_monotonic"] and report["global_step_samples"] > 10, summary
    assert report["val_loss_last"] < report["val_loss_first"], summary
    assert report["recovery_after_restart_s"]["never"] == 0, summary  # training resumed after every restart
    assert not report["unexpected_exits"] and not report["crashes"], summary + processes.tail()
    assert not report["state_lost"], summary  # the keeper checkpointed the swarm's newest state at the end


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_peer_joining_while_the_coordinator_restarts_waits_for_it(tmp_path: Path, processes: Processes):
    """Found by the chaos run: a peer that registered just before the coordinator went down could not reach the
    DHT bootstrap node (the coordinator's) and died of hivemind's P2PDaemonError ("failed to connect to bootstrap
    peers") or RuntimeError ("none of the initial_peers responded"). It must wait for the coordinator instead."""
    chaos = Chaos(tmp_path, processes, ChaosConfig(max_corpus_mb=0.05))
    chaos.start_coordinator()
    wait_for(chaos.status, timeout=180, what="the coordinator to serve", procs=processes)
    # Hold that moment open: the coordinator's bootstrap node is gone while its gRPC service still answers.
    node = [pid for pid in descendants(chaos.coordinator.pid)
            if "p2pd" in (cmd := _cmdline(pid)) and f"/tcp/{chaos.dht}" in cmd]
    assert node, "the coordinator's libp2p daemon was not found"
    for pid in node:
        os.kill(pid, signal.SIGKILL)
    peer = chaos.start_peer(0)
    log = peer.proc.log  # type: ignore[attr-defined]
    wait_for(lambda: peer.proc.poll() is not None or "bootstrap node did not answer" in log.read_text(),
             timeout=180, what="the peer to find the bootstrap node down", procs=processes)
    assert peer.proc.poll() is None, crashes(log.read_text()) or processes.tail()

    # The coordinator restarts on the same ports; the peer registers again, joins, trains and is credited.
    Processes.kill_group(chaos.coordinator)
    chaos.coordinator.wait()
    chaos.start_coordinator()
    wait_for(lambda: peer.proc.poll() is not None or ACCEPTED_LINE.search(log.read_text()), timeout=240,
             what="the peer's first accepted result", procs=processes)
    assert peer.proc.poll() is None and not crashes(log.read_text()), processes.tail()
