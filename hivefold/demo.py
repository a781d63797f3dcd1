"""``hivefold demo``: a coordinator and N peers as separate processes on loopback, watched live.

At the end it prints a summary (swarm steps, tokens, train and validation loss first → last), the
final checkpoint's path, and a text sample generated from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hivefold.client import CoordinatorClient
from hivefold.errors import ConfigError, HivefoldError
from hivefold.generate import generate_text
from hivefold.retry import Unreachable
from hivefold.status_view import fmt, render

# Settings tuned so a 2-core CPU machine shows a clearly falling validation loss in ~3 minutes: DiLoCo with
# short rounds (32 micro-batches of 8 across the swarm, about 2 s) and a plain averaging outer step (lr 1,
# no momentum), which beat DiLoCo's long-run defaults (0.7, 0.9) at this length (see the README).
DEMO_RUN_FLAGS = ["--seq-len", "128", "--micro-batch", "8", "--averaging", "diloco", "--inner-steps", "32",
                  "--outer-lr", "1.0", "--outer-momentum", "0.0", "--lr", "3e-3", "--warmup-steps", "20",
                  "--decay-steps", "3000", "--shard-sequences", "128", "--matchmaking-time", "1",
                  "--averaging-timeout", "20"]
DEMO_SERVICE_FLAGS = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                      "--lease-seconds", "60", "--heartbeat-interval", "3", "--checkpoint-every", "10",
                      "--keeper-poll", "2"]
STARTUP_TIMEOUT_S = 300.0  # building shards from the stdlib takes a few seconds; hivemind's start a few more
STOP_TIMEOUT_S = 180.0


def _wait_for_endpoints(path: Path, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise HivefoldError("the coordinator exited during start-up:\n" + "\n".join(tail))
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.5)
    raise HivefoldError(f"the coordinator did not start within {STARTUP_TIMEOUT_S:.0f}s; see {log}")


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_demo(*, peers: int = 2, minutes: float = 3.0, corpus: str = "stdlib", workdir: Path | None = None,
             model: str = "tiny", console: Console | None = None) -> dict:
    """Run the demo; returns the final status document with ``sample`` added."""
    if peers < 1 or peers > 16:
        raise ConfigError(f"--peers must be between 1 and 16, got {peers}")
    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    console = console or Console()
    workdir = (workdir or Path("hivefold-demo") / datetime.now().strftime("run-%Y%m%d-%H%M%S")).resolve()
    if (workdir / "coordinator" / "spec.json").exists():
        raise ConfigError(f"{workdir} already holds a demo run; pass a fresh --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    threads = max(1, cores // peers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "hivefold", "coordinator", "--workdir", str(workdir / "coordinator"),
           "--corpus", corpus, "--model", model, *DEMO_RUN_FLAGS, *DEMO_SERVICE_FLAGS]
    coord_log = workdir / "coordinator.log"
    console.print(f"[bold]hivefold demo[/]: 1 coordinator + {peers} peers, {minutes:g} min, corpus {corpus!r}; "
                  f"logs in {workdir}")
    procs: list[subprocess.Popen] = []
    with coord_log.open("wb") as out:
        coord = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peer_procs: list[subprocess.Popen] = []
    try:
        endpoints = _wait_for_endpoints(workdir / "coordinator" / "coordinator.json", coord, coord_log)
        address = endpoints["grpc"]
        console.print(f"coordinator at {address}, status at http://{endpoints.get('http')}/api/status")
        for i in range(peers):
            with (workdir / f"peer-{i}.log").open("wb") as out:
                peer_procs.append(subprocess.Popen(
                    [sys.executable, "-m", "hivefold", "peer", "--coordinator", address, "--workdir",
                     str(workdir / f"peer-{i}"), "--name", f"demo-peer-{i}", "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                     "--threads", str(threads), "--no-progress"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        procs = [coord, *peer_procs]
        client = CoordinatorClient(address, give_up_after=10.0)
        total = minutes * 60
        start = time.monotonic()
        status = client.status()
        with Live(render(status, clock=f"0/{total:.0f}s"), console=console, refresh_per_second=2) as live:
            while (elapsed := time.monotonic() - start) < total:
                time.sleep(1.0)
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise HivefoldError(f"a demo process exited early (code {dead[0].returncode}); see {workdir}")
                try:
                    status = client.status()
                except Unreachable:
                    continue
                live.update(render(status, clock=f"{elapsed:.0f}/{total:.0f}s"))
        client.close()
        console.print("stopping: the keeper takes a final checkpoint, then the peers leave …")
        _stop([coord], STOP_TIMEOUT_S)
        _stop(peer_procs, 60.0)
    finally:
        _stop([coord, *peer_procs], 30.0)
    return summarize(workdir, console)


def summarize(workdir: Path, console: Console) -> dict:
    from coordinator.ledger import Ledger  # the demo reads the stopped coordinator's ledger directly
    from coordinator.run import LEDGER_FILE

    spec = json.loads((workdir / "coordinator" / "spec.json").read_text())
    ledger = Ledger(workdir / "coordinator" / LEDGER_FILE)
    try:
        status = ledger.status(now=time.time(), online_seconds=0, seq_len=spec["seq_len"])
    finally:
        ledger.close()
    ckpt = status["checkpoint"]
    table = Table(title="hivefold demo: summary", show_header=False)
    table.add_row("swarm steps", str(status["global_step"]))
    table.add_row("tokens trained", f"{status['tokens_trained']:,}")
    table.add_row("shards done", f"{status['shards']['done']} of {status['shards']['total']}")
    table.add_row("train loss", f"{fmt(status['train_loss_first'])} → {fmt(status['train_loss'])}")
    table.add_row("validation loss", f"{fmt(status['val_loss_first'])} → {fmt(status['val_loss'])}")
    table.add_row("checkpoint", f"{ckpt['path']} (step {ckpt['step']})" if ckpt else "none")
    console.print(table)
    status["sample"] = None
    if ckpt:
        prompt = "def "
        status["sample"] = generate_text(Path(ckpt["path"]), prompt, tokens=300, temperature=0.8)
        console.rule("sample from the final checkpoint")
        console.print(status["sample"], markup=False, highlight=False)
        console.rule()
        console.print(f"try: hivefold generate --checkpoint {ckpt['path']} --prompt 'import '")
    return status
