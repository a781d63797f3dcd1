"""How many work units one coordinator can hand out: a real coordinator, many simulated peers, no training.

    python benchmarks/coordinator_load.py [--processes 4] [--peers-per-process 8] [--seconds 20] [--json PATH]

The coordinator is a real ``hivefold coordinator`` process (SQLite ledger on disk, no keeper) on a run
of many small shards. Simulated peers run in ``--processes`` separate processes, ``--peers-per-process``
threads each; every one registers with its own Ed25519 identity, then loops over full lease cycles as
a peer does (LeaseShard, FetchShard with its sha256 check, SubmitResult with one loss per micro-batch)
and heartbeats every few seconds. Printed and written with ``--json``: completed cycles per second,
p50/p99 latency of each RPC, and where the time goes (the coordinator's CPU seconds per cycle, and
the clients'). Only the SQLite backend exists so far (``backend`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the repo's tests/ helpers
from tests.conftest import descendants  # noqa: E402 - after the path is set


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children that were waited for (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every living descendant (the coordinator's DHT process and p2pd)."""
    total = 0.0
    for pid in (root, *descendants(root)):
        try:
            total += _cpu_seconds(pid)
        except OSError:  # exited meanwhile
            pass
    return total


def client_process(address: str, peers: int, seconds: float, start_at: float, out: mp.Queue, workdir: str) -> None:
    """``peers`` simulated peers in threads; puts {rpc: [latencies]}, cycles, errors on ``out``."""
    from hivefold.client import CoordinatorClient
    from hivefold.identity import Identity
    from protos import coordinator_pb2 as pb

    lat: dict[str, list[float]] = {k: [] for k in ("LeaseShard", "FetchShard", "SubmitResult", "Heartbeat")}
    lock = threading.Lock()
    counts = {"cycles": 0, "errors": 0, "no_work": 0}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        with lock:
            lat[name].append(dt)
        return result

    def peer(i: int) -> None:
        client = CoordinatorClient(address, give_up_after=30)
        ident = Identity.load_or_create(Path(workdir) / f"p{os.getpid()}-{i}")
        client.register(ident, name=f"load-{os.getpid()}-{i}", device=pb.DeviceReport(kind="cpu"))
        while time.time() < start_at:
            time.sleep(0.01)
        deadline, next_beat = start_at + seconds, 0.0
        while time.time() < deadline:
            try:
                if time.time() >= next_beat:
                    timed("Heartbeat", lambda: client.heartbeat(pb.HeartbeatRequest(samples_per_second=100.0)))
                    next_beat = time.time() + 5.0
                resp = timed("LeaseShard", lambda: client.lease())
                if not resp.HasField("work"):
                    with lock:
                        counts["no_work"] += 1
                    time.sleep(0.05)
                    continue
                work = resp.work
                timed("FetchShard", lambda w=work: client.fetch_shard(w.lease_id, w.sha256))
                losses = [pb.MicroBatchLoss(loss=2.0, epoch=0)] * -(-work.num_sequences // 4)
                request = pb.SubmitResultRequest(lease_id=work.lease_id, samples=work.num_sequences, losses=losses,
                                                 compute_seconds=0.1)
                timed("SubmitResult", lambda r=request: client.submit(r))
                with lock:
                    counts["cycles"] += 1
            except Exception:  # noqa: BLE001 - counted: a load test reports failures rather than stopping
                with lock:
                    counts["errors"] += 1
        client.close()

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"latencies": lat, **counts})


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--peers-per-process", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--shard-sequences", type=int, default=4, help="small shards: the RPCs, not the bytes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivefold-load-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200000)))
        workdir = root / "coordinator"
        log = (root / "coordinator.log").open("wb")
        coord = subprocess.Popen(
            [sys.executable, "-m", "hivefold", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0",
             "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", "--corpus", str(corpus),
             "--seq-len", "32", "--micro-batch", "4", "--target-batch-size", "16",
             "--shard-sequences", str(args.shard_sequences), "--lease-seconds", "60"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            endpoints = workdir / "coordinator.json"
            deadline = time.monotonic() + 300
            while not endpoints.exists():
                if coord.poll() is not None or time.monotonic() > deadline:
                    print((root / "coordinator.log").read_text()[-3000:])
                    return 1
                time.sleep(0.2)
            address = json.loads(endpoints.read_text())["grpc"]
            shards = len(list((workdir / "shards").glob("shard-*")))
            print(f"coordinator at {address}: {shards} shards of {args.shard_sequences} sequences; "
                  f"{args.processes} x {args.peers_per_process} simulated peers for {args.seconds:.0f}s")
            out: mp.Queue = mp.get_context("spawn").Queue()
            start_at = time.time() + 5.0 + 0.5 * args.processes  # after every client registered
            procs = [mp.get_context("spawn").Process(target=client_process, args=(
                address, args.peers_per_process, args.seconds, start_at, out, str(root / "peers")))
                for _ in range(args.processes)]
            for p in procs:
                p.start()
            while time.time() < start_at:
                time.sleep(0.01)
            cpu0, t0 = _tree_cpu(coord.pid), time.perf_counter()
            results = [out.get(timeout=args.seconds + 300) for _ in procs]
            cpu1, wall = _tree_cpu(coord.pid), time.perf_counter() - t0
            for p in procs:
                p.join()
        finally:
            coord.terminate()
            try:
                coord.wait(30)
            except subprocess.TimeoutExpired:
                coord.kill()
    cycles = sum(r["cycles"] for r in results)
    rpcs = {}
    for name in ("LeaseShard", "FetchShard", "SubmitResult", "Heartbeat"):
        values = [v for r in results for v in r["latencies"][name]]
        rpcs[name] = {"calls": len(values), "p50_ms": 1000 * (percentile(values, 0.5) or 0),
                      "p99_ms": 1000 * (percentile(values, 0.99) or 0)}
    all_lat = [v for r in results for lst in r["latencies"].values() for v in lst]
    row = {"backend": "sqlite", "cycles": cycles, "cycles_per_s": cycles / args.seconds,
           "p50_ms": 1000 * (percentile(all_lat, 0.5) or 0), "p99_ms": 1000 * (percentile(all_lat, 0.99) or 0),
           "errors": sum(r["errors"] for r in results), "no_work": sum(r["no_work"] for r in results),
           "coordinator_cpu_s_per_cycle": (cpu1 - cpu0) / cycles if cycles else None,
           "coordinator_cores": (cpu1 - cpu0) / wall, "peers": args.processes * args.peers_per_process,
           "cores": os.cpu_count(), "rpcs": rpcs}
    print(f"{cycles} lease cycles in {args.seconds:.0f}s: {row['cycles_per_s']:.0f}/s; errors {row['errors']}")
    for name, r in rpcs.items():
        print(f"  {name:13s} {r['calls']:7d} calls  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms")
    if cycles:
        print(f"the coordinator used {row['coordinator_cores']:.2f} cores: "
              f"{1000 * row['coordinator_cpu_s_per_cycle']:.2f} ms of CPU per cycle (3 RPCs, one shard streamed, "
              f"a transaction each for lease and submit); the clients share the same {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps([row], indent=2))
    return 0 if cycles and not row["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
