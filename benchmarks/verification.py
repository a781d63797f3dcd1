"""Verified work: what checking results costs, how much is checked in steady state, how fast a cheater is banned.

    python benchmarks/verification.py [--seconds 150] [--json PATH]

Runs a real coordinator (with its keeper) and ``hivefold peer`` processes on this machine, at the demo's
run settings, three times for the same wall time: two honest peers with verification off
(``--verify-ceiling 0``, the limit), the same with verification on (the default), and the same plus a
cheater that runs forward passes only and answers challenges with proofs of training it did not do
(``tests/integration/cheat_peer.py``). Prints, for each: tokens/s of accepted work and the last validation
loss; for the checked runs: the keeper's seconds per check against the checked shard's training seconds,
the share of results checked (whole run, and its second half: the steady state), and for the cheater how
many shards it submitted before its ban, when the ban came, and the credit it earned.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hivefold.client import CoordinatorClient  # noqa: E402
from hivefold.demo import DEMO_RUN_FLAGS  # noqa: E402
from hivefold.tls import Trust  # noqa: E402
from tests.conftest import Processes, start_coordinator  # noqa: E402

CORPUS = ["--corpus", "stdlib", "--max-corpus-mb", "2", "--model", "tiny"]


def run(root: Path, seconds: float, *, verify: bool, cheater: bool) -> dict:
    root.mkdir(parents=True)
    procs = Processes(root)
    try:
        flags = [] if verify else ["--verify-ceiling", "0"]
        endpoints = start_coordinator(procs, root / "coordinator", "--heartbeat-interval", "2", "--keeper-poll", "1",
                                      *flags, *CORPUS, *DEMO_RUN_FLAGS)
        start, wall = time.monotonic(), time.time()
        names = ("alice", "bob", "mallory") if cheater else ("alice", "bob")
        for name in names:
            procs.start(name, "peer", "--coordinator", endpoints["grpc"], "--coordinator-fingerprint",
                        endpoints["fingerprint"], "--workdir", str(root / name), "--name", name, "--dht-listen",
                        "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress",
                        module="tests.integration.cheat_peer" if name == "mallory" else "hivefold")
        client = CoordinatorClient(endpoints["grpc"], trust=Trust(fingerprint=endpoints["fingerprint"]),
                                   give_up_after=10)
        banned_at = None
        while (elapsed := time.monotonic() - start) < seconds:
            status = client.status()
            m = next((p for p in status["peers"] if p["name"] == "mallory"), None)
            if banned_at is None and m and m["banned"]:
                banned_at = round(elapsed, 1)
            time.sleep(2.0)
        status = client.status()
        client.close()
        peers = {p["name"]: p for p in status["peers"]}
        with sqlite3.connect(root / "coordinator" / "ledger.sqlite") as db:
            ids = {p["name"]: p["peer_id"] for p in status["peers"]}

            def share(since: float) -> float | None:
                honest = tuple(ids[n] for n in ("alice", "bob") if n in ids)
                q = f"peer_id IN ({','.join('?' * len(honest))}) AND submitted_at >= ?"
                results = db.execute(f"SELECT COUNT(*) FROM results WHERE {q}", (*honest, since)).fetchone()[0]
                q = q.replace("submitted_at", "requested_at")
                checked = db.execute(f"SELECT COUNT(*) FROM verifications WHERE {q}", (*honest, since)).fetchone()[0]
                return round(checked / results, 3) if results else None

            cheater_results = (db.execute("SELECT COUNT(*) FROM results WHERE peer_id = ?", (ids["mallory"],))
                               .fetchone()[0] if "mallory" in ids else None)
            steady, whole = share(wall + seconds / 2), share(0.0)
            honest_invalid = [r[0] for r in db.execute(
                "SELECT detail FROM verifications WHERE state = 'invalid' AND peer_id IN (?, ?)",
                (ids.get("alice", ""), ids.get("bob", ""))).fetchall()]
            evals = db.execute("SELECT step, val_loss FROM evaluations ORDER BY step DESC LIMIT 1").fetchone()
        v = status["verification"]
        out = {"tokens_per_s": round(status["tokens_trained"] / seconds, 1), "val_loss_last": status["val_loss"],
               "global_step": status["global_step"], "val_loss_step": evals[0] if evals else None,
               "honest_invalid": honest_invalid, "keeper_seconds_per_check": v["keeper_seconds_per_check"],
               "train_seconds_per_check": v["train_seconds_per_check"], "checks": v["checked"],
               "checks_valid": v["valid"], "checks_invalid": v["invalid"], "share_checked_honest": whole,
               "share_checked_honest_second_half": steady}
        if cheater:
            out.update(cheater_banned_after_s=banned_at, cheater_results_submitted=cheater_results,
                       cheater_credit=peers["mallory"]["credit"], cheater_ban_reason=peers["mallory"]["ban_reason"])
        return out
    finally:
        procs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="wall time of each run (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivefold-verification-") as tmp:
        runs = {"unchecked": run(Path(tmp) / "off", args.seconds, verify=False, cheater=False),
                "checked": run(Path(tmp) / "on", args.seconds, verify=True, cheater=False),
                "checked_with_cheater": run(Path(tmp) / "cheat", args.seconds, verify=True, cheater=True)}
    base = runs["unchecked"]["tokens_per_s"]
    result = {"seconds": args.seconds, **runs,
              "tokens_per_s_ratio": round(runs["checked"]["tokens_per_s"] / base, 3) if base else None}
    for name, r in runs.items():
        print(f"{name:21s} {r['tokens_per_s']:8.1f} tokens/s, val loss {r['val_loss_last']} at step "
              f"{r['val_loss_step']} (swarm at step {r['global_step']})")
        for why in r["honest_invalid"]:
            print(f"{'':21s} an honest result was not credited: {why}")
        if r["checks"]:
            print(f"{'':21s} {r['checks']} checks ({r['checks_valid']} valid, {r['checks_invalid']} invalid): keeper "
                  f"{r['keeper_seconds_per_check']} s per check for shards trained in {r['train_seconds_per_check']} s;"
                  f" honest results checked {r['share_checked_honest']} (second half "
                  f"{r['share_checked_honest_second_half']})")
    c = runs["checked_with_cheater"]
    print(f"cheater: {c['cheater_results_submitted']} results submitted, banned after {c['cheater_banned_after_s']} s, "
          f"credit {c['cheater_credit']}: {c['cheater_ban_reason']}")
    print(f"tokens/s checked / unchecked: {result['tokens_per_s_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
