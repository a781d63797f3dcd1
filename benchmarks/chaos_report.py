"""What benchmarks/chaos.py finds after its run: the ledger's and the peers' accounts checked against each other
(nothing lost, nothing credited twice, every acknowledged result in the ledger), crashes in any log, how the
swarm coped; and the printed report."""

from __future__ import annotations

import re
import sqlite3
import statistics
from dataclasses import asdict

from hivefold.errors import IntegrityError
from hivefold.receipts import ReceiptBook, verify_receipt

ACCEPTED_LINE = re.compile(r"result for lease ([0-9a-f]+): (accepted[^(]*?) \(credit")
# A traceback through a main module (hivefold's entry point, the keeper's): an uncaught exception ended a process.
ENTRY_POINT = re.compile(r'^  File "[^"]*", line \d+, in <module>$')
# A thread of the peer's own that died (hivemind's threads die noisily when a killed peer's helpers go first).
THREAD_CRASH = re.compile(r"^Exception in thread (heartbeat|prefetch|submit)\b", re.MULTILINE)


def crashes(log: str) -> list[str]:
    """The uncaught exceptions in a process's log: a traceback through a main module (hivemind's own tracebacks,
    such as asyncio's "never retrieved" ones, are logged noise) or a peer thread that died of one."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if ENTRY_POINT.match(line):
            exc = next((x for x in lines[i + 1:] if x and not x[0].isspace()), "?")
            out.append(exc[:300])
    return out + [f"thread {m.group(1)} died" for m in THREAD_CRASH.finditer(log)]


def findings(chaos, completed: bool, wall: float) -> dict:
    """The report of a finished ``Chaos`` run: ``completed`` (the pass finished) after ``wall`` seconds."""
    db = sqlite3.connect(f"file:{chaos.workdir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return _findings(chaos, db, completed, wall)
    finally:
        db.close()


def _findings(chaos, db: sqlite3.Connection, completed: bool, wall: float) -> dict:
    q = lambda sql, *args: db.execute(sql, args).fetchall()  # noqa: E731
    total = q("SELECT COUNT(*) FROM shards")[0][0]
    done = q("SELECT COUNT(*) FROM shards WHERE state = 'done'")[0][0]
    accepted = dict(((r[0], r[1]), r[2]) for r in q(
        "SELECT shard_id, data_pass, COUNT(*) FROM results WHERE verdict = 'accepted' "
        "GROUP BY shard_id, data_pass"))
    double = sorted(k for k, n in accepted.items() if n > 1)
    passes = int(q("SELECT value FROM meta WHERE key = 'data_pass'")[0][0]) + 1
    shard_ids = [r[0] for r in q("SELECT shard_id FROM shards")]
    missing = [(s, dp) for dp in range(passes) for s in shard_ids if (s, dp) not in accepted]
    ledger_accepted = {r[0]: r[1] for r in q("SELECT lease_id, peer_id FROM results WHERE verdict = 'accepted'")}

    # Every acknowledgement a peer holds (a signed receipt, or an "accepted" log line) is in the ledger.
    acked: dict[str, str] = {}  # lease id -> where the peer's claim comes from
    receipts = bad_receipts = 0
    key = bytes.fromhex(chaos.last_status["receipt_public_key"]) if chaos.last_status else None
    workdirs = sorted({p.workdir for p in [*chaos.retired, *chaos.peers]})
    for wd in workdirs:
        path = wd / ReceiptBook.FILENAME
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                fields = verify_receipt(line, key)
            except IntegrityError:
                bad_receipts += 1
                continue
            receipts += 1
            acked.setdefault(fields["lease_id"], f"receipt in {wd.name}")
    for log in sorted(chaos.root.glob("peer-*.log")):
        for m in ACCEPTED_LINE.finditer(log.read_text(errors="replace")):
            acked.setdefault(m.group(1), f"log {log.name}")
    lost = sorted(f"{lease} ({where})" for lease, where in acked.items() if lease not in ledger_accepted)
    stranded = sum(len(list((wd / "outbox").glob("*.pb"))) for wd in workdirs)

    steps = [s for _, s in chaos.steps]
    monotonic = all(b >= a for a, b in zip(steps, steps[1:], strict=False))
    evals = q("SELECT step, val_loss FROM evaluations ORDER BY step")
    verdicts = dict(q("SELECT CASE verdict WHEN 'accepted' THEN detail ELSE verdict END AS kind, COUNT(*) "
                      "FROM results GROUP BY kind"))
    lease_states = dict(q("SELECT state, COUNT(*) FROM leases GROUP BY state"))
    # How the swarm coped: the longest stretch without an accepted result, and for every coordinator
    # restart, how long from serving again to the next accepted result.
    times = [r[0] for r in q("SELECT submitted_at FROM results WHERE verdict = 'accepted' ORDER BY submitted_at")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    recovery = []
    for t in chaos.restarts_serving:
        later = [x for x in times if x >= t]
        if later:
            recovery.append(round(later[0] - t, 1))
    crashed = {log.name: found for log in sorted(chaos.root.glob("*.log"))
               if (found := crashes(log.read_text(errors="replace")))}
    # The swarm's newest state must reach a checkpoint when the pass is over: the last peers to leave wait
    # for the keeper to download it. Either side saying it did not happen means that training was lost.
    state_lost = [f"{log.name}: {line.strip()[:200]}" for log in sorted(chaos.root.glob("*.log"))
                  for line in log.read_text(errors="replace").splitlines()
                  if "final checkpoint NOT written" in line or "the keeper did not take this peer's state" in line]
    ckpt = q("SELECT step FROM checkpoints ORDER BY step DESC LIMIT 1")
    report = {
        "seed": chaos.config.seed,
        "config": asdict(chaos.config),
        "completed": completed,
        "wall_s": round(wall, 1),
        "faults": dict(chaos.faults),
        "faults_total": sum(chaos.faults.values()),
        "faults_target_reached": sum(chaos.faults.values()) >= chaos.config.faults,
        "shards_total": total,
        "shards_done": done,
        "missing": len(missing),
        "double_credited": len(double),
        "double_credited_shards": [list(k) for k in double],
        "lost": len(lost),
        "lost_leases": lost,
        "acknowledged": len(acked),
        "receipts": receipts,
        "receipts_invalid": bad_receipts,
        "stranded_in_outboxes": stranded,
        "results": verdicts,
        "leases": lease_states,
        "global_step_monotonic": monotonic,
        "global_step_samples": len(steps),
        "global_step_last": steps[-1] if steps else None,
        "val_loss_first": evals[0][1] if evals else None,
        "val_loss_last": evals[-1][1] if evals else None,
        "evaluations": len(evals),
        "checkpoint_last": ckpt[0][0] if ckpt else None,
        "state_lost": state_lost,
        "coordinator_restarts": len(chaos.restarts_serving),
        "recovery_after_restart_s": {"median": statistics.median(recovery) if recovery else None,
                                     "max": max(recovery) if recovery else None,
                                     "never": len(chaos.restarts_serving) - len(recovery)},
        "longest_gap_between_results_s": round(max(gaps), 1) if gaps else None,
        "longest_offline_running_peer_s": round(max(chaos.offline.values()), 1) if chaos.offline else 0.0,
        "unexpected_exits": chaos.unexpected,
        "crashes": crashed,
        "fault_log": chaos.fault_log,
    }
    report["ok"] = bool(completed and not missing and not double and not lost and monotonic and not bad_receipts
                        and evals and evals[-1][1] < evals[0][1] and not chaos.unexpected and not crashed
                        and not state_lost)
    return report


def print_report(r: dict) -> None:
    rows = [
        ("faults injected", f"{r['faults_total']} " + ", ".join(f"{k} {v}" for k, v in r["faults"].items())),
        ("pass completed", f"{r['completed']} ({r['shards_done']}/{r['shards_total']} shards) in {r['wall_s']}s"),
        ("lost", r["lost"]), ("double credited", r["double_credited"]), ("missing", r["missing"]),
        ("acknowledged results (receipts)", f"{r['acknowledged']} ({r['receipts']}, {r['receipts_invalid']} invalid)"),
        ("results by verdict", ", ".join(f"{k}: {v}" for k, v in r["results"].items())),
        ("leases by state", ", ".join(f"{k}: {v}" for k, v in r["leases"].items())),
        ("left unsent in abandoned outboxes", r["stranded_in_outboxes"]),
        ("global step monotonic", f"{r['global_step_monotonic']} ({r['global_step_samples']} samples, "
                                  f"last {r['global_step_last']})"),
        ("val loss first -> last", f"{r['val_loss_first']} -> {r['val_loss_last']} ({r['evaluations']} evaluations)"),
        ("latest checkpoint", f"step {r['checkpoint_last']}; newest state lost at the end: "
                              f"{r['state_lost'] or 'no'}"),
        ("coordinator restarts", r["coordinator_restarts"]),
        ("next accepted result after a restart", r["recovery_after_restart_s"]),
        ("longest gap between accepted results", f"{r['longest_gap_between_results_s']}s"),
        ("longest a running peer was offline", f"{r['longest_offline_running_peer_s']}s"),
        ("unexpected exits", r["unexpected_exits"] or "none"),
        ("crashes (uncaught exceptions)", r["crashes"] or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not r["faults_target_reached"]:
        print(f"the pass ended after {r['faults_total']} of {r['config']['faults']} faults: raise --max-corpus-mb")
    print("OK" if r["ok"] else "FAILED")
