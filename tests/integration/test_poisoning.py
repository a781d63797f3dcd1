"""A hostile member among three real DiLoCo members: the robust all-reduce catches it and leaves its slices out,
the honest members keep learning together (diloco_worker.py), and in a real swarm the coordinator bans it on the
honest peers' reports (poison_peer.py)."""

from __future__ import annotations

import math

import pytest
import torch

from hivefold.client import CoordinatorClient
from hivefold.tls import Trust
from tests.conftest import Processes, start_coordinator, wait_for
from tests.integration.test_diloco import logs, rms, saved, start
from tests.integration.test_swarm import RUN_FLAGS, SYNC_FLAGS

pytestmark = pytest.mark.integration

ROUNDS = 5


def first_step(tmp, index: int) -> int:
    return min(int(p.stem.split("-")[1]) for p in tmp.glob(f"w{index}-*.pt"))


@pytest.mark.parametrize("poison", ["flip", "huge"])
def test_a_poisoner_among_three_is_caught_and_the_honest_members_keep_learning_together(tmp_path, poison):
    # A flip is evidence only in a round where three members did real work; on a loaded machine the first rounds
    # often form pairs, and a pair's disagreement makes its members reload (no real work that round). One clean
    # run had none in 5 rounds: give it more.
    rounds = 2 * ROUNDS if poison == "flip" else ROUNDS
    workers = [start(tmp_path, 0, "--rounds", str(rounds), "--members", "3"),
               start(tmp_path, 1, "--rounds", str(rounds), "--members", "3"),
               start(tmp_path, 2, "--rounds", "0", "--members", "3", "--poison", poison)]
    try:
        for i in (0, 1):
            wait_for(lambda i=i: (tmp_path / f"w{i}-{rounds}.pt").exists(), timeout=240,
                     what=f"honest member {i}'s {rounds} outer steps")
        poisoner = saved(tmp_path, 2, first_step(tmp_path, 2))["libp2p_id"]
        first = [saved(tmp_path, i, first_step(tmp_path, i)) for i in (0, 1)]  # a reload may skip a step's file
        last = [saved(tmp_path, i, rounds) for i in (0, 1)]
        caught = [poisoner in z["flagged"] for z in last]
        # A flipped update is in every slice, so every reducer sees it. A huge one is in every slice too (see
        # diloco_worker.py), but the first reducer to flag it stops averaging with it (so the other may never see it).
        assert all(caught) if poison == "flip" else any(caught), (caught, logs(tmp_path))
        for a, z in zip(first, last, strict=True):
            assert set(z["flagged"]) <= {poisoner}, z["flagged"]  # no honest member accused
            assert all(torch.isfinite(p).all() for p in z["params"]) and z["loss"] < a["loss"], logs(tmp_path)
        # the honest members still average with each other: their global parameters stay together
        apart = rms([p - q for p, q in zip(last[0]["params"], last[1]["params"], strict=True)])
        assert apart < 0.1 * rms(last[0]["params"]), (apart, logs(tmp_path))
        assert math.isfinite(last[0]["loss"])
    finally:
        for w in workers:
            Processes.kill_group(w)
            w.wait()


@pytest.mark.parametrize("flags", [RUN_FLAGS, SYNC_FLAGS], ids=["diloco", "sync"])
def test_a_poisoning_volunteer_in_a_real_swarm_is_banned_and_the_loss_still_falls(tmp_path, flags):
    """Coordinator, keeper and three `hivefold peer` processes, one of them hostile (poison_peer.py): both honest
    peers catch it in the all-reduce and report it in their heartbeats, the coordinator bans it (two reports, the
    default --ban-after-reports), and the keeper's validation loss keeps falling."""
    procs = Processes(tmp_path)
    try:
        endpoints = start_coordinator(procs, tmp_path / "coordinator", "--heartbeat-interval", "2",
                                      "--checkpoint-every", "2", "--keeper-poll", "1", *flags)

        def peer(name, **kwargs):
            return procs.start(name, "peer", "--coordinator", endpoints["grpc"], "--coordinator-fingerprint",
                               endpoints["fingerprint"], "--workdir", str(tmp_path / name), "--name", name,
                               "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--no-progress", **kwargs)

        for name in ("alice", "bob"):
            peer(name)
        peer("mallory", module="tests.integration.poison_peer")
        client = CoordinatorClient(endpoints["grpc"], trust=Trust(fingerprint=endpoints["fingerprint"]),
                                   give_up_after=10)

        def mallory():
            return next((p for p in client.status()["peers"] if p["name"] == "mallory" and p["banned"]), None)
        banned = wait_for(mallory, timeout=300, what="mallory's ban", procs=procs)
        assert banned["ban_reason"].startswith("poisoning the averaging: caught by 2 peers"), banned
        at_ban = client.status()

        def fell():
            s = client.status()
            later = [loss for step, loss in s["val_history"] if step > at_ban["global_step"]]
            return later and later[-1] < s["val_loss_first"] - 0.5 and later
        wait_for(fell, timeout=240, what="the validation loss to keep falling after the ban", procs=procs)
        honest = {p["name"]: p for p in client.status()["peers"]}
        assert not honest["alice"]["banned"] and not honest["bob"]["banned"]
        client.close()
    finally:
        procs.close()
