"""A 3-peer swarm with one poisoner against the same swarm all honest: validation loss, and when the ban came.

    python benchmarks/poisoning.py [--mode diloco|sync] [--seconds 150] [--scale -16] [--json PATH]

Runs a real coordinator (with its keeper) and three ``hivefold peer`` processes on this machine twice, for
the same wall time from the coordinator's start: all honest, then with one peer sending every
pseudo-gradient (in ``sync``: gradient) multiplied by ``--scale`` (``tests/integration/poison_peer.py``).
Prints, for both, the keeper's validation loss by swarm step, and for the poisoned run when the poisoner
was banned (seconds after the coordinator served) and why. Both runs share the machine's two cores the
same way, so the honest run is the limit the poisoned one is measured against.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hivefold.client import CoordinatorClient  # noqa: E402
from hivefold.tls import Trust  # noqa: E402
from tests.conftest import Processes, start_coordinator  # noqa: E402
from tests.integration.test_swarm import RUN_FLAGS, SYNC_FLAGS  # noqa: E402

PEERS = ("alice", "bob", "mallory")


def run(root: Path, seconds: float, scale: float | None, flags: list[str]) -> dict:
    """One swarm for ``seconds``; ``scale`` None: all honest, else mallory multiplies its updates by it."""
    root.mkdir(parents=True)
    procs = Processes(root)
    try:
        endpoints = start_coordinator(procs, root / "coordinator", "--heartbeat-interval", "2",
                                      "--checkpoint-every", "2", "--keeper-poll", "1", *flags)
        start = time.monotonic()
        for name in PEERS:
            hostile = scale is not None and name == "mallory"
            procs.start(name, "peer", "--coordinator", endpoints["grpc"], "--coordinator-fingerprint",
                        endpoints["fingerprint"], "--workdir", str(root / name), "--name", name, "--dht-listen",
                        "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress",
                        module="tests.integration.poison_peer" if hostile else "hivefold",
                        env={"POISON_SCALE": str(scale)} if hostile else None)
        client = CoordinatorClient(endpoints["grpc"], trust=Trust(fingerprint=endpoints["fingerprint"]),
                                   give_up_after=10)
        banned_at, ban_reason, status = None, None, {}
        while (elapsed := time.monotonic() - start) < seconds:
            status = client.status()
            mallory = next((p for p in status["peers"] if p["name"] == "mallory"), None)
            if banned_at is None and mallory and mallory["banned"]:
                banned_at, ban_reason = round(elapsed, 1), mallory["ban_reason"]
            time.sleep(2.0)
        status = client.status()
        client.close()
        return {"val_history": status["val_history"], "val_loss_first": status["val_loss_first"],
                "val_loss_last": status["val_loss"], "global_step": status["global_step"],
                "tokens_trained": status["tokens_trained"], "banned_after_s": banned_at, "ban_reason": ban_reason,
                "reports": {p["name"]: p["poison_reports"] for p in status["peers"]}}
    finally:
        procs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("diloco", "sync"), default="diloco", help="averaging (default diloco)")
    parser.add_argument("--seconds", type=float, default=150.0, help="wall time of each run (default %(default)s)")
    parser.add_argument("--scale", type=float, default=-16.0, help="what the poisoner multiplies its updates by")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--only", choices=("honest", "poisoned"), help="run only this one of the two")
    parser.add_argument("--keep", action="store_true", help="keep the runs' workdirs and logs (the path is printed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hivefold-poisoning-"))
    empty = {"val_history": [], "val_loss_last": None, "global_step": 0, "tokens_trained": 0,
             "banned_after_s": None, "ban_reason": None, "reports": {}}
    flags = SYNC_FLAGS if args.mode == "sync" else RUN_FLAGS
    try:
        honest = run(tmp / "honest", args.seconds, None, flags) if args.only != "poisoned" else empty
        poisoned = run(tmp / "poisoned", args.seconds, args.scale, flags) if args.only != "honest" else empty
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"mode": args.mode, "seconds": args.seconds, "scale": args.scale, "honest": honest, "poisoned": poisoned,
              "val_loss_ratio": (poisoned["val_loss_last"] / honest["val_loss_last"]
                                 if honest["val_loss_last"] and poisoned["val_loss_last"] else None)}
    for name, r in (("honest", honest), ("poisoned", poisoned)):
        curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in r["val_history"])
        print(f"{name:9s} val loss by step: {curve}")
        print(f"{'':9s} last {r['val_loss_last']}, step {r['global_step']}, {r['tokens_trained']:,} tokens")
    print(f"poisoner banned after {poisoned['banned_after_s']} s: {poisoned['ban_reason']}")
    print(f"reports: {poisoned['reports']}; val loss poisoned / honest: {result['val_loss_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
