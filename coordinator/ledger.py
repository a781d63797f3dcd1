"""The ledger: the run's durable state in one SQLite file (peers, shards, leases, results, checkpoints).

Every state change of a shard or lease happens in one ``BEGIN IMMEDIATE`` transaction, so two
peers racing for the last shard, or a submission racing its lease's expiry, can never both win.
Time comes from an injected clock (``now`` arguments) so expiry is testable without sleeping.
The keeper process writes to the same file (checkpoints, evaluations, the swarm's step, how its
downloads of the swarm's state fare); WAL mode lets the dashboard and status readers run beside
the writers.
"""

from __future__ import annotations

import enum
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from hivefold.spec import ShardInfo

PRAGMAS = (
    "PRAGMA journal_mode=WAL",  # readers (status, dashboard) never block the writer
    "PRAGMA busy_timeout=10000",  # the keeper and the server share the file: wait, don't fail
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",  # safe with WAL; a power cut loses at most the last transactions
)


class ShardState(str, enum.Enum):
    PENDING = "pending"  # waiting in the pool for the current data pass
    LEASED = "leased"  # held by exactly one active lease
    DONE = "done"  # trained in the current data pass; exactly one accepted result


class LeaseState(str, enum.Enum):
    ACTIVE = "active"  # the peer is training; expires at its deadline unless heartbeats extend it
    COMPLETED = "completed"  # a result was accepted under it
    EXPIRED = "expired"  # the deadline passed; its shard went back to the pool
    RELEASED = "released"  # the peer handed it back


class Verdict(str, enum.Enum):
    ACCEPTED = "accepted"  # shard done, peer credited
    REJECTED_LATE = "rejected_late"  # lease had expired and the shard was reassigned


MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE peers (
        peer_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        public_key BLOB NOT NULL,
        token TEXT NOT NULL,
        device_kind TEXT NOT NULL DEFAULT '',
        device_name TEXT NOT NULL DEFAULT '',
        memory_bytes INTEGER NOT NULL DEFAULT 0,
        registered_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        epoch INTEGER NOT NULL DEFAULT 0,
        samples_reported INTEGER NOT NULL DEFAULT 0,
        recent_loss REAL,
        samples_per_second REAL NOT NULL DEFAULT 0,
        banned INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE shards (
        shard_id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL,
        byte_size INTEGER NOT NULL,
        num_sequences INTEGER NOT NULL,
        state TEXT NOT NULL,
        position INTEGER NOT NULL  -- lease order within the current data pass
    );
    CREATE INDEX shards_by_state ON shards (state, position);
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        shard_id INTEGER NOT NULL REFERENCES shards (shard_id),
        peer_id TEXT NOT NULL REFERENCES peers (peer_id),
        data_pass INTEGER NOT NULL,
        state TEXT NOT NULL,
        issued_at REAL NOT NULL,
        deadline REAL NOT NULL,
        closed_at REAL,
        close_reason TEXT
    );
    CREATE INDEX leases_by_state ON leases (state, deadline);
    CREATE INDEX leases_by_peer ON leases (peer_id, state);
    CREATE TABLE results (
        lease_id TEXT PRIMARY KEY REFERENCES leases (lease_id),
        shard_id INTEGER NOT NULL,
        peer_id TEXT NOT NULL,
        data_pass INTEGER NOT NULL,
        verdict TEXT NOT NULL,
        samples INTEGER NOT NULL,
        compute_seconds REAL NOT NULL,
        credit REAL NOT NULL,
        submitted_at REAL NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE losses (
        lease_id TEXT NOT NULL REFERENCES results (lease_id),
        idx INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        loss REAL NOT NULL,
        PRIMARY KEY (lease_id, idx)
    );
    CREATE INDEX losses_by_epoch ON losses (epoch);
    CREATE TABLE checkpoints (
        step INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        val_loss REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE evaluations (
        step INTEGER PRIMARY KEY,
        val_loss REAL NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        peer_id TEXT,
        shard_id INTEGER,
        detail TEXT NOT NULL DEFAULT ''
    );
    """,
    # 2: the swarm's address book (dht_maddrs: JSON list of the peer's hivemind multiaddrs) and clean leaves
    # (left_at: set by Leave, cleared when the peer is heard from again; leaving_epoch: its epoch then);
    # utilization: the share of its wall time the peer spends computing, from heartbeats.
    # No comments inside the statements: SQLite appends an added column's text to the table's schema.
    """
    ALTER TABLE peers ADD COLUMN dht_maddrs TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE peers ADD COLUMN left_at REAL;
    ALTER TABLE peers ADD COLUMN leaving_epoch INTEGER;
    ALTER TABLE peers ADD COLUMN utilization REAL NOT NULL DEFAULT 0
    """,
]

MAX_ACTIVE_LEASES = 3  # per peer: the work unit training, one fetched ahead, one whose result awaits its ack
SWARM_MADDRS_LIMIT = 32  # peers handed out per answer: enough to join the swarm, small at any swarm size


@dataclass(frozen=True)
class Lease:
    lease_id: str
    shard_id: int
    peer_id: str
    data_pass: int
    state: LeaseState
    deadline: float
    sha256: str
    byte_size: int
    num_sequences: int


@dataclass(frozen=True)
class LeaseOutcome:
    """What ``lease_shard`` decided: a lease, or nothing now (retry later), or the run is complete."""

    lease: Lease | None
    run_complete: bool = False


@dataclass(frozen=True)
class SubmitOutcome:
    verdict: Verdict
    credit: float
    detail: str


class Ledger:
    """Thread-safe access to the ledger file (or ``:memory:``)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        for pragma in PRAGMAS:
            self._conn.execute(pragma)
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolls back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                yield self._conn
                committed = True
            finally:
                self._conn.execute("COMMIT" if committed else "ROLLBACK")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise FailedPrecondition(f"ledger {self.path} has schema version {version}, newer than this "
                                         f"hivefold ({len(MIGRATIONS)}); upgrade hivefold")
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(statement)
            if row is None:
                c.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            else:
                c.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def schema_version(self) -> int:
        return self._read("SELECT version FROM schema_version")[0][0]

    # --- run setup ----------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            _set_meta(c, key, value)

    def set_checkpoint_every(self, n: int) -> None:
        """The coordinator's ``--checkpoint-every``, written at start-up: the status document measures the
        keeper's lag against it."""
        if n < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {n}")
        with self._tx() as c:
            _set_meta(c, "checkpoint_every", str(n))

    def init_run(self, *, run_id: str, spec_hash: str, shards: list[ShardInfo], seed: int, data_passes: int,
                 now: float) -> None:
        """Record a new run's shards (first pass in a seeded shuffled order). Refuses a second run."""
        with self._tx() as c:
            existing = c.execute("SELECT value FROM meta WHERE key = 'spec_hash'").fetchone()
            if existing is not None:
                if existing[0] != spec_hash:
                    raise FailedPrecondition(f"ledger already holds run {existing[0][:12]}; use a fresh workdir")
                return
            for k, v in (("run_id", run_id), ("spec_hash", spec_hash), ("seed", str(seed)), ("data_pass", "0"),
                         ("data_passes", str(data_passes)), ("global_step", "0"), ("created_at", repr(now))):
                c.execute("INSERT INTO meta VALUES (?, ?)", (k, v))
            order = _pass_order(len(shards), seed, 0)
            c.executemany(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?)",
                [(s.shard_id, s.sha256, s.byte_size, s.num_sequences, ShardState.PENDING.value, int(order[i]))
                 for i, s in enumerate(shards)],
            )
            _event(c, now, "run_created", detail=f"{len(shards)} shards")

    # --- peers --------------------------------------------------------------------------------

    def register_peer(self, *, peer_id: str, name: str, public_key: bytes, device_kind: str, device_name: str,
                      memory_bytes: int, now: float) -> str:
        """Insert or refresh a peer; returns a new session token (older tokens stop working)."""
        token = secrets.token_hex(16)
        with self._tx() as c:
            row = c.execute("SELECT public_key, banned FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            if row is not None and bytes(row["public_key"]) != public_key:
                raise PermissionDenied(f"peer id {peer_id} belongs to another key")
            if row is not None and row["banned"]:
                raise PermissionDenied(f"peer {peer_id} is banned from this run")
            if row is None:
                c.execute("INSERT INTO peers (peer_id, name, public_key, token, device_kind, device_name, "
                          "memory_bytes, registered_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (peer_id, name, public_key, token, device_kind, device_name, memory_bytes, now, now))
            else:
                c.execute("UPDATE peers SET name = ?, token = ?, device_kind = ?, device_name = ?, memory_bytes = ?,"
                          " last_seen = ?, left_at = NULL WHERE peer_id = ?",
                          (name, token, device_kind, device_name, memory_bytes, now, peer_id))
            _event(c, now, "peer_registered", peer_id=peer_id, detail=name)
        return token

    def check_token(self, peer_id: str, token: str) -> bool:
        rows = self._read("SELECT token, banned FROM peers WHERE peer_id = ?", (peer_id,))
        return bool(rows) and secrets.compare_digest(rows[0]["token"], token) and not rows[0]["banned"]

    def heartbeat(self, peer_id: str, *, epoch: int, samples: int, recent_loss: float | None,
                  samples_per_second: float, lease_seconds: float, now: float,
                  dht_maddrs: list[str] | None = None, utilization: float = 0.0) -> tuple[list[str], int]:
        """Mark the peer alive, extend its active leases; returns (extended lease ids, global step)."""
        with self._tx() as c:
            _expire(c, now)
            c.execute("UPDATE peers SET last_seen = ?, epoch = ?, samples_reported = ?, recent_loss = ?, "
                      "samples_per_second = ?, utilization = ?, left_at = NULL WHERE peer_id = ?",
                      (now, epoch, samples, recent_loss, samples_per_second, utilization, peer_id))
            if dht_maddrs is not None:
                c.execute("UPDATE peers SET dht_maddrs = ? WHERE peer_id = ?", (json.dumps(dht_maddrs), peer_id))
            ids = [r[0] for r in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ?",
                                           (peer_id, LeaseState.ACTIVE.value))]
            c.execute("UPDATE leases SET deadline = ? WHERE peer_id = ? AND state = ?",
                      (now + lease_seconds, peer_id, LeaseState.ACTIVE.value))
            step = _raise_global_step(c, epoch)
        return ids, step

    def leave(self, peer_id: str, *, epoch: int, reason: str, now: float) -> None:
        """A clean leave: the peer goes offline at once and its active leases go back to the pool."""
        with self._tx() as c:
            for row in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ?",
                                 (peer_id, LeaseState.ACTIVE.value)).fetchall():
                _close_lease(c, _get_lease(c, row[0]), LeaseState.RELEASED, "peer left", now)
            c.execute("UPDATE peers SET left_at = COALESCE(left_at, ?), leaving_epoch = ?, epoch = MAX(epoch, ?) "
                      "WHERE peer_id = ?", (now, epoch, epoch, peer_id))
            _raise_global_step(c, epoch)
            _event(c, now, "peer_left", peer_id=peer_id, detail=reason)

    def handover_needed(self, peer_id: str, *, online_seconds: float, now: float) -> bool:
        """True while ``peer_id`` (leaving) holds a state newer than the latest checkpoint that no online peer has."""
        with self._lock:
            c = self._conn
            row = c.execute("SELECT leaving_epoch FROM peers WHERE peer_id = ? AND left_at IS NOT NULL",
                            (peer_id,)).fetchone()
            if row is None or row[0] is None:
                return False
            ckpt = c.execute("SELECT COALESCE(MAX(step), -1) FROM checkpoints").fetchone()[0]
            if row[0] <= ckpt:
                return False
            others = c.execute("SELECT COUNT(*) FROM peers WHERE peer_id != ? AND left_at IS NULL AND last_seen >= ? "
                               "AND epoch >= ?", (peer_id, now - online_seconds, row[0])).fetchone()[0]
            return others == 0

    def handovers_wanted(self, *, since: float, online_seconds: float, now: float) -> list[tuple[str, int, list[str]]]:
        """Peers that left since ``since`` and alone hold a state newer than the latest checkpoint, newest first:
        ``(peer id, epoch, maddrs)`` for the keeper to download from."""
        rows = self._read("SELECT peer_id, leaving_epoch, dht_maddrs FROM peers WHERE left_at >= ? "
                          "ORDER BY leaving_epoch DESC", (since,))
        return [(r[0], r[1], json.loads(r[2])) for r in rows
                if self.handover_needed(r[0], online_seconds=online_seconds, now=now)]

    def swarm_maddrs(self, *, exclude_peer: str | None, online_seconds: float, now: float) -> list[str]:
        """hivemind maddrs of the keeper and of the most recently seen online peers (see SWARM_MADDRS_LIMIT)."""
        rows = self._read("SELECT dht_maddrs FROM peers WHERE peer_id IS NOT ? AND left_at IS NULL AND last_seen >= ? "
                          "AND dht_maddrs != '[]' ORDER BY last_seen DESC LIMIT ?",
                          (exclude_peer, now - online_seconds, SWARM_MADDRS_LIMIT))
        keeper = json.loads(self.get_meta("keeper_maddrs", "[]"))
        return keeper + [m for r in rows for m in json.loads(r[0])]

    def set_keeper_maddrs(self, maddrs: list[str]) -> None:
        self.set_meta("keeper_maddrs", json.dumps(maddrs))

    # --- leases -------------------------------------------------------------------------------

    def lease_shard(self, peer_id: str, *, lease_seconds: float, now: float, held: list[str] = ()) -> LeaseOutcome:
        """Lease the next pending shard to ``peer_id``.

        ``held``: the leases the peer knows it holds. An active lease of the peer not among them is from an
        earlier run of the peer and is handed back to it instead of being stranded; otherwise a peer may hold
        up to ``MAX_ACTIVE_LEASES`` at once (one training, one fetched ahead, one awaiting its ack).
        """
        with self._tx() as c:
            _expire(c, now)
            active = [r[0] for r in c.execute("SELECT lease_id FROM leases WHERE peer_id = ? AND state = ? "
                                              "ORDER BY issued_at", (peer_id, LeaseState.ACTIVE.value))]
            orphans = [lease_id for lease_id in active if lease_id not in set(held)]
            if orphans:
                c.execute("UPDATE leases SET deadline = ? WHERE lease_id = ?", (now + lease_seconds, orphans[0]))
                return LeaseOutcome(_get_lease(c, orphans[0]))
            if len(active) >= MAX_ACTIVE_LEASES:
                return LeaseOutcome(None)
            data_pass = int(_meta(c, "data_pass"))
            row = c.execute("SELECT shard_id FROM shards WHERE state = ? ORDER BY position LIMIT 1",
                            (ShardState.PENDING.value,)).fetchone()
            if row is None:
                busy = c.execute("SELECT COUNT(*) FROM shards WHERE state = ?", (ShardState.LEASED.value,)).fetchone()
                if busy[0]:
                    return LeaseOutcome(None)  # every shard is out: wait for one to finish or expire
                passes = int(_meta(c, "data_passes"))
                if passes and data_pass + 1 >= passes:
                    return LeaseOutcome(None, run_complete=True)
                data_pass = _start_next_pass(c, data_pass + 1, now)
                row = c.execute("SELECT shard_id FROM shards WHERE state = ? ORDER BY position LIMIT 1",
                                (ShardState.PENDING.value,)).fetchone()
            lease_id = secrets.token_hex(12)
            c.execute("UPDATE shards SET state = ? WHERE shard_id = ?", (ShardState.LEASED.value, row[0]))
            c.execute("INSERT INTO leases (lease_id, shard_id, peer_id, data_pass, state, issued_at, deadline) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (lease_id, row[0], peer_id, data_pass, LeaseState.ACTIVE.value, now, now + lease_seconds))
            _event(c, now, "lease_issued", peer_id=peer_id, shard_id=row[0], detail=lease_id)
            return LeaseOutcome(_get_lease(c, lease_id))

    def get_lease(self, lease_id: str) -> Lease:
        with self._lock:
            return _get_lease(self._conn, lease_id)

    def active_lease_for(self, peer_id: str, lease_id: str, *, now: float) -> Lease:
        """The lease, if it is active and held by ``peer_id``; raises otherwise (for FetchShard)."""
        with self._tx() as c:
            lease = _owned_lease(c, peer_id, lease_id, now)
        if lease.state is not LeaseState.ACTIVE:
            raise FailedPrecondition(f"lease {lease_id} is {lease.state.value}; lease a new shard")
        return lease

    def release(self, peer_id: str, lease_id: str, *, reason: str, now: float) -> bool:
        with self._tx() as c:
            lease = _owned_lease(c, peer_id, lease_id, now)
            if lease.state is not LeaseState.ACTIVE:
                return False
            _close_lease(c, lease, LeaseState.RELEASED, reason, now)
            return True

    def expire_leases(self, now: float) -> int:
        with self._tx() as c:
            return _expire(c, now)

    def submit(self, peer_id: str, lease_id: str, *, samples: int, losses: list[tuple[float, int]],
               compute_seconds: float, credit_per_sample: float, now: float) -> SubmitOutcome:
        """Record a result. Idempotent: a second submission of a lease returns the first outcome."""
        with self._tx() as c:
            lease = _owned_lease(c, peer_id, lease_id, now)
            prior = c.execute("SELECT verdict, credit, detail FROM results WHERE lease_id = ?", (lease_id,)).fetchone()
            if prior is not None:
                return SubmitOutcome(Verdict(prior["verdict"]), prior["credit"], prior["detail"])
            if samples != lease.num_sequences:
                raise InvalidArgument(f"samples={samples} but shard {lease.shard_id} holds {lease.num_sequences} "
                                      "sequences; submit only whole shards and release unfinished ones")
            shard_state = c.execute("SELECT state FROM shards WHERE shard_id = ?", (lease.shard_id,)).fetchone()[0]
            current_pass = int(_meta(c, "data_pass"))
            late_but_free = (lease.state is not LeaseState.ACTIVE and lease.data_pass == current_pass
                             and shard_state == ShardState.PENDING.value)
            if lease.state is LeaseState.ACTIVE or late_but_free:
                verdict, credit = Verdict.ACCEPTED, samples * credit_per_sample
                detail = "accepted" if lease.state is LeaseState.ACTIVE else "accepted after lease expiry"
                if lease.state is LeaseState.ACTIVE:
                    c.execute("UPDATE leases SET state = ?, closed_at = ?, close_reason = 'result' "
                              "WHERE lease_id = ?", (LeaseState.COMPLETED.value, now, lease_id))
                else:
                    c.execute("UPDATE leases SET state = ?, close_reason = 'late result' WHERE lease_id = ?",
                              (LeaseState.COMPLETED.value, lease_id))
                c.execute("UPDATE shards SET state = ? WHERE shard_id = ?", (ShardState.DONE.value, lease.shard_id))
            else:
                verdict, credit = Verdict.REJECTED_LATE, 0.0
                detail = f"lease {lease.state.value} and shard {lease.shard_id} was reassigned"
            c.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (lease_id, lease.shard_id, peer_id, lease.data_pass, verdict.value, samples, compute_seconds,
                       credit, now, detail))
            c.executemany("INSERT INTO losses VALUES (?, ?, ?, ?)",
                          [(lease_id, i, epoch, loss) for i, (loss, epoch) in enumerate(losses)])
            if losses:
                _raise_global_step(c, max(epoch for _, epoch in losses))
            _event(c, now, "result_" + verdict.value, peer_id=peer_id, shard_id=lease.shard_id, detail=lease_id)
            return SubmitOutcome(verdict, credit, detail)

    # --- swarm progress written by the keeper -------------------------------------------------

    def observe_global_step(self, step: int) -> int:
        with self._tx() as c:
            return _raise_global_step(c, step)

    def record_keeper_download(self, *, step: int | None, error: str | None, now: float) -> None:
        """The keeper's latest attempt to download the swarm's state: a success at swarm ``step`` when
        ``error`` is None, else a failure and its reason, which stays in the status document until the
        next success."""
        with self._tx() as c:
            if error is None:
                if step is None:
                    raise ValueError("a successful download needs the step it reached")
                _set_meta(c, "keeper_last_download_at", repr(now))
                _set_meta(c, "keeper_last_download_step", str(step))
                c.execute("DELETE FROM meta WHERE key IN ('keeper_last_error', 'keeper_last_error_at')")
                _raise_global_step(c, step)
            else:
                _set_meta(c, "keeper_last_error", error)
                _set_meta(c, "keeper_last_error_at", repr(now))

    def record_evaluation(self, step: int, val_loss: float, *, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO evaluations VALUES (?, ?, ?) ON CONFLICT (step) DO UPDATE SET "
                      "val_loss = excluded.val_loss, created_at = excluded.created_at", (step, val_loss, now))

    def record_checkpoint(self, step: int, path: str, val_loss: float | None, *, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?) ON CONFLICT (step) DO UPDATE SET "
                      "path = excluded.path, val_loss = excluded.val_loss, created_at = excluded.created_at",
                      (step, path, val_loss, now))
            _raise_global_step(c, step)
            _event(c, now, "checkpoint", detail=f"step {step}")

    def forget_checkpoint(self, step: int) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM checkpoints WHERE step = ?", (step,))

    def latest_checkpoint(self) -> tuple[int, str] | None:
        rows = self._read("SELECT step, path FROM checkpoints ORDER BY step DESC LIMIT 1")
        return (rows[0]["step"], rows[0]["path"]) if rows else None

    # --- reading ------------------------------------------------------------------------------

    def shard_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in ShardState}
        for row in self._read("SELECT state, COUNT(*) FROM shards GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def accepted_results_per_shard(self, data_pass: int) -> dict[int, int]:
        rows = self._read("SELECT shard_id, COUNT(*) FROM results WHERE verdict = ? AND data_pass = ? "
                          "GROUP BY shard_id", (Verdict.ACCEPTED.value, data_pass))
        return {r[0]: r[1] for r in rows}

    def status(self, *, now: float, online_seconds: float, seq_len: int) -> dict:
        """The status document (see README); reads only."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN")  # one consistent snapshot
            try:
                return _status(c, now=now, online_seconds=online_seconds, seq_len=seq_len)
            finally:
                c.execute("COMMIT")


# --- helpers that run inside a transaction -------------------------------------------------------


def _meta(c: sqlite3.Connection, key: str) -> str:
    return c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def _set_meta(c: sqlite3.Connection, key: str, value: str) -> None:
    c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _event(c: sqlite3.Connection, now: float, kind: str, *, peer_id: str | None = None,
           shard_id: int | None = None, detail: str = "") -> None:
    c.execute("INSERT INTO events (at, kind, peer_id, shard_id, detail) VALUES (?, ?, ?, ?, ?)",
              (now, kind, peer_id, shard_id, detail))


def _pass_order(n: int, seed: int, data_pass: int) -> np.ndarray:
    """Position of each shard in a pass's lease order: a fresh seeded shuffle per pass."""
    order = np.empty(n, dtype=np.int64)
    order[np.random.default_rng([seed, data_pass]).permutation(n)] = np.arange(n)
    return order


def _start_next_pass(c: sqlite3.Connection, data_pass: int, now: float) -> int:
    seed = int(_meta(c, "seed"))
    ids = [r[0] for r in c.execute("SELECT shard_id FROM shards ORDER BY shard_id")]
    order = _pass_order(len(ids), seed, data_pass)
    c.executemany("UPDATE shards SET state = ?, position = ? WHERE shard_id = ?",
                  [(ShardState.PENDING.value, int(order[i]), sid) for i, sid in enumerate(ids)])
    c.execute("UPDATE meta SET value = ? WHERE key = 'data_pass'", (str(data_pass),))
    _event(c, now, "data_pass_started", detail=str(data_pass))
    return data_pass


def _get_lease(c: sqlite3.Connection, lease_id: str) -> Lease:
    row = c.execute("SELECT l.*, s.sha256, s.byte_size, s.num_sequences FROM leases l "
                    "JOIN shards s USING (shard_id) WHERE lease_id = ?", (lease_id,)).fetchone()
    if row is None:
        raise NotFound(f"unknown lease id {lease_id!r}; lease a shard first")
    return Lease(row["lease_id"], row["shard_id"], row["peer_id"], row["data_pass"], LeaseState(row["state"]),
                 row["deadline"], row["sha256"], row["byte_size"], row["num_sequences"])


def _owned_lease(c: sqlite3.Connection, peer_id: str, lease_id: str, now: float) -> Lease:
    """Expire overdue leases, then return ``lease_id`` if ``peer_id`` holds it (in any state)."""
    _expire(c, now)
    lease = _get_lease(c, lease_id)
    if lease.peer_id != peer_id:
        raise PermissionDenied(f"lease {lease_id} belongs to another peer")
    return lease


def _close_lease(c: sqlite3.Connection, lease: Lease, state: LeaseState, reason: str, now: float) -> None:
    c.execute("UPDATE leases SET state = ?, closed_at = ?, close_reason = ? WHERE lease_id = ?",
              (state.value, now, reason, lease.lease_id))
    c.execute("UPDATE shards SET state = ? WHERE shard_id = ? AND state = ?",
              (ShardState.PENDING.value, lease.shard_id, ShardState.LEASED.value))
    _event(c, now, "lease_" + state.value, peer_id=lease.peer_id, shard_id=lease.shard_id, detail=reason)


def _expire(c: sqlite3.Connection, now: float) -> int:
    rows = c.execute("SELECT lease_id FROM leases WHERE state = ? AND deadline < ?",
                     (LeaseState.ACTIVE.value, now)).fetchall()
    for row in rows:
        _close_lease(c, _get_lease(c, row[0]), LeaseState.EXPIRED, "deadline passed", now)
    return len(rows)


def _raise_global_step(c: sqlite3.Connection, step: int) -> int:
    """The swarm's step only moves forward; peers' reports can be stale or out of order."""
    current = int(_meta(c, "global_step"))
    if step > current:
        c.execute("UPDATE meta SET value = ? WHERE key = 'global_step'", (str(step),))
        return step
    return current


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


def _status(c: sqlite3.Connection, *, now: float, online_seconds: float, seq_len: int) -> dict:
    meta = {r[0]: r[1] for r in c.execute("SELECT key, value FROM meta")}
    counts = {s.value: 0 for s in ShardState}
    for row in c.execute("SELECT state, COUNT(*) FROM shards GROUP BY state"):
        counts[row[0]] = row[1]
    peers = []
    for p in c.execute(
        "SELECT p.*, "
        "(SELECT COUNT(*) FROM results r WHERE r.peer_id = p.peer_id AND r.verdict = 'accepted') AS shards_done, "
        "(SELECT COALESCE(SUM(samples), 0) FROM results r WHERE r.peer_id = p.peer_id AND r.verdict = 'accepted')"
        " AS samples, "
        "(SELECT COALESCE(SUM(credit), 0) FROM results r WHERE r.peer_id = p.peer_id) AS credit "
        "FROM peers p ORDER BY p.registered_at"
    ):
        peers.append({
            "peer_id": p["peer_id"], "name": p["name"],
            "online": p["left_at"] is None and now - p["last_seen"] <= online_seconds,
            "shards_done": p["shards_done"], "samples": p["samples"], "credit": round(p["credit"], 3),
            "last_seen": p["last_seen"], "device": p["device_kind"], "epoch": p["epoch"],
            "samples_per_second": p["samples_per_second"], "recent_loss": p["recent_loss"],
            "utilization": p["utilization"],
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
    global_step = int(meta.get("global_step", 0))
    return {
        "run_id": meta.get("run_id", ""),
        "spec_hash": meta.get("spec_hash", ""),
        "global_step": global_step,
        "data_pass": int(meta.get("data_pass", 0)),
        "shards": {"total": sum(counts.values()), **counts},
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
        "time": now,
    }

