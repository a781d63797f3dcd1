"""Proof of training: the evidence that lets the keeper check, by recomputing it, that a peer trained a shard.

With verification on (``RegisterResponse.proof_segments`` > 0) a peer cuts each shard's micro-batches
into that many segments and keeps its training state at the start of each (the parameters and, in
``diloco``, the inner AdamW's moments), the learning rate of every inner step, and the parameters at
the end. The result carries a loss per micro-batch and a sha256 commitment to every state kept;
only then does the coordinator say whether it is checked and which segment. The peer uploads that
segment's proof (its start state, the learning rates, the parameters at its end); the keeper checks
them against the commitments and replays the segment (the same micro-batches, the same forward passes
and, in ``diloco``, the same inner steps). Every reported loss must match the replay within a
tolerance, and the replay must end where the committed end state is. A peer that skipped training
cannot commit, before it knows the segment, to end states that a replay of its own start states
reaches (the idea of Jia et al., "Proof-of-Learning", IEEE S&P 2021). The segment's change of the parameters is also
scored on held-out data, as Templar's Gauntlet scores contributions: validation loss before minus after.

Where the swarm replaced the parameters under the peer (an outer step landing, a state download: the
result's ``state_changes``), the segment is cut in two: the part before ends at the parameters just
before the replacement, the part after starts from the state the swarm gave. Every segment then
replays whole, and each commits to its own start and end (:func:`proof_bounds`). The coordinator
picks a segment with probability in proportion to its micro-batches, so a peer that claims changes to
cut its shard into pieces is still checked on each micro-batch as often as on any other. In ``sync`` mode
parameters move only at the swarm's steps, so the replay is forward passes at the segment's state.
Proofs are tensors saved with ``torch.save`` and read with ``weights_only=True``: nothing a peer
sends is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from hivefold.averaging.guard import total_norm
from hivefold.errors import IntegrityError
from hivefold.model import GPT
from hivefold.spec import RunSpec
from hivefold.training import autocast, evaluate, inner_optimizer, lr_lambda

DEFAULT_SEGMENTS = 4
# A replay runs a peer's micro-batch at once, in the peer's own shapes, up to this many tokens: a different split
# rounds differently, and training amplifies any difference (32 bf16 steps of `small` early in training, replayed
# in quarter-size chunks, ended 25 % off the peer's end state on a CPU and 35-60 % on an H200; at the peer's shape
# the CPU replay is exact). Past this, in chunks of this size (the keeper's memory bounds it), which may drift.
REPLAY_MAX_TOKENS = 1 << 17
SCORE_SEQUENCES = 16  # held-out sequences the Gauntlet-style score is measured on (two forward passes each)
_MOMENTS = ("step", "exp_avg", "exp_avg_sq")


def segment_bounds(n_batches: int, segments: int) -> list[tuple[int, int]]:
    """``[start, end)`` micro-batch ranges of ``segments`` near-equal stretches (fewer if the shard is short)."""
    k = max(1, min(segments, n_batches))
    cuts = [round(i * n_batches / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def proof_bounds(n_batches: int, segments: int, state_changes: list[int]) -> list[tuple[int, int]]:
    """The segments a shard's record is cut into: ``segments`` near-equal stretches, each cut again where the
    swarm replaced the parameters (a change at ``c`` lands after micro-batch ``c - 1``'s step)."""
    if n_batches <= 0 or segments <= 0:
        return []
    cuts = sorted({a for a, _ in segment_bounds(n_batches, segments)} | {c for c in state_changes if 0 < c < n_batches})
    return list(zip(cuts, [*cuts[1:], n_batches], strict=True))


def proof_max_bytes(num_parameters: int) -> int:
    """The largest proof a run's model can need: parameters and two moments at the start, parameters at the end."""
    return 4 * 4 * num_parameters + (4 << 20)


def _cpu(tensors) -> list[torch.Tensor]:
    return [t.detach().to("cpu", dtype=torch.float32, copy=True).contiguous() for t in tensors]


def digest(tensors: list[torch.Tensor]) -> bytes:
    """sha256 over the tensors' float32 bytes in order: the commitment a result carries for each state kept."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", dtype=torch.float32).contiguous().numpy())  # its buffer: no copy
    return h.digest()


def _flat(moments: list[list[torch.Tensor]] | None) -> list[torch.Tensor]:
    return [t for row in moments or [] for t in row]


class ShardRecorder:
    """Peer side: what a shard's training must keep to answer a challenge (see the module docstring).

    The trainer calls :meth:`before_batch` before every micro-batch (``changed``: the swarm replaced the
    parameters since the previous one) and the averaging calls :meth:`before_change` just before it replaces
    them, so the segment that ends there ends at the parameters it trained to.
    """

    def __init__(self, n_batches: int, segments: int, micro_batch: int):
        self.micro_batch, self.segments, self.n_batches = micro_batch, segments, n_batches
        self._regular = {a for a, _ in proof_bounds(n_batches, segments, [])}
        # segment start -> (parameters, moments) there, and their digests
        self.states: dict[int, tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]] = {}
        self._digests: dict[int, tuple[bytes, bytes]] = {}
        self._ends: dict[int, tuple[list[torch.Tensor], bytes]] = {}  # start -> its end, where a change cut it
        self._current: int | None = None  # the start of the segment being trained
        self.lrs: list[float] = []  # the learning rate of the inner step after each micro-batch (diloco)
        self.final: list[torch.Tensor] | None = None
        self._final_digest = b""
        self.bounds: list[tuple[int, int]] = []  # set by digests(), once the shard's state changes are known

    def before_change(self, params: list[torch.Tensor]) -> None:
        """The swarm is about to replace ``params``: they are where the current segment ends."""
        if self.final is None and self._current is not None and self._current not in self._ends:
            end = _cpu(params)
            self._ends[self._current] = (end, digest(end))

    def before_batch(self, i: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer | None,
                     changed: bool = False) -> None:
        if i not in self._regular and not (changed and self._current is not None):
            return
        if changed and self._current is not None and self._current not in self._ends:
            # no snapshot from the averaging (sync): parameters do not move between its steps, so the segment
            # ended where it started
            self._ends[self._current] = (self.states[self._current][0], self._digests[self._current][0])
        moments = None
        if optimizer is not None:
            moments = []
            for p in params:
                st = optimizer.state.get(p, {})
                moments.append(_cpu([st[m] if m in st else torch.zeros(() if m == "step" else p.shape)
                                     for m in _MOMENTS]))
        self.states[i] = (_cpu(params), moments)
        self._digests[i] = (digest(self.states[i][0]), digest(_flat(moments)))
        self._current = i

    def record_lr(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None:
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def finish(self, params: list[torch.Tensor]) -> None:
        self.final = _cpu(params)
        self._final_digest = digest(self.final)

    def _end(self, k: int, bounds: list[tuple[int, int]]) -> tuple[list[torch.Tensor], bytes]:
        start, end = bounds[k]
        if start in self._ends:
            return self._ends[start]
        if end in self.states:
            return self.states[end][0], self._digests[end][0]
        return self.final, self._final_digest

    def digests(self, state_changes: list[int]) -> list[bytes]:
        """The commitments the result carries: per segment (:func:`proof_bounds`) its start's parameters and
        moments and its end's parameters; none if the record does not cover the shard."""
        self.bounds = proof_bounds(self.n_batches, self.segments, state_changes)
        if self.final is None or not self.bounds or sorted(self.states) != [a for a, _ in self.bounds]:
            return []
        return [d for k, (a, _) in enumerate(self.bounds) for d in (*self._digests[a], self._end(k, self.bounds)[1])]

    def proof(self, segment: int) -> bytes:
        """The proof of ``segment`` (1-based, of the bounds :meth:`digests` committed to), serialized;
        IntegrityError if this shard kept none for it."""
        k, bounds = segment - 1, self.bounds
        if not 0 <= k < len(bounds) or self.final is None:
            raise IntegrityError(f"no proof kept for segment {segment}")
        start, end = bounds[k]
        params, moments = self.states[start]
        doc = {"segment": segment, "start": start, "end": end, "micro_batch": self.micro_batch,
               "params": params, "moments": moments, "lrs": self.lrs[start:end], "end_params": self._end(k, bounds)[0]}
        buf = io.BytesIO()
        torch.save(doc, buf)
        return buf.getvalue()


@dataclass(frozen=True)
class Check:
    """The keeper's finding on one proof."""

    valid: bool
    detail: str
    score: float = math.nan  # held-out loss before the segment minus after (higher: the update helped)
    batches: int = 0  # micro-batches replayed
    loss_error: float = 0.0  # the largest relative difference between a reported and a replayed loss
    end_error: float = 0.0  # the replay's distance from the committed end state, relative to the segment's movement


def _load(data: bytes, model: GPT) -> dict:
    try:
        doc = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - anything a hostile file can raise is the same verdict
        raise IntegrityError(f"unreadable proof: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise IntegrityError("a proof is a dict of tensors")
    shapes = [p.shape for p in model.parameters()]

    def tensors(name: str, value) -> list[torch.Tensor]:
        if not isinstance(value, list) or len(value) != len(shapes) or any(
                not isinstance(t, torch.Tensor) or t.shape != s for t, s in zip(value, shapes, strict=False)):
            raise IntegrityError(f"proof field {name!r} does not hold the run's parameter shapes")
        if not all(bool(torch.isfinite(t).all()) for t in value):
            raise IntegrityError(f"proof field {name!r} is not finite")
        return [t.float() for t in value]

    doc["params"] = tensors("params", doc.get("params"))
    doc["end_params"] = tensors("end_params", doc.get("end_params"))
    if doc.get("moments") is not None:
        m = doc["moments"]
        if not isinstance(m, list) or len(m) != len(shapes):
            raise IntegrityError("proof field 'moments' does not match the model")
        for row, s in zip(m, shapes, strict=True):
            if not isinstance(row, list) or len(row) != 3 or any(not isinstance(t, torch.Tensor) for t in row) \
                    or row[1].shape != s or row[2].shape != s or row[0].numel() != 1 \
                    or not all(bool(torch.isfinite(t).all()) for t in row) or bool((row[2] < 0).any()):
                raise IntegrityError("proof field 'moments' does not match the model")
        doc["moments"] = [[t.float() for t in row] for row in m]
    for name in ("segment", "start", "end", "micro_batch"):
        if not isinstance(doc.get(name), int):
            raise IntegrityError(f"proof field {name!r} must be an integer")
    if not isinstance(doc.get("lrs"), list) or not all(isinstance(x, float) for x in doc["lrs"]):
        raise IntegrityError("proof field 'lrs' must be a list of floats")
    return doc


def _lr_range(spec: RunSpec, epoch: int) -> tuple[float, float]:
    """The inner learning rates a peer at outer step ``epoch`` can have used (``DiLoCo._set_lr``): its schedule
    runs ``inner_steps`` per outer step, plus the steps of a round still in flight (up to two more rounds); the
    step right after an outer step lands still uses the rate set before it (one round back)."""
    h, cfg = spec.averaging.inner_steps, spec.optimizer
    first, last = max(0, epoch - 1) * h, (epoch + 3) * h
    # the schedule rises to its peak at warmup_steps and falls after it: extremes at the ends or the peak
    low = min(lr_lambda(first, cfg=cfg), lr_lambda(last, cfg=cfg))
    high = lr_lambda(min(max(cfg.warmup_steps, first), last), cfg=cfg)
    return cfg.lr * low, cfg.lr * high


def check_proof(data: bytes, *, spec: RunSpec, model: GPT, sequences: np.ndarray,
                losses: list[tuple[float, int]], digests: list[bytes], state_changes: list[int], segments: int,
                segment: int, tolerance: float, held_out: np.ndarray | None = None, device: str = "cpu",
                bf16: bool | None = None) -> Check:
    """Replay ``segment`` of a shard's training from the peer's proof and compare it with what the peer reported.

    ``model`` is the keeper's scratch copy of the run's model (its parameters are overwritten);
    ``losses``: the result's ``(loss, epoch)`` per micro-batch; ``digests`` and ``state_changes``: its
    commitments (:meth:`ShardRecorder.digests`, the trainer's state changes); ``segments``: the run's
    segments per shard, which the state changes cut further (:func:`proof_bounds`); ``tolerance``: the largest
    relative difference allowed between a reported and a replayed loss (the end check allows 4x that);
    ``device``: where ``model`` is and the replay runs (on CUDA in bf16 autocast, as a GPU peer trains: a
    GPU-trained segment replayed in fp32 on a CPU drifts from it, and takes minutes where the GPU took
    a second); ``bf16``: whether the peer trained in bf16 (default: ``device`` is CUDA), so a keeper without a
    GPU replays a GPU peer's segment in the CPU's bf16.
    """
    model.zero_grad(set_to_none=True)
    try:
        return _check(data, spec=spec, model=model, sequences=sequences, losses=losses, digests=digests,
                      bounds=proof_bounds(len(losses), segments, state_changes), segment=segment,
                      tolerance=tolerance, held_out=held_out, device=device, bf16=bf16)
    finally:
        model.zero_grad(set_to_none=True)  # a replay that failed mid-step must not leave gradients to the next


def _check(data: bytes, *, spec, model, sequences, losses, digests, bounds, segment, tolerance, held_out,
           device, bf16) -> Check:
    try:
        doc = _load(data, model)
    except IntegrityError as e:
        return Check(False, str(e))
    mb = doc["micro_batch"]
    # a peer picks its own micro-batch (a GPU's is far larger than the run's)
    if mb < 1 or math.ceil(len(sequences) / mb) != len(losses):  # _load checked it is an integer
        return Check(False, f"micro-batch {mb} does not fit {len(losses)} losses for {len(sequences)} sequences")
    if len(digests) != 3 * len(bounds) or not 1 <= segment <= len(bounds):
        return Check(False, f"the result committed to {len(digests)} states, which does not fit its losses")
    if doc["segment"] != segment or (doc["start"], doc["end"]) != bounds[segment - 1]:
        return Check(False, f"the proof is not for segment {segment} {bounds[segment - 1]}")
    start, end = bounds[segment - 1]
    k = segment - 1
    if (digest(doc["params"]), digest(_flat(doc["moments"])), digest(doc["end_params"])) != tuple(
            digests[3 * k:3 * k + 3]):
        return Check(False, "the proof's states are not those the result committed to")
    diloco = spec.averaging.mode == "diloco"
    if diloco:
        low, high = _lr_range(spec, losses[start][1])
        if doc["moments"] is None or len(doc["lrs"]) != end - start:
            return Check(False, "a diloco proof needs the inner optimizer's moments and one learning rate per step")
        if not all(low * (1 - 1e-6) <= lr <= high * (1 + 1e-6) for lr in doc["lrs"]):
            return Check(False, f"learning rates {min(doc['lrs']):.4g}..{max(doc['lrs']):.4g} outside the schedule's "
                                f"[{low:.4g}, {high:.4g}] at step {losses[start][1]}")
        clip = spec.optimizer.grad_clip
        if clip:  # clipped gradients bound AdamW's moments: a huge second moment would freeze the replay
            m1 = total_norm([row[1] for row in doc["moments"]])
            m2 = sum(float(row[2].sum()) for row in doc["moments"])
            if m1 > clip * (1 + 1e-3) or m2 > clip * clip * (1 + 1e-3):
                return Check(False, f"the inner optimizer's moments ({m1:.3g}, {m2:.3g}) exceed what gradients "
                                    f"clipped at {clip:g} can give")
    params = list(model.parameters())
    with torch.no_grad():
        for p, t in zip(params, doc["params"], strict=True):
            p.copy_(t)
    opt = None
    if diloco:
        opt = inner_optimizer(spec, model)
        for p, (step, m1, m2) in zip(params, doc["moments"], strict=True):
            # fused AdamW (CUDA) keeps its step count on the device
            opt.state[p] = {"step": step.reshape(()).to(p.device if opt.defaults.get("fused") else "cpu",
                                                        dtype=torch.float32, copy=True),
                            "exp_avg": m1.to(p.device, copy=True), "exp_avg_sq": m2.to(p.device, copy=True)}
    model.train()
    loss_error = 0.0
    chunk = max(1, min(mb, REPLAY_MAX_TOKENS // spec.seq_len))
    for i in range(start, end):
        reported = losses[i][0]
        block = sequences[i * mb:(i + 1) * mb]
        total = 0.0
        with torch.set_grad_enabled(diloco):
            for c in range(0, len(block), chunk):  # the micro-batch's mean loss and gradient, a chunk at a time
                part = torch.from_numpy(block[c:c + chunk].astype(np.int64)).to(device)
                with autocast(device, bf16):
                    _, loss = model(part[:, :-1], part[:, 1:])
                total += float(loss.detach()) * len(part)
                if diloco:
                    (loss * len(part)).backward()
        value = total / len(block)
        error = abs(value - reported) / max(1.0, abs(value))
        loss_error = max(loss_error, error) if math.isfinite(error) else math.inf
        if not error <= tolerance:
            return Check(False, f"micro-batch {i}: reported loss {reported:.4f}, replayed {value:.4f}",
                         batches=i - start + 1, loss_error=loss_error)
        if diloco:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_div_(grads, float(len(block)))
            if spec.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, spec.optimizer.grad_clip)
            for g in opt.param_groups:
                g["lr"] = doc["lrs"][i - start]
            opt.step()
            opt.zero_grad(set_to_none=True)
    replayed = end - start
    detail = f"{replayed} micro-batches replayed"
    score, end_error = math.nan, 0.0
    if diloco:  # the replay must end where the peer committed to having ended
        with torch.no_grad():
            moved = total_norm([e - s for e, s in zip(doc["end_params"], doc["params"], strict=True)])
            off = total_norm([p.float().cpu() - e for p, e in zip(params, doc["end_params"], strict=True)])
        end_error = off / moved if moved > 0 else math.inf
        if not end_error <= 4 * tolerance:
            return Check(False, f"the replay ends {off:.3g} from the peer's end state (it moved {moved:.3g})",
                         batches=replayed, loss_error=loss_error, end_error=end_error)
        detail += ", end state matches"
        if held_out is not None and len(held_out):
            score = _score(model, params, doc, held_out[:SCORE_SEQUENCES], device)
    return Check(True, detail, score=score, batches=replayed, loss_error=loss_error, end_error=end_error)


def _score(model: GPT, params: list[torch.Tensor], doc: dict, sample: np.ndarray, device: str) -> float:
    """Held-out loss at the segment's start minus at its end (Gauntlet-style: positive means it helped)."""
    with torch.no_grad():
        for p, t in zip(params, doc["params"], strict=True):
            p.copy_(t)
    before = evaluate(model, sample, device=device)
    with torch.no_grad():
        for p, t in zip(params, doc["end_params"], strict=True):
            p.copy_(t)
    return before - evaluate(model, sample, device=device)
