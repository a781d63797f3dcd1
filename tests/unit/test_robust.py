"""The robust outer all-reduce's arithmetic (hivefold/averaging/robust.py): what a hostile member gets through."""

import asyncio
import math

import pytest
import torch

from hivefold.averaging.robust import RANGE_FACTOR, RobustReducer, check_returned, robust_combine

N = 4096


def honest(seed: int, common: torch.Tensor, noise: float = 1.0) -> torch.Tensor:
    """A member's slice: the swarm's common direction plus its own data's part (cosine ~0.5 between members)."""
    return common + noise * torch.randn(N, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def common():
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


def mean(slices):
    return torch.stack(slices).mean(0)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_honest_members_are_neither_flagged_nor_moved_far_from_their_mean(common):
    slices = [honest(i, common) for i in (1, 2, 3)]
    result, flags = robust_combine([(i, s, 8.0) for i, s in enumerate(slices)], own_index=0)
    assert flags == []
    assert rel(result, mean(slices)) < 0.1  # clipping at twice the median distance barely touches honest slices


@pytest.mark.parametrize("attack", ["flip", "huge", "nan", "noise"])
def test_one_hostile_sender_among_three_is_flagged_and_left_out(common, attack):
    a, b = honest(1, common), honest(2, common)
    bad = {"flip": -16.0 * honest(3, common), "huge": 1e6 * honest(3, common),
           "nan": torch.full((N,), float("nan")), "noise": 20.0 * torch.randn(N)}[attack]
    result, flags = robust_combine([(0, a, 8.0), (1, b, 8.0), (2, bad, 8.0)], own_index=0)
    assert [s for s, _ in flags] == [2], flags
    assert torch.isfinite(result).all() and rel(result, mean([a, b])) < 0.2
    if attack != "nan":  # what hivemind's plain mean would have applied instead
        assert rel(mean([a, b, bad]), mean([a, b])) > 1.0


def test_an_inflated_weight_is_capped(common):
    a, b, c = honest(1, common), honest(2, common), 1.5 * honest(3, common)
    result, flags = robust_combine([(0, a, 8.0), (1, b, 8.0), (2, c, 1e9)], own_index=0, max_weight=16.0)
    assert flags == []
    # uncapped, the result would be c itself; capped at 16 (twice a round's samples), c has half of it
    assert rel(result, c) > 0.2


def test_with_two_senders_the_reducers_own_slice_is_the_reference(common):
    own, other = honest(1, common), honest(2, common)
    result, flags = robust_combine([(0, own, 8.0), (1, other, 8.0)], own_index=0)
    assert flags == [] and torch.allclose(result, (own + other) / 2)
    for bad in (1e4 * other, torch.full((N,), float("inf"))):
        result, flags = robust_combine([(0, own, 8.0), (1, bad, 8.0)], own_index=0)
        assert [s for s, _ in flags] == [1] and torch.allclose(result, own)
    result, _ = robust_combine([(0, own, 8.0), (1, other, 8e6)], own_index=0, max_weight=32.0)  # capped at 32
    assert torch.allclose(result, (own + 4 * other) / 5, atol=1e-5)
    # this member trained a step since a reload (weight 1 against 30): the other's far larger slice is honest
    _, flags = robust_combine([(0, 1e-4 * own, 1.0), (1, other, 30.0)], own_index=0)
    assert flags == []


def test_an_honest_member_that_sent_nothing_this_round_is_not_flagged(common):
    slices = [(0, honest(1, common), 8.0), (1, honest(2, common), 8.0), (2, torch.zeros(N), 1e-6)]
    _, flags = robust_combine(slices, own_index=0)
    assert flags == []


def test_a_returned_average_must_be_finite_and_before_the_range_is_known_nothing_else_is_evidence(common):
    own, other = honest(1, common), honest(2, common)
    fair = (own + other) / 2
    assert "non-finite" in check_returned(torch.full((N,), float("nan")))
    # honest averages can point against this member's slice or dwarf it (it trained a few steps since a reload)
    for plausible in (fair, -fair, 1e4 * fair):
        assert check_returned(plausible) is None


@pytest.mark.parametrize("attack", ["flip", "huge", "noise", "edge"])
def test_once_the_range_is_known_whatever_a_robust_reducer_returns_passes_and_a_hostile_reducer_is_caught(common,
                                                                                                         attack):
    """The receiver's bound holds every average an honest reducer computes, whoever sent it what (here a hostile
    sender among three, or one just inside the reducer's range), and catches a reducer returning a huge part."""
    slices = [honest(i, common) for i in (1, 2, 3)]
    recent = float(mean(slices).norm())
    hostile = {"flip": -16 * slices[2], "huge": torch.full((N,), 1e6), "noise": 50 * torch.randn(N),
               "edge": slices[2] * (0.99 * RANGE_FACTOR * recent / float(slices[2].norm()))}[attack]
    for members in (slices[:1], slices[:2]):  # a group of two, and of three
        result, _ = robust_combine([(i, s, 8.0) for i, s in enumerate([*members, hostile])], own_index=0,
                                   recent_norm=recent)
        assert check_returned(result, recent) is None, attack
    assert "over 16x" in check_returned(torch.full((N,), 1e6), recent)
    assert check_returned(torch.full((N,), 1e6), 0.0) is None  # the receiver does not know the range yet


def test_a_plain_sign_flip_is_not_caught_but_its_pull_is_bounded(common):
    """A flip of an honest-sized update is indistinguishable from an honest member that disagrees; clipping keeps
    the result closer to the honest mean than hivemind's plain mean would be."""
    a, b, flip = honest(1, common), honest(2, common), -3.0 * honest(3, common)
    result, flags = robust_combine([(0, a, 8.0), (1, b, 8.0), (2, flip, 8.0)], own_index=0)
    assert flags == []
    assert rel(result, mean([a, b])) < rel(mean([a, b, flip]), mean([a, b]))


def test_the_reducer_combines_each_part_once_every_sender_sent_it(common):
    """The hivemind reducer's protocol (parts in order, senders concurrently), with a hostile third sender."""
    a, b, bad = honest(1, common), honest(2, common), -16 * honest(3, common)
    parts = [(x[: N // 2], x[N // 2:]) for x in (a, b, bad)]
    flags = []

    async def run():
        reducer = RobustReducer((torch.Size([N // 2]), torch.Size([N // 2])), 3, own_index=0,
                                on_flag=lambda i, why: flags.append(i))

        async def send(sender):
            return [await reducer.accumulate_part(sender, k, parts[sender][k], weight=8.0) for k in (0, 1)]
        return await asyncio.gather(*(send(s) for s in (2, 0, 1)))

    results = asyncio.run(run())
    for got in results:  # every sender gets the same robust average back
        assert rel(torch.cat(got), mean([a, b])) < 0.2
    assert flags == [2, 2]  # flagged in both parts
    assert math.isclose(float(torch.cat(results[0]).norm()), float(torch.cat(results[1]).norm()))


def test_the_swarms_recent_range_bounds_every_slice_even_in_a_group_of_two(common):
    """No majority between two members, but a flipped update scaled 16x is far beyond the updates the swarm averaged
    lately; an honest one, even twice as large as usual, is not."""
    own, other = honest(1, common), honest(2, common)
    recent = float(((own + other) / 2).norm())
    _, flags = robust_combine([(0, own, 8.0), (1, -16 * other, 8.0)], own_index=0, recent_norm=recent)
    assert [s for s, _ in flags] == [1] and "recent updates" in flags[0][1]
    _, flags = robust_combine([(0, own, 8.0), (1, 2 * other, 8.0)], own_index=0, recent_norm=recent)
    assert flags == []
    _, flags = robust_combine([(0, own, 8.0), (1, -16 * other, 8.0)], own_index=0)  # no history yet: no bound
    assert flags == []


def test_members_that_add_nothing_this_round_do_not_make_an_honest_one_the_outlier(common):
    """Two members just reloaded the state (weight ~0, slices ~0): the one that trained a whole round is not
    flagged, and its update is what the part averages to."""
    full = honest(1, common)
    slices = [(0, 1e-4 * honest(2, common), 1e-6), (1, full, 8.0), (2, torch.zeros(N), 1e-6)]
    result, flags = robust_combine(slices, own_index=0)
    assert flags == [] and rel(result, full) < 1e-3


def test_a_member_that_trained_a_whole_round_beside_two_newcomers_is_not_the_outlier(common):
    """Found by the chaos run (a peer killed and one started afresh joined the same round): the two newcomers
    trained a few steps (1/32 of the round, updates 1/20 as large), so the center lies by them, and the one
    member that trained the whole round was banned as a poisoner. An update may grow linearly with its weight."""
    full = honest(1, common)
    slices = [(0, 0.05 * honest(2, common), 0.25), (1, full, 8.0), (2, 0.05 * honest(3, common), 0.25)]
    result, flags = robust_combine(slices, own_index=0, max_weight=16.0)
    assert flags == []
    weighted = (0.25 * slices[0][1] + 8.0 * full + 0.25 * slices[2][1]) / 8.5
    assert rel(result, weighted) < 0.1  # nor is its update clipped away
    # the same weights, but its update flipped and 16x larger than its weight allows: still caught
    slices[1] = (1, -32 * 16 * full, 8.0)
    _, flags = robust_combine(slices, own_index=0, max_weight=16.0)
    assert [s for s, _ in flags] == [1], flags


def test_a_smaller_update_than_the_others_is_never_the_outlier(common):
    """A newcomer's few steps beside two members whose updates agree closely (early training): it lies far from
    their center, yet an update smaller than the others' can only slow the swarm down."""
    a, b = honest(1, common, noise=0.05), honest(2, common, noise=0.05)
    small = 0.3 * honest(3, common)
    result, flags = robust_combine([(0, a, 8.0), (1, b, 8.0), (2, small, 1.0)], own_index=0)
    assert flags == [] and rel(result, mean([a, b])) < 0.2


def test_claiming_the_largest_weight_buys_a_poisoner_little(common):
    """The allowance grows with the claimed weight, which is capped at max_weight: a scaled flip is still caught."""
    a, b = honest(1, common), honest(2, common)
    _, flags = robust_combine([(0, a, 8.0), (1, b, 8.0), (2, -64 * honest(3, common), 1e9)], own_index=0,
                              max_weight=16.0)
    assert [s for s, _ in flags] == [2], flags


def test_members_sending_almost_nothing_do_not_make_an_honest_update_the_outlier(common):
    """Found by the poisoning test: an idle poisoner sends zeros (claiming a full round) and the other honest member
    has converged (its update ~0): the one member still learning lay 700x further from their center than they did,
    and both reported it. Once the swarm's recent range is known, it sets the least spread the test assumes."""
    live = honest(1, common)
    slices = [(0, 1e-4 * honest(2, common), 8.0), (1, live, 8.0), (2, torch.zeros(N), 8.0)]
    recent = float(live.norm())  # a part that is the whole vector: share 1
    result, flags = robust_combine(slices, own_index=0, recent_norm=recent)
    assert flags == []
    _, flags = robust_combine(slices, own_index=0)  # the first rounds, no range known yet: it is flagged
    assert [s for s, _ in flags] == [1]
    # a scaled flip beside the same two is still caught, and so is one in a part a quarter of the vector
    slices[1] = (1, -16 * live, 8.0)
    _, flags = robust_combine(slices, own_index=0, recent_norm=recent)
    assert [s for s, _ in flags] == [1], flags
    _, flags = robust_combine(slices, own_index=0, recent_norm=2 * recent, share=0.25)
    assert [s for s, _ in flags] == [1], flags


def test_from_the_first_round_a_slice_or_average_over_the_ceiling_is_caught(common):
    """Before the recent range is known (the first rounds, a member that just reloaded), the ceiling on any honest
    update still catches a huge slice in a group of two and a reducer returning a huge average."""
    own, other = honest(1, common), honest(2, common)
    ceiling = 100 * float(own.norm())
    _, flags = robust_combine([(0, own, 8.0), (1, torch.full((N,), 1e6), 8.0)], own_index=0, ceiling=ceiling)
    assert [s for s, _ in flags] == [1] and "most an honest member sends" in flags[0][1]
    result, flags = robust_combine([(0, own, 1e-6), (1, 50 * other, 8.0)], own_index=0, ceiling=ceiling)
    assert flags == []  # honest: this member just reloaded, the other trained a whole round
    assert check_returned(result, 0.0, ceiling) is None
    assert "most an honest member sends" in check_returned(torch.full((N,), 1e6), 0.0, ceiling)
