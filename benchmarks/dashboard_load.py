"""How quickly the dashboard answers and renders for a big swarm: a ledger with --peers peers.

    python benchmarks/dashboard_load.py [--peers 1000] [--results-per-peer 10] [--history-hours 24] [--json PATH]

Builds a run through the ledger's own API (every peer registered, heartbeating, each with accepted
results and their losses; a day of swarm samples; evaluations), serves it with the coordinator's
HTTP server, and measures: the status document built straight from the ledger (the work behind
``/api/status``, ``GetStatus`` and ``/metrics``), each JSON endpoint and ``/metrics`` over HTTP
(uncached: the server caches answers for a second, the benchmark waits that out), their sizes,
and, when Debian's Chromium and chromium-driver are installed, the page in a headless browser:
from navigation until the peers table holds every peer and the charts are drawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from coordinator.config import CoordinatorConfig, RunOptions
from coordinator.handlers import Context, status_document
from coordinator.http import start_http
from coordinator.http.server import CACHE_SECONDS
from coordinator.run import open_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def build(workdir: Path, peers: int, results_per_peer: int, history_hours: float) -> Context:
    corpus = workdir.parent / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60000)))
    config = CoordinatorConfig(workdir=workdir, listen="127.0.0.1:0", http="127.0.0.1:0",
                               run=RunOptions(corpus=str(corpus), seq_len=32, micro_batch=4, target_batch_size=16,
                                              shard_sequences=4))
    spec, ledger = open_run(workdir, config.run)
    ctx = Context(config=config, spec=spec, ledger=ledger, dht_maddrs=[])
    now = time.time()
    start = now - history_hours * 3600
    for i in range(peers):
        pid = f"{i:040x}"
        ledger.register_peer(peer_id=pid, name=f"volunteer-{i}", public_key=pid.encode(), device_kind="cpu",
                             device_name="bench", memory_bytes=1 << 30, now=start)
        for k in range(results_per_peer):
            t = start + (now - start) * (i * results_per_peer + k) / (peers * results_per_peer)
            lease = ledger.lease_shard(pid, lease_seconds=600, now=t).lease
            if lease is None:
                break
            ledger.submit(pid, lease.lease_id, samples=lease.num_sequences, losses=[(3.0 - k / results_per_peer, k)],
                          compute_seconds=1.0, credit_per_sample=ctx.credit_per_sample, now=t + 1)
        ledger.heartbeat(pid, epoch=results_per_peer, samples=4 * results_per_peer, recent_loss=2.5,
                         samples_per_second=1.0 + i % 7, now=now - (i % 3) * 100,
                         utilization=0.9, micro_batch=4)
    with ledger._tx() as c:  # noqa: SLF001 - a day of samples at the coordinator's 5 s cadence, in one transaction
        c.executemany("INSERT INTO swarm_history VALUES (?, ?, ?, ?, ?, ?)",
                      [(start + s * 5, peers, 1000.0, 0.9, s * 10, s // 10)
                       for s in range(int(history_hours * 3600 / 5))])
    for step in range(50):
        ledger.record_evaluation(step, 3.0 - step / 50, now=start + (now - start) * step / 50)
    return ctx


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        size = len(r.read())
    return time.perf_counter() - t0, size


def browser_load(url: str, peers: int) -> dict | None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        t0 = time.perf_counter()
        driver.get(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = driver.execute_script(
                "return document.querySelectorAll('#peers tbody tr').length === arguments[0] && "
                "!!(window.hivefoldCharts && window.hivefoldCharts['c-loss'] && window.hivefoldCharts['c-rate'])",
                peers)
            if ready:
                break
            time.sleep(0.02)
        else:
            return {"error": "the page did not render every peer and chart within 60 s"}
        total = time.perf_counter() - t0
        t1 = time.perf_counter()  # a re-sort of the whole table, as a click on a column header does
        driver.execute_script("document.querySelector('#peers th[data-key=name]').click()")
        sort = time.perf_counter() - t1
        return {"page_ready_s": total, "sort_s": sort}
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--results-per-peer", type=int, default=10)
    parser.add_argument("--history-hours", type=float, default=24.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivefold-dashload-") as tmp:
        t0 = time.perf_counter()
        ctx = build(Path(tmp) / "coordinator", args.peers, args.results_per_peer, args.history_hours)
        print(f"ledger built in {time.perf_counter() - t0:.1f}s: {args.peers} peers, "
              f"{args.peers * args.results_per_peer} results, {args.history_hours:g} h of swarm samples")
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            status_document(ctx, time.time())
            times.append(time.perf_counter() - t)
        out = {"peers": args.peers, "results": args.peers * args.results_per_peer,
               "status_document_s": statistics.median(times)}
        server, port = start_http(ctx, "127.0.0.1:0")
        base = f"http://127.0.0.1:{port}"
        try:
            for path in ("/", "/api/status", "/api/history", "/api/events?limit=30", "/metrics"):
                runs = []
                for _ in range(args.repeat):
                    time.sleep(CACHE_SECONDS)  # past the server's cache: every run does the work
                    runs.append(fetch(base + path))
                out[path] = {"seconds": statistics.median(r[0] for r in runs), "bytes": runs[-1][1]}
            out["browser"] = browser_load(base + "/", args.peers)
        finally:
            server.shutdown()
            ctx.ledger.close()
    print(f"status document from the ledger: {1000 * out['status_document_s']:.1f} ms")
    for path in ("/", "/api/status", "/api/history", "/api/events?limit=30", "/metrics"):
        print(f"GET {path:22s} {1000 * out[path]['seconds']:7.1f} ms  {out[path]['bytes'] / 1024:8.1f} KiB")
    b = out["browser"]
    if b is None:
        print("browser: skipped (needs Debian's chromium and chromium-driver)")
    elif "error" in b:
        print(f"browser: {b['error']}")
    else:
        print(f"browser: page ready with {args.peers} peers and its charts in {b['page_ready_s']:.2f}s; "
              f"re-sorting the table {1000 * b['sort_s']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
