"""The chaos run: a tiny swarm under random faults must still train every shard of a pass exactly once.

    python benchmarks/chaos.py [--faults 100] [--seed 0] [--time-limit 1200] [--json PATH] [--keep]

A coordinator (with its keeper) and ``--peers`` peers train a tiny model for one data pass with short
leases. At random moments (a seeded RNG: the same ``--seed`` injects the same faults in the same
order, though what they hit depends on timing) it injects faults:

    peer_kill_same    SIGKILL a peer and its hivemind helpers, start it again on the same workdir
    peer_kill_fresh   SIGKILL a peer, start a newcomer on a fresh workdir (a new identity) in its place
    peer_stop         SIGSTOP a peer and its helpers until its leases are past their deadline, then SIGCONT
    coordinator_kill  SIGKILL the coordinator's whole process tree (the keeper and the DHT included) and
                      restart it on the same workdir and the same gRPC, HTTP and DHT ports

When the pass is done (or at ``--time-limit``) the peers leave, the coordinator stops, and the run is
checked against the ledger (read-only) and every peer workdir ever used:

    double_credited        shards with more than one accepted result in a data pass
    missing                shards of the pass without an accepted result (0 unless the time limit hit)
    lost                   results a peer holds a signed receipt for, or logged as accepted, that the
                           ledger lacks as accepted results (a receipt is the coordinator's proof)
    global_step_monotonic  the status API's global_step, sampled every second across restarts, never fell
    val_loss_first/last    the keeper's first and last evaluations (it must fall)
    crashes                uncaught exceptions in any process's log (and processes that exited by themselves)
    state_lost             the keeper could not checkpoint the swarm's newest state when the last peers left

and a few figures on how the swarm coped: results rejected as late, expired leases, the longest
stretch without a shard finishing, and how long after each coordinator restart the next result
was accepted. Exit status 0 when every check holds and the fault target was reached (the pass
must outlast it: ``--max-corpus-mb``). ``tests/integration/test_chaos.py`` runs the same engine
with a handful of faults; the checks and the report are in ``chaos_report.py``, the processes in
``chaos_swarm.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.chaos_report import findings, print_report  # noqa: E402
from benchmarks.chaos_swarm import ChaosConfig, ChaosSwarm  # noqa: E402
from hivefold.tls import KNOWN_ENV  # noqa: E402
from tests.conftest import Processes  # noqa: E402

KINDS = ("peer_kill_same", "peer_kill_fresh", "peer_stop", "coordinator_kill")


class Chaos(ChaosSwarm):
    """Starts the swarm, injects faults, and checks the outcome (``run()`` returns the report)."""

    def __init__(self, root: Path, procs: Processes, config: ChaosConfig, say=print):
        super().__init__(root, procs, config)
        self.say = say
        self.rng = random.Random(config.seed)
        self.restarts_serving: list[float] = []  # wall-clock times each restarted coordinator first answered
        self.faults: dict[str, int] = {k: 0 for k in KINDS}
        self.fault_log: list[dict] = []
        self.steps: list[tuple[float, int]] = []  # (time, global_step) samples of the status API
        self.last_status: dict | None = None
        self.offline: dict[str, float] = {}  # peer log -> longest stretch a running peer was not online (s)
        self._offline_since: dict[str, float] = {}
        self.t0 = time.monotonic()

    # --- faults ----------------------------------------------------------------------------------

    def _eligible(self, kind: str, now: float) -> list:
        c = self.config
        if kind == "coordinator_kill":
            ok = (self.coordinator_serving is not None and now - self.coordinator_serving >= c.min_coordinator_uptime)
            return [self.coordinator] if ok else []
        running = [p for p in self.peers if p.stopped_until is None and p.proc.poll() is None
                   and now - p.started >= c.min_peer_uptime]
        if kind == "peer_stop":  # keep at least one peer training
            awake = sum(p.stopped_until is None for p in self.peers)
            return running if awake >= 2 else []
        return running

    def _pick_kind(self) -> str:
        c = self.config
        if c.schedule:
            return c.schedule[sum(self.faults.values()) % len(c.schedule)]
        kinds = [k for k in KINDS if c.weights.get(k, 0) > 0]
        return self.rng.choices(kinds, weights=[c.weights[k] for k in kinds])[0]

    def inject(self, kind: str, now: float) -> bool:
        """Inject one fault of ``kind``; False when nothing is eligible right now (try again soon)."""
        c = self.config
        targets = self._eligible(kind, now)
        if not targets:
            return False
        at = round(now - self.t0, 1)
        if kind == "coordinator_kill":
            Processes.kill_group(self.coordinator)
            self.coordinator.wait()
            delay = self.rng.uniform(0.0, 3.0)
            detail = f"restart after {delay:.1f}s"
            time.sleep(delay)
            self.start_coordinator()
        else:
            peer = self.rng.choice(targets)
            if kind == "peer_stop":
                # Past the shortest lease's deadline (well short of the coordinator's silence threshold, a minute):
                # the frozen peer wakes to find its leases expired and, if someone took them, its shards handed on.
                seconds = c.lease_seconds + c.heartbeat_interval + self.rng.uniform(1.0, 5.0)
                Processes.kill_group(peer.proc, signal.SIGSTOP)
                peer.stopped_until = now + seconds
                detail = f"{peer.name} for {seconds:.1f}s"
            else:
                self.kill_peer(peer)
                self.peers.remove(peer)
                if kind == "peer_kill_same":
                    new = self.start_peer(peer.slot, peer.workdir, peer.name)
                else:
                    new = self.start_peer(peer.slot)
                self.peers.append(new)
                detail = f"{peer.name} -> {new.name}"
        self.faults[kind] += 1
        self.fault_log.append({"at": at, "kind": kind, "detail": detail})
        self.say(f"[{at:7.1f}s] fault {sum(self.faults.values()):3d}: {kind} ({detail})")
        return True

    def resume_due(self, now: float, *, all_of_them: bool = False) -> None:
        for p in self.peers:
            if p.stopped_until is not None and (all_of_them or now >= p.stopped_until):
                Processes.kill_group(p.proc, signal.SIGCONT)
                p.stopped_until = None
                p.started = min(p.started, now)

    # --- watching ---------------------------------------------------------------------------------

    def sample(self, now: float) -> None:
        doc = self.status()
        if doc is None:
            return
        if self.coordinator_serving is None:
            self.coordinator_serving = now
            if self.coordinator_incarnations > 1:
                self.restarts_serving.append(time.time())
        self.last_status = doc
        self.steps.append((round(now - self.t0, 1), int(doc["global_step"])))
        # A running (not stopped) peer that registered should be online while the coordinator has been up a while.
        online = {p["peer_id"]: p["online"] for p in doc["peers"]}
        settled = now - self.coordinator_serving > 4 * self.config.heartbeat_interval
        for p in self.peers:
            pid = p.identify()
            if pid is None or pid not in online:
                continue
            key = p.proc.log.name  # type: ignore[attr-defined]
            if online[pid] or p.stopped_until is not None or not settled or now - p.started < 60:
                self._offline_since.pop(key, None)
                continue
            since = self._offline_since.setdefault(key, now)
            self.offline[key] = max(self.offline.get(key, 0.0), now - since)

    def check_exits(self, now: float) -> None:
        if self.coordinator.poll() is not None:
            self.unexpected.append(f"coordinator-{self.coordinator_incarnations} exited with "
                                   f"{self.coordinator.returncode} at {now - self.t0:.0f}s")
            self.say(f"[{now - self.t0:7.1f}s] {self.unexpected[-1]}; restarting it")
            self.start_coordinator()
        for p in list(self.peers):
            if p.proc.poll() is None or self.pass_done():
                continue
            if p.proc.returncode == 0 and "the run is complete" in p.proc.log.read_text():  # type: ignore
                continue  # the pass ended since the last sample; the loop notices at its next one
            self.unexpected.append(f"{p.proc.log.name} exited with {p.proc.returncode} at "  # type: ignore
                                   f"{now - self.t0:.0f}s")
            self.say(f"[{now - self.t0:7.1f}s] {self.unexpected[-1]}; starting it again")
            self.peers.remove(p)
            self.retired.append(p)
            self.peers.append(self.start_peer(p.slot, p.workdir, p.name))

    def pass_done(self) -> bool:
        s = self.last_status
        return bool(s) and s["shards"]["done"] == s["shards"]["total"] > 0

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        self.say(f"chaos: seed {c.seed}, {c.peers} peers, {c.faults} faults every ~{c.mean_interval}s; "
                 f"coordinator at {self.address}, http {self.http}, dht {self.dht}; logs in {self.root}")
        self.start_coordinator()
        while self.status() is None:
            if self.coordinator.poll() is not None:
                raise RuntimeError("the coordinator did not start:\n" + self.procs.tail())
            if time.monotonic() - self.t0 > 300:
                raise RuntimeError("the coordinator did not serve within 300 s:\n" + self.procs.tail())
            time.sleep(0.5)
        self.sample(time.monotonic())
        self.peers = [self.start_peer(i) for i in range(c.peers)]
        # The first fault waits until the swarm trains (a shard done), so every kind hits a working swarm.
        next_fault = None
        next_sample = 0.0
        completed = False
        while True:
            now = time.monotonic()
            if now - self.t0 > c.time_limit:
                self.say(f"time limit of {c.time_limit:.0f}s reached")
                break
            self.resume_due(now)
            if now >= next_sample:
                next_sample = now + 1.0
                self.sample(now)
            if self.pass_done():
                completed = True
                self.say(f"[{now - self.t0:7.1f}s] every shard of the pass is done")
                break
            self.check_exits(now)
            if next_fault is None and self.last_status and self.last_status["shards"]["done"] > 0:
                next_fault = now + self.rng.expovariate(1.0 / c.mean_interval)
            if next_fault is not None and now >= next_fault and sum(self.faults.values()) < c.faults:
                if self.inject(self._pick_kind(), now):
                    next_fault = time.monotonic() + self.rng.expovariate(1.0 / c.mean_interval)
            time.sleep(0.2)
        wall = time.monotonic() - self.t0
        self.settle(completed)
        report = self.check(completed, wall)
        return report

    def settle(self, completed: bool) -> None:
        """Resume stopped peers; let them leave (the run is complete) or stop them; then stop the coordinator."""
        self.resume_due(time.monotonic(), all_of_them=True)
        deadline = time.monotonic() + (self.config.settle_timeout if completed else 5.0)
        while any(p.proc.poll() is None for p in self.peers) and time.monotonic() < deadline:
            if self.coordinator.poll() is not None:  # died meanwhile: the peers need it to leave
                self.start_coordinator()
            self.sample(time.monotonic())
            time.sleep(1.0)
        lingering = [p.name for p in self.peers if p.proc.poll() is None]
        if lingering and completed:
            self.unexpected.append(f"peers still running {self.config.settle_timeout:.0f}s after the pass: "
                                   f"{lingering}")
        for p in self.peers:
            self.procs.stop(p.proc, timeout=60)
        self.sample(time.monotonic())
        self.procs.stop(self.coordinator, timeout=150)  # SIGTERM: the keeper's final checkpoint

    # --- the checks -------------------------------------------------------------------------------

    def check(self, completed: bool, wall: float) -> dict:
        """The run's findings (chaos_report.findings)."""
        return findings(self, completed, wall)


def main() -> None:
    d = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--peers", type=int, default=d.peers)
    parser.add_argument("--faults", type=int, default=d.faults, help="faults to inject (default %(default)s)")
    parser.add_argument("--mean-interval", type=float, default=d.mean_interval,
                        help="mean seconds between faults (default %(default)s)")
    parser.add_argument("--time-limit", type=float, default=d.time_limit,
                        help="seconds before the pass is given up on (default %(default)s)")
    parser.add_argument("--max-corpus-mb", type=float, default=d.max_corpus_mb,
                        help="corpus size, i.e. the pass's length (default %(default)s)")
    parser.add_argument("--shard-sequences", type=int, default=d.shard_sequences)
    parser.add_argument("--lease-seconds", type=float, default=d.lease_seconds)
    parser.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    parser.add_argument("--weights", default=",".join(f"{k}={v:g}" for k, v in d.weights.items()),
                        help="fault kinds' relative weights, KIND=W,... (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs and logs (always kept on failure)")
    args = parser.parse_args()
    weights = {k: float(v) for k, _, v in (w.partition("=") for w in args.weights.split(",") if w)}
    if not set(weights) <= set(KINDS):
        parser.error(f"--weights: kinds are {', '.join(KINDS)}")
    config = ChaosConfig(seed=args.seed, peers=args.peers, faults=args.faults, mean_interval=args.mean_interval,
                         time_limit=args.time_limit, max_corpus_mb=args.max_corpus_mb,
                         shard_sequences=args.shard_sequences, lease_seconds=args.lease_seconds,
                         heartbeat_interval=args.heartbeat_interval, weights=weights)
    root = Path(tempfile.mkdtemp(prefix="hivefold-chaos-"))
    os.environ[KNOWN_ENV] = str(root / "known_coordinators")  # this run's coordinators, trusted on first use
    procs = Processes(root)
    try:
        report = Chaos(root, procs, config).run()
    finally:
        procs.close()
    report["logs"] = str(root)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if report["ok"] and not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if report["ok"] and report["faults_target_reached"] else 1)


if __name__ == "__main__":
    main()
