"""A hostile member among three real DiLoCo members (diloco_worker.py): the robust all-reduce flags it, leaves its
slices out, and the honest members keep learning together."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import Processes, wait_for
from tests.integration.test_diloco import logs, rms, saved, start

pytestmark = pytest.mark.integration

ROUNDS = 5


def first_step(tmp, index: int) -> int:
    return min(int(p.stem.split("-")[1]) for p in tmp.glob(f"w{index}-*.pt"))


@pytest.mark.parametrize("poison", ["flip", "huge"])
def test_a_poisoner_among_three_is_caught_and_the_honest_members_keep_learning_together(tmp_path, poison):
    workers = [start(tmp_path, 0, "--rounds", str(ROUNDS), "--members", "3"),
               start(tmp_path, 1, "--rounds", str(ROUNDS), "--members", "3"),
               start(tmp_path, 2, "--rounds", "0", "--members", "3", "--poison", poison)]
    try:
        for i in (0, 1):
            wait_for(lambda i=i: (tmp_path / f"w{i}-{ROUNDS}.pt").exists(), timeout=240,
                     what=f"honest member {i}'s {ROUNDS} outer steps")
        poisoner = saved(tmp_path, 2, first_step(tmp_path, 2))["libp2p_id"]
        first = [saved(tmp_path, i, first_step(tmp_path, i)) for i in (0, 1)]  # a reload may skip a step's file
        last = [saved(tmp_path, i, ROUNDS) for i in (0, 1)]
        caught = [poisoner in z["flagged"] for z in last]
        # A flipped update is in every slice, so every reducer sees it; a huge one poisons one tensor, whose part only
        # one member reduces, and that member then stops averaging with it (so the other may never see it).
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
