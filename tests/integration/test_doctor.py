"""``hivefold doctor`` against a real coordinator: all clear and nothing registered; an unreachable
coordinator and a missing GPU fail, each naming its check."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Processes, wait_for
from tests.integration.test_restart import free_port
from tests.integration.test_swarm import RUN_FLAGS

pytestmark = pytest.mark.integration

NAMES = ["versions", "coordinator", "p2p-daemon", "dht-bootstrap", "reachability", "device"]


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hivefold", "doctor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    procs = Processes(root)
    workdir = root / "coordinator"
    try:
        with socket.socket() as s:  # a fixed DHT port, announced without its /p2p/ id as an operator would
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs.start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http", "",
                    "--dht-listen", f"/ip4/127.0.0.1/tcp/{port}", "--dht-announce", f"/ip4/127.0.0.1/tcp/{port}",
                    "--no-keeper", *RUN_FLAGS)
        path = workdir / "coordinator.json"
        address = wait_for(lambda: path.exists() and json.loads(path.read_text())["grpc"], timeout=180,
                           what="the coordinator to serve", procs=procs)
        # the coordinator completed the announced address with its node id: doctor's DHT check joins through it
        assert json.loads(path.read_text())["dht"] == [f"/ip4/127.0.0.1/tcp/{port}/p2p/" + json.loads(
            path.read_text())["dht"][0].rsplit("/", 1)[-1]]
        yield address, workdir
    finally:
        procs.close()


def peers_in_ledger(workdir: Path) -> int:
    with sqlite3.connect(f"file:{workdir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM peers").fetchone()[0]


def test_a_healthy_machine_passes_and_registers_nothing(coordinator):
    address, workdir = coordinator
    r = doctor("--coordinator", address, "--device", "cpu", "--timeout", "30")
    print(r.stdout)  # shown with -s: the output a volunteer sees
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    checks = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert list(checks) == NAMES, r.stdout
    assert all(status == "PASS" or (name == "reachability" and status == "WARN") for name, status in checks.items())
    assert "hivemind matches the coordinator's" in r.stdout and "samples/s" in r.stdout
    assert lines[-1].startswith("doctor: ready")
    assert peers_in_ledger(workdir) == 0


def test_an_unreachable_coordinator_fails_naming_it():
    address = f"127.0.0.1:{free_port()}"
    r = doctor("--coordinator", address, "--device", "cpu", "--timeout", "3")
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("FAIL  coordinator"))
    assert f"no answer from {address}" in line and "firewall" in line
    assert "failed (coordinator)" in r.stdout.splitlines()[-1] and "Traceback" not in r.stderr


def test_cuda_without_a_gpu_fails_the_device_check():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = doctor("--device", "cuda", "--json", "--timeout", "30")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"] and checks["device"]["status"] == "FAIL"
    assert "CUDA" in checks["device"]["detail"] and "torch" in checks["device"]["advice"]
    assert checks["coordinator"]["status"] == "SKIP" and checks["dht-bootstrap"]["status"] == "SKIP"
    assert [c["name"] for c in report["checks"] if c["status"] == "FAIL"] == ["device"]
