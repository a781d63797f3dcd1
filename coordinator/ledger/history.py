"""The swarm over time, for the dashboard's charts and ``/metrics``: samples of the swarm, curves, events, counters.

The coordinator records a sample of the swarm (peers online, throughput, utilization, samples
trained, step) every few seconds; the loss curves come from the results and the keeper's
evaluations already in the ledger. Everything a chart reads is thinned to at most ``max_points``
so a long run's page stays quick.
"""

from __future__ import annotations

import math

from coordinator.ledger.store import LedgerStore

# What the dashboard's event list shows: the swarm's life, not every lease (those are in the ledger).
NOTABLE_EVENTS = ("run_created", "peer_registered", "peer_left", "lease_expired", "lease_released",
                  "result_rejected_late", "result_invalid", "peer_banned", "checkpoint", "data_pass_started",
                  "run_complete", "leases_resumed")


class SwarmHistory(LedgerStore):
    def record_history(self, *, now: float, online_seconds: float, min_interval: float = 0.0) -> None:
        """Append one sample of the swarm as the ledger sees it at ``now``, unless one was taken less than
        ``min_interval`` seconds before (by this or another coordinator sharing the ledger)."""
        with self._tx() as c:
            last = c.execute("SELECT MAX(at) FROM swarm_history").fetchone()[0]
            if min_interval and last is not None and now - last < min_interval:
                return
            online = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(samples_per_second), 0), "
                "SUM(utilization * samples_per_second) FROM peers WHERE left_at IS NULL AND last_seen >= ?",
                (now - online_seconds,)).fetchone()
            count, rate, busy = online[0], float(online[1]), online[2]
            samples = c.execute("SELECT COALESCE(SUM(samples), 0) FROM results "
                                "WHERE verdict = 'accepted'").fetchone()[0]
            step = c.execute("SELECT value FROM meta WHERE key = 'global_step'").fetchone()
            c.execute("INSERT INTO swarm_history VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (at) DO UPDATE SET "
                      "peers_online = excluded.peers_online, samples_per_second = excluded.samples_per_second, "
                      "utilization = excluded.utilization, samples_trained = excluded.samples_trained, "
                      "global_step = excluded.global_step",
                      (now, count, rate, busy / rate if rate > 0 and busy is not None else None, int(samples),
                       int(step[0]) if step else 0))

    def history(self, *, seq_len: int, max_points: int = 1000) -> dict:
        """The charts' data: the swarm over time, and the training and validation loss against tokens.

        ``swarm``: ``[time, peers online, samples/s, utilization or None, tokens trained]`` rows;
        ``train_loss``: ``[tokens, mean loss of the results up to there]``; ``val_loss``:
        ``[tokens accepted when the keeper took the state, loss, step]``.
        """
        with self._snapshot() as c:  # one snapshot for all three
            swarm = _thin([[r[0], r[1], r[2], r[3], r[4] * seq_len] for r in c.execute(
                "SELECT at, peers_online, samples_per_second, utilization, samples_trained FROM swarm_history "
                "ORDER BY at")], max_points)
            results = c.execute(
                "SELECT r.submitted_at, SUM(r.samples) OVER (ORDER BY r.submitted_at, r.lease_id), "
                "(SELECT AVG(loss) FROM losses l WHERE l.lease_id = r.lease_id) "
                "FROM results r WHERE r.verdict = 'accepted' ORDER BY r.submitted_at, r.lease_id").fetchall()
            evals = c.execute("SELECT step, val_loss, created_at FROM evaluations ORDER BY created_at").fetchall()
        train = _bucket_means([(cum * seq_len, loss) for _, cum, loss in results if loss is not None], max_points)
        val, i, tokens = [], 0, 0
        for step, loss, at in evals:  # tokens accepted by each evaluation's time: one merge over both lists
            while i < len(results) and results[i][0] <= at:
                tokens = results[i][1] * seq_len
                i += 1
            val.append([tokens, loss, step])
        return {"swarm": swarm, "train_loss": train, "val_loss": _thin(val, max_points)}

    def recent_events(self, *, limit: int = 50, kinds: tuple[str, ...] = NOTABLE_EVENTS) -> list[dict]:
        """The latest ``limit`` events of ``kinds``, newest first, with the peer's name where there is one."""
        marks = ",".join("?" * len(kinds))
        rows = self._read(
            f"SELECT e.id, e.at, e.kind, e.peer_id, p.name, e.shard_id, e.detail FROM events e "
            f"LEFT JOIN peers p ON p.peer_id = e.peer_id WHERE e.kind IN ({marks}) ORDER BY e.id DESC LIMIT ?",
            (*kinds, limit))
        return [{"id": r[0], "at": r[1], "kind": r[2], "peer_id": r[3], "peer": r[4], "shard_id": r[5],
                 "detail": r[6]} for r in rows]

    def counters(self) -> dict:
        """Totals since the run began, for Prometheus counters: leases by final state, results by verdict."""
        with self._snapshot() as c:
            leases = dict(c.execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall())
            verdicts = dict(c.execute("SELECT verdict, COUNT(*) FROM results GROUP BY verdict").fetchall())
        return {"leases": leases, "results": verdicts}


def _thin(rows: list, max_points: int) -> list:
    """Every k-th row (and always the last) so that at most about ``max_points`` remain."""
    if len(rows) <= max_points:
        return rows
    k = math.ceil(len(rows) / max_points)
    return rows[::k] if (len(rows) - 1) % k == 0 else rows[::k] + [rows[-1]]


def _bucket_means(points: list[tuple[float, float]], max_points: int) -> list[list[float]]:
    """Consecutive points averaged in groups so at most ``max_points`` remain; x is each group's last x."""
    if not points:
        return []
    k = math.ceil(len(points) / max_points)
    out = []
    for start in range(0, len(points), k):
        group = points[start:start + k]
        out.append([group[-1][0], sum(y for _, y in group) / len(group)])
    return out

