"""The ledger: the run's durable state (peers, shards, leases, results, checkpoints) in one SQLite file,
the embedded default, or in a PostgreSQL database that several coordinators share (``backend.py``).

Every state change of a shard or lease happens in one write transaction, and write transactions run
one at a time for the whole run (SQLite's ``BEGIN IMMEDIATE``; on PostgreSQL a transaction-scoped
advisory lock), so two peers racing for the last shard, a submission racing its lease's expiry, or
two coordinators serving one run can never both win.
Time comes from an injected clock (``now`` arguments) so expiry is testable without sleeping.
The keeper process writes to the same file (checkpoints, evaluations, the swarm's step, how its
downloads of the swarm's state fare); WAL mode lets the dashboard and status readers run beside
the writers.

A work unit's life (every arrow is one transaction; ``leases.py``, ``results.py`` and ``peers.py``):

    shard   pending ──LeaseShard──▶ leased ──SubmitResult (accepted)──▶ done
               ▲                      │                                  │
               └── lease expired, ────┘        every shard of the pass done: the next pass
                   or handed back (ReleaseLease)  starts with a new shuffle (all pending again)
                                                  unless --data-passes or --token-budget is spent:
                                                  the run is complete (LeaseShard says so)

    lease   active ──SubmitResult──▶ completed    (credited once; a repeat gets the first answer)
              │ ──deadline passed──▶ expired      (a result still comes in: accepted if the shard
              │   or its peer silent               is still pending in the same pass, else
              │   (no heartbeat for a while)       recorded as rejected_late, no credit)
              │ ──ReleaseLease────▶ released
              └── ExtendLease: the deadline moves, against progress, within --lease-max-seconds;
                  heartbeats keep the peer online but never extend a lease

A lease's deadline is sized at issue to the shard's work at the peer's reported throughput
(3x, times its place in the peer's queue), between ``--lease-seconds`` and ``--lease-max-seconds``.

One module per concept, composed into ``Ledger`` below:
    schema.py    pragmas, migrations, the state enums and the value types the ledger returns
    backend.py   SQLite or PostgreSQL: the connection, the transaction shapes, the schema's types
    store.py     the connection's lock, transactions, migrating, the meta and events tables
    peers.py     registration, heartbeats, clean leaves and handovers, the swarm's address book
    access.py    who may take part: invites (invite-only runs) and bans
    nonces.py    signed requests' nonces, claimed once for all coordinators of a shared ledger
    reports.py   members caught poisoning the averaging: reports, and the ban enough of them bring
    verification.py  results sampled for a proof-of-training check, their proofs, verdicts, bans
    leases.py    the run's shards, leasing them, expiring leases
    results.py   results submitted under leases: accepted once, credited or held for a check
    progress.py  what the keeper records: the swarm's step, evaluations, checkpoints, state downloads
    status.py    the status document
    history.py   the swarm over time (charts), recent events, totals (metrics)
"""

from coordinator.ledger.access import INVITE_PREFIX, PeerAccess
from coordinator.ledger.backend import SqliteBackend, is_postgres, redact
from coordinator.ledger.history import NOTABLE_EVENTS, SwarmHistory
from coordinator.ledger.leases import MAX_ACTIVE_LEASES
from coordinator.ledger.nonces import SharedNonces
from coordinator.ledger.peers import SWARM_MADDRS_LIMIT, PeerRegistry
from coordinator.ledger.progress import KeeperProgress
from coordinator.ledger.reports import PoisonReports
from coordinator.ledger.results import ShardResults
from coordinator.ledger.schema import (
    MIGRATIONS,
    Lease,
    LeaseOutcome,
    LeaseState,
    ShardState,
    SubmitOutcome,
    Verdict,
)
from coordinator.ledger.status import StatusReport
from coordinator.ledger.verification import ProofTask, Verifications, VerifyPolicy

PRAGMAS = SqliteBackend.PRAGMAS

__all__ = [
    "INVITE_PREFIX", "MAX_ACTIVE_LEASES", "MIGRATIONS", "NOTABLE_EVENTS", "PRAGMAS", "SWARM_MADDRS_LIMIT", "Lease",
    "LeaseOutcome",
    "LeaseState", "Ledger", "ProofTask", "ShardState", "SubmitOutcome", "Verdict", "VerifyPolicy", "is_postgres",
    "redact",
]


class Ledger(PeerRegistry, PeerAccess, SharedNonces, PoisonReports, Verifications, ShardResults, KeeperProgress,
             StatusReport, SwarmHistory):
    """Thread-safe access to the ledger file (or ``:memory:``)."""
