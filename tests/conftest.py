"""Shared fixtures: a tiny run spec, and process helpers that never leave strays behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KNOWN_ENV = "HIVEFOLD_KNOWN_COORDINATORS"  # hivefold.tls (not imported here: this module stays light)


class Processes:
    """Starts commands in their own process groups and kills every group at teardown."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str, env: dict | None = None, module: str = "hivefold") -> subprocess.Popen:
        """``python -m hivefold ARGS`` (or another ``module``) in its own process group, logging to ``NAME.log``."""
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append((proc, log))
        return proc

    @staticmethod
    def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal the process's group and every descendant (hivemind's DHT runs in a group of its own)."""
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, proc: subprocess.Popen, timeout: float = 60.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole group (hivemind helpers and p2pd included)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group(proc)
                proc.wait()
        self.kill_group(proc)  # helpers that outlived their parent
        return proc.returncode

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                self.kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill_group(proc)
            if proc.poll() is None:
                proc.wait()

    def tail(self) -> str:
        out = []
        for proc, log in self.procs:
            lines = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
            out.append(f"==== {log.name} (exit {proc.poll()})\n" + "\n".join(lines))
        return "\n".join(out)


def start_coordinator(procs: Processes, workdir: Path, *flags: str, timeout: float = 180) -> dict:
    """``hivefold coordinator`` on loopback ports (gRPC, HTTP, DHT) with ``flags``; its endpoints once it serves."""
    coordinator = procs.start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0",
                              "--http", "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0", *flags)
    path = workdir / "coordinator.json"
    return wait_for(lambda: coordinator.poll() is None and path.exists() and json.loads(path.read_text()),
                    timeout=timeout, what="the coordinator to serve", procs=procs)


def descendants(root: int) -> list[int]:
    """Pids of every living descendant of ``root`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def wait_for(predicate: Callable[[], object], *, timeout: float, interval: float = 0.5, what: str = "condition",
             procs: Processes | None = None):
    """Poll ``predicate`` until it returns something truthy; fail with the logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n" + (procs.tail() if procs else ""))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skips, saying why, where none can be started)."""
    from tests import pgserver

    why = pgserver.unavailable()
    if why:
        pytest.skip(f"PostgreSQL tests skipped: {why}")
    server = pgserver.PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A fresh schema of its own on the session's server, as a ``postgresql://`` URL."""
    postgres_url.count = getattr(postgres_url, "count", 0) + 1
    return postgres.create_schema(f"t{postgres_url.count}_{os.getpid()}")


def hivefold(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``hivefold`` command to its end, capturing its output."""
    return subprocess.run([sys.executable, "-m", "hivefold", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def pytest_configure(config) -> None:
    # Clients made by module-scoped fixtures trust on first use into a file of the session's, never the user's.
    os.environ[KNOWN_ENV] = str(Path(tempfile.mkdtemp(prefix="hivefold-trust-")) / "known_coordinators")


@pytest.fixture(autouse=True)
def known_coordinators(tmp_path_factory, monkeypatch) -> Path:
    """Each test trusts on first use into a file of its own: a port another test's coordinator (with another
    certificate) used before is not taken for an impersonator. Peers a test starts inherit it."""
    path = tmp_path_factory.mktemp("trust") / "known_coordinators"
    monkeypatch.setenv(KNOWN_ENV, str(path))
    return path


def serve_tls(workdir: Path):
    """The self-signed certificate a coordinator with this workdir serves, and a client trust pinned to it."""
    from hivefold.tls import Trust, server_tls

    tls, key_file = server_tls(workdir)
    return tls, key_file, Trust(fingerprint=tls.fingerprint)


@pytest.fixture
def processes(tmp_path: Path):
    procs = Processes(tmp_path)
    yield procs
    procs.close()


FAKE_MADDR = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def small_run(workdir: Path, dht_maddrs: list[str] = (FAKE_MADDR,), verify_ceiling: float = 0.0):
    """A coordinator's context for a small real run (400 lines of text, shards of 16 sequences of 32 tokens),
    without starting anything: tests serve it with ``start_server`` / ``start_http`` as they need.
    Results are not sampled for verification unless ``verify_ceiling`` says so: these tests' peers submit
    results they did not train, with no proof to send."""
    from coordinator.config import CoordinatorConfig, RunOptions
    from coordinator.handlers import Context
    from coordinator.run import open_run

    corpus = workdir.parent / f"{workdir.name}-corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    config = CoordinatorConfig(workdir=workdir, listen="127.0.0.1:0", http="127.0.0.1:0",
                               run=RunOptions(corpus=str(corpus), seq_len=32, micro_batch=4, target_batch_size=16,
                                              shard_sequences=16), verify_ceiling=verify_ceiling, verify_floor=0.0)
    spec, ledger = open_run(workdir, config.run)
    return Context(config=config, spec=spec, ledger=ledger, dht_maddrs=list(dht_maddrs))
