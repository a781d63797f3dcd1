"""Proof of training (hivefold/proof.py): an honest record replays; fabricated losses, a state that did not
train, a proof for another segment and hostile bytes are all refused."""

import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch

from hivefold.model import build_model
from hivefold.proof import ShardRecorder, check_proof, digest, proof_max_bytes, segment_bounds
from hivefold.spec import AveragingConfig, OptimizerConfig
from hivefold.training import autocast, inner_optimizer
from tests.unit.test_spec import make_spec

SEGMENTS, MB = 4, 4


def spec_for(mode="diloco"):
    return make_spec(micro_batch=MB, seq_len=16, optimizer=OptimizerConfig(lr=3e-3),
                     averaging=dataclasses.replace(AveragingConfig(), mode=mode))


def honest(spec, sequences, *, train=True, mb=MB, changes=(), hook=True, device="cpu", bf16=None):
    """Train like the peer's trainer does (diloco: one inner AdamW step per micro-batch of ``mb``), recording the
    proof; ``train=False``: a cheater's forward passes, recorded the same way. ``changes``: where the swarm
    replaces the parameters (a change at ``c`` lands after micro-batch ``c - 1``'s step, as an outer step does)."""
    torch.manual_seed(0)
    model = build_model(spec.model, spec.seed).to(device)
    params = list(model.parameters())
    opt = inner_optimizer(spec, model) if spec.averaging.mode == "diloco" else None  # fused on CUDA, as a peer's
    n = -(-len(sequences) // mb)
    rec = ShardRecorder(n, SEGMENTS, mb)
    losses = []
    for i in range(n):
        rec.before_batch(i, params, opt, changed=i in changes)
        block = torch.from_numpy(sequences[i * mb:(i + 1) * mb].astype(np.int64)).to(device)
        with autocast(device, bf16):  # bf16 on CUDA, as the peer's trainer
            _, loss = model(block[:, :-1], block[:, 1:])
        losses.append((float(loss.detach()), 0))
        if opt is not None:
            for g in opt.param_groups:
                g["lr"] = spec.optimizer.lr * (0.5 + 0.5 * i / n)  # varies: the replay must follow it
            rec.record_lr(opt)
        if opt is not None and train:
            (loss * len(block)).backward()
            torch._foreach_div_([p.grad for p in params], float(len(block)))
            torch.nn.utils.clip_grad_norm_(params, spec.optimizer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i + 1 in changes:
            if hook:  # what DiLoCo's before_change does
                rec.before_change(params)
            with torch.no_grad():
                for p in params:
                    p.mul_(0.9).add_(0.01)
    rec.finish(params)
    rec.digests(list(changes))
    return rec, losses


@pytest.fixture(scope="module")
def shard():
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, size=(32, 17), dtype=np.uint16)  # 8 micro-batches of 4


def check(spec, rec_or_bytes, losses, shard, segment, digests=None, state_changes=(), model=None, **kw):
    if isinstance(rec_or_bytes, bytes):
        data = rec_or_bytes
    else:
        digests = digests or rec_or_bytes.digests(list(state_changes))
        data = rec_or_bytes.proof(segment)
    digests = digests if digests is not None else [b"\0" * 32] * (3 * SEGMENTS)
    return check_proof(data, spec=spec, model=model or build_model(spec.model, 1), sequences=shard, losses=losses,
                       digests=digests, state_changes=list(state_changes), segments=SEGMENTS, segment=segment,
                       tolerance=1e-3, **kw)


def test_segments_cover_the_shard_without_gaps():
    assert segment_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert segment_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]
    bounds = segment_bounds(17, 4)
    assert bounds[0][0] == 0 and bounds[-1][1] == 17
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert proof_max_bytes(1000) > 16 * 1000


@pytest.mark.parametrize("segment", [1, 2, 3, 4])
def test_an_honest_diloco_record_replays_and_its_update_is_scored(shard, segment):
    spec = spec_for()
    rec, losses = honest(spec, shard)
    result = check(spec, rec, losses, shard, segment, held_out=shard[:8])
    assert result.valid, result.detail
    assert result.batches == 2 and "end state matches" in result.detail
    assert np.isfinite(result.score)  # held-out loss before the segment minus after


def test_a_peer_at_a_larger_micro_batch_than_the_runs_replays_at_its_own(shard, monkeypatch):
    """Found on an H200: peers pick their micro-batch (256 there, the run's 16), and every check of an honest GPU
    peer failed ("micro-batch 256 does not fit"), which banned both. Then replayed in smaller chunks, 32-step
    segments drifted 35-60 % from the peers' end states. The keeper replays the peer's micro-batch whole (exactly,
    same arithmetic), or in chunks past ``REPLAY_MAX_TOKENS`` (close)."""
    import hivefold.proof as proof

    spec = spec_for()
    rec, losses = honest(spec, shard, mb=4 * MB)  # 2 micro-batches of 16 in the shard: segments of one each
    assert len(losses) == 2
    for segment in (1, 2):
        result = check(spec, rec, losses, shard, segment)
        assert result.valid and result.loss_error == 0 and result.end_error == 0, result
    monkeypatch.setattr(proof, "REPLAY_MAX_TOKENS", MB * spec.seq_len)  # chunks of the run's micro-batch
    for segment in (1, 2):
        result = check(spec, rec, losses, shard, segment)
        assert result.valid and result.loss_error < 1e-5 and result.end_error < 1e-3, result
    rec, losses = honest(spec, shard, mb=4 * MB, train=False)  # and a cheater at that size is still caught
    assert not check(spec, rec, losses, shard, 1).valid


def test_fabricated_losses_are_caught(shard):
    spec = spec_for()
    rec, losses = honest(spec, shard)
    forged = [(loss * 0.97, e) for loss, e in losses]  # plausible numbers, 3 % off
    result = check(spec, rec, forged, shard, 2)
    assert not result.valid and "reported loss" in result.detail


def test_a_peer_that_only_ran_forward_passes_is_caught(shard):
    """A third of the work: forward passes at one state, losses within 0.1 % of an honest peer's. Its committed
    states never move, and a segment trained only once challenged does not end at the committed state."""
    spec = spec_for()
    _, honest_losses = honest(spec, shard)
    lazy, losses = honest(spec, shard, train=False)
    assert max(abs(a - b) / a for (a, _), (b, _) in zip(losses, honest_losses, strict=True)) < 2e-3
    result = check(spec, lazy, losses, shard, 2)
    assert not result.valid and "from the peer's end state" in result.detail
    trained_when_asked, _ = honest(spec, shard)  # real end states, but not the ones committed to before
    result = check(spec, trained_when_asked.proof(2), losses, shard, 2, digests=lazy.digests([]))
    assert not result.valid and "committed" in result.detail


def test_a_proof_for_another_segment_or_shard_is_refused(shard):
    spec = spec_for()
    rec, losses = honest(spec, shard)
    assert not check(spec, rec.proof(1), losses, shard, 2).valid
    other = np.roll(shard, 1, axis=0)
    assert not check(spec, rec, losses, other, 2).valid


@pytest.mark.parametrize("mode", ["diloco", "sync"])
@pytest.mark.parametrize("change", [3, 4, 8])
def test_where_the_swarm_replaced_the_parameters_the_segment_is_cut_and_both_parts_replay(shard, mode, change):
    """An outer step landing inside segment 2 = micro-batches [2, 4), at its end, or after the shard's last step:
    the part before ends at the parameters training left, the part after starts from the swarm's. Before, such
    a segment could not be replayed and an honest result checked there earned nothing."""
    spec = spec_for(mode)
    rec, losses = honest(spec, shard, changes=[change])
    segments = 5 if change == 3 else 4
    assert len(rec.digests([change])) == 3 * segments
    for segment in range(1, segments + 1):
        result = check(spec, rec, losses, shard, segment, state_changes=[change])
        assert result.valid, (segment, result.detail)
    if mode == "diloco":  # without the parameters from just before the change, the part before cannot end right
        missed, losses = honest(spec, shard, changes=[change], hook=False)
        before = next(k + 1 for k, (_, end) in enumerate(missed.bounds) if end == min(change, 8))
        result = check(spec, missed, losses, shard, before, state_changes=[change])
        assert not result.valid and "from the peer's end state" in result.detail


def test_learning_rates_and_moments_must_be_ones_training_could_have(shard):
    """A forward-only cheater could otherwise commit to a zero learning rate (or huge second moments) so that
    the replay never moves: both are refused, and so is an end state equal to the start."""
    spec = spec_for()
    lazy, losses = honest(spec, shard, train=False)
    lazy.lrs = [0.0] * len(lazy.lrs)
    result = check(spec, lazy, losses, shard, 2)
    assert not result.valid and "outside the schedule" in result.detail
    lazy, losses = honest(spec, shard, train=False)
    params, moments = lazy.states[2]  # segment 2 starts at micro-batch 2
    huge = [[st, m1, torch.full_like(m2, 1e30)] for st, m1, m2 in moments]
    lazy.states[2] = (params, huge)
    lazy._digests[2] = (lazy._digests[2][0], digest([t for row in huge for t in row]))
    result = check(spec, lazy, losses, shard, 2)
    assert not result.valid and "exceed what gradients" in result.detail


def test_a_replay_that_fails_mid_step_leaves_no_gradients_behind(shard, monkeypatch):
    """The keeper reuses one scratch model: a replay that raises after a backward pass must not leak gradients
    into the next peer's replay."""
    spec = spec_for()
    rec, losses = honest(spec, shard)
    model = build_model(spec.model, 1)

    def broken(self, closure=None):
        raise RuntimeError("optimizer failed")

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", broken)
        with pytest.raises(RuntimeError, match="optimizer failed"):
            check(spec, rec, losses, shard, 2, model=model)
    assert all(p.grad is None for p in model.parameters())
    assert check(spec, rec, losses, shard, 2, model=model).valid


def test_sync_mode_replays_forward_passes(shard):
    spec = spec_for("sync")
    rec, losses = honest(spec, shard)
    assert check(spec, rec, losses, shard, 3).valid
    assert not check(spec, rec, [(x + 0.05, e) for x, e in losses], shard, 3).valid


def test_hostile_bytes_are_refused_without_unpickling(shard, tmp_path):
    spec = spec_for()
    _, losses = honest(spec, shard)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for data in (b"", b"not a proof", pickle.dumps(Evil())):
        result = check(spec, data, losses, shard, 1)
        assert not result.valid and "unreadable proof" in result.detail
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save({"segment": 1, "params": [torch.zeros(3)]}, buf)
    result = check(spec, buf.getvalue(), losses, shard, 1)
    assert not result.valid and "shapes" in result.detail


def test_the_learning_rates_a_replay_allows_are_the_schedules_extremes_over_the_steps_a_peer_can_be_at():
    """Found profiling the keeper: it evaluated the schedule at every step a peer could be at (four rounds' worth,
    four million for a long round) for each check; the extremes sit at the ends of the range or the peak."""
    import random

    from hivefold.proof import _lr_range
    from hivefold.training import lr_lambda
    from tests.unit.test_spec import make_spec

    base, rng = make_spec(), random.Random(0)
    for _ in range(200):
        opt = OptimizerConfig(lr=rng.choice([1e-3, 3e-3]), warmup_steps=rng.randint(0, 300),
                              decay_steps=rng.randint(1, 3000), min_lr_ratio=rng.random())
        spec = dataclasses.replace(base, optimizer=opt, averaging=AveragingConfig(mode="diloco",
                                                                                  inner_steps=rng.randint(1, 200)))
        epoch, h = rng.randint(0, 40), spec.averaging.inner_steps
        rates = [opt.lr * lr_lambda(s, cfg=opt) for s in range(max(0, epoch - 1) * h, (epoch + 3) * h + 1)]
        assert _lr_range(spec, epoch) == pytest.approx((min(rates), max(rates)), rel=1e-12, abs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays on CUDA run on a GPU machine only")
def test_a_segment_a_gpu_trained_in_bf16_replays_on_a_gpu_and_a_cheater_is_still_caught(shard):
    """Found on an H200: the keeper replayed GPU peers' segments on its CPU, in fp32, 19-26 s per micro-batch that
    the GPU trained in 0.1-0.2 s, and the first steps from fresh moments did not replay closely enough. A keeper
    with a GPU replays there, in bf16 autocast as the peer trained."""
    spec = spec_for()
    rec, losses = honest(spec, shard, device="cuda", changes=[3])
    model = build_model(spec.model, 1).to("cuda")
    for segment in range(1, len(rec.bounds) + 1):
        result = check(spec, rec, losses, shard, segment, state_changes=[3], model=model, device="cuda",
                       held_out=shard[:8])
        assert result.valid, (segment, result.detail)
        assert result.end_error < 0.02, result  # the 2 % tolerance's end check allows 8 %
    lazy, losses = honest(spec, shard, device="cuda", train=False)
    result = check(spec, lazy, losses, shard, 2, model=model, device="cuda")
    assert not result.valid and "from the peer's end state" in result.detail


def test_a_keeper_without_a_gpu_replays_a_bf16_segment_in_bf16(monkeypatch):
    """The keeper replays a GPU peer's proof in bf16 even on its CPU (coordinator.verifier.replay_device): here a
    segment trained in the CPU's bf16 stands in for it. Replayed in bf16 it matches exactly; in fp32 the losses
    and the end state drift by more than a tight tolerance allows."""
    from coordinator.verifier import replay_device

    assert replay_device("cpu") == ("cpu", False) and replay_device("")[1] is False
    assert replay_device("cuda") == ("cuda" if torch.cuda.is_available() else "cpu", True)
    rng = np.random.default_rng(1)
    sequences = rng.integers(0, 200, size=(64, 17), dtype=np.uint16)
    spec = spec_for()
    rec, losses = honest(spec, sequences, bf16=True, mb=2 * MB)  # a GPU peer's micro-batch is its own
    for segment in range(1, len(rec.bounds) + 1):
        result = check(spec, rec, losses, sequences, segment, bf16=True)
        assert result.valid and result.loss_error == 0 and result.end_error == 0, (segment, result)
    drift = [check(spec, rec, losses, sequences, segment, bf16=False) for segment in range(1, len(rec.bounds) + 1)]
    assert max(max(r.loss_error, r.end_error) for r in drift) > 1e-3, drift
    import hivefold.proof as proof

    monkeypatch.setattr(proof, "REPLAY_MAX_TOKENS", MB * spec.seq_len)  # split as an older keeper did: not exact
    split = [check(spec, rec, losses, sequences, segment, bf16=True) for segment in range(1, len(rec.bounds) + 1)]
    assert max(max(r.loss_error, r.end_error) for r in split) > 0, split


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays of a GPU's training run on a GPU machine only")
def test_a_segment_a_gpu_trained_in_bf16_replays_on_a_cpu_in_bf16(shard):
    """What a keeper without a GPU sees of a GPU peer's work: every honest segment, replayed in the CPU's bf16,
    passes the default tolerance (2 %: losses within 2 %, the end state within 8 % of the segment's move)."""
    spec = spec_for()
    rec, losses = honest(spec, shard, device="cuda", changes=[3])
    for segment in range(1, len(rec.bounds) + 1):
        result = check_proof(rec.proof(segment), spec=spec, model=build_model(spec.model, 1), sequences=shard,
                             losses=losses, digests=rec.digests([3]), state_changes=[3], segments=SEGMENTS,
                             segment=segment, tolerance=0.02, device="cpu", bf16=True)
        print(f"segment {segment}: loss error {result.loss_error:.2e}, end error {result.end_error:.2e}")
        assert result.valid, (segment, result.detail)
