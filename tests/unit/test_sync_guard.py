"""sync's guarded averagers (hivefold/averaging/sync_members.py): the gradient ceiling holds for every honest member,
gradients are combined without flagging honest noise, and a downloaded state is checked before it is installed."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import dump_optimizer_state
from hivemind.utils.nested import nested_pack

from hivefold.averaging.robust import robust_combine
from hivefold.averaging.sync_members import (
    CLIP_MARGIN,
    NOT_EVIDENCE,
    GuardedGradientAverager,
    refused_state,
    vetted_optimizer_state,
)

CLIP = 1.0


def clipped(seed: int, n: int = 1000) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 5
    return g * (CLIP / g.norm())  # what clip_grad_norm_ leaves: norm at the clip


def accumulate(cls, batches: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The tensor ``cls``'s accumulation puts into the averager for these (micro-batch size, mean gradient)s."""
    param = torch.nn.Parameter(torch.zeros(batches[0][1].shape))
    out = torch.zeros_like(param)
    avg = SimpleNamespace(reuse_grad_buffers=False, warn=False, local_samples_accumulated=0, local_times_accumulated=0,
                          _anchor_batch_size=None, _accumulators_used_in_step=False, acc=torch.zeros_like(param))
    avg._grads_from_parameters = lambda: iter([param.grad])
    avg._grad_accumulators = lambda: iter([avg.acc])
    avg.get_tensors = lambda: contextlib.nullcontext([out])
    for size, grad in batches:
        param.grad = grad.clone()
        cls.accumulate_grads_(avg, size)
    cls.load_accumulators_into_averager_(avg)
    return out


def test_the_accumulated_gradient_is_the_sample_weighted_mean_and_stays_within_the_clip():
    batches = [(2, clipped(1)), (16, clipped(2)), (14, clipped(3))]  # a shard's short last micro-batch came first
    guarded = accumulate(GuardedGradientAverager, batches)
    assert torch.allclose(guarded, (2 * clipped(1) + 16 * clipped(2) + 14 * clipped(3)) / 32, atol=1e-6)
    assert guarded.norm() <= CLIP * 1.0001
    # hivemind's own scales each by its size over the first one's, then divides by the count: over 3x the clip
    # here (for the same gradient three times, 5.7x), which an honest member would then be flagged for
    assert accumulate(GradientAverager, batches).norm() > 3 * CLIP
    assert accumulate(GradientAverager, [(2, clipped(1)), (16, clipped(1)), (16, clipped(1))]).norm() > 5 * CLIP


def test_gradients_over_the_ceiling_or_non_finite_are_flagged_and_honest_noise_is_not():
    ceiling = CLIP * CLIP_MARGIN
    honest = [(0, clipped(1), 16.0), (1, clipped(2), 1.0)]  # a member with one sample: noisy, but within the clip
    for attack, flagged in ((clipped(3) * -16, True), (torch.full((1000,), float("nan")), True),
                            (-clipped(1), False), (clipped(9), False)):
        result, flags = robust_combine([*honest, (2, attack, 16.0)], own_index=0, ceiling=ceiling, outliers=False)
        assert [s for s, _ in flags] == ([2] if flagged else []), flags
        assert torch.isfinite(result).all() and result.norm() <= ceiling
    # within the ceiling nothing is evidence, but three members' centered clipping bounds a flipped pull
    many = [(i, clipped(1) + 0.1 * clipped(10 + i), 16.0) for i in range(3)]
    result, flags = robust_combine([*many, (3, -clipped(1), 16.0)], own_index=0, ceiling=ceiling, outliers=False)
    plain = torch.stack([t for _, t, _ in many] + [-clipped(1)]).mean(0)
    assert not flags and (result - clipped(1)).norm() < 0.5 * (plain - clipped(1)).norm()


@pytest.mark.parametrize(("metadata", "tensors", "why"), [
    ({"epoch": 5}, [torch.ones(3), torch.ones(2)], None),
    ({"epoch": 3}, [torch.ones(3), torch.ones(2)], "behind"),
    ({}, [torch.ones(3), torch.ones(2)], "missing"),
    ({"epoch": 5}, [torch.ones(3)], "shapes"),
    ({"epoch": 5}, [torch.ones(4), torch.ones(2)], "shapes"),
    ({"epoch": 5}, [torch.ones(3), torch.tensor([1.0, float("inf")])], "non-finite"),
    ({"epoch": 5}, [torch.ones(3) * 100, torch.ones(2)], "norm"),
])
def test_a_downloaded_state_is_refused_unless_finite_of_the_models_shapes_near_in_size_and_not_older(
        metadata, tensors, why):
    got = refused_state(metadata, tensors, [torch.ones(3), torch.ones(2)], epoch=4)
    assert (got is None) if why is None else (why in got), got
    # only what no honest member serves gets its server reported: not a state behind, nor one cut short (a dropped
    # connection ends hivemind's stream as if whole)
    assert (got in NOT_EVIDENCE) == (why in ("behind", "missing", "shapes")), got


def adamw(maximize: bool = False) -> torch.optim.AdamW:
    """An AdamW over a small model, one clipped step taken (its moments exist)."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, maximize=maximize)
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return opt


def test_a_served_optimizer_state_keeps_this_members_hyperparameters_and_honest_moments_only():
    mine, served = adamw(), adamw(maximize=True)  # a poisoner serving maximize=True would turn descent into ascent
    served.param_groups[0]["weight_decay"] = 1e4
    metadata, tensors = dump_optimizer_state(served)
    vetted, why = vetted_optimizer_state(mine, metadata, tensors, CLIP * CLIP_MARGIN)
    assert why is None
    def group(meta) -> dict:
        flat = [tensors[m["index"]] if m["type"] == "tensor" else m["value"] for m in meta]
        return nested_pack(flat, structure=mine.state_dict())["param_groups"][0]

    assert group(metadata)["maximize"] is True and group(metadata)["weight_decay"] == 1e4  # what was served
    assert group(vetted)["maximize"] is False and group(vetted)["weight_decay"] == 0.1  # what is installed

    def refused(change) -> str:
        meta, flat = dump_optimizer_state(adamw())
        meta, flat = change(meta, [t.clone() for t in flat])
        return vetted_optimizer_state(mine, meta, flat, CLIP * CLIP_MARGIN)[1]

    def moment(name, value):
        def change(meta, flat):
            index = next(i for i, t in enumerate(flat) if t.shape == (3, 4))  # exp_avg, then exp_avg_sq
            flat[index + (name == "exp_avg_sq")].fill_(value)
            return meta, flat
        return change

    assert "first moments" in refused(moment("exp_avg", 1e30))
    assert "second moments" in refused(moment("exp_avg_sq", -1.0))
    assert "second moments" in refused(moment("exp_avg_sq", 1e6))
    assert "layout" in refused(lambda meta, flat: (meta[:-1], flat))
    assert "shapes" in refused(lambda meta, flat: (meta, [t.reshape(-1) for t in flat]))
