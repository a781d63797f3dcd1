"""Swarm efficiency: one peer training alone vs. the aggregate of two peers in a hivemind swarm.

    python benchmarks/swarm_efficiency.py [--seconds 60] [--warmup 40] [--no-keeper]

Same model, sequence length and micro-batch in both phases, one torch thread per trainer.
Phase 1 trains the model alone in a plain torch loop (no hivemind, no coordinator): the ceiling.
Phase 2 starts a real coordinator (with its keeper unless --no-keeper) and two peer processes on
loopback, waits until both train and the swarm has stepped, then measures the samples the peers
report in heartbeats over a window. It prints both rates and

    ratio = aggregate swarm samples/s / (2 x alone samples/s)

1.0 is perfect scaling. On a 2-core machine everything (coordinator, keeper, DHT daemons) shares the
two cores the trainers use, so the ratio includes all of hivemind's and hivefold's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hivefold.tls import KNOWN_ENV  # noqa: E402 - after the path is set


def alone(model: str, seq_len: int, micro_batch: int, seconds: float) -> float:
    """Samples/s of a plain torch training loop in a fresh process with one thread."""
    code = f"""
import time, torch
from hivefold.model import build_model
from hivefold.spec import model_config_from_name
torch.set_num_threads(1)
m = build_model(model_config_from_name({model!r}, vocab_size=257, max_seq_len={seq_len}), 0)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, 257, ({micro_batch}, {seq_len} + 1))
n, t0 = 0, None
while True:
    _, loss = m(x[:, :-1], x[:, 1:]); loss.backward(); opt.step(); opt.zero_grad()
    if t0 is None: t0 = time.perf_counter(); continue   # first step warms up
    n += {micro_batch}
    if time.perf_counter() - t0 >= {seconds}: break
print(n / (time.perf_counter() - t0))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _cpu_seconds() -> dict[int, tuple[int, float]]:
    """{pid: (ppid, utime + stime in seconds)} for every process, from /proc (Linux)."""
    out, hz = {}, os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / hz)
    return out


def _cpu_by_role(before: dict, after: dict, roots: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one core used over the window by each root process and, separately, its descendants."""
    def root_of(pid: int) -> tuple[str, bool] | None:
        seen = pid
        while seen > 1 and seen in after:
            for name, root in roots.items():
                if seen == root:
                    return name, seen == pid
            seen = after[seen][0]
        return None

    usage: dict[str, float] = {}
    for pid, (_, cpu) in after.items():
        owner = root_of(pid)
        if owner is None:
            continue
        name, is_root = owner
        key = name if is_root else f"{name} helpers"
        usage[key] = usage.get(key, 0.0) + (cpu - before.get(pid, (0, 0.0))[1]) / seconds * 100
    return usage


def swarm(args, root: Path) -> dict:
    procs: list[subprocess.Popen] = []

    def start(name, *cmd):
        log = (root / f"{name}.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "hivefold", *cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        workdir = root / "coordinator"
        start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http", "",
              "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat-interval", "2", "--lease-seconds", "60",
              "--corpus", "stdlib", "--max-corpus-mb", "4", "--model", args.model, "--seq-len", str(args.seq_len),
              "--micro-batch", str(args.micro_batch), "--target-batch-size", str(args.target_batch_size),
              "--shard-sequences", str(args.shard_sequences), "--matchmaking-time", str(args.matchmaking_time),
              "--average-state-every", str(args.average_state_every),
              *(["--no-keeper"] if args.no_keeper else []))
        endpoints = workdir / "coordinator.json"
        deadline = time.monotonic() + 180
        while not endpoints.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"coordinator did not start; see {root / 'coordinator.log'}")
            time.sleep(0.5)
        address = json.loads(endpoints.read_text())["grpc"]
        for i in range(2):
            start(f"peer{i}", "peer", "--coordinator", address, "--workdir", str(root / f"peer{i}"), "--name",
                  f"bench{i}", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress",
                  "--step-interval", str(args.step_interval))
        db = sqlite3.connect(f"file:{workdir / 'ledger.sqlite'}?mode=ro", uri=True)

        def snapshot():
            rows = db.execute("SELECT peer_id, samples_reported FROM peers").fetchall()
            step = int(db.execute("SELECT value FROM meta WHERE key = 'global_step'").fetchone()[0])
            return dict(rows), step, time.monotonic()

        deadline = time.monotonic() + 300
        while True:  # warm-up: both peers report samples and the swarm has taken a step
            samples, step, _ = snapshot()
            if len(samples) == 2 and all(v > 0 for v in samples.values()) and step >= 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"swarm did not warm up; see logs in {root}")
            time.sleep(1)
        time.sleep(args.warmup)
        roots = {"coordinator": procs[0].pid, "peer 0": procs[1].pid, "peer 1": procs[2].pid}
        cpu0 = _cpu_seconds()
        s0, step0, t0 = snapshot()
        time.sleep(args.seconds)
        s1, step1, t1 = snapshot()
        cpu = _cpu_by_role(cpu0, _cpu_seconds(), roots, t1 - t0)
        rate = sum(s1[p] - s0[p] for p in s1) / (t1 - t0)
        return {"aggregate": rate, "steps": step1 - step0, "window_s": t1 - t0, "cpu": cpu,
                "per_peer": {p: (s1[p] - s0[p]) / (t1 - t0) for p in s1}}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--target-batch-size", type=int, default=384)
    parser.add_argument("--shard-sequences", type=int, default=256)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--step-interval", type=float, default=1.0)
    parser.add_argument("--average-state-every", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=20.0, help="extra seconds after the first swarm step")
    parser.add_argument("--no-keeper", action="store_true", help="run the coordinator without its keeper")
    args = parser.parse_args()
    single = alone(args.model, args.seq_len, args.micro_batch, min(args.seconds, 30.0))
    tmp = Path(tempfile.mkdtemp(prefix="hivefold-bench-"))
    os.environ[KNOWN_ENV] = str(tmp / "known_coordinators")  # this run's coordinators, trusted on first use
    result = swarm(args, tmp)  # on failure the logs stay in tmp for a look
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"model {args.model}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, target batch "
          f"{args.target_batch_size}, step interval {args.step_interval}s, "
          f"state averaging every {args.average_state_every} steps, keeper {'off' if args.no_keeper else 'on'}")
    print(f"alone (plain torch, 1 thread):   {single:8.1f} samples/s")
    print(f"swarm of 2 (aggregate):          {result['aggregate']:8.1f} samples/s "
          f"({', '.join(f'{v:.1f}' for v in result['per_peer'].values())} per peer; "
          f"{result['steps']} swarm steps in {result['window_s']:.0f}s)")
    print(f"ratio swarm / (2 x alone):       {result['aggregate'] / (2 * single):8.3f}")
    print(f"where the {os.cpu_count()} cores went during the window (% of one core; helpers = hivemind's DHT and "
          "averager processes and p2pd, and for the coordinator its keeper):")
    for name, pct in sorted(result["cpu"].items()):
        print(f"  {name:<22} {pct:6.1f}%")


if __name__ == "__main__":
    main()
