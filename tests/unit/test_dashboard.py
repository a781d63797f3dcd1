"""The coordinator's HTTP side, really served: dashboard files, JSON API, ``/metrics`` and the RPC histogram."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.handlers import record_history
from coordinator.http import make_metrics, start_http
from coordinator.http.server import STATIC
from coordinator.ledger import Ledger
from coordinator.server import start_server
from hivefold.client import CoordinatorClient
from hivefold.identity import Identity
from hivefold.tls import client_ssl_context
from protos import coordinator_pb2 as pb
from tests.conftest import serve_tls, small_run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A coordinator with two peers that each trained a shard (one of them named to attack the page)."""
    ctx = small_run(tmp_path_factory.mktemp("coordinator"))
    ledger = ctx.ledger
    metrics = make_metrics(ctx)
    tls, key_file, trust = serve_tls(ctx.config.workdir)
    server, port = start_server(ctx, "127.0.0.1:0", interceptors=[metrics.interceptor()], tls=tls)
    http, http_port = start_http(ctx, "127.0.0.1:0", metrics, tls=tls.ssl_context(key_file))
    HTTPS.append(client_ssl_context(tls.cert_pem))
    address = f"127.0.0.1:{port}"
    for i, name in enumerate(["alice", "<img src=x onerror=alert(1)>"]):
        client = CoordinatorClient(address, trust=trust, give_up_after=5.0)
        client.register(Identity.load_or_create(ctx.config.workdir.parent / f"peer{i}"), name=name,
                        device=pb.DeviceReport(kind="cpu"))
        client.heartbeat(pb.HeartbeatRequest(epoch=0, samples_per_second=10.0 + i, compute_utilization=0.9))
        work = client.lease().work
        losses = [pb.MicroBatchLoss(loss=3.0 - i, epoch=0)] * -(-work.num_sequences // ctx.spec.micro_batch)
        client.submit(pb.SubmitResultRequest(lease_id=work.lease_id, samples=work.num_sequences, losses=losses))
        record_history(ctx, now=time.time())
        client.close()
    ledger.record_evaluation(1, 2.5, now=time.time())
    yield ctx, address, f"https://127.0.0.1:{http_port}"
    server.stop(0)
    http.shutdown()
    ledger.close()


HTTPS = []  # the served coordinator's certificate, pinned (set by the fixture)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, context=HTTPS[-1]) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_the_page_and_its_files_are_served_from_the_package(served):
    _, _, base = served
    code, kind, body = get(base + "/")
    assert code == 200 and kind.startswith("text/html")
    page = body.decode()
    # every file the page loads is served, and none comes from another host (users may be offline)
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(ref.startswith("/static/") for ref in refs)
    for ref in refs:
        code, kind, data = get(base + ref)
        assert code == 200 and data, ref
    for bad in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/nope.js", "/etc/passwd"):
        assert get(base + bad)[0] == 404, bad


def test_vendored_chart_library_matches_its_recorded_hashes():
    readme = (STATIC / "vendor" / "README.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        recorded = re.search(rf"`{re.escape(name)}`: ([0-9a-f]{{64}})", readme).group(1)
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == recorded


def test_history_events_and_status_for_the_page(served):
    ctx, _, base = served
    history = json.loads(get(base + "/api/history")[2])
    assert len(history["swarm"]) == 2 and history["swarm"][-1][1] == 2  # two peers online at the second sample
    tokens = [p[0] for p in history["train_loss"]]
    assert tokens == sorted(tokens) and tokens[-1] == 2 * 16 * ctx.spec.seq_len
    assert [p[1] for p in history["train_loss"]] == [3.0, 2.0]
    assert history["val_loss"] == [[2 * 16 * ctx.spec.seq_len, 2.5, 1]]
    events = json.loads(get(base + "/api/events?limit=10")[2])
    kinds = [e["kind"] for e in events]
    assert kinds.count("peer_registered") == 2 and "lease_issued" not in kinds
    assert {e["peer"] for e in events if e["kind"] == "peer_registered"} == {"alice", "<img src=x onerror=alert(1)>"}
    code, _, body = get(base + "/api/events?limit=lots")
    assert code == 400 and "limit must be" in json.loads(body)["error"]
    status = json.loads(get(base + "/api/status")[2])
    assert status["run"]["model"]["parameters"] > 0 and status["run"]["averaging"]["mode"] == "diloco"
    assert status["data_pass_progress"]["fraction"] == pytest.approx(2 / len(ctx.spec.shards), abs=0.01)


def test_metrics_are_prometheus_text_with_the_swarm_and_rpc_latency(served):
    _, _, base = served
    code, kind, body = get(base + "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("hivefold_peers_online", ())] == 2
    assert samples[("hivefold_peers_banned", ())] == 0 and samples[("hivefold_peers_reported", ())] == 0
    assert samples[("hivefold_verifications", (("state", "invalid"),))] == 0  # this test's run verifies nothing
    assert samples[("hivefold_verification_share", ())] == 0
    assert samples[("hivefold_shards", (("state", "done"),))] == 2
    assert samples[("hivefold_tokens_trained_total", ())] == 2 * 16 * 32
    assert samples[("hivefold_samples_per_second", ())] == pytest.approx(21.0)
    assert samples[("hivefold_train_loss", ())] == pytest.approx(2.5)
    assert samples[("hivefold_val_loss", ())] == 2.5
    assert samples[("hivefold_global_step", ())] == 0
    assert samples[("hivefold_results_total", (("verdict", "accepted"),))] == 2
    assert samples[("hivefold_leases_expired_total", ())] == 0
    # every RPC the fixture made was timed, by method
    assert samples[("hivefold_rpc_duration_seconds_count", (("method", "Register"),))] == 2
    assert samples[("hivefold_rpc_duration_seconds_count", (("method", "SubmitResult"),))] == 2
    assert samples[("hivefold_rpc_duration_seconds_sum", (("method", "LeaseShard"),))] > 0


def test_history_is_thinned_for_long_runs(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for i in range(5000):
        ledger._conn.execute("INSERT INTO swarm_history VALUES (?, 1, 2.0, 0.5, ?, 0)", (float(i), i))
    rows = ledger.history(seq_len=10, max_points=1000)["swarm"]
    assert len(rows) <= 1001 and rows[0][0] == 0.0 and rows[-1][0] == 4999.0
    ledger.close()


def test_status_watch_redraws_in_place_until_ctrl_c(served):
    """In a real terminal (a pty): the table is drawn, then redrawn over itself; Ctrl-C ends it cleanly."""
    ctx, address, _ = served
    main, child = pty.openpty()
    # started with SIGINT ignored, as a parent running hivemind (the test suite, after its in-process averagers) or
    # a background job's shell leaves it: Ctrl-C must still end --watch
    proc = subprocess.Popen([sys.executable, "-m", "hivefold", "status", "--coordinator", address, "--watch", "0.3"],
                            stdin=child, stdout=child, stderr=child, env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    os.close(child)
    out, deadline = b"", time.monotonic() + 60
    while out.count(ctx.spec.run_id.encode()) < 3 and time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            out += os.read(main, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    os.close(main)
    text = out.decode(errors="replace")
    assert text.count(ctx.spec.run_id) >= 3, text[-2000:]
    assert "\x1b[1A" in text or "\x1b[2K" in text  # the cursor went back up: redrawn in place, not scrolled
    assert "leaderboard" in text and "alice" in text
