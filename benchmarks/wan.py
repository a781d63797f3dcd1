"""WAN testbed: a hivefold swarm whose peers sit behind bandwidth-capped links, against one plain torch process.

    sudo python benchmarks/wan.py [--modes sync,diloco] [--mbit 20,100,1000] [--peers 2] [--seconds 120]
                                  [--model small] [--json PATH]
    sudo python benchmarks/wan.py --selftest-net [--mbit 20]   # the network alone: build, measure, tear down

Needs root and iproute2 (``ip``, ``tc``) on a kernel with network namespaces, veth, bridges and the
``tbf`` qdisc (and ``htb`` with the ``u32`` classifier unless --cap-coordinator); it says so and exits
with code 2 when something is missing.

The network. A bridge in the root namespace holds 10.77.0.1/24: the coordinator, its DHT bootstrap node
and its keeper listen there. Each peer i runs in its own network namespace (``hfwan-<pid>-p<i>``) whose
``eth0`` (10.77.0.<i+2>) is one end of a veth pair; the other end is a port of the bridge. A ``tbf``
qdisc caps both ends at --mbit: the namespace side is the peer's upload, the bridge side its download,
so every byte between two peers crosses two capped links, like two home connections. tbf settings:
burst = max(64 KiB, 4 ms at the rate): at least one whole GSO packet (veth hands tbf up to 64 KiB at
once; anything bigger than the burst is split in software) and enough tokens to ride out a few ms of
scheduling delay on a busy 2-core machine, so that 1000 Mbit/s can be reached too; over the seconds
this benchmark measures, a burst is well under 1 % of the traffic. limit (the queue) = max(50 ms at the
rate, 2 bursts): an access link's buffer, deep enough for TCP to keep the link busy, short enough that
hivemind's control messages (matchmaking requests time out after about a second) never queue behind
more than ~50 ms of bulk data.

By default the path between a peer and 10.77.0.1 is not capped (an htb class and a u32 filter on the
coordinator's address send it around the tbf): the keeper downloads the whole swarm state from a peer
every --checkpoint-every rounds to measure the validation loss (small model: ~88 MB in diloco, ~130 MB
in sync at fp32), and at 20 Mbit/s that takes longer than its 30 s download timeout, so it would retry
without end, holding the peer's uplink and measuring nothing. The coordinator is the instrument here,
not a volunteer. --cap-coordinator caps every byte instead (one tbf per link end). Either way the
bytes a peer sends are counted in full (``bytes_per_sample``); by default those to other peers alone
are counted too (``p2p_bytes_per_sample``, the htb class's counter).

No latency: this kernel has no ``netem``, so links add no delay. Each row gives the averaging rounds
the swarm made in the window (swarm steps in sync, outer steps in diloco); account latency on paper
from them: a round costs a few sequential round trips (hivemind's matchmaking: DHT store and get, the
join request and the leader's answer; then the all-reduce's exchange), so at a round-trip time r add
roughly rounds x k x r (k ~ 5-10) to the window where peers wait for rounds (sync), or compare
k x r with the seconds per round where the all-reduce overlaps training (diloco); TCP's window limits
over a high bandwidth-delay product are not modelled either.

Per mode (sync, diloco): the run is built once with the coordinator's code and the single process (the
one from benchmarks/time_to_loss.py: plain torch on every core, the mode's schedule at its own batch)
runs once in the root namespace for --single-seconds. Per rate: a fresh testbed and a fresh copy of the
run, then the swarm of benchmarks/time_to_loss.py (coordinator + --peers peer processes pinned to their
own cores) for --seconds. Measured over the throughput window (from the swarm's first accepted results
to the end):
  utilization        the peers' compute utilization as they report it in heartbeats (the ledger's
                     peers table: share of wall time since the peer started training spent computing),
                     mean over peers, read at the end; ``utilization_window`` estimates the same share
                     inside the window (samples trained there x compute seconds per sample from the
                     peer's results, over the window's length)
  bytes_per_sample   bytes the peers' eth0 sent in the window / samples they trained in it (heartbeats'
                     sample counts), both summed over peers: what a peer sends per sample it trains
  samples_per_s      samples the peers trained per second (heartbeats' counts; ``accepted_samples_per_s``
                     counts the accepted results instead, which arrive a shard at a time)
  val_loss           the keeper's latest validation loss in the window, at the tokens accepted by then;
                     ``single_val_loss`` is the single process's loss interpolated at the same tokens
                     (tokens as in time_to_loss; in diloco the keeper's state holds the finished rounds
                     only, so the swarm is compared at up to a round more tokens than its state saw)
Printed as a table and written with --json as a list of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import time_to_loss as ttl  # benchmarks/ is this script's directory, hence on sys.path
from netns import (  # noqa: E402 - benchmarks/ is on sys.path
    HOST_IP,
    SIGNALS,
    SetupError,
    Testbed,
    preflight,
    remove_stale,
    tbf_args,
)
from netns_check import selftest, tcp_sink, tcp_source  # noqa: E402


def make_probe(net: Testbed, workdir: Path):
    """Per peer: its eth0 counters and what the ledger knows of it (by its name, bench<i>), at one moment."""
    uri = f"file:{workdir / 'ledger.sqlite'}?mode=ro"

    def probe(i: int) -> dict:
        t = time.time()
        tx, rx = net.link_bytes(i)
        out = {"t": t, "tx_bytes": tx, "rx_bytes": rx, "p2p_tx_bytes": net.p2p_sent_bytes(i), "samples": 0,
               "utilization": 0.0, "epoch": 0, "compute_seconds": 0.0, "result_samples": 0}
        db = sqlite3.connect(uri, uri=True)
        try:
            row = db.execute("SELECT peer_id, samples_reported, utilization, epoch FROM peers WHERE name = ? "
                             "ORDER BY last_seen DESC LIMIT 1", (f"bench{i}",)).fetchone()
            if row:
                out.update(samples=row[1], utilization=row[2], epoch=row[3])
                cs, n = db.execute("SELECT COALESCE(SUM(compute_seconds), 0), COALESCE(SUM(samples), 0) FROM "
                                   f"results WHERE peer_id = ? AND {ttl.TRAINED}", (row[0],)).fetchone()
                out.update(compute_seconds=cs, result_samples=n)
        finally:
            db.close()
        return out

    return probe


def loss_at_tokens(curve: list, tokens: float) -> float | None:
    """The curve's loss at ``tokens`` (linear between measurements); None beyond its last point."""
    for (_, k0, v0), (_, k1, v1) in zip(curve, curve[1:], strict=False):
        if k0 <= tokens <= k1:
            return v0 + (v1 - v0) * (tokens - k0) / (k1 - k0) if k1 > k0 else v1
    return curve[0][2] if curve and tokens <= curve[0][1] else None


def summarize(mode: str, mbit: float, swarm: dict, single: dict, seq_len: int) -> dict:
    peers = []
    for p in swarm["probes"]:
        s, e = p["start"], p["end"]
        if s is None:  # the window never opened (no accepted results): nothing to divide by
            continue
        window = e["t"] - s["t"]
        samples = e["samples"] - s["samples"]
        per_sample_busy = e["compute_seconds"] / e["result_samples"] if e["result_samples"] else None
        peers.append({
            "bytes_sent": e["tx_bytes"] - s["tx_bytes"], "bytes_received": e["rx_bytes"] - s["rx_bytes"],
            "bytes_sent_to_peers": (e["p2p_tx_bytes"] - s["p2p_tx_bytes"]) if e["p2p_tx_bytes"] is not None
            else None, "samples": samples, "window_s": window, "utilization": e["utilization"],
            "utilization_window": samples * per_sample_busy / window if per_sample_busy and window > 0 else None,
            "rounds": e["epoch"] - s["epoch"]})
    samples = sum(p["samples"] for p in peers)

    def mean(key):
        vals = [p[key] for p in peers if p[key] is not None]
        return sum(vals) / len(vals) if vals else None

    p2p = [p["bytes_sent_to_peers"] for p in peers]
    curve = [c for c in swarm["curve"] if c[1] > 0]  # evaluations after the swarm trained something
    val = curve[-1] if curve else None
    single_val = loss_at_tokens(single["curve"], val[1]) if val else None
    starts = [p["start"]["epoch"] for p in swarm["probes"] if p["start"]]
    return {
        "mode": mode, "mbit": mbit, "peers": swarm["peers"], "utilization": mean("utilization"),
        "utilization_window": mean("utilization_window"),
        "bytes_per_sample": sum(p["bytes_sent"] for p in peers) / samples if samples else None,
        "p2p_bytes_per_sample": sum(p2p) / samples if samples and p2p and None not in p2p else None,
        # trained samples per second from the heartbeats' counts (the accepted results come a shard at a time)
        "samples_per_s": sum(p["samples"] / p["window_s"] for p in peers if p["window_s"] > 0) if peers else 0.0,
        "accepted_samples_per_s": swarm["tokens_per_s"] / seq_len, "val_loss": val[2] if val else None,
        "val_tokens": val[1] if val else None, "single_val_loss": single_val,
        "val_loss_ratio": val[2] / single_val if val and single_val else None,
        "rounds": max(p["end"]["epoch"] for p in swarm["probes"]) - max(starts) if starts else None,
        "window_s": mean("window_s"), "startup_s": swarm["startup_s"], "per_peer": peers,
        "single_samples_per_s": single["tokens_per_s"] / seq_len, "curve": swarm["curve"],
    }


def fmt(v, spec: str, width: int) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


def print_table(rows: list[dict], notes: bool = True) -> None:
    print()
    print(f"{'mode':7s} {'Mbit/s':>7s} {'util':>5s} {'util(w)':>7s} {'B/sample':>10s} {'p2p B/s.':>10s} "
          f"{'samples/s':>9s} {'rounds':>6s} {'s/round':>7s} {'tokens':>9s} {'val loss':>8s} {'single':>7s} "
          f"{'ratio':>6s}")
    for r in rows:
        if r.get("error"):
            print(f"{r['mode']:7s} {r['mbit']:7g}  failed: {r['error']}")
            continue
        per_round = r["window_s"] / r["rounds"] if r["rounds"] else None
        print(f"{r['mode']:7s} {r['mbit']:7g} {fmt(r['utilization'], '.2f', 5)} "
              f"{fmt(r['utilization_window'], '.2f', 7)} {fmt(r['bytes_per_sample'], '.4g', 10)} "
              f"{fmt(r['p2p_bytes_per_sample'], '.4g', 10)} {fmt(r['samples_per_s'], '.2f', 9)} "
              f"{fmt(r['rounds'], 'd', 6)} {fmt(per_round, '.1f', 7)} {fmt(r['val_tokens'], '.0f', 9)} "
              f"{fmt(r['val_loss'], '.3f', 8)} {fmt(r['single_val_loss'], '.3f', 7)} "
              f"{fmt(r['val_loss_ratio'], '.3f', 6)}")
    if not notes:
        return
    print("util: peers' reported utilization (since they started); util(w): inside the window. B/sample: bytes "
          "each peer sent per sample it trained; p2p: to other peers only. val loss: the keeper's latest in the "
          "window, at 'tokens'; single: the single process at the same tokens. No latency was emulated (no netem): "
          "at a round-trip time r a round costs roughly k x r more (k ~ 5-10 sequential exchanges), see the "
          "module docstring.")


def run_benchmark(args, root: Path, rows: list[dict]) -> None:
    """Appends a row per mode and rate to ``rows`` as each run ends (a failed run's row has ``error``)."""
    print(f"network: each peer in its own namespace, both ends of its link capped by tbf "
          f"({' '.join(tbf_args(args.mbit[0])[3:])} at {args.mbit[0]:g} Mbit/s); the coordinator's address "
          f"{'capped too' if args.cap_coordinator else 'uncapped'}; no latency emulated", flush=True)
    for mode in args.modes:
        margs = argparse.Namespace(**{**vars(args), "mode": mode})
        mdir = root / mode
        mdir.mkdir(parents=True)
        template = mdir / "run"
        spec = ttl.build_run(template, margs)
        print(f"{mode}: single process for {args.single_seconds:.0f}s", flush=True)
        single = ttl.run_single(template, argparse.Namespace(**{**vars(margs), "seconds": args.single_seconds}), mdir)
        for mbit in args.mbit:
            rdir = mdir / f"{mbit:g}mbit"
            workdir = rdir / "coordinator"
            # a fresh copy of the untouched run: the shards are only read (hard links), the ledger is written
            shutil.copytree(template, workdir, copy_function=_link_shard_or_copy)
            print(f"{mode}: swarm of {args.peers} at {mbit:g} Mbit/s for {args.seconds:.0f}s", flush=True)
            try:
                with Testbed(args.peers, mbit, cap_coordinator=args.cap_coordinator) as net:
                    swarm = ttl.run_swarm(
                        workdir, margs, rdir, spec["seq_len"], listen=f"{HOST_IP}:0",
                        dht_listen=f"/ip4/{HOST_IP}/tcp/0",
                        peer_dht_listen=lambda i, net=net: f"/ip4/{net.peer_ip(i)}/tcp/0",
                        peer_prefix=net.exec_prefix, probe=make_probe(net, workdir))
                row = summarize(mode, mbit, swarm, single, spec["seq_len"])
            except (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error) as e:
                # a process died or a command failed: the other rows still run
                row = {"mode": mode, "mbit": mbit, "error": str(e)}
            rows.append(row)
            print_table(rows[-1:], notes=False)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))


def _link_shard_or_copy(src: str, dst: str) -> None:
    if Path(src).parent.name == "shards":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Needs root and iproute2; see the module docstring for the network.")
    parser.add_argument("--modes", type=_csv(str), default=["sync", "diloco"], help="comma list (default sync,diloco)")
    parser.add_argument("--mbit", type=_csv(float), default=[20.0, 100.0, 1000.0],
                        help="comma list of link rates, Mbit/s each way (default 20,100,1000)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120.0, help="each swarm's wall time")
    parser.add_argument("--single-seconds", type=float,
                        help="the single process's training time, once per mode (default: --seconds)")
    parser.add_argument("--cap-coordinator", action="store_true",
                        help="also cap the path between the peers and the coordinator's address (the keeper's state "
                             "downloads then share the peers' uplinks; at 20 Mbit/s they outlast its timeout)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small", help="tiny | small (~11M parameters) | base | L<n>-H<n>-D<n>")
    parser.add_argument("--shard-sequences", type=int, default=128, help="sequences per work unit")
    parser.add_argument("--micro-batch", type=int, default=16, help="the run's (each peer's) micro-batch")
    parser.add_argument("--target-batch-size", type=int, default=128, help="sync: samples per swarm step")
    parser.add_argument("--inner-steps", type=int, default=16, help="diloco: micro-batches the swarm trains per round")
    parser.add_argument("--outer-lr", type=float, default=1.0,
                        help="diloco: outer learning rate (default 1 with momentum 0: plain averaging, which did "
                             "better in short runs; see the README)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="diloco: outer Nesterov momentum")
    parser.add_argument("--compression", default="fp32",
                        help="diloco: fp32 | fp16 | int8 | int4 on the wire (sync mode sends hivemind's default, fp32)")
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--averaging-timeout", type=float, default=120.0,
                        help="seconds before an all-reduce is abandoned (the run's default, 30, is too short at "
                             "20 Mbit/s: sync's state averaging alone sends ~130 MB per peer for the small model)")
    parser.add_argument("--lr", type=float, default=3e-3, help="the run's (inner) peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--decay-steps", type=int, default=3000)
    parser.add_argument("--single-batch", type=int, default=16)
    parser.add_argument("--single-lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=float, default=10.0, help="single: seconds between validation losses")
    parser.add_argument("--checkpoint-every", type=int, default=2,
                        help="swarm: the keeper's validation loss every N rounds")
    parser.add_argument("--json", type=Path, help="write the rows here (also after each run)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' workdirs and logs")
    parser.add_argument("--selftest-net", action="store_true",
                        help="only the network: build it for 2 peers at the first --mbit, measure TCP goodput over "
                             "each path for --selftest-seconds, tear it down, check that nothing is left")
    parser.add_argument("--selftest-seconds", type=float, default=4.0)
    for hidden in ("--tcp-sink", "--tcp-source"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--tcp-seconds", type=float, default=4.0, help=argparse.SUPPRESS)
    parser.add_argument("--tcp-warm", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--tcp-pace-mbit", type=float, default=100.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_sink:
        tcp_sink(args.tcp_sink, args.tcp_seconds, args.tcp_warm)
        return 0
    if args.tcp_source:
        tcp_source(args.tcp_source, args.tcp_seconds, args.tcp_pace_mbit)
        return 0
    if not args.modes or set(args.modes) - {"sync", "diloco"}:
        parser.error("--modes takes sync and/or diloco")
    if not args.mbit or min(args.mbit) <= 0:
        parser.error("--mbit takes positive rates")
    if not 1 <= args.peers <= 250:
        parser.error("--peers must be 1..250 (one address each in 10.77.0.0/24)")
    args.single_seconds = args.single_seconds or args.seconds

    for var in ("no_proxy", "NO_PROXY"):  # gRPC honours proxy variables; the testbed's addresses are local
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), HOST_IP]))
    SIGNALS.install()
    try:
        preflight(args.cap_coordinator)
        remove_stale()
    except SetupError as e:
        print(f"wan: {e}", file=sys.stderr)
        return 2
    if args.selftest_net:
        return selftest(args)
    root = Path(tempfile.mkdtemp(prefix="hivefold-wan-"))
    os.environ[ttl.KNOWN_ENV] = str(root / "known_coordinators")  # this run's coordinators, trusted on first use
    rows: list[dict] = []
    ok = False
    try:
        run_benchmark(args, root, rows)
        ok = not any(r.get("error") for r in rows)
    finally:
        if len(rows) > 1:
            print_table(rows)
        if args.json and rows:
            args.json.write_text(json.dumps(rows, indent=2))
        if args.keep or not ok:
            print(f"logs and runs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have stopped the swarm and removed the namespaces
        print("wan: interrupted", file=sys.stderr)
        sys.exit(130)
