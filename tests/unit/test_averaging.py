"""DiLoCo's pieces that need no swarm: the outer Nesterov step, the wire codecs, the spec's settings."""

import concurrent.futures
import dataclasses
import time
import types

import numpy as np
import pytest
import torch

from hivefold.averaging.outer import compression, nesterov_outer_step
from hivefold.spec import AveragingConfig, RunSpec
from tests.unit.test_spec import make_spec

INT8_RELATIVE_ERROR = 0.02  # ||x - int8(x)|| / ||x|| for a pseudo-gradient-like tensor (see the test)
INT4_RELATIVE_ERROR = 0.11  # the same for int4 (NF4 levels in blocks of 64: 0.093 measured)


def test_outer_step_matches_a_hand_computed_nesterov_update():
    p, m = [torch.tensor([1.0, -2.0])], [torch.zeros(2)]
    g = [torch.tensor([0.5, 0.25])]
    nesterov_outer_step(p, m, g, lr=0.7, mu=0.9)
    # buf = 0.9 * 0 + g = (0.5, 0.25); p -= 0.7 * (g + 0.9 * buf) = 0.7 * 1.9 * g
    assert torch.allclose(m[0], torch.tensor([0.5, 0.25]))
    assert torch.allclose(p[0], torch.tensor([1.0 - 0.665, -2.0 - 0.3325]))
    nesterov_outer_step(p, m, g, lr=0.7, mu=0.9)
    # buf = 0.9 * (0.5, 0.25) + g = (0.95, 0.475); p -= 0.7 * (g + 0.9 * buf)
    assert torch.allclose(m[0], torch.tensor([0.95, 0.475]))
    assert torch.allclose(p[0], torch.tensor([0.335 - 0.7 * (0.5 + 0.855), -2.3325 - 0.7 * (0.25 + 0.4275)]))


def test_outer_step_equals_torch_sgd_with_nesterov():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    ours, buf = [start.clone()], [torch.zeros(5, 3)]
    ref = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(4):
        g = torch.randn(5, 3, generator=gen)
        nesterov_outer_step(ours, buf, [g], lr=0.7, mu=0.9)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(ours[0], ref.detach(), atol=1e-6)


@pytest.mark.parametrize("name,bound", [("fp32", 0.0), ("fp16", 1e-3), ("int8", INT8_RELATIVE_ERROR),
                                        ("int4", INT4_RELATIVE_ERROR)])
def test_codec_round_trip_error_is_bounded(name, bound):
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(4096, generator=gen) * 1e-3  # a round's pseudo-gradient: small, roughly normal
    back = deserialize_torch_tensor(compression(name).compress(delta, CompressionInfo.from_tensor(delta)))
    error = ((back - delta).norm() / delta.norm()).item()
    assert error <= bound, error


def test_int4_halves_int8s_bytes_keeps_shapes_and_dtypes_and_refuses_a_malformed_buffer():
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    from hivefold.averaging.outer import WIRE_BYTES

    def wire(name, t):
        return compression(name).compress(t, CompressionInfo.from_tensor(t))

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(64 * 1000, generator=gen) * 1e-3
    assert len(wire("int4", delta).buffer) == delta.numel() * WIRE_BYTES["int4"]  # 4 bits + a 16-bit scale per 64
    assert len(wire("int4", delta).buffer) < 0.54 * len(wire("int8", delta).buffer)
    # a block is scaled by its own largest value, so one layer's large values do not flatten another's
    mixed = torch.cat([delta[:640] * 1000, delta[640:1280]])
    back = deserialize_torch_tensor(wire("int4", mixed))
    small_error = ((back[640:] - mixed[640:]).norm() / mixed[640:].norm()).item()
    assert small_error < INT4_RELATIVE_ERROR
    empty = deserialize_torch_tensor(wire("int4", torch.zeros(0, 4)))  # a parameter of no values averages too
    assert empty.shape == (0, 4)
    for t in (torch.zeros(3, 5), torch.randn(7, 3, generator=gen).bfloat16(), torch.randn(65, generator=gen)):
        back = deserialize_torch_tensor(wire("int4", t))
        assert back.shape == t.shape and back.dtype == t.dtype
        assert torch.equal(back.abs().amax(), t.abs().amax().bfloat16().to(t.dtype))  # the extreme is exact
    assert torch.equal(deserialize_torch_tensor(wire("int4", torch.zeros(3, 5))), torch.zeros(3, 5))
    bad = wire("int4", delta)
    bad.buffer = bad.buffer[:-1]
    with pytest.raises(ValueError, match="do not hold"):
        deserialize_torch_tensor(bad)


def test_averaging_settings_are_validated_and_an_older_specs_hash_is_unchanged():
    spec = make_spec()
    assert spec.averaging.mode == "sync"
    assert '"mode"' not in spec.to_json()  # a spec written before these fields existed hashes as it did
    diloco = dataclasses.replace(spec, averaging=AveragingConfig(mode="diloco", inner_steps=30, compression="int8"))
    assert RunSpec.from_json(diloco.to_json()) == diloco and diloco.hash != spec.hash
    assert diloco.round_samples == 30 * spec.micro_batch
    for bad in (dict(mode="gossip"), dict(compression="int2"), dict(inner_steps=0), dict(outer_momentum=1.0)):
        with pytest.raises(ValueError):
            AveragingConfig(**bad)


class _OutlastedAverager:
    """hivemind's averager when the download outlasts its timeout: every member it tried was dead or frozen
    (it gives each one the whole timeout), or this process was suspended mid-download. Its future raises."""

    def load_state_from_peers(self, timeout=None, sources=None):
        raise concurrent.futures.TimeoutError()

    state_samples = load_state_from_peers  # asking members what they hold outlasts it too (consensus.py)
    dht, peer_id = types.SimpleNamespace(get=lambda *args, **kwargs: None), "me"


def test_a_state_download_that_outlasts_its_timeout_is_no_state_not_a_crash():
    """Found by benchmarks/chaos.py: a peer SIGSTOPped while DiLoCo reloaded the swarm's state died of the
    TimeoutError on SIGCONT (the same call runs when a peer joins, and in sync mode)."""
    from hivefold.averaging.consensus import StateDownloads
    from hivefold.averaging.diloco import DiLoCo
    from hivefold.averaging.guarded import Caught
    from hivefold.averaging.sync import SyncAveraging

    diloco = DiLoCo.__new__(DiLoCo)  # only the download path: no DHT, no averager process
    diloco._pending, diloco.trains, diloco.epoch, diloco._global_sample = None, True, 0, np.zeros(4, np.float32)
    diloco._downloads = StateDownloads(_OutlastedAverager(), "run", [], lambda: None)
    assert diloco.load_state_from_peers(timeout=1.0, accept_equal=True) is False
    sync = SyncAveraging.__new__(SyncAveraging)
    sync.opt = types.SimpleNamespace(local_epoch=3, state_averager=_OutlastedAverager(), take_flags=list,
                                     forward_exclusions=lambda: None)
    sync.caught = Caught()
    assert sync.load_state_from_peers(timeout=1.0) is False


def test_the_update_guard_refuses_non_finite_and_outsized_updates():
    from hivefold.averaging.guard import UpdateGuard

    guard = UpdateGuard(factor=10.0)
    ones = [torch.ones(3, 4), torch.ones(5)]  # norm sqrt(17)
    norm, why = guard.check_outgoing(ones)
    assert why is None and abs(norm - 17 ** 0.5) < 1e-6
    assert "non-finite" in guard.check_outgoing([torch.tensor([1.0, float("nan")])])[1]
    # before a few accepted updates, the bound is relative to this peer's own pseudo-gradient
    assert guard.check_incoming([t * 9 for t in ones], own_norm=norm) is None
    assert "over the bound" in guard.check_incoming([t * 11 for t in ones], own_norm=norm)
    assert "non-finite" in guard.check_incoming([torch.tensor([float("inf")])], own_norm=norm)
    for _ in range(3):
        guard.accept_own(norm)
    # then by the recent median: an honest update of the usual size passes, a 20x one does not
    assert guard.check_outgoing([t * 2 for t in ones])[1] is None
    assert "over 10x the recent outer updates" in guard.check_outgoing([t * 20 for t in ones])[1]
    assert (guard.refused_out, guard.refused_in) == (2, 2)
    # a downloaded outer state: a trained model's or a fresh one's passes, a blown-up or non-finite one does not
    assert guard.check_state([t * 3 for t in ones], ones) is None
    assert guard.check_state([t * 0.1 for t in ones], ones) is None
    assert "over 10x this peer's" in guard.check_state([t * 50 for t in ones], ones)
    assert "non-finite" in guard.check_state([torch.tensor([float("nan")])], [torch.ones(1)])


def test_rounds_where_nobody_trained_do_not_shrink_the_guards_range():
    """Found by the chaos test: rounds where nobody trained averaged to zero, the recent range became 0, and every
    later update was refused, so the swarm stopped learning. A zero update says nothing about the range."""
    from hivefold.averaging.guard import UpdateGuard

    guard = UpdateGuard(factor=10.0)
    for _ in range(3):
        guard.accept_own(0.5)
    for _ in range(5):
        assert guard.check_incoming([torch.zeros(4)], own_norm=0.0) is None
        guard.accept_own(0.0)
    assert guard.recent_norm() == 0.5 and guard.check_outgoing([torch.ones(4)])[1] is None  # norm 2: within 10x
    # a diverged local model is still refused, round after round
    for _ in range(4):
        assert "over 10x" in guard.check_outgoing([torch.full((4,), 1e5)])[1]


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999), (0.5, 0.99)])
def test_the_ceiling_holds_what_adamw_can_move_and_a_member_with_nothing_to_compare_refuses_a_huge_average(betas):
    """Found by the poisoning test: a member that had just reloaded the state, with no history and nothing of its
    own, accepted a poisoner's huge average (its bound was relative to its own zero pseudo-gradient)."""
    from hivefold.averaging.guard import UpdateGuard, total_norm, update_ceiling
    from hivefold.model import GPT

    torch.manual_seed(0)
    model = GPT(make_spec().model)
    start = [p.detach().clone() for p in model.parameters()]
    lr, steps = 1e-2, 40
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.1)
    for step in range(steps):  # the worst case for Adam: gradients of steady sign, a spike now and then
        for p in model.parameters():
            p.grad = torch.ones_like(p) * (1e3 if step % 7 == 6 else 1e-3)
        optimizer.step()
    moved = total_norm([p.detach() - s for p, s in zip(model.parameters(), start, strict=True)])
    ceiling = update_ceiling(lr, betas, steps, start)
    # it holds, and not by miles (with a large beta2 its per-step bound is reached only by a spike after a calm)
    assert moved <= ceiling < 30 * moved + 2 * total_norm(start), (moved, ceiling)

    guard = UpdateGuard(factor=10.0)
    guard.ceiling = ceiling
    assert guard.check_incoming([torch.full((4,), ceiling / 3)], own_norm=0.0) is None
    assert "over the bound" in guard.check_incoming([torch.full((4,), ceiling)], own_norm=0.0)
    assert "over" in guard.check_outgoing([torch.full((4,), ceiling)])[1]


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int4"])
def test_members_that_averaged_together_agree_and_one_that_stepped_alone_does_not(codec):
    """As the robust all-reduce does (robust.py): a part's reducer encodes the average once and every member takes
    its decoding, the reducer by its own delta, another member as ``own + (decoded - own)``. Both must agree to
    rounding; a member that applied its own pseudo-gradient instead (a round it took alone) must not."""
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    from hivefold.averaging import agreement

    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(64, 64, generator=gen) * 0.02, torch.randn(300, generator=gen), torch.zeros(32)]
    scale = [1e-3, 1e-3, 1e-4]  # the last (a bias, say) moves less than the rest
    own_a = [torch.randn_like(t) * k for t, k in zip(start, scale, strict=True)]
    own_b = [torch.randn_like(t) * k for t, k in zip(start, scale, strict=True)]
    avg = [(a + b) / 2 for a, b in zip(own_a, own_b, strict=True)]

    def wire(t):
        return deserialize_torch_tensor(compression(codec).compress(t, CompressionInfo.from_tensor(t)))

    decoded = [wire(m) for m in avg]
    got_a = [a + (d - a) for a, d in zip(own_a, decoded, strict=True)]
    got_b = [b + (d - b) for b, d in zip(own_b, decoded, strict=True)]
    check = agreement.Agreement()
    views = {}
    for name, update in [("a", got_a), ("b", got_b), ("alone", own_b)]:
        params, momentum = [t.clone() for t in start], [torch.zeros_like(t) for t in start]
        before = agreement.sample(params)
        nesterov_outer_step(params, momentum, update, lr=0.7, mu=0.9)
        views[name] = agreement.sample(params)
    check.note_step(before, views["a"])
    assert check.step_rms > 0
    assert check.agrees(views["a"], views["b"]) and check.agrees(views["b"], views["a"])
    assert not check.agrees(views["a"], views["alone"])
    assert not check.agrees(views["a"], views["a"][:-1]), "a sample of another shape is another model"
    assert agreement.fingerprint(views["a"]) != agreement.fingerprint(views["alone"])


def test_a_member_out_of_step_follows_the_rounds_majority_not_the_newest_looking_state():
    """Before, the member with the highest (step, fingerprint) led: a poisoner no reducer had caught could lead
    the honest members of its round to download its state. Now the consensus is the largest set that agrees."""
    from hivefold.averaging import agreement

    check = agreement.Agreement()
    base = np.linspace(-1, 1, 64, dtype=np.float32)
    check.note_step(base, base + 0.01)  # the latest outer step moved the sample by 0.01 (rms)

    def state(values, step=3):
        return (step, agreement.fingerprint(values), values.tobytes())

    honest, rounded, drifted = state(base), state(base + 1e-7), state(base + 0.05)
    # an honest member that drifted follows the two that agree (up to rounding), not the drifted fingerprint
    assert sorted(agreement.to_follow(drifted, {"h1": honest, "h2": rounded}, check)) == ["h1", "h2"]
    # ... and the two honest members do not follow it, whatever its fingerprint, nor a newer step it claims
    assert agreement.to_follow(honest, {"h2": rounded, "x": drifted}, check) is None
    assert agreement.to_follow(honest, {"h2": rounded, "x": state(base + 0.05, step=9)}, check) is None
    # two members that disagree: no majority, the newer state leads, as it did before
    assert agreement.to_follow(honest, {"other": state(base + 0.05, step=4)}, check) == ["other"]
    assert agreement.to_follow(state(base + 0.05, step=4), {"other": honest}, check) is None
    # malformed states count for nothing; a member alone in its round has nobody to follow
    assert agreement.to_follow(drifted, {"bad": ["x", 1.0, b""], "worse": 7}, check) is None


def test_a_download_takes_the_state_most_of_the_newest_members_declare_and_checks_it_is_the_one_served():
    """hivemind's download takes whoever declares the highest priority; a poisoner declares what it likes. The
    keeper (and now newcomers) compare the members' declared samples, download once, and check the state served
    against the sample its member declared."""
    from hivefold.averaging import agreement, consensus

    honest, poisoned = [torch.ones(8), torch.zeros(2)], [torch.full((8,), -15.0), torch.zeros(2)]
    served = {"poisoner": (4, poisoned), "a": (4, honest), "b": (4, [honest[0] + 1e-7, honest[1]]),
              "silent": (None, None), "c": (4, honest)}
    declared = {peer: (step, agreement.sample(t[:1])) for peer, (step, t) in served.items() if step is not None}
    asked, downloaded = [], []

    def ask(peers):
        asked.append(list(peers))
        return {p: declared[p] for p in peers if p in declared}

    def download(peer):
        downloaded.append(peer)
        return served[peer]

    def take(order):
        asked.clear()
        downloaded.clear()
        got = consensus.download_agreed(order, ask, download, n_params=1)
        return got if got is None else next(p for p in downloaded if served[p] is got)

    order = ["poisoner", "a", "silent", "b", "c"]
    assert take(order) == "a" and downloaded == ["a"]  # one download, from the group of two that agree
    assert asked == [order]  # up to twice three candidates asked at once; the first three answers count
    assert take(["poisoner", "a"]) == "poisoner"  # one against one: the newer, then the higher priority
    # a newer state declared by one member does not outvote two at the previous step; one answer decides nothing
    served["poisoner"], declared["poisoner"] = (5, poisoned), (5, agreement.sample(poisoned[:1]))
    assert take(["poisoner", "a", "b"]) == "a"
    assert take(["poisoner", "silent"]) is None
    # a member that declares the honest sample but serves its own state is skipped for the next of its group
    declared["poisoner"] = declared["a"]
    served["poisoner"] = (4, poisoned)
    assert take(["poisoner", "a", "b"]) == "a" and downloaded == ["poisoner", "a"]
    # ... and a member whose state moved on since it answered is not taken either: nobody vouched for that one
    served["a"], served["b"] = (5, honest), (5, honest)
    assert consensus.download_agreed(["a", "b"], ask, download, n_params=1) == (None, None, True)  # ask again


def test_a_member_that_holds_the_state_the_swarm_declares_downloads_nothing():
    """Newcomers to a swarm at step 0 hold its state already (the run's seed built it): 88 MB of `small` each,
    downloaded from each other over home uplinks before this."""
    from hivefold.averaging import agreement, consensus

    init, other = [torch.ones(8)], [torch.full((8,), 2.0)]
    declared = {"a": (0, agreement.sample(init)), "b": (0, agreement.sample(init)), "c": (3, agreement.sample(init))}
    downloaded = []

    def ask(peers):
        return {p: declared[p] for p in peers if p in declared}

    def download(peer):
        downloaded.append(peer)
        return declared[peer][0], init

    def take(order, held):
        downloaded.clear()
        return consensus.download_agreed(order, ask, download, n_params=1, held=held)

    assert take(["a", "b"], (0, agreement.sample(init))) == (0, None, False) and downloaded == []
    assert take(["a"], (0, agreement.sample(init))) == (0, None, False) and downloaded == []  # the only answer
    assert take(["a", "b"], (0, agreement.sample(other)))[1] is init and downloaded == ["a"]  # another init
    assert take(["c", "a"], (0, agreement.sample(init)))[1] is init and downloaded == ["c"]  # behind: fetch it
    assert take(["a"], (0, agreement.sample(other))) is None  # nothing to compare: hivemind's download decides


def test_a_round_hivemind_never_ends_is_given_up_at_its_deadline():
    """Two clean-clone runs of the chaos test had a peer's round block for minutes after SIGSTOP/kill faults: a
    blocked wait on the round now ends at its deadline, and the round is cancelled."""
    from hivemind.averaging.control import StepControl
    from hivemind.utils import get_dht_time
    from hivemind.utils.mpfuture import MPFuture

    from hivefold.averaging.diloco import round_result

    MPFuture()  # hivemind starts its futures' backend for a plain one (a subclass first would set it on itself)

    def control() -> StepControl:
        made = StepControl(scheduled_time=get_dht_time(), deadline=get_dht_time() + 60, allow_retries=False,
                           weight=1.0, data_for_gather=b"")
        made.attach(MPFuture(), MPFuture())  # as the averager's process does when it takes the step
        made.allow_allreduce()  # (wait=False: hivemind's step triggers it at once)
        return made

    stuck, t0 = control(), time.perf_counter()
    assert round_result(stuck, t0 + 0.3, epoch=7) is None
    assert 0.25 <= time.perf_counter() - t0 < 5 and stuck.cancelled()
    landed = control()
    landed.set_result({"member": b"gathered"})
    assert round_result(landed, 0.0, epoch=7) == {"member": b"gathered"}
    failed, t0 = control(), time.perf_counter()
    failed.set_exception(TimeoutError("no group formed"))
    assert round_result(failed, t0 + 30, epoch=7) is None and time.perf_counter() - t0 < 5
    assert not failed.cancelled()
