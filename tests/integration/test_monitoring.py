"""Watching a real swarm: the dashboard in a real headless Chromium, and a real Prometheus scraping it.

One diloco swarm (coordinator with its keeper, two peers serving their own ``/metrics``) is shared by
the tests of this module. Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium)
and Prometheus (Debian's ``prometheus``) are installed by ``.ci/run``; where they are missing the
tests are skipped with the command that installs them. The dashboard's screenshot is saved in
``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from hivefold.receipts import ReceiptBook
from hivefold.tls import SERVER_NAME, client_ssl_context
from tests.conftest import REPO, Processes, wait_for

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER, PROMETHEUS = "/usr/bin/chromium", "/usr/bin/chromedriver", shutil.which("prometheus")
ARTIFACTS = REPO / "test-artifacts"
RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--shard-sequences", "32", "--inner-steps", "8", "--matchmaking-time", "1", "--averaging-timeout", "15",
             "--warmup-steps", "2", "--lr", "3e-3"]


class Swarm:
    def __init__(self, root: Path, procs: Processes):
        self.root, self.procs = root, procs
        workdir = root / "coordinator"
        coordinator = procs.start(
            "coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http",
            "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat-interval", "2",
            "--checkpoint-every", "1", "--keeper-poll", "1", *RUN_FLAGS)

        def endpoints():
            if coordinator.poll() is not None:
                pytest.fail("coordinator exited:\n" + procs.tail())
            path = workdir / "coordinator.json"
            return json.loads(path.read_text()) if path.exists() else None

        info = wait_for(endpoints, timeout=180, what="the coordinator to serve", procs=procs)
        self.address, self.http = info["grpc"], "https://" + info["http"]
        self.cert = Path(info["cert"])  # the dashboard and /metrics are served with the gRPC side's certificate
        self.https = client_ssl_context(self.cert.read_bytes())
        self.peers = {}
        for name in ("alice", "bob"):
            proc = procs.start(name, "peer", "--coordinator", self.address, "--coordinator-fingerprint",
                               info["fingerprint"], "--workdir", str(root / name), "--name",
                               name, "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress",
                               "--metrics-port", "127.0.0.1:0", *(["--team", "hive <b>"] if name == "alice" else []))
            self.peers[name] = proc
        self.metrics = {name: wait_for(lambda p=proc: _metrics_address(p), timeout=180, procs=procs,
                                       what=f"{name}'s metrics endpoint") for name, proc in self.peers.items()}

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(self.http + path, timeout=10, context=self.https) as r:
            return json.load(r)


def _metrics_address(proc) -> str | None:
    found = re.search(r"metrics at http://([\d.]+:\d+)/metrics", proc.log.read_text(errors="replace"))
    return found.group(1) if found else None


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    procs = Processes(root)
    try:
        s = Swarm(root, procs)
        # Worth watching: both peers heard from, results in, the keeper's first validation loss after training.
        wait_for(lambda: (st := s.api("/api/status"))["peers_online"] == 2 and st["samples_trained"] > 0
                 and len(st["val_history"]) >= 2, timeout=300, what="a swarm with results and a val loss",
                 procs=procs)
        yield s
    finally:
        procs.close()


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="needs Chromium: apt-get install chromium chromium-driver (.ci/run does)")
def test_dashboard_shows_both_peers_and_live_charts_in_chromium(swarm):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine has no internet: Chromium's background services would only fail to connect.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1300"):
        options.add_argument(flag)
    # the page is served over HTTPS with the coordinator's self-signed certificate: trust that key, and only it
    options.add_argument(f"--ignore-certificate-errors-spki-list={spki_sha256(swarm.cert.read_bytes())}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(swarm.http + "/")

        def page():
            return driver.execute_script("""
                const c = window.hivefoldCharts || {};
                const points = (id) => c[id] ? c[id].data[0].length : 0;
                return {rows: [...document.querySelectorAll('#peers tbody tr')].map(r => r.innerText),
                        loss: points('c-loss'), rate: points('c-rate'), peers: points('c-peers'),
                        canvases: document.querySelectorAll('.uplot canvas').length,
                        step: document.getElementById('t-step').textContent,
                        error: (e => e.hidden ? null : e.textContent)(document.getElementById('error'))};
            """)

        seen = wait_for(lambda: (p := page())["loss"] >= 2 and p["rate"] >= 2 and len(p["rows"]) == 2 and p,
                        timeout=90, what="both peers and non-empty charts on the page", procs=swarm.procs)
        assert seen["error"] is None
        assert {row.split()[0] for row in seen["rows"]} == {"alice", "bob"}
        assert any("hive <b>" in row for row in seen["rows"])  # shown as text, not markup
        assert all("online" in row for row in seen["rows"])
        assert seen["canvases"] >= 4
        # live: the throughput chart grows while the page is open (history is sampled every 5 s)
        before = seen["rate"]
        wait_for(lambda: page()["rate"] > before, timeout=30, what="the throughput chart to update")
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 20_000
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs  # no script errors, no failed requests
    finally:
        driver.quit()


def spki_sha256(cert_pem: bytes) -> str:
    """Chromium's pin for a certificate: base64 of the SHA-256 of its public key (SubjectPublicKeyInfo)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(PROMETHEUS is None, reason="needs Prometheus: apt-get install prometheus (.ci/run does)")
def test_a_real_prometheus_scrapes_the_coordinator_and_the_peers(swarm, tmp_path):
    coordinator = urllib.parse.urlsplit(swarm.http).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: coordinator\n    scheme: https\n"  # verified against the coordinator's own certificate
        f"    tls_config: {{ca_file: '{swarm.cert}', server_name: {SERVER_NAME}}}\n"
        f"    static_configs: [{{targets: ['{coordinator}']}}]\n"
        f"  - job_name: peers\n    static_configs: [{{targets: {json.dumps(list(swarm.metrics.values()))}}}]\n")
    port = _free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(q: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.load(r)
            except (urllib.error.URLError, ConnectionError):
                return []
            return body["data"]["result"] if body.get("status") == "success" else []

        def value(q: str) -> float | None:
            result = query(q)
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: value("count(up == 1)") == 3, timeout=90, what="Prometheus to scrape all three targets",
                 procs=swarm.procs)
        wait_for(lambda: value("hivefold_rpc_duration_seconds_count{method='Heartbeat'}"), timeout=30,
                 what="the RPC histogram")
        assert value("hivefold_peers_online") == 2
        assert value("hivefold_tokens_trained_total") > 0
        assert value("hivefold_samples_per_second") > 0
        assert 0 < value("hivefold_train_loss") < 20 and 0 < value("hivefold_val_loss") < 20
        assert value("hivefold_global_step") >= 0
        assert value("sum(hivefold_shards)") == value("hivefold_shards{state='done'}") + value(
            "hivefold_shards{state='pending'}") + value("hivefold_shards{state='leased'}")
        assert value("hivefold_results_total{verdict='accepted'}") >= 1
        assert value("hivefold_leases_expired_total") is not None
        assert value("hivefold_rpc_duration_seconds_bucket{method='Heartbeat', le='+Inf'}") >= 1
        assert 0 < value("hivefold_rpc_duration_seconds_sum{method='Heartbeat'} / "
                         "hivefold_rpc_duration_seconds_count{method='Heartbeat'}") < 5
        # the peers' own figures, one series per peer
        assert len(query("hivefold_peer_samples_per_second > 0")) == 2
        assert len(query("hivefold_peer_compute_utilization > 0")) == 2
        assert len(query("hivefold_peer_device_memory_bytes > 1e6")) == 2
        assert len(query("hivefold_peer_poisoners_caught == 0")) == 2  # an honest swarm
        assert len(query("hivefold_peer_coordinator_bytes_total{direction='received'} > 0")) == 2
        # every query of the Grafana dashboard in deploy/ names series that exist
        panels = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())["panels"]
        exprs = [t["expr"].replace("$__rate_interval", "30s") for p in panels for t in p["targets"]]
        assert len(exprs) >= 15
        wait_for(lambda: all(query(e) for e in exprs), timeout=30, what="data for every Grafana panel's query")
    finally:
        prom.terminate()
        prom.wait(10)


def test_peers_keep_verified_receipts_and_teams_lead(swarm):
    board = swarm.api("/api/credit")
    alice = next(p for p in board["peers"] if p["name"] == "alice")
    assert board["teams"][0]["team"] == "hive <b>" and board["teams"][0]["points"] == alice["points"] > 0
    key = bytes.fromhex(board["receipt_public_key"])
    summary = ReceiptBook(swarm.root / "alice").summary(key)
    assert summary["receipts"] >= 1 and not summary["invalid"] and summary["points"] > 0
    assert summary["points"] <= alice["points"] + 1e-3  # no receipt for credit the ledger does not hold
