"""Two coordinator processes on different ports serve one run from one PostgreSQL ledger: simulated peers in
separate processes race each other through both, and no shard is ever leased twice at once or credited twice."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import shutil
import time
from pathlib import Path

import pytest

from coordinator.credit import KEY_DIR
from coordinator.ledger import Ledger
from tests.conftest import Processes, wait_for

pytestmark = pytest.mark.integration

RUN_FLAGS = ["--corpus", "CORPUS", "--seq-len", "32", "--micro-batch", "4", "--target-batch-size", "16",
             "--shard-sequences", "4", "--data-passes", "2", "--lease-seconds", "60"]


def racer(addresses: list[str], threads: int, identity_dir: str, out) -> None:
    """Peers in threads: each registers at one coordinator, then leases, fetches and submits at random ones."""
    import threading

    from hivefold.client import CoordinatorClient
    from hivefold.identity import Identity
    from protos import coordinator_pb2 as pb

    tally = {"cycles": 0, "by_coordinator": [0] * len(addresses), "errors": []}
    lock = threading.Lock()

    def peer(i: int) -> None:
        rng = random.Random(i)
        clients = [CoordinatorClient(a, give_up_after=30) for a in addresses]
        ident = Identity.load_or_create(Path(identity_dir) / f"{i}")
        clients[i % len(clients)].register(ident, name=f"racer-{i}", device=pb.DeviceReport(kind="cpu"))
        for c in clients:  # the session token lives in the shared ledger: every coordinator honours it
            c.adopt(clients[i % len(clients)])
        idle_since = None
        while True:
            k = rng.randrange(len(clients))
            try:
                resp = clients[k].lease()
                if resp.run_complete:
                    break
                if not resp.HasField("work"):
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 60:
                        raise RuntimeError("no work for 60 s and the run is not complete")
                    time.sleep(0.05)
                    continue
                idle_since = None
                work = resp.work
                rng.choice(clients).fetch_shard(work.lease_id, work.sha256)
                verdict = rng.choice(clients).submit(pb.SubmitResultRequest(
                    lease_id=work.lease_id, samples=work.num_sequences, compute_seconds=0.01,
                    losses=[pb.MicroBatchLoss(loss=2.0, epoch=0)])).verdict
                with lock:
                    tally["cycles"] += 1
                    tally["by_coordinator"][k] += 1
                    if verdict != pb.RESULT_VERDICT_ACCEPTED:
                        tally["errors"].append(f"verdict {verdict} for {work.lease_id}")
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails on any
                with lock:
                    tally["errors"].append(repr(e)[:300])
                break
        for c in clients:
            c.close()

    workers = [threading.Thread(target=peer, args=(int(identity_dir.rsplit("-", 1)[1]) * 100 + i,))
               for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put(tally)


def test_two_coordinators_on_one_postgresql_ledger_never_lease_a_shard_twice(tmp_path, postgres):
    url = postgres.create_database("shared_run")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    flags = [str(corpus) if f == "CORPUS" else f for f in RUN_FLAGS]
    procs = Processes(tmp_path)
    try:
        addresses = []
        def coordinator(name: str):
            return procs.start(f"coordinator-{name}", "coordinator", "--workdir", str(tmp_path / name), "--ledger",
                               url, "--listen", "127.0.0.1:0", "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                               "--no-keeper", "--verify-ceiling", "0", *flags)  # simulated peers: no proofs

        for name in ("a", "b"):  # one after the other: the second finds the run the first created in the ledger
            workdir = tmp_path / name
            if name == "b":  # the run's coordinators sign swarm tokens and receipts with one key
                stranger = coordinator("b-own-key")
                assert stranger.wait(120) == 2
                assert "coordinators of one run must share it" in stranger.log.read_text()
                shutil.copytree(tmp_path / "a" / KEY_DIR, workdir / KEY_DIR)
            coordinator(name)
            path = workdir / "coordinator.json"
            info = wait_for(lambda p=path: p.exists() and json.loads(p.read_text()), timeout=180,
                            what=f"coordinator {name} to serve", procs=procs)
            addresses.append(info["grpc"])
        assert not (tmp_path / "a" / "ledger.sqlite").exists()  # the run lives in PostgreSQL only
        ledger = Ledger(url)
        shards = sum(ledger.shard_counts().values())
        assert shards >= 40

        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        racers = [ctx.Process(target=racer, args=(addresses, 4, str(tmp_path / f"ids-{n}"), out)) for n in range(3)]
        for p in racers:
            p.start()
        tallies = [out.get(timeout=300) for _ in racers]
        for p in racers:
            p.join(30)

        errors = [e for t in tallies for e in t["errors"]]
        assert not errors, errors[:5]
        by_coordinator = [sum(t["by_coordinator"][k] for t in tallies) for k in range(2)]
        assert min(by_coordinator) > 0.25 * sum(by_coordinator), by_coordinator  # both really served
        assert sum(t["cycles"] for t in tallies) == 2 * shards  # every shard once per pass, nothing more
        for data_pass in (0, 1):
            assert ledger.accepted_results_per_shard(data_pass) == {s: 1 for s in range(shards)}
        # no two leases of one shard were ever active at the same time
        leases = ledger._read("SELECT shard_id, issued_at, closed_at, state FROM leases ORDER BY shard_id, issued_at")
        assert all(r["state"] == "completed" for r in leases)
        for before, after in zip(leases, leases[1:], strict=False):
            if before["shard_id"] == after["shard_id"]:
                assert before["closed_at"] <= after["issued_at"], (before, after)
        assert ledger.status(now=time.time(), online_seconds=30, seq_len=32)["run_complete"]
        ledger.close()
    finally:
        procs.close()
