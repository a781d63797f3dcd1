"""sync's averagers, guarded as diloco's are (guarded.py): hivemind's Optimizer averages gradients every swarm step
and parameters every ``average_state_every`` steps, and downloads a newcomer's state, each trusting every member.

- **Gradients** (:class:`GuardedGradientAverager`): every member sends the sample-weighted mean of its clipped
  micro-batch gradients, so no honest slice, and no honest average, is larger than the spec's ``grad_clip``: that
  is the ceiling, from the first step. hivemind's own accumulation scales each micro-batch by its size over the
  first one's and divides by their count, which lets a short first micro-batch inflate the others past the clip;
  here each is weighted by its samples and the sum divided by the samples. A member's weight (its samples, which
  nobody can check) is capped at twice the target batch. Outliers are not flagged (an honest member that
  accumulated a few samples sends a noisy gradient far from the others'), but the robust reducer still combines
  by centered clipping, so a flipped or unrelated gradient within the ceiling pulls the average by a bounded amount
  where three or more members average.
- **Parameters** (:class:`GuardedStateAverager`): a slice over ``STATE_FACTOR`` × this member's parameters' norm,
  or non-finite, is flagged; weights are capped at hivemind's 1. A downloaded state is installed only if it is
  finite, of the model's and the optimizer's shapes, its parameters' norm within ``STATE_FACTOR`` × this member's,
  its AdamW moments within what clipped gradients give, and no older than what it holds; the optimizer's
  hyperparameters stay this member's own (a served ``maximize`` or weight decay would steer it).
- **This member's own gradient** is not sent when it is non-finite (one bad batch, a bf16 overflow): the others
  would rightly flag it, and two reports ban a peer. It takes part with nothing that step.

A flagged member is not averaged with (guarded.py) and is reported to the coordinator like diloco's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import hivemind
import hivemind.optim.optimizer
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state
from hivemind.utils.nested import nested_pack

from hivefold.averaging.consensus import declared
from hivefold.averaging.guard import STATE_FACTOR, UpdateGuard, total_norm
from hivefold.averaging.guarded import Guarded

log = logging.getLogger(__name__)

# The gradient ceiling over the spec's grad_clip: a mean of vectors within the clip is within it, and this leaves
# room for float rounding and a lossy codec's error on a part (int4's is ~12 %).
CLIP_MARGIN = 1.25
DOWNLOAD_TRIES = 3  # members a state download asks, highest declared priority first


class GuardedGradientAverager(Guarded, GradientAverager):
    """hivemind's ``GradientAverager`` guarded (see the module's docstring); ``grad_clip`` 0: no ceiling."""

    _rpc_handlers = None  # hivemind caches these per class: a subclass must collect its own (and name them itself)
    _stub_type = None

    def __init__(self, parameters, *, swarm_key: bytes | None = None, grad_clip: float, max_weight: float, **kwargs):
        ceiling = grad_clip * CLIP_MARGIN
        self._guard(swarm_key=swarm_key, max_weight=max_weight, limits=lambda tensors: (0.0, ceiling),
                    outliers=False)
        super().__init__(parameters, **kwargs)

    @torch.no_grad()
    def accumulate_grads_(self, batch_size: int) -> None:
        """Add the current gradients, each a mean over its ``batch_size`` samples, weighted by those samples."""
        if self.reuse_grad_buffers:
            raise ValueError("hivefold's sync averaging accumulates gradients in buffers of its own")
        self._accumulators_used_in_step = False
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1
        for grad_buf, grad_acc in zip(self._grads_from_parameters(), self._grad_accumulators(), strict=True):
            grad_acc.add_(grad_buf.to(grad_acc.device), alpha=float(batch_size))

    @torch.no_grad()
    def load_accumulators_into_averager_(self) -> None:
        """The sample-weighted mean of the accumulated gradients, into the averager's tensors."""
        samples = self.local_samples_accumulated
        with self.get_tensors() as averaged_grads:
            for grad_acc, averaged_grad in zip(self._grad_accumulators(), averaged_grads, strict=True):
                averaged_grad.copy_(grad_acc, non_blocking=True).mul_(1.0 / samples if samples else 0.0)


class _CheckedDownload(DecentralizedAverager):
    """Sits under ``TrainingStateAverager`` (its ``super()``): a downloaded state it would install is checked first,
    and its optimizer hyperparameters are replaced by this member's own."""

    _grad_ceiling = 0.0

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):  # noqa: ARG002 - always waits
        """The first state that passes the checks, from the members declaring the highest priority, one at a time
        (hivemind's takes the first served, without saying whose). A member whose state is bad, not merely
        behind, cut short or of another layout, is reported and no longer averaged with: an honest member cannot
        serve one. Members already caught are not asked."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ranked = [p for p in declared(self.dht, self.prefix, str(self.peer_id)) if not self.excluded(p)]
        for peer in ranked[:DOWNLOAD_TRIES]:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                loaded = self._download(left, [peer]).result(timeout=left)
            except FutureTimeout:
                log.info("member %s did not serve its state within %.0fs", peer, left)
                continue
            if loaded is None:
                continue
            metadata, tensors = loaded
            why = refused_state(metadata, tensors, self.main_parameters, self.local_epoch)
            if why is None:
                n = len(self.main_parameters) + len(self.extra_tensors)
                own_hyperparameters, why = vetted_optimizer_state(self.optimizer, metadata.get("optimizer_metadata"),
                                                                  tensors[n:], self._grad_ceiling)
            if why is None:
                return {**metadata, "optimizer_metadata": own_hyperparameters}, tensors
            if why in NOT_EVIDENCE:
                log.warning("not loading the state member %s served: %s", peer, why)
                continue
            log.error("not loading the state member %s served: %s", peer, why)
            self._flags.put((peer, f"served a bad state: {why}"))
            self.exclude(peer)
        return None


# Why a state is refused without blaming its server: it fell behind (or a step landed here meanwhile); a stream cut
# short by a dropped connection (hivemind cannot tell it from a whole one) lacks tensors; another torch version
# lays out AdamW's state differently. Only what no honest member serves is evidence: non-finite values, a norm far
# beyond this member's, moments clipped gradients cannot give.
BEHIND = "its step is behind this peer's"
MISSING = "its step is missing"
SHAPES = "its parameters do not have the model's shapes"
LAYOUT = "its optimizer state does not have this optimizer's layout or shapes"
NOT_EVIDENCE = (BEHIND, MISSING, SHAPES, LAYOUT)


def refused_state(metadata, tensors: list[torch.Tensor], own: list[torch.Tensor], epoch: int) -> str | None:
    """None if a downloaded state (hivemind's metadata and flat tensors, the parameters first) may replace ``own``
    parameters at ``epoch``, else why not."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
        return MISSING
    if metadata["epoch"] < epoch:
        return BEHIND
    if len(tensors) < len(own) or any(t.shape != p.shape for t, p in zip(tensors, own, strict=False)):
        return SHAPES
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "it has non-finite values"
    return UpdateGuard.check_state(tensors[:len(own)], own)  # diloco's check of a downloaded state's size


def vetted_optimizer_state(optimizer: torch.optim.Optimizer, metadata, tensors: list[torch.Tensor],
                           ceiling: float) -> tuple[list | None, str | None]:
    """A served optimizer state (hivemind's flat metadata and tensors) with every plain value (learning rate, betas,
    weight decay, ``maximize``...) replaced by ``optimizer``'s own, or why it is refused: another layout or shapes,
    or AdamW moments no honest member has. Every gradient an honest member applies is within ``ceiling`` (sync's
    clip; 0: unknown), so its first moment's norm is too, and its second moment's values are within its square."""
    own, own_tensors = dump_optimizer_state(optimizer)
    if not isinstance(metadata, list) or len(metadata) != len(own) or any(
            not isinstance(t, dict) or t.get("type") != o["type"] for t, o in zip(metadata, own, strict=True)):
        return None, LAYOUT
    vetted, flat = [], []
    for theirs, mine in zip(metadata, own, strict=True):
        if mine["type"] == "value":
            vetted.append(mine)
            flat.append(mine["value"])
            continue
        index = theirs.get("index")
        if not isinstance(index, int) or not 0 <= index < len(tensors) or (
                tensors[index].shape != own_tensors[mine["index"]].shape):
            return None, LAYOUT
        vetted.append({"type": "tensor", "index": index})
        flat.append(tensors[index])
    state = nested_pack(flat, structure=optimizer.state_dict())["state"]
    for moments in state.values():
        exp_avg, exp_avg_sq = moments.get("exp_avg"), moments.get("exp_avg_sq")
        if ceiling > 0 and exp_avg is not None and (norm := total_norm([exp_avg])) > ceiling:
            return None, f"its first moments' norm {norm:.3g} is over the gradient clip ({ceiling:.3g})"
        if exp_avg_sq is not None and (bool((exp_avg_sq < 0).any()) or (
                ceiling > 0 and exp_avg_sq.numel() and float(exp_avg_sq.max()) > ceiling ** 2)):
            return None, "its second moments are negative or over the square of the gradient clip"
    return vetted, None


class GuardedStateAverager(Guarded, TrainingStateAverager, _CheckedDownload):
    """hivemind's ``TrainingStateAverager`` guarded (see the module's docstring)."""

    _rpc_handlers = None
    _stub_type = None

    def __init__(self, *, swarm_key: bytes | None = None, grad_clip: float = 0.0, **kwargs):
        self._grad_ceiling = grad_clip * CLIP_MARGIN
        self._guard(swarm_key=swarm_key, max_weight=1.0, outliers=False,
                    limits=lambda tensors: (0.0, STATE_FACTOR * total_norm(tensors)))
        super().__init__(**kwargs)


@contextlib.contextmanager
def _state_averager_class(factory):
    """hivemind's Optimizer builds its state averager from a module global, with the arguments it computes."""
    original = hivemind.optim.optimizer.TrainingStateAverager
    hivemind.optim.optimizer.TrainingStateAverager = factory
    try:
        yield
    finally:
        hivemind.optim.optimizer.TrainingStateAverager = original


class GuardedOptimizer(hivemind.Optimizer):
    """hivemind's Optimizer with the guarded averagers above. Build it in the process's main thread."""

    def __init__(self, *args, swarm_key: bytes | None, grad_clip: float, **kwargs):
        self._swarm_key, self._grad_clip = swarm_key, grad_clip
        self._flags_lock = threading.Lock()  # flags are taken by the training and the heartbeat threads
        self._to_exclude: list[str] = []
        target = kwargs["target_batch_size"]
        kwargs["grad_averager_factory"] = partial(GuardedGradientAverager, swarm_key=swarm_key, grad_clip=grad_clip,
                                                  max_weight=2.0 * target, **kwargs.pop("grad_averager_opts", {}))
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        with _state_averager_class(partial(GuardedStateAverager, swarm_key=self._swarm_key,
                                           grad_clip=self._grad_clip)):
            return super()._make_state_averager(**kwargs)

    def _averagers(self) -> list[Guarded]:
        return [a for a in (self.state_averager, self.grad_averager) if a is not None]

    def take_flags(self) -> list[tuple[str, str]]:
        """Members either averager caught since the last call, as ``(libp2p peer id, why)`` (from any thread)."""
        with self._flags_lock:
            flags = [flag for averager in self._averagers() for flag in averager.take_flags()]
            self._to_exclude += [peer for peer, _ in flags]
        return flags

    def forward_exclusions(self) -> None:
        """Each averager runs in its own process, with its own list of members caught: tell both of every member
        either caught. Call it from the training thread, which alone sends to the averagers."""
        with self._flags_lock:
            peers, self._to_exclude = self._to_exclude, []
        for peer in peers:
            for averager in self._averagers():
                averager.exclude(peer)

