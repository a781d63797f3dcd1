"""The chaos run's swarm: its settings, and starting, killing and asking the coordinator and peer processes.

``benchmarks/chaos.py`` adds the faults, the run loop and the checks on top of ``ChaosSwarm``.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hivefold.tls import client_ssl_context
from tests.conftest import Processes

PEER_ID_LINE = re.compile(r"peer (\w+) \((.+?)\) registering with")


@dataclass
class ChaosConfig:
    """One chaos run. The defaults are the benchmark's (about 10-15 minutes on a loaded 2-core machine)."""

    seed: int = 0  # the fault RNG: kinds, moments, victims, durations
    peers: int = 3  # peer processes kept running (each fault replaces or resumes the one it hit)
    faults: int = 100  # stop injecting after this many; the pass then finishes in peace
    mean_interval: float = 3.5  # mean seconds between faults (exponentially distributed)
    time_limit: float = 1200.0  # give up on the pass after this many seconds (the checks still run)
    weights: dict[str, float] = field(default_factory=lambda: {
        "peer_kill_same": 2.0, "peer_kill_fresh": 1.0, "peer_stop": 2.0, "coordinator_kill": 1.0})
    schedule: tuple[str, ...] = ()  # fault kinds in this order instead of drawn by weight (tests)
    min_coordinator_uptime: float = 15.0  # seconds the coordinator serves before it may be killed again
    min_peer_uptime: float = 2.0  # seconds a peer process lives before it may be hit
    lease_seconds: float = 8.0
    heartbeat_interval: float = 2.0
    max_corpus_mb: float = 1.5  # ~690 shards of 32: the pass outlasts 100 faults
    shard_sequences: int = 32
    micro_batch: int = 8
    inner_steps: int = 16  # diloco: micro-batches the swarm trains per outer round (a swarm step)
    checkpoint_every: int = 2
    settle_timeout: float = 180.0  # after the pass: how long the peers may take to leave

    def run_flags(self) -> list[str]:
        return ["--corpus", "stdlib", "--max-corpus-mb", str(self.max_corpus_mb), "--model", "tiny", "--seq-len", "64",
                "--micro-batch", str(self.micro_batch), "--shard-sequences", str(self.shard_sequences),
                "--data-passes", "1", "--averaging", "diloco", "--inner-steps", str(self.inner_steps),
                "--outer-lr", "1.0", "--outer-momentum", "0.0", "--lr", "3e-3", "--warmup-steps", "2",
                "--matchmaking-time", "1", "--averaging-timeout", "10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PeerProc:
    slot: int
    workdir: Path
    name: str
    proc: subprocess.Popen
    started: float
    stopped_until: float | None = None  # SIGSTOPped: when it gets SIGCONT
    peer_id: str | None = None

    def identify(self) -> str | None:
        if self.peer_id is None:
            m = PEER_ID_LINE.search(self.proc.log.read_text(errors="replace"))  # type: ignore[attr-defined]
            self.peer_id = m.group(1) if m else None
        return self.peer_id


class ChaosSwarm:
    """The coordinator (restartable on the same workdir and ports) and the peer processes of one chaos run."""

    def __init__(self, root: Path, procs: Processes, config: ChaosConfig):
        self.root, self.procs, self.config = root, procs, config
        self.workdir = root / "coordinator"
        self.grpc, self.http, self.dht = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.grpc}"
        self.coordinator: subprocess.Popen | None = None
        self.coordinator_started = 0.0
        self.coordinator_serving: float | None = None  # when the current coordinator first answered
        self.coordinator_incarnations = 0
        self.peers: list[PeerProc] = []
        self.retired: list[PeerProc] = []  # killed incarnations (their workdirs and logs are checked at the end)
        self.unexpected: list[str] = []  # processes that exited on their own before the pass was done
        self.generation = 0

    def start_coordinator(self) -> None:
        c = self.config
        self.coordinator_incarnations += 1
        self.coordinator = self.procs.start(
            f"coordinator-{self.coordinator_incarnations}", "coordinator", "--workdir", str(self.workdir),
            "--listen", self.address, "--http", f"127.0.0.1:{self.http}", "--dht-listen",
            f"/ip4/127.0.0.1/tcp/{self.dht}", "--lease-seconds", str(c.lease_seconds), "--heartbeat-interval",
            str(c.heartbeat_interval), "--checkpoint-every", str(c.checkpoint_every), "--keeper-poll", "1",
            *c.run_flags())
        self.coordinator_started = time.monotonic()
        self.coordinator_serving = None

    def start_peer(self, slot: int, workdir: Path | None = None, name: str | None = None) -> PeerProc:
        self.generation += 1
        if workdir is None:
            name = f"p{slot}-g{self.generation}"
            workdir = self.root / "peers" / name
        proc = self.procs.start(f"peer-{name}-{self.generation}", "peer", "--coordinator", self.address,
                                "--workdir", str(workdir), "--name", name, "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                                "--threads", "1", "--no-progress", "--retry-cap", "2")
        return PeerProc(slot, workdir, name, proc, time.monotonic())

    def kill_peer(self, peer: PeerProc) -> None:
        if peer.proc.poll() not in (None, 0):  # it died by itself before the fault reached it
            self.unexpected.append(f"{peer.proc.log.name} exited with {peer.proc.returncode}")  # type: ignore
        Processes.kill_group(peer.proc)
        peer.proc.wait()
        self.retired.append(peer)

    def status(self) -> dict | None:
        try:
            https = client_ssl_context((self.workdir / "tls" / "cert.pem").read_bytes())
            with urllib.request.urlopen(f"https://127.0.0.1:{self.http}/api/status", timeout=3, context=https) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None
