"""``hivefold demo``: a coordinator and N peers as separate processes on loopback, watched live.

At the end it prints a summary (swarm steps, tokens, train and validation loss first → last), the
final checkpoint's path, and a text sample generated from it. The summary comes from the coordinator's
status document, read just before the coordinator is stopped (the demo is an app on top of the roles
and opens no role's files), plus the final checkpoint the keeper writes on the way out.
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

from hivefold.checkpoint import load_checkpoint, newest_checkpoint
from hivefold.client import CoordinatorClient
from hivefold.errors import ConfigError, HivefoldError
from hivefold.generate import generate_text
from hivefold.retry import Unreachable
from hivefold.status_view import fmt, render
from hivefold.tls import Trust

# Settings tuned so a 2-core CPU machine shows a clearly falling validation loss in ~3 minutes: DiLoCo with
# short rounds (64 micro-batches of 8 across the swarm, about 3 s) and a plain averaging outer step (lr 1,
# no momentum), which beat DiLoCo's long-run defaults (0.7, 0.9) at this length (see the README).
DEMO_RUN_FLAGS = ["--seq-len", "128", "--micro-batch", "8", "--averaging", "diloco", "--inner-steps", "64",
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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def coordinator_command(workdir: Path, *, corpus: str, model: str, gpu: bool) -> list[str]:
    """The demo's coordinator. On a GPU its checks are off: the demo's peers are the user's own, and the keeper
    would replay their work on the CPU, far slower than the GPU trains (README, "Verified work"), holding their
    leases back until it caught up."""
    return [sys.executable, "-m", "hivefold", "coordinator", "--workdir", str(workdir), "--corpus", corpus,
            "--model", model, *DEMO_RUN_FLAGS, *DEMO_SERVICE_FLAGS, *(["--verify-ceiling", "0"] if gpu else [])]


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
    gpu = _cuda_available()
    cmd = coordinator_command(workdir / "coordinator", corpus=corpus, model=model, gpu=gpu)
    coord_log = workdir / "coordinator.log"
    console.print(f"[bold]hivefold demo[/]: 1 coordinator + {peers} peers, {minutes:g} min, corpus {corpus!r}; "
                  f"logs in {workdir}" + ("; on the GPU, results are not checked (the keeper replays on the CPU)"
                                          if gpu else ""))
    procs: list[subprocess.Popen] = []
    with coord_log.open("wb") as out:
        coord = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peer_procs: list[subprocess.Popen] = []
    try:
        endpoints = _wait_for_endpoints(workdir / "coordinator" / "coordinator.json", coord, coord_log)
        address, pin = endpoints["grpc"], endpoints["fingerprint"]
        console.print(f"coordinator at {address} (TLS, certificate fingerprint {pin}); watch it live at "
                      f"https://{endpoints.get('http')}/ (the browser warns about the self-signed certificate: "
                      "it is the one above)")
        for i in range(peers):
            with (workdir / f"peer-{i}.log").open("wb") as out:
                peer_procs.append(subprocess.Popen(
                    [sys.executable, "-m", "hivefold", "peer", "--coordinator", address,
                     "--coordinator-fingerprint", pin, "--workdir",
                     str(workdir / f"peer-{i}"), "--name", f"demo-peer-{i}", "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                     "--threads", str(threads), "--no-progress"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        procs = [coord, *peer_procs]
        client = CoordinatorClient(address, trust=Trust(fingerprint=pin), give_up_after=10.0)
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
        try:  # the summary's facts: the status API is gone once the coordinator stops
            status = client.status()
        except Unreachable:
            pass  # the last document the live view showed
        client.close()
        console.print("stopping: the keeper takes a final checkpoint, then the peers leave …")
        _stop([coord], STOP_TIMEOUT_S)
        _stop(peer_procs, 60.0)
    finally:
        _stop([coord, *peer_procs], 30.0)
    return summarize(with_final_checkpoint(status), console)


def with_final_checkpoint(status: dict) -> dict:
    """``status`` with the checkpoint the keeper wrote after it was read (its final one, on the coordinator's stop).

    That checkpoint lies beside the latest one the document names and carries its own step and validation
    loss; the keeper evaluates at every checkpoint, so its loss is the run's last validation loss.
    """
    latest = status["checkpoint"]
    newest = newest_checkpoint(Path(latest["path"]).parent) if latest else None
    if newest is None or newest == Path(latest["path"]):
        return status
    ckpt = load_checkpoint(newest)
    if ckpt.step <= latest["step"]:
        return status
    status = {**status, "checkpoint": {"step": ckpt.step, "path": str(newest), "val_loss": ckpt.val_loss},
              "global_step": max(status["global_step"], ckpt.step)}
    if ckpt.val_loss is not None:
        status["val_history"] = [*status["val_history"], [ckpt.step, ckpt.val_loss]]
        status["val_loss"] = ckpt.val_loss
        if status["val_loss_first"] is None:
            status["val_loss_first"] = ckpt.val_loss
    return status


def summarize(status: dict, console: Console) -> dict:
    """Print the run's summary from its status document, and a sample from its latest checkpoint."""
    status = dict(status)
    ckpt = status["checkpoint"]
    table = Table(title="hivefold demo: summary", show_header=False)
    table.add_row("swarm steps", str(status["global_step"]))
    table.add_row("tokens trained", f"{status['tokens_trained']:,}")
    table.add_row("shards done", f"{status['shards']['done']} of {status['shards']['total']}")
    table.add_row("train loss", f"{fmt(status['train_loss_first'])} → {fmt(status['train_loss'])}")
    table.add_row("validation loss", f"{fmt(status['val_loss_first'])} → {fmt(status['val_loss'])}")
    table.add_row("checkpoint", f"{ckpt['path']} (step {ckpt['step']})" if ckpt else "none")
    console.print(table)
    if ckpt and (behind := status["global_step"] - ckpt["step"]) > 0:
        console.print(f"[yellow]the final checkpoint is {behind} swarm step{'s' * (behind > 1)} behind the swarm: the "
                      "keeper could not download its state (its lines in coordinator.log say why)[/]")
    status["sample"] = None
    if ckpt:
        prompt = "def "
        status["sample"] = generate_text(Path(ckpt["path"]), prompt, tokens=300, temperature=0.8)
        console.rule("sample from the final checkpoint")
        console.print(status["sample"], markup=False, highlight=False)
        console.rule()
        console.print(f"try: hivefold generate --checkpoint {ckpt['path']} --prompt 'import '")
    return status
