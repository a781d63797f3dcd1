"""A Byzantine-tolerant outer all-reduce: each member checks what others send it, and what it gets back.

hivemind splits the averaged vector into parts and gives each member some parts to reduce: every member
sends its slice of a part to that part's reducer, which returns the average. A hostile member can attack
in both roles: as a sender (NaNs, a huge or sign-flipped slice, an inflated weight) and as a reducer
(returning garbage for its parts). hivemind's own reducer trusts both. Here, in the averager's process:

- **as a reducer** (:class:`RobustReducer`), a member waits for every sender's slice of a part and leaves
  out, flagging its sender: a non-finite slice; one over the ceiling on any honest update (the most an
  inner optimizer moves the model in the samples a member may claim: guard.update_ceiling), which holds
  from the first round; one over ``RANGE_FACTOR`` × the norm of the swarm's recent averaged updates (the
  check that still holds in a group of two, where a flipped and scaled update has no majority against it);
  with three or more senders that trained this round, one larger than the others' and
  over ``OUTLIER`` × their median distance from the center, times how much more it trained than they did (an
  update grows at most linearly with its samples: a member that trained a whole round beside two that just
  joined lies far from their small updates); with two, one over ``NORM_FACTOR`` × the reducer's own slice
  when both did comparable work (weights within ``COMPARABLE``). It combines the rest by centered clipping
  (Karimireddy et al., 2021, the aggregator BTARD builds on): from the coordinate-wise median, a few steps
  each moving by the weighted mean of the members' differences clipped to ``CLIP`` × their median distance
  (times the same allowance for what each trained). A weight is the samples a member trained this round,
  which nobody can check: it is capped at ``max_weight`` (twice a round's samples);
- **as a receiver** (:func:`check_returned`), it refuses a non-finite averaged part, or one over the ceiling
  or ``RETURNED_FACTOR`` × the recent norm (more than a robust reducer returns): the reducer is flagged, and the
  member keeps its own slice for that part.

Only what no honest member sends is flagged: honest pseudo-gradients can point against each other (in a
real two-peer swarm, parts had cosines of -0.6 to -0.8 between honest members) and differ several-fold
in size (a member that trained a few steps since a reload, a GPU beside a laptop), so direction alone,
or a moderate size, is never evidence.

Flags name libp2p peer ids and say why. The averager then stops averaging with a flagged member: it
does not serve its group joins or state downloads, makes no call to it (asking it to lead a group,
downloading its state), and refuses to run an all-reduce in a group that contains it (it applies its
own update). It also hands the flags to its owner (``hivefold.averaging.diloco``), which reports them.

What this cannot see: a slice less than ``OUTLIER`` times as far from the center as the others' (a sign
flip of an honest-sized update, say) is not flagged, but clipping bounds its pull to ``CLIP`` median
distances; a reducer that returns a wrong average within the range is not caught by its receivers; the main
process's guard (guard.py) bounds each whole averaged update by the recent rounds'.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

CLIP = 2.0  # clipping radius, in median distances from the center: honest slices are rarely clipped
OUTLIER = 10.0  # a sender this many times further from the center than the others' median is flagged
# ... where the others' median distance counts as at least an honest slice's expected norm (recent_norm scaled to
# the part) over OUTLIER_FLOOR: members sending (almost) nothing, a converged one or an idle poisoner, do not shrink
# the reference until an honest update stands out; a sender must then lie OUTLIER / OUTLIER_FLOOR expected norms
# out (a flipped update 16x too large lies 17)
OUTLIER_FLOOR = 2.0
# With two senders the only reference is this member's own slice: a slice this many times larger is flagged, and
# only when both did comparable work (weights within COMPARABLE): one that reloaded the state or joined mid-round
# trained a few steps, and the other's honest slice is far larger. The main process's guard (guard.py) bounds the
# whole averaged update by the recent rounds' in any case.
NORM_FACTOR = 1000.0
COMPARABLE = 4.0  # two members' weights within this factor: they did comparable work
# A slice (a part of one member's update) over this many times the norm of the recent averaged updates (whole
# vectors) is flagged, whatever the group's size: an honest member's whole update is within a small factor of the
# average's (about sqrt(group size) when members disagree), and a part is at most the whole.
RANGE_FACTOR = 4.0
# A robust reducer that knows the range returns a combination of slices each within RANGE_FACTOR x its recent norm
# (centered clipping stays in their hull; the coordinate-wise median is as large in practice). A receiver flags a
# returned part larger than this many times its own recent norm: the margin covers members whose recent ranges
# differ (one that averaged alone for a while, one that just joined and checks nothing yet). Without it, a hostile
# reducer returning huge averages is caught by nobody: the one member reducing its huge slice stops averaging with
# it, the others' guards refuse every round's update, and the honest members drift apart.
RETURNED_FACTOR = 4 * RANGE_FACTOR
CLIP_ITERATIONS = 3
VOTE_WEIGHT = 1e-3  # members weighing less than this fraction of the heaviest do not vote on the center
TINY = 1e-12

Flag = tuple[int, str]  # (sender or reducer index, why)


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float()))


def _mean(kept: list[tuple[int, torch.Tensor, float]]) -> torch.Tensor:
    total = sum(w for _, _, w in kept)
    if total <= 0:
        return torch.stack([t for _, t, _ in kept]).mean(0)
    return sum(t * (w / total) for _, t, w in kept)


def _allowance(weight: float, others: list[float]) -> float:
    """How much further than the others a member that trained ``weight`` samples may honestly lie: an inner AdamW
    step moves each parameter by about the learning rate, so an update grows at most linearly with the samples
    trained. A member that trained a whole round beside two that just joined is far from their (small) updates."""
    reference = statistics.median(others) if others else 0.0
    return max(1.0, weight / reference) if reference > 0 else 1.0


def robust_combine(slices: list[tuple[int, torch.Tensor, float]], own_index: int | None, recent_norm: float = 0.0,
                   max_weight: float = 0.0, share: float = 1.0, ceiling: float = 0.0,
                   outliers: bool = True) -> tuple[torch.Tensor | None, list[Flag]]:
    """The robust weighted average of ``(sender index, slice, weight)``, and the senders it flagged.

    ``recent_norm``: the norm of the swarm's recent averaged updates as this member saw them (0: not known yet);
    ``share``: this part's share of the whole vector's values (an honest slice's norm is about ``recent_norm``
    times its square root: the least spread the outlier test assumes, so that members sending (almost) nothing,
    a converged one or an idle poisoner, cannot make an honest update the outlier);
    ``max_weight``: the largest weight a member may claim (0: no cap); ``ceiling``: the largest norm any honest update
    can have (0: unknown; in diloco guard.update_ceiling, in sync the gradient clip), which holds from the first round.
    None when no slice can be used.
    ``outliers=False`` flags only what is out of bounds (non-finite, an invalid weight, over the ceiling or the range)
    and still combines by centered clipping: for gradients, whose honest spread grows as a member's samples shrink.
    """
    flags: list[Flag] = []
    kept = []
    for s, t, w in slices:
        t = t.float()
        if not torch.isfinite(t).all():
            flags.append((s, "it sent non-finite values"))
        elif not math.isfinite(w) or w < 0:
            flags.append((s, f"it sent an invalid weight {w!r}"))
        elif ceiling > 0 and (norm := _norm(t)) > ceiling:
            flags.append((s, f"its slice's norm {norm:.3g} is over the most an honest member sends ({ceiling:.3g})"))
        elif recent_norm > 0 and (norm := _norm(t)) > RANGE_FACTOR * recent_norm:
            flags.append((s, f"its slice's norm {norm:.3g} is over {RANGE_FACTOR:.0f}x the swarm's recent updates' "
                             f"({recent_norm:.3g})"))
        else:
            kept.append((s, t, min(w, max_weight) if max_weight > 0 else w))
    if not kept:
        return None, flags
    own = next(((t, w) for s, t, w in kept if s == own_index), None)
    if len(kept) <= 2:  # no majority to compare with: bound the other against this member's own slice
        if own is not None and outliers:
            own_norm, own_weight = _norm(own[0]), own[1]
            checked = []
            for s, t, w in kept:
                comparable = own_weight * COMPARABLE >= w and own_norm > TINY
                if s != own_index and comparable and (norm := _norm(t)) > NORM_FACTOR * own_norm:
                    flags.append((s, f"its slice's norm {norm:.3g} is over {NORM_FACTOR:.0f}x this member's "
                                     f"({own_norm:.3g})"))
                    continue
                checked.append((s, t, w))
            kept = checked
        return _mean(kept), flags

    # Members that add (almost) nothing this round (they just joined or reloaded the state: their slices are near
    # zero) do not vote on the center: two of them would make an honest full-round slice look like the outlier.
    heaviest = max(w for _, _, w in kept)
    voters = [(s, t, w) for s, t, w in kept if w >= VOTE_WEIGHT * heaviest]
    if len(voters) < 3:
        return _mean(kept), flags
    extra = [(s, t, w) for s, t, w in kept if w < VOTE_WEIGHT * heaviest]
    kept = voters
    stacked = torch.stack([t for _, t, _ in kept])
    center = stacked.median(dim=0).values
    distances = [_norm(t - center) for _, t, _ in kept]
    typical = recent_norm * math.sqrt(share) / OUTLIER_FLOOR
    norms = [_norm(t) for _, t, _ in kept]
    allowances = [_allowance(w, [v for j, (_, _, v) in enumerate(kept) if j != i]) for i, (_, _, w) in enumerate(kept)]
    honest = []
    for i, (s, t, w) in enumerate(kept):
        others = max(statistics.median(d for j, d in enumerate(distances) if j != i), typical)
        larger = norms[i] > statistics.median(n for j, n in enumerate(norms) if j != i)
        if outliers and larger and distances[i] > OUTLIER * allowances[i] * others and distances[i] > TINY:
            flags.append((s, f"its slice lies {distances[i] / max(others, TINY):.1f}x further from the others' "
                             f"center than they do (a flipped, scaled or unrelated update)"))
        else:
            honest.append((t, w, distances[i], allowances[i]))
    if not honest:  # no way to tell who is right (cannot happen with one outlier): clip around everyone
        honest = [(t, w, d, a) for (_, t, w), d, a in zip(kept, distances, allowances, strict=True)]
        flags = flags[:-len(kept)]
    radius = CLIP * statistics.median(d for _, _, d, _ in honest)
    honest += [(t, w, 0.0, 1.0) for _, t, w in extra]  # their (tiny) weight still counts, as in a plain average
    total = sum(w for _, w, _, _ in honest)
    weights = [w / total if total > 0 else 1 / len(honest) for _, w, _, _ in honest]
    v = center
    for _ in range(CLIP_ITERATIONS):
        step = torch.zeros_like(v)
        for (t, _, _, allowance), w in zip(honest, weights, strict=True):
            diff = t - v
            n = _norm(diff)
            step += diff * (w * (min(1.0, allowance * radius / n) if n > TINY else 1.0))
        v = v + step
    return v, flags


def check_returned(averaged: torch.Tensor, recent_norm: float = 0.0, ceiling: float = 0.0) -> str | None:
    """None if the ``averaged`` part a reducer returned may be applied: it must be finite, within the ``ceiling``
    (see :func:`robust_combine`; 0: unknown) and, once the swarm's recent range is known, within ``RETURNED_FACTOR``
    × ``recent_norm``. Its direction proves nothing (honest averages can point anywhere), nor does a moderate size:
    this member does not know the others' weights."""
    if not torch.isfinite(averaged).all():
        return "it returned non-finite values"
    if ceiling > 0 and (norm := _norm(averaged)) > ceiling:
        return f"its averaged part's norm {norm:.3g} is over the most an honest member sends ({ceiling:.3g})"
    if recent_norm > 0 and (norm := _norm(averaged)) > RETURNED_FACTOR * recent_norm:
        return (f"its averaged part's norm {norm:.3g} is over {RETURNED_FACTOR:.0f}x the swarm's recent updates' "
                f"({recent_norm:.3g}), more than a robust reducer returns")
    return None


class RobustReducer(TensorPartReducer):
    """hivemind's reducer, but each part is combined by :func:`robust_combine` once every sender sent it.

    With ``encode(part index, tensor)`` (the wire codec), each part's average is encoded once: every sender
    gets those same bytes back (:attr:`encoded`), and this member's own part is their decoding too.
    """

    def __init__(self, part_shapes, num_senders: int, *, own_index: int | None, on_flag: Callable[[int, str], None],
                 recent_norm: float = 0.0, max_weight: float = 0.0, total_size: int = 0, ceiling: float = 0.0,
                 encode: Callable[[int, torch.Tensor], runtime_pb2.Tensor] | None = None, outliers: bool = True):
        self.own_index, self.on_flag, self.recent_norm, self.max_weight = own_index, on_flag, recent_norm, max_weight
        self.ceiling, self.outliers = ceiling, outliers
        self.total_size = total_size  # values in the whole averaged vector (0: unknown, each part counts as whole)
        self.encode = encode
        self.slices: dict[int, list[tuple[int, torch.Tensor, float]]] = {}
        self.encoded: dict[int, runtime_pb2.Tensor] = {}
        super().__init__(part_shapes, num_senders)

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # kept by part: the base class may make this sender wait until the parts before this one are done
        self.slices.setdefault(part_index, []).append((sender_index, tensor_part, weight))
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight)

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        part = self.current_part_index
        slices = [(s, t, w) for s, t, w in self.slices.pop(part, []) if part < self.sender_failed_after[s]]
        share = math.prod(self.part_shapes[part]) / self.total_size if self.total_size else 1.0
        result, flags = robust_combine(slices, self.own_index, self.recent_norm, self.max_weight, min(share, 1.0),
                                       self.ceiling, self.outliers)
        for sender, why in flags:
            self.on_flag(sender, why)
        if result is None:
            result = torch.zeros(self.part_shapes[part])
        result = result.to(self.accumulator.dtype)
        if self.encode is not None:
            self.encoded[part] = self.encode(part, result)
            result = deserialize_torch_tensor(self.encoded[part]).to(self.accumulator.dtype)
        self.current_part_future.set_result(result)
        self.reset_accumulators()


def guarded_runner(on_flag: Callable[[str, str], None], excluded: Callable[[str], bool],
                   limits: Callable[[list[torch.Tensor]], tuple[float, float]], max_weight: float,
                   outliers: bool = True) -> type[AllReduceRunner]:
    """An ``AllReduceRunner`` whose reducer is robust (bounded by ``limits(this member's tensors)``, the recent norm
    and the ceiling, by ``max_weight``, and flagging ``outliers`` or not, see :func:`robust_combine`) and whose
    received averages are checked. Flags go to ``on_flag(libp2p peer id in base58, why)``. It refuses to run in a
    group with an ``excluded`` member.

    Members end a round with the same averaged tensors (up to float rounding), also through a lossy codec:
    hivemind's reducer returns each sender the average minus that sender's slice, encoded, and a member adds
    that to its own unencoded slice, so members differ by their own slices' and their deltas' quantization
    error (with int8, a few percent of an outer step each round, adding up until a member reloads the whole
    state). Here a reducer encodes each part's average once and returns those bytes to every sender; every
    member, the reducer too, takes their decoding.
    """

    class GuardedAllReduceRunner(AllReduceRunner):
        def __init__(self, *args, ordered_peer_ids, tensors, **kwargs):
            caught = [p.to_base58() for p in ordered_peer_ids if excluded(p.to_base58())]
            if caught:
                raise AllreduceException(f"not averaging in a group with {', '.join(caught)}, caught poisoning")
            super().__init__(*args, ordered_peer_ids=ordered_peer_ids, tensors=tensors, **kwargs)
            me = self.peer_id.to_base58()

            def flag(peer: str, why: str) -> None:
                if peer != me:
                    on_flag(peer, why)

            container, my_index = self.tensor_part_container, self.ordered_peer_ids.index(self.peer_id)
            infos = [info for _, info in container._input_parts_by_peer[my_index]]  # the parts this member reduces
            own = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
            recent, ceiling = limits(list(tensors))
            self.tensor_part_reducer.finished.set()  # hivemind's own, replaced unused (else it warns it got nothing)
            self.tensor_part_reducer = RobustReducer(
                tuple(p.shape for p in self.parts_for_local_averaging), len(self.sender_peer_ids), own_index=own,
                on_flag=lambda i, why: flag(self.sender_peer_ids[i].to_base58(), f"as a sender: {why}"),
                recent_norm=recent, max_weight=max_weight, total_size=container.total_size, ceiling=ceiling,
                encode=lambda part, t: container.compression.compress(t, infos[part]), outliers=outliers)
            register = container.register_processed_part

            def received(peer_index: int, part_index: int, part: torch.Tensor) -> None:
                own_slice = container._input_parts_by_peer[peer_index][part_index][0]  # a view of this member's
                if peer_index == my_index:  # from this member's own reducer: already the average minus own_slice
                    register(peer_index, part_index, part)
                    return
                why = check_returned(part, recent, ceiling)  # another reducer's part: the average itself
                if why:
                    flag(self.ordered_peer_ids[peer_index].to_base58(), f"as a reducer: {why}")
                    register(peer_index, part_index, torch.zeros_like(own_slice))  # keep this member's own slice
                else:
                    register(peer_index, part_index, part.to(own_slice.dtype) - own_slice)

            container.register_processed_part = received

            def failed(peer_index: int) -> None:  # hivemind's, which would register its zero deltas as averages
                for part_index in range(container._outputs_registered_by_peer[peer_index],
                                        container.num_parts_by_peer[peer_index]):
                    own_slice = container._input_parts_by_peer[peer_index][part_index][0]
                    register(peer_index, part_index, torch.zeros_like(own_slice))  # keep this member's own slice
                    container.failed_size += own_slice.numel()

            container.register_failed_reducer = failed

        async def _accumulate_parts_streaming(self, stream, sender_index: int):
            """hivemind's, but what goes back is the part's average as the reducer encoded it for everyone."""
            reducer, part_index = self.tensor_part_reducer, 0
            try:
                async for tensor_part, weight in amap_in_executor(
                        lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight), stream,
                        max_prefetch=self.tensor_part_container.prefetch):
                    try:
                        await reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                    except BannedException:
                        break  # the sender failed: nothing more to aggregate from it
                    part_index += 1
                    yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                      tensor_part=reducer.encoded[part_index - 1])
            finally:
                if part_index != reducer.num_parts:
                    await self._ban_sender(self.sender_peer_ids[sender_index])

    return GuardedAllReduceRunner
