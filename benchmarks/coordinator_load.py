"""How many work units a coordinator can hand out: real coordinators, many simulated peers, no training.

    python benchmarks/coordinator_load.py [--backends sqlite,postgresql] [--coordinators 1] [--processes 4]
                                          [--peers-per-process 8] [--seconds 20] [--json PATH]

Each coordinator is a real ``hivefold coordinator`` process (no keeper) on a run of many small shards, its
ledger an SQLite file in its workdir, or a database on a real PostgreSQL server this script starts from
Debian's binaries (``tests/pgserver.py``; with ``--coordinators N`` that many coordinators share it, the
clients spread over them). Simulated peers run in ``--processes`` separate processes,
``--peers-per-process`` threads each; every one registers with its own Ed25519 identity, then loops over
full lease cycles as a peer does (LeaseShard, FetchShard with its sha256 check, SubmitResult with one
loss per micro-batch) and heartbeats every few seconds. Printed and written with ``--json`` (one row per
backend): completed cycles per second, p50/p99 latency of each RPC, and where the time goes (the
coordinators' and the database server's CPU seconds per cycle), and the limit: the same clients
against a gRPC server configured as the coordinator's whose one method does nothing, at the same number
of calls per cycle (``grpc_ceiling_cycles_per_s``, and each backend's ``ratio_to_grpc_ceiling``).
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
from hivefold.client import INLINE_MAX_BYTES  # noqa: E402 - after the path is set
from hivefold.tls import KNOWN_ENV  # noqa: E402
from tests.conftest import descendants  # noqa: E402


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


def client_process(address: str, peers: int, seconds: float, start_at: float, out: mp.Queue, workdir: str,
                   inline_max_bytes: int) -> None:
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
                resp = timed("LeaseShard", lambda: client.lease(inline_max_bytes=inline_max_bytes))
                if not resp.HasField("work"):
                    with lock:
                        counts["no_work"] += 1
                    time.sleep(0.05)
                    continue
                work = resp.work
                if work.data:  # came inline with the lease, as a peer takes it
                    client.shard_bytes(work)
                else:
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


NULL_METHOD = "/hivefold.bench.Null/Call"


def null_server(port_out: mp.Queue, stop_in: mp.Queue) -> None:
    """A gRPC server configured as the coordinator's (thread pool, options) whose one method does nothing."""
    from concurrent import futures

    import grpc

    from hivefold.client import CHANNEL_OPTIONS
    from hivefold.tls import server_tls

    handler = grpc.method_handlers_generic_handler("hivefold.bench.Null", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[handler], options=CHANNEL_OPTIONS)
    with tempfile.TemporaryDirectory() as tmp:  # TLS, as the coordinator serves
        tls, _ = server_tls(Path(tmp))
    port_out.put((server.add_secure_port("127.0.0.1:0", tls.grpc_credentials()), tls.fingerprint))
    server.start()
    stop_in.get()
    server.stop(0)


def null_client(address: str, fingerprint: str, peers: int, seconds: float, start_at: float, rpcs_per_cycle: int,
                out: mp.Queue) -> None:
    """As ``client_process``, but each cycle is ``rpcs_per_cycle`` calls that carry nothing and do nothing."""
    from hivefold.client import CHANNEL_OPTIONS
    from hivefold.tls import Trust, open_channel

    counts = [0] * peers

    def peer(i: int) -> None:
        channel = open_channel(address, Trust(fingerprint=fingerprint), CHANNEL_OPTIONS)
        call = channel.unary_unary(NULL_METHOD)
        while time.time() < start_at:
            time.sleep(0.01)
        while time.time() < start_at + seconds:
            for _ in range(rpcs_per_cycle):
                call(b"x" * 64, timeout=30)
            counts[i] += 1
        channel.close()

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(counts))


def grpc_ceiling(args: argparse.Namespace, rpcs_per_cycle: int) -> float:
    """Cycles per second of the same clients against a server that does nothing: what Python gRPC alone allows."""
    ctx = mp.get_context("spawn")
    port_q, stop_q, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=null_server, args=(port_q, stop_q))
    server.start()
    try:
        port, fingerprint = port_q.get(timeout=60)
        address = f"127.0.0.1:{port}"
        start_at = time.time() + 3.0 + 0.3 * args.processes
        procs = [ctx.Process(target=null_client, args=(address, fingerprint, args.peers_per_process, args.seconds,
                                                        start_at, rpcs_per_cycle, out)) for _ in range(args.processes)]
        for p in procs:
            p.start()
        cycles = sum(out.get(timeout=args.seconds + 120) for _ in procs)
        for p in procs:
            p.join()
    finally:
        stop_q.put(True)
        server.join(10)
    return cycles / args.seconds


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def start_coordinators(n: int, root: Path, corpus: Path, ledger: str, shard_sequences: int) -> list:
    """``n`` coordinators on ``ledger`` ('' = each its own SQLite file); returns [(process, grpc address)]."""
    started = []
    for i in range(n):  # one after the other: the first creates the run in a shared ledger
        workdir = root / f"coordinator-{i}"
        log = (root / f"coordinator-{i}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hivefold", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0",
             "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", "--verify-ceiling", "0",
             "--corpus", str(corpus),
             "--seq-len", "32", "--micro-batch", "4", "--target-batch-size", "16",
             "--shard-sequences", str(shard_sequences), "--lease-seconds", "60",
             *(["--ledger", ledger] if ledger else [])],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        started.append((proc, None))
        endpoints = workdir / "coordinator.json"
        deadline = time.monotonic() + 300
        while not endpoints.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / f"coordinator-{i}.log").read_text()[-3000:])
            time.sleep(0.2)
        started[-1] = (proc, json.loads(endpoints.read_text())["grpc"])
    return started


def measure(backend: str, args: argparse.Namespace, root: Path) -> dict:
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200000)))
    server, ledger = None, ""
    if backend == "postgresql":
        from tests.pgserver import PostgresServer
        server = PostgresServer.start(durable=True)
        ledger = server.create_database("load")
    elif args.coordinators > 1:
        raise SystemExit("--coordinators > 1 needs a shared ledger: --backends postgresql")
    coords = []
    try:
        coords = start_coordinators(args.coordinators, root, corpus, ledger, args.shard_sequences)
        addresses = [a for _, a in coords]
        shards = len(list((root / "coordinator-0" / "shards").glob("shard-*")))
        print(f"{backend}: {len(coords)} coordinator(s) at {' '.join(addresses)}: {shards} shards of "
              f"{args.shard_sequences} sequences; {args.processes} x {args.peers_per_process} simulated peers for "
              f"{args.seconds:.0f}s")
        out: mp.Queue = mp.get_context("spawn").Queue()
        start_at = time.time() + 5.0 + 0.5 * args.processes  # after every client registered
        procs = [mp.get_context("spawn").Process(target=client_process, args=(
            addresses[i % len(addresses)], args.peers_per_process, args.seconds, start_at, out,
            str(root / "peers"), 0 if args.no_inline else INLINE_MAX_BYTES)) for i in range(args.processes)]
        for p in procs:
            p.start()
        while time.time() < start_at:
            time.sleep(0.01)
        roots = [p.pid for p, _ in coords] + (server.postmaster_pids() if server else [])
        cpu0, t0 = [_tree_cpu(pid) for pid in roots], time.perf_counter()
        results = [out.get(timeout=args.seconds + 300) for _ in procs]
        cpu1, wall = [_tree_cpu(pid) for pid in roots], time.perf_counter() - t0
        for p in procs:
            p.join()
    finally:
        for proc, _ in coords:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.stop()
    cycles = sum(r["cycles"] for r in results)
    rpcs = {}
    for name in ("LeaseShard", "FetchShard", "SubmitResult", "Heartbeat"):
        values = [v for r in results for v in r["latencies"][name]]
        rpcs[name] = {"calls": len(values), "p50_ms": 1000 * (percentile(values, 0.5) or 0),
                      "p99_ms": 1000 * (percentile(values, 0.99) or 0)}
    all_lat = [v for r in results for lst in r["latencies"].values() for v in lst]
    n = len(coords)
    coord_cpu = sum(cpu1[:n]) - sum(cpu0[:n])
    db_cpu = sum(cpu1[n:]) - sum(cpu0[n:])
    row = {"backend": backend, "coordinators": n, "inline": not args.no_inline, "cycles": cycles,
           "cycles_per_s": cycles / args.seconds,
           "p50_ms": 1000 * (percentile(all_lat, 0.5) or 0), "p99_ms": 1000 * (percentile(all_lat, 0.99) or 0),
           "errors": sum(r["errors"] for r in results), "no_work": sum(r["no_work"] for r in results),
           "coordinator_cpu_s_per_cycle": coord_cpu / cycles if cycles else None,
           "database_cpu_s_per_cycle": db_cpu / cycles if cycles and server else None,
           "coordinator_cores": coord_cpu / wall, "database_cores": db_cpu / wall if server else None,
           "peers": args.processes * args.peers_per_process, "cores": os.cpu_count(), "rpcs": rpcs}
    print(f"{backend}: {cycles} lease cycles in {args.seconds:.0f}s: {row['cycles_per_s']:.0f}/s; "
          f"errors {row['errors']}")
    for name, r in rpcs.items():
        print(f"  {name:13s} {r['calls']:7d} calls  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms")
    if cycles:
        print(f"  the coordinator(s) used {row['coordinator_cores']:.2f} cores: "
              f"{1000 * row['coordinator_cpu_s_per_cycle']:.2f} ms of CPU per cycle ("
              + ("3 RPCs, one shard streamed" if args.no_inline else "2 RPCs, the shard inline with its lease")
              + ", a transaction each for lease and submit)"
              + (f"; PostgreSQL {row['database_cores']:.2f} cores, {1000 * row['database_cpu_s_per_cycle']:.2f} ms "
                 "per cycle" if server else "")
              + f"; the clients share the same {os.cpu_count()} cores")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default %(default)s; postgresql is skipped, "
                             "saying why, where no server can be started)")
    parser.add_argument("--coordinators", type=int, default=1, help="coordinators sharing a postgresql ledger")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--peers-per-process", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--shard-sequences", type=int, default=4, help="small shards: the RPCs, not the bytes")
    parser.add_argument("--no-inline", action="store_true",
                        help="fetch every shard with FetchShard (three RPCs per cycle), not inline with its lease")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rpcs_per_cycle = 3 if args.no_inline else 2
    ceiling = grpc_ceiling(args, rpcs_per_cycle)
    print(f"the limit: the same clients against a gRPC server that does nothing, {rpcs_per_cycle} calls per cycle: "
          f"{ceiling:.0f} cycles/s")
    rows = []
    for backend in args.backends.split(","):
        if backend not in ("sqlite", "postgresql"):
            parser.error(f"unknown backend {backend!r}: sqlite or postgresql")
        if backend == "postgresql":
            from tests.pgserver import unavailable
            if unavailable():
                print(f"postgresql: skipped: {unavailable()}")
                continue
        with tempfile.TemporaryDirectory(prefix="hivefold-load-") as tmp:
            os.environ[KNOWN_ENV] = str(Path(tmp) / "known_coordinators")  # trusted on first use, this run only
            row = measure(backend, args, Path(tmp))
        row["grpc_ceiling_cycles_per_s"] = ceiling
        row["ratio_to_grpc_ceiling"] = row["cycles_per_s"] / ceiling if ceiling else None
        print(f"{backend}: {row['ratio_to_grpc_ceiling']:.2f} of the bare gRPC ceiling")
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if rows and all(r["cycles"] and not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
