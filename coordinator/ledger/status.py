"""The status document (``hivefold status``, ``GetStatus``, ``/api/status``): one consistent read of the ledger."""

from __future__ import annotations

from coordinator.ledger.backend import Connection
from coordinator.ledger.schema import ShardState
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.verification import reputation, verification_summary


class StatusReport(LedgerStore):
    """Reads only."""

    def credit_board(self, *, seq_len: int) -> dict:
        """Every peer's and team's accepted work and points, for ``/api/credit`` (stats sites, audits)."""
        rows = self._read(
            "SELECT p.peer_id, p.name, p.team, COALESCE(SUM(r.credit), 0), COUNT(r.lease_id), "
            "COALESCE(SUM(r.samples), 0) FROM peers p LEFT JOIN results r ON r.peer_id = p.peer_id AND "
            "r.verdict = 'accepted' GROUP BY p.peer_id ORDER BY 4 DESC, p.registered_at")
        peers = [{"peer_id": r[0], "name": r[1], "team": r[2], "credit": round(r[3], 3), "shards_done": r[4],
                  "tokens": r[5] * seq_len} for r in rows]
        teams = _teams(peers)
        return {"peers": [{"peer_id": p["peer_id"], "name": p["name"], "team": p["team"], "points": p["credit"],
                           "shards": p["shards_done"], "tokens": p["tokens"]} for p in peers], "teams": teams}

    def status(self, *, now: float, online_seconds: float, seq_len: int) -> dict:
        """The status document (see README); reads only."""
        with self._snapshot() as c:
            return _status(c, now=now, online_seconds=online_seconds, seq_len=seq_len)


def _teams(peers: list[dict]) -> list[dict]:
    """The team leaderboard: points, shards and members per team (peers without a team are not listed)."""
    teams: dict[str, dict] = {}
    for p in peers:
        if p["team"]:
            t = teams.setdefault(p["team"], {"team": p["team"], "points": 0.0, "shards": 0, "peers": 0})
            t["points"] += p["credit"]
            t["shards"] += p["shards_done"]
            t["peers"] += 1
    return sorted(({**t, "points": round(t["points"], 3)} for t in teams.values()), key=lambda t: -t["points"])


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _keeper_health(meta: dict[str, str], global_step: int, checkpoint_step: int | None) -> dict:
    """The keeper's part of the status document, with a warning when checkpoints fall behind the swarm."""
    def number(key: str, kind: type):
        return kind(meta[key]) if key in meta else None

    every = number("checkpoint_every", int)
    error = meta.get("keeper_last_error")
    age = None if checkpoint_step is None else global_step - checkpoint_step
    # Two intervals of slack: the keeper checkpoints once the swarm is one interval ahead, then needs
    # a while to download the state, evaluate and write.
    warning = None
    if every is not None and (age if age is not None else global_step) > 2 * every:
        warning = (f"the latest checkpoint is {age} swarm steps behind" if age is not None
                   else f"no checkpoint yet at swarm step {global_step}") + f" (checkpoint every {every})"
        warning += (f": the keeper cannot download the swarm's state: {error}" if error
                    else "; is the keeper running? See the coordinator's log")
    return {
        "checkpoint_every": every,
        "last_download_at": number("keeper_last_download_at", float),
        "last_download_step": number("keeper_last_download_step", int),
        "last_error": error,
        "last_error_at": number("keeper_last_error_at", float),
        "checkpoint_step": checkpoint_step,
        "checkpoint_age_steps": age,
        "warning": warning,
    }


def _status(c: Connection, *, now: float, online_seconds: float, seq_len: int) -> dict:
    meta = {r[0]: r[1] for r in c.execute("SELECT key, value FROM meta")}
    counts = {s.value: 0 for s in ShardState}
    for row in c.execute("SELECT state, COUNT(*) FROM shards GROUP BY state"):
        counts[row[0]] = row[1]
    peers = []
    reported = dict(c.execute("SELECT suspect, COUNT(*) FROM poison_reports GROUP BY suspect").fetchall())
    scores = dict(c.execute("SELECT peer_id, AVG(score) FROM verifications WHERE score IS NOT NULL "
                            "GROUP BY peer_id").fetchall())
    # One pass over the results for every peer (a subquery per peer is quadratic with thousands of peers).
    for p in c.execute(
        "SELECT p.*, COALESCE(r.shards_done, 0) AS shards_done, COALESCE(r.samples, 0) AS samples, "
        "COALESCE(r.credit, 0) AS credit FROM peers p LEFT JOIN ("
        "SELECT peer_id, SUM(CASE WHEN verdict = 'accepted' THEN 1 ELSE 0 END) AS shards_done, "
        "SUM(CASE WHEN verdict = 'accepted' THEN samples ELSE 0 END) AS samples, SUM(credit) AS credit "
        "FROM results GROUP BY peer_id) r ON r.peer_id = p.peer_id ORDER BY p.registered_at"
    ):
        online = p["left_at"] is None and now - p["last_seen"] <= online_seconds
        peers.append({
            "peer_id": p["peer_id"], "name": p["name"], "online": online,
            "paused": online and p["pause_reason"] is not None, "pause_reason": p["pause_reason"] if online else None,
            "shards_done": p["shards_done"], "samples": p["samples"], "credit": round(p["credit"], 3),
            "last_seen": p["last_seen"], "device": p["device_kind"], "epoch": p["epoch"],
            "samples_per_second": p["samples_per_second"], "recent_loss": p["recent_loss"],
            "utilization": p["utilization"], "micro_batch": p["micro_batch"], "team": p["team"],
            "banned": bool(p["banned"]), "ban_reason": p["ban_reason"],
            "poison_reports": reported.get(p["peer_id"], 0),  # peers that caught it poisoning the averaging
            # verified work: results checked valid / invalid, valid in a row (the sampling rate is 1/streak)
            "results_valid": p["results_valid"], "results_invalid": p["results_invalid"],
            "valid_streak": p["valid_streak"], "reputation": reputation(p["results_valid"], p["results_invalid"]),
            # Gauntlet-style: held-out loss before a checked segment minus after (positive: the update helped)
            "contribution_score": (round(scores[p["peer_id"]], 5) if scores.get(p["peer_id"]) is not None
                                   else None),
        })
    samples = c.execute("SELECT COALESCE(SUM(samples), 0) FROM results WHERE verdict = 'accepted'").fetchone()[0]
    # Training loss: mean over the micro-batches of the latest swarm steps that have any.
    recent = c.execute("SELECT epoch, AVG(loss), COUNT(*) FROM losses GROUP BY epoch ORDER BY epoch DESC "
                       "LIMIT 3").fetchall()
    first = c.execute("SELECT epoch, AVG(loss) FROM losses GROUP BY epoch ORDER BY epoch LIMIT 1").fetchone()
    live = [p["recent_loss"] for p in peers if p["online"] and p["recent_loss"] is not None]
    train_loss = _mean([r[1] for r in recent]) if recent else _mean(live)
    evals = c.execute("SELECT step, val_loss FROM evaluations ORDER BY step").fetchall()
    ckpt = c.execute("SELECT step, path, val_loss FROM checkpoints ORDER BY step DESC LIMIT 1").fetchone()
    rate = sum(p["samples_per_second"] for p in peers if p["online"])
    # Progress through the current data pass: sequences not yet trained in it, and when they will be at this rate.
    left, total_seqs = c.execute("SELECT COALESCE(SUM(CASE WHEN state != 'done' THEN num_sequences ELSE 0 END), 0), "
                                 "COALESCE(SUM(num_sequences), 0) FROM shards").fetchone()
    global_step = int(meta.get("global_step", 0))
    budget = int(meta.get("sample_budget", 0))
    return {
        "run_id": meta.get("run_id", ""),
        "spec_hash": meta.get("spec_hash", ""),
        "global_step": global_step,
        "data_pass": int(meta.get("data_pass", 0)),
        "shards": {"total": sum(counts.values()), **counts},
        # the operator's --token-budget: how much is spent, and when the rest will be at this rate
        "token_budget": ({"tokens": budget * seq_len, "fraction": round(min(1.0, samples / budget), 4),
                          "eta_seconds": round(max(0, budget - samples) / rate, 1) if rate > 0 else None}
                         if budget else None),
        "run_complete": ({"at": float(meta["completed_at"]), "why": meta.get("completed_why", "")}
                         if "completed_at" in meta else None),
        "data_pass_progress": {
            "fraction": round(1 - left / total_seqs, 4) if total_seqs else None,
            "sequences_left": int(left),
            "eta_seconds": round(left / rate, 1) if rate > 0 else None,
        },
        "peers": peers,
        "peers_online": sum(p["online"] for p in peers),
        "samples_per_second": round(rate, 2),
        # the swarm's compute utilization: online peers' shares weighted by their throughput
        "utilization": (round(sum(p["utilization"] * p["samples_per_second"] for p in peers if p["online"]) / rate, 3)
                        if rate > 0 else None),
        "averaging": meta.get("averaging"),
        "train_loss": train_loss,
        "train_loss_first": float(first[1]) if first else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_loss_first": evals[0]["val_loss"] if evals else None,
        "val_history": [[e["step"], e["val_loss"]] for e in evals],
        "samples_trained": int(samples),
        "tokens_trained": int(samples) * seq_len,
        "checkpoint": ({"step": ckpt["step"], "path": ckpt["path"], "val_loss": ckpt["val_loss"]} if ckpt else None),
        "keeper": _keeper_health(meta, global_step, ckpt["step"] if ckpt else None),
        "verification": verification_summary(c),
        "teams": _teams(peers),
        "time": now,
    }
