"""The ledger's schema: ordered migrations (in SQLite's types; ``backend.postgres_ddl`` maps them to
PostgreSQL's), the state enums and the value types the ledger returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ShardState(str, enum.Enum):
    PENDING = "pending"  # waiting in the pool for the current data pass
    LEASED = "leased"  # held by exactly one active lease
    DONE = "done"  # trained in the current data pass; exactly one accepted result


class LeaseState(str, enum.Enum):
    ACTIVE = "active"  # held by the peer; expires at its deadline unless the peer asks for more time (ExtendLease)
    COMPLETED = "completed"  # a result was accepted under it
    EXPIRED = "expired"  # the deadline passed; its shard went back to the pool
    RELEASED = "released"  # the peer handed it back


class Verdict(str, enum.Enum):
    ACCEPTED = "accepted"  # shard done, peer credited
    REJECTED_LATE = "rejected_late"  # lease had expired and the shard was reassigned
    PENDING = "pending_verification"  # shard done; credit waits for the keeper's replay of the proof
    INVALID = "invalid"  # the replay contradicted the result, or no proof came: no credit, shard trained again


class CheckState(str, enum.Enum):
    """A sampled result's verification (``verification.py``)."""

    AWAITING = "awaiting_proof"  # the peer has not uploaded the proof yet
    QUEUED = "queued"  # the proof is in; the keeper has not replayed it yet
    VALID = "valid"
    INVALID = "invalid"


MAX_UNVERIFIED = 4  # a peer with this many results awaiting their check gets no new lease until the keeper catches up


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
    # 3: micro_batch: the sequences per forward/backward pass the peer chose for its device (0: not yet reported).
    """
    ALTER TABLE peers ADD COLUMN micro_batch INTEGER NOT NULL DEFAULT 0
    """,
    # 4: the swarm over time for the dashboard's charts (one row every few seconds, written by the coordinator),
    # and indexes that keep the status document and the charts quick with thousands of peers and results.
    """
    CREATE TABLE swarm_history (
        at REAL PRIMARY KEY,
        peers_online INTEGER NOT NULL,
        samples_per_second REAL NOT NULL,
        utilization REAL,
        samples_trained INTEGER NOT NULL,
        global_step INTEGER NOT NULL
    );
    CREATE INDEX results_by_peer ON results (peer_id, verdict);
    CREATE INDEX results_by_time ON results (submitted_at);
    CREATE INDEX events_by_kind ON events (kind, id)
    """,
    # 5: credit: a peer's team ('' = none) and the coordinator's signed receipt of each accepted result.
    """
    ALTER TABLE peers ADD COLUMN team TEXT NOT NULL DEFAULT '';
    ALTER TABLE results ADD COLUMN receipt TEXT NOT NULL DEFAULT ''
    """,
    # 6 (volunteer controls): pause_reason: why an online peer does not train (paused by its volunteer, a busy
    # machine, its daily upload cap), from heartbeats; NULL while it trains.
    """
    ALTER TABLE peers ADD COLUMN pause_reason TEXT
    """,
    # 7: leases sized to the work and the peer (allotted_s: the seconds it was given at issue, the quick-return
    # bonus's deadline) and extended only on request, against progress (samples the peer reported done in it).
    """
    ALTER TABLE leases ADD COLUMN allotted_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN progress INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN extensions INTEGER NOT NULL DEFAULT 0
    """,
    # 8 (who may join): invites (only their sha256 is kept; uses_left counts down at each new peer's registration)
    # and why a peer was banned; invite: the sha256 prefix of the invite a peer joined with ('' = an open run).
    """
    CREATE TABLE invites (
        token_sha256 TEXT PRIMARY KEY,
        uses_left INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        created_at REAL NOT NULL,
        note TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE peers ADD COLUMN ban_reason TEXT;
    ALTER TABLE peers ADD COLUMN invite TEXT NOT NULL DEFAULT ''
    """,
    # 9 (poisoned averaging): which peer each swarm token's libp2p id belongs to, and who reported whom
    """
    CREATE TABLE swarm_ids (
        libp2p_id TEXT PRIMARY KEY,
        peer_id TEXT NOT NULL,
        issued_at REAL NOT NULL
    );
    CREATE TABLE poison_reports (
        reporter TEXT NOT NULL,
        suspect TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (reporter, suspect)
    )
    """,
    # 10 (verified work): results sampled for a proof-of-training check, their proofs while they wait for the
    # keeper, and each peer's record (the sampling rate follows valid_streak; invalid results ban)
    """
    CREATE TABLE verifications (
        lease_id TEXT PRIMARY KEY,
        peer_id TEXT NOT NULL,
        shard_id INTEGER NOT NULL,
        data_pass INTEGER NOT NULL,
        segment INTEGER NOT NULL,
        segments INTEGER NOT NULL,
        state TEXT NOT NULL,
        held_credit REAL NOT NULL,
        train_seconds REAL NOT NULL,
        requested_at REAL NOT NULL,
        proof_deadline REAL NOT NULL,
        digests BLOB NOT NULL,
        state_changes TEXT NOT NULL DEFAULT '',
        proof_bytes INTEGER NOT NULL DEFAULT 0,
        checked_at REAL,
        keeper_seconds REAL,
        score REAL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX verifications_by_state ON verifications (state, requested_at);
    CREATE TABLE proof_chunks (
        lease_id TEXT NOT NULL,
        byte_offset INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (lease_id, byte_offset)
    );
    ALTER TABLE peers ADD COLUMN valid_streak INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN results_valid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN results_invalid INTEGER NOT NULL DEFAULT 0
    """,
    # 11: signed requests' nonces, claimed once for every coordinator of a shared ledger (nonces.py).
    """
    CREATE TABLE nonces (nonce TEXT PRIMARY KEY, signed_at REAL NOT NULL);
    CREATE INDEX nonces_by_time ON nonces (signed_at)
    """,
]


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
    receipt: str = ""  # the coordinator's signed receipt (accepted results, when the ledger was given a signer)
