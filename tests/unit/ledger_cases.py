"""What the ledger's contract tests share: a small run on every backend (SQLite ``:memory:``, an SQLite file, a
real PostgreSQL server; the ``ledger`` fixture in ``conftest.py``), and shortcuts for leasing and submitting."""

from hivefold.spec import ShardInfo

LEASE_S = 60.0
SHARDS = [ShardInfo(i, f"{i:064x}", 100, 8) for i in range(4)]


def location(kind: str, request, tmp_path):
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return ":memory:" if kind == "memory" else tmp_path / "ledger.sqlite"


def lease(led, peer, now=1.0):
    return led.lease_shard(peer, lease_seconds=LEASE_S, now=now).lease


def submit(led, peer, lease_obj, now=2.0, samples=8):
    return led.submit(peer, lease_obj.lease_id, samples=samples, losses=[(2.0, 0), (1.5, 1)], compute_seconds=1.0,
                      credit_per_sample=0.5, now=now)
