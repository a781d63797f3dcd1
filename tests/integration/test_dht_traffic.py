"""How many DHT requests the diloco averager makes, counted on a real third node: its state declaration once per
round (hivemind re-declares each time an all-reduce lands a tensor) and its matchmaking lookups paced (hivemind
repeats one as soon as the last answers). On two cores these requests were the helpers' main cost."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hivemind import DHT
from hivemind.dht.routing import DHTID

from hivefold.averaging.guarded import LOOKUP_GAP_S
from hivefold.averaging.members import OuterStateAverager

pytestmark = pytest.mark.integration

TENSORS = 40  # as many as the tiny model has: hivemind would re-declare up to once per tensor per round
ROUNDS = 3
LATE_S = 1.5  # one member comes to each round this much later: the other waits alone, looking for a group


async def _count_requests(_dht, node) -> None:
    """Runs in the observer's DHT process: count what other nodes store and look up there, by key."""
    protocol, counts = node.protocol, {}
    node.hf_counts = counts
    for storage, methods in ((protocol.storage, ("store_subkey", "store", "get")),
                             (protocol.cache, ("store_subkey", "store"))):  # a lookup reads both: count it once
        for method in methods:
            original = getattr(storage, method)

            def counted(key_id, *args, _original=original, _method=method, **kwargs):
                kind = "get" if _method == "get" else "store"
                counts[(kind, key_id.to_bytes())] = counts.get((kind, key_id.to_bytes()), 0) + 1
                return _original(key_id, *args, **kwargs)

            setattr(storage, method, counted)


async def _counts(_dht, node) -> dict:
    return dict(node.hf_counts)


def _averager(dht: DHT, prefix: str, fill: float) -> OuterStateAverager:
    tensors = [torch.full((16,), fill) for _ in range(TENSORS)]
    return OuterStateAverager(averaged_tensors=tensors, dht=dht, start=True, prefix=prefix,
                              state_fn=lambda: ({}, tensors), min_matchmaking_time=1.0, request_timeout=0.5,
                              allreduce_timeout=20.0, target_group_size=2, declare_state_period=30.0)


def test_a_round_declares_the_state_once_and_matchmaking_lookups_are_paced():
    observer = DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    maddrs = [str(m) for m in observer.get_visible_maddrs()]
    dhts = [DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True) for _ in range(2)]
    averagers = []
    try:
        averagers = [_averager(dht, "traffic", fill) for dht, fill in zip(dhts, (1.0, 3.0), strict=True)]
        started = time.monotonic()
        observer.run_coroutine(_count_requests)
        for round_index in range(ROUNDS):
            results = [None, None]

            def run(i, round_index=round_index, results=results):
                time.sleep(LATE_S * i)
                averagers[i].state_sharing_priority = float(round_index + 1)  # as the owner does once a round
                results[i] = averagers[i].step(timeout=30)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(r is not None for r in results), f"round {round_index} failed: {results}"
        elapsed = time.monotonic() - started
        with averagers[0].get_tensors() as got:
            assert torch.allclose(got[0], torch.full((16,), 2.0)), "the rounds did average"
        time.sleep(1.0)  # stores in flight land
        counts = observer.run_coroutine(_counts)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in (*dhts, observer):
            dht.shutdown()

    declared = counts.get(("store", DHTID.generate(source="traffic.all_averagers").to_bytes()), 0)
    # each member: one declaration at start and one per priority change; hivemind's own made one per tensor landed
    assert 0 < declared <= 2 * (ROUNDS + 2), f"{declared} state declarations in {ROUNDS} rounds"
    lookups = counts.get(("get", DHTID.generate(source="traffic.0b").to_bytes()), 0)
    # each member looks up who waits for a group at most once per LOOKUP_GAP_S, plus a few as a group forms;
    # unpaced, the member waiting alone repeated its lookup as soon as one answered (about 100 a second here)
    bound = 2 * (elapsed / LOOKUP_GAP_S + 8 * ROUNDS)
    assert 0 < lookups <= bound, f"{lookups} matchmaking lookups in {elapsed:.1f}s (bound {bound:.0f})"
