"""Does the keeper reach the swarm in every run? Repeated trials of the README's own setup.

    python benchmarks/keeper_reach.py [--trials 20] [--timeout 120] [--json PATH]

Each trial starts a coordinator whose DHT listens on all interfaces (the README's setup; port 0 so
trials cannot collide) and one peer with default flags, then waits until the keeper has written a
checkpoint past the initial state (``--checkpoint-every 3``). It records whether it did, at which
swarm step, how long it took and how many ``routing: not found`` lines the coordinator logged.
Before the address book, 2 of 10 such trials checkpointed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hivefold.client import CoordinatorClient  # noqa: E402
from hivefold.tls import KNOWN_ENV  # noqa: E402

CHECKPOINT_EVERY = 3
RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--target-batch-size", "64", "--shard-sequences", "48", "--inner-steps", "20",
             "--checkpoint-every", str(CHECKPOINT_EVERY),
             "--keeper-poll", "1", "--heartbeat-interval", "2"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hivefold", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def trial(root: Path, timeout: float) -> dict:
    workdir = root / "coordinator"
    coord = _start(["coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http", "",
                    "--dht-listen", "/ip4/0.0.0.0/tcp/0", *RUN_FLAGS], root / "coordinator.log")
    peer = None
    result = {"ok": False, "checkpoint_step": None, "global_step": None, "seconds": None}
    try:
        endpoints = workdir / "coordinator.json"
        deadline = time.monotonic() + 120
        while not endpoints.exists():
            if coord.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start; see {root / 'coordinator.log'}")
            time.sleep(0.5)
        address = json.loads(endpoints.read_text())["grpc"]
        peer = _start(["peer", "--coordinator", address, "--workdir", str(root / "peer"), "--threads", "1",
                       "--no-progress"], root / "peer.log")
        client = CoordinatorClient(address, give_up_after=10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            status = client.status()
            ckpt = status["checkpoint"]
            if ckpt and ckpt["step"] >= CHECKPOINT_EVERY:
                result.update(ok=True, checkpoint_step=ckpt["step"], global_step=status["global_step"],
                              seconds=round(time.monotonic() - t0, 1))
                break
            time.sleep(0.5)
        else:
            result.update(global_step=status["global_step"], checkpoint_step=ckpt and ckpt["step"])
        client.close()
    finally:
        if peer is not None:
            _stop(peer)
        _stop(coord)
    result["routing_errors"] = (root / "coordinator.log").read_text(errors="replace").count("routing: not found")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a trial may take to checkpoint")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the trials' workdirs and logs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="keeper-reach-") as tmp:
        os.environ[KNOWN_ENV] = str(Path(tmp) / "known_coordinators")  # this run's coordinators, trusted on first use
        for i in range(args.trials):
            root = Path(tempfile.mkdtemp(prefix=f"trial-{i:02d}-", dir=None if args.keep else tmp))
            row = trial(root, args.timeout)
            rows.append(row)
            print(f"trial {i + 1:2d}/{args.trials}: {'checkpointed' if row['ok'] else 'NO CHECKPOINT'} "
                  f"step {row['checkpoint_step']} at swarm step {row['global_step']} after {row['seconds']}s, "
                  f"{row['routing_errors']} routing errors{'' if row['ok'] else f' (logs in {root})'}", flush=True)
    ok = sum(r["ok"] for r in rows)
    print(f"{ok} of {len(rows)} trials checkpointed past the initial state")
    if args.json:
        args.json.write_text(json.dumps({"trials": rows, "checkpointed": ok, "total": len(rows)}, indent=2))
    sys.exit(0 if ok == len(rows) else 1)


if __name__ == "__main__":
    main()
