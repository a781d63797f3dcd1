"""The network alone, for benchmarks/wan.py --selftest-net: build a ``Testbed``, measure each path's TCP goodput
against its cap, tear it down and check that nothing is left."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from netns import HOST_IP, Testbed, sh, tbf_args  # benchmarks/ is on sys.path


def tcp_sink(addr: str, seconds: float, warm: float) -> None:
    """Hidden worker: accept one connection, count what arrives after ``warm`` seconds, print it as JSON."""
    host, _, port = addr.rpartition(":")
    srv = socket.create_server((host, int(port)))
    srv.settimeout(20)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(seconds + warm + 10)
    first = t_warm = last = None
    counted = 0
    while data := conn.recv(1 << 20):
        now = time.monotonic()
        first = first or now
        if now - first >= warm:
            if t_warm is None:
                t_warm = now  # counting starts after this chunk: past tbf's burst and TCP's slow start
            else:
                counted, last = counted + len(data), now
    print(json.dumps({"bytes": counted, "seconds": (last - t_warm) if last else 0.0}), flush=True)


def tcp_source(addr: str, seconds: float, pace_mbit: float) -> None:
    """Hidden worker: send to ``addr`` for ``seconds``, at most ``pace_mbit`` (so an uncapped path stays cheap)."""
    host, _, port = addr.rpartition(":")
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    chunk = b"\0" * 65536
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < seconds:
        conn.sendall(chunk)
        sent += len(chunk)
        ahead = sent * 8 / (pace_mbit * 1e6) - (now - start)
        if ahead > 0:
            time.sleep(ahead)
    conn.close()


def measure_tcp(src_prefix: list[str], dst_prefix: list[str], dst_ip: str, seconds: float, pace_mbit: float,
                port: int = 5299) -> float:
    """Goodput in Mbit/s of one TCP stream from the source's namespace to ``dst_ip``."""
    me = [sys.executable, str(Path(__file__).resolve().with_name("wan.py"))]  # its hidden --tcp-* modes
    warm = 1.0
    procs = []
    try:
        sink = subprocess.Popen([*dst_prefix, *me, "--tcp-sink", f"{dst_ip}:{port}", "--tcp-seconds", str(seconds),
                                 "--tcp-warm", str(warm)], stdout=subprocess.PIPE, text=True)
        procs.append(sink)
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the TCP sink on {dst_ip} did not start")
        source = subprocess.Popen([*src_prefix, *me, "--tcp-source", f"{dst_ip}:{port}", "--tcp-seconds",
                                   str(seconds + warm), "--tcp-pace-mbit", str(pace_mbit)])
        procs.append(source)
        if source.wait(seconds + warm + 20) != 0:
            raise RuntimeError("the TCP source failed")
        out = json.loads(sink.communicate(timeout=20)[0].strip().splitlines()[-1])
        return out["bytes"] * 8 / out["seconds"] / 1e6 if out["seconds"] else 0.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def selftest(args) -> int:
    mbit = args.mbit[0]
    secs = args.selftest_seconds
    pace = 5 * mbit  # well above the cap: a capped path shows the cap, an uncapped one shows the pace
    # goodput under a cap: TCP payload per wire frame, 1448 of 1514 bytes (headers with timestamps; tbf counts
    # the Ethernet header)
    expect = mbit * 1448 / 1514
    which = "every path" if args.cap_coordinator else "peer-to-peer paths"
    print(f"selftest: 2 peer namespaces at {mbit:g} Mbit/s each way, {which} capped; "
          f"tbf {' '.join(tbf_args(mbit)[1:])}")
    with Testbed(2, mbit, cap_coordinator=args.cap_coordinator) as net:
        print(f"  made: bridge {net.bridge} ({HOST_IP}), namespaces {', '.join(net.ns)}, veths {', '.join(net.veth)}")
        print("  qdiscs in", net.ns[0], "|", " / ".join(
            line.strip() for line in sh("tc", "-n", net.ns[0], "qdisc", "show", "dev", "eth0").stdout.splitlines()))
        tests = [("peer 0 -> peer 1 (p0 upload + p1 download caps)", net.exec_prefix(0), net.exec_prefix(1),
                  net.peer_ip(1), True),
                 ("peer 0 -> coordinator host (p0 upload)", net.exec_prefix(0), [], HOST_IP, args.cap_coordinator),
                 ("coordinator host -> peer 1 (p1 download)", [], net.exec_prefix(1), net.peer_ip(1),
                  args.cap_coordinator)]
        ok = True
        for name, src, dst, ip, capped in tests:
            got = measure_tcp(src, dst, ip, secs, pace)
            want = f"~{expect:.1f} (capped)" if capped else f"> {mbit:g}, up to the test's {pace:g} pace (uncapped)"
            good = 0.9 * expect <= got <= 1.05 * mbit if capped else got > 1.5 * mbit
            ok &= good
            print(f"  {name:50s} {got:8.2f} Mbit/s   expected {want}   {'ok' if good else 'UNEXPECTED'}")
        tx, rx = net.link_bytes(0)
        print(f"  peer 0 eth0 counters: sent {tx} B, received {rx} B; to other peers (htb 1:10): "
              f"{net.p2p_sent_bytes(0)} B")
    left = net.leftovers()
    print(f"  torn down: {'nothing left' if not left else 'LEFT OVER: ' + ', '.join(left)}")
    return 0 if ok and not left else 1
