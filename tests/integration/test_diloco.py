"""DiLoCo between real hivemind peers in separate processes (see diloco_worker.py).

Two workers complete outer steps together; after each outer step their global parameters agree up to
fp32 rounding, int8 and int4 rounds too (a first round that one of them took alone, before the progress trackers
saw each other, is reconciled by the next), and their training
loss falls. A worker killed mid-round does not stop the other from completing its next outer steps.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, Processes, wait_for

pytestmark = pytest.mark.integration

# Members that averaged together take the same decoded average whatever the codec (hivefold/averaging/robust.py),
# so they agree up to fp32 rounding: the clean CI run saw 5e-6 after 8 fp32 rounds back when each member added
# its own delta to its own slice (int8 then left members a few percent of a step apart each round); now ~1e-8.
# Two rounds in a row must agree that closely (right after a state download members agree exactly, whatever the
# codec, so one round is no evidence); a later partial round (a reducer failed for one member) may leave them a
# few percent of a step apart, which the agreement check tolerates. No round may drift a third of a step (a round
# taken alone is a whole step).
FP32_TOLERANCE = 2e-5
STEP_FRACTION = 0.35


def start(tmp: Path, index: int, *args: str, worker: str = "diloco_worker") -> subprocess.Popen:
    log = (tmp / f"w{index}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", f"tests.integration.{worker}", "--index", str(index), "--dir",
                             str(tmp), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def logs(tmp: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp.glob("w*.log")))


def saved(tmp: Path, index: int, step: int) -> dict:
    return torch.load(tmp / f"w{index}-{step}.pt", weights_only=True)


def rms(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors) / sum(t.numel() for t in tensors))


@pytest.mark.parametrize("compression", ["fp32", "int8", "int4"])
def test_two_peers_agree_after_every_outer_step_and_learn(tmp_path, compression):
    rounds = 8
    workers = [start(tmp_path, i, "--rounds", str(rounds), "--compression", compression) for i in range(2)]
    try:
        for w in workers:
            assert w.wait(180) == 0, logs(tmp_path)
    finally:
        for w in workers:
            Processes.kill_group(w)
    steps = [sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob(f"w{i}-*.pt")) for i in range(2)]
    common = sorted(set(steps[0]) & set(steps[1]))
    assert common[-1] == rounds, steps
    diffs, apart = {}, {}
    for step in common:
        a, b = saved(tmp_path, 0, step), saved(tmp_path, 1, step)
        diffs[step] = max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"], strict=True))
        if step - 1 in steps[0]:
            moved = rms([x - y for x, y in zip(a["params"], saved(tmp_path, 0, step - 1)["params"], strict=True)])
            apart[step] = rms([x - y for x, y in zip(a["params"], b["params"], strict=True)]) / max(moved, 1e-12)
    # Rounds that a worker took before its progress tracker saw the other (or while reloading) may leave them
    # apart; the next rounds find that and reconcile them, and from then on they agree.
    assert sum(s in apart for s in common[-3:]) >= 2, steps  # not a pass for want of steps to compare
    assert all(apart.get(s, 0.0) <= STEP_FRACTION for s in common[-3:]), (apart, diffs)
    assert any(diffs[s] <= FP32_TOLERANCE and diffs.get(s + 1, 1.0) <= FP32_TOLERANCE for s in common), diffs
    last = saved(tmp_path, 0, rounds)
    assert last["stats"]["rounds_ok"] >= rounds - 3, last["stats"]  # the rounds were averaged, not taken alone
    assert last["loss"] < 0.5 * math.log(64), last["loss"]  # from ln(64) = 4.16 nats at the random init
    moved = max((x - y).abs().max().item() for x, y in zip(saved(tmp_path, 0, steps[0][0])["params"],
                                                              last["params"], strict=True))
    assert moved > 1e4 * FP32_TOLERANCE  # the agreement above is not that of parameters that never moved


def test_a_peer_killed_mid_round_does_not_stop_the_other(tmp_path):
    survivor, victim = start(tmp_path, 0, "--rounds", "0"), start(tmp_path, 1, "--rounds", "0")
    try:
        wait_for(lambda: (tmp_path / "w1-2.pt").exists() and (tmp_path / "w0-2.pt").exists(), timeout=120,
                 what="two outer steps together")
        victim.send_signal(signal.SIGKILL)  # rounds are back to back: one is in flight now
        killed_at = time.time()
        victim.wait()
        reached = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("w0-*.pt"))[-1]
        wait_for(lambda: (tmp_path / f"w0-{reached + 3}.pt").exists(), timeout=90,
                 what="the survivor's next outer steps")
        # It waited at most about one averaging timeout for the dead peer, then went on alone.
        took = saved(tmp_path, 0, reached + 3)["time"] - killed_at
        assert took < 60, took
        assert survivor.poll() is None, logs(tmp_path)
    finally:
        for w in (survivor, victim):
            Processes.kill_group(w)  # the worker and its hivemind helpers
            w.wait()


def test_a_member_whose_model_went_non_finite_once_recovers(tmp_path):
    """Its guard refuses to send the bad pseudo-gradient once; it restarts from the global parameters with fresh
    AdamW moments (the old ones are as bad as the model was), and sends again from the next round on."""
    workers = [start(tmp_path, 0, "--rounds", "5"), start(tmp_path, 1, "--rounds", "5", "--poison", "nan-once")]
    try:
        wait_for(lambda: (tmp_path / "w1-5.pt").exists(), timeout=240, what="the recovering member's 5 outer steps")
        last = saved(tmp_path, 1, 5)
        assert last["refused_out"] == 1, logs(tmp_path)  # once, not at every round after
        assert all(torch.isfinite(p).all() for p in last["params"]) and math.isfinite(last["loss"]), logs(tmp_path)
    finally:
        for w in workers:
            Processes.kill_group(w)
            w.wait()


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_a_poisoning_member_does_not_wreck_the_honest_one(tmp_path, poison):
    """A member sends NaNs or a huge pseudo-gradient into every all-reduce: the honest member catches it or refuses
    the averaged update, and keeps learning with finite parameters."""
    honest, hostile = start(tmp_path, 0, "--rounds", "4"), start(tmp_path, 1, "--rounds", "0", "--poison", poison)
    try:
        wait_for(lambda: (tmp_path / "w0-4.pt").exists(), timeout=180, what="the honest member's 4 outer steps")
        first, last = saved(tmp_path, 0, 1), saved(tmp_path, 0, 4)
        assert all(torch.isfinite(p).all() and p.abs().max() < 100 for p in last["params"]), logs(tmp_path)
        # it averaged with the poisoner: its reducer caught the poisoned slices (robust.py) and it stopped averaging
        # with it, or the poisoned average reached it and its guard refused it
        assert last["flagged"] or last["refused_in"] >= 1, logs(tmp_path)
        assert math.isfinite(last["loss"]) and last["loss"] < first["loss"], (first["loss"], last["loss"])
    finally:
        for w in (honest, hostile):
            Processes.kill_group(w)
            w.wait()


def test_a_state_download_from_the_rounds_consensus_skips_a_member_that_declares_itself_newest():
    """A member out of sync downloads from the members that agree on its round (agreement.to_follow), not from
    whoever declares the highest priority in the DHT, as hivemind would (a poisoner can declare anything); the
    keeper and newcomers compare what the newest members say they hold and download the state most of them hold,
    skipping a member that serves another state than it said (consensus.py)."""
    import json

    out = subprocess.run([sys.executable, "-m", "tests.integration.state_sources"], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"any": "newest", "consensus": "honest-a", "nobody": None,
                   "declared": ["newest", "honest-a", "honest-b"], "answered": ["honest-a", "honest-b", "newest"],
                   "keeper": "honest-a", "after_exclude": "honest-a"}, (got, out.stderr[-4000:])
    assert "served another state than the one it declared" in out.stderr, out.stderr[-4000:]
    # hivemind logs each member a download skips ("Failed to download state from ..."); a skip by design is no news
    assert "Failed to download state" not in out.stderr, out.stderr[-4000:]
