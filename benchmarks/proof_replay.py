"""How closely the keeper's CPU replay of a proof of training matches an honest peer's training on another device.

    python benchmarks/proof_replay.py [--device cuda] [--model small] [--json PATH]

Trains a model on ``--device`` exactly as the peer's trainer does in ``diloco`` (bf16 autocast and fused AdamW on
CUDA, one inner step per micro-batch), first ``--warmup`` micro-batches to leave the untrained regime, then one
shard of ``--batches`` micro-batches recorded for a proof (``hivefold.proof``). Every segment is then replayed
on ``--keeper-device`` (in the peer's precision, as the keeper does: a GPU peer's in bf16, on a CPU too), and the
largest relative loss difference and the replay's distance from the committed end state (relative to the segment's
movement) are printed: the margins ``--verify-tolerance`` must cover (a check fails past ``tolerance`` on
losses and ``4 × tolerance`` on the end). Also the costs: the peer's, of keeping the proof (states copied to
the host, sha256 commitments), and the keeper's, of one check, each against the shard's training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hivefold.model import build_model  # noqa: E402
from hivefold.proof import ShardRecorder, check_proof  # noqa: E402
from hivefold.spec import (  # noqa: E402
    MODEL_PRESETS,
    AveragingConfig,
    ModelConfig,
    OptimizerConfig,
    RunSpec,
    ShardInfo,
)
from hivefold.training import autocast, inner_optimizer, lr_lambda  # noqa: E402


def corpus_sequences(n: int, seq_len: int) -> np.ndarray:
    """``n`` sequences of ``seq_len + 1`` bytes of the standard library's source (the default corpus's text)."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n * (seq_len + 1):
            break
    return np.frombuffer(bytes(data[: n * (seq_len + 1)]), dtype=np.uint8).astype(np.uint16).reshape(n, seq_len + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200, help="micro-batches trained before the recorded shard")
    parser.add_argument("--batches", type=int, default=32, help="micro-batches in the recorded shard")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--keeper-device", default="cpu",
                        help="where the replay runs, in the peer's precision (a --device cuda proof in bf16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the inner AdamW's peak learning rate")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch's deterministic algorithms for training and replay (on a GPU: does it make the "
                             "replay exact, and what does it cost the training?)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when CUDA starts: now
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    mb, h = args.micro_batch, 10 ** 6  # one long round: the schedule's range covers every step taken
    model_cfg = ModelConfig(**MODEL_PRESETS[args.model], vocab_size=257, max_seq_len=args.seq_len)
    spec = RunSpec(run_id="replay", seed=0, tokenizer="bytes", seq_len=args.seq_len, micro_batch=mb,
                   target_batch_size=mb, model=model_cfg,
                   optimizer=OptimizerConfig(lr=args.lr, warmup_steps=20, decay_steps=10 ** 6),
                   averaging=dataclasses.replace(AveragingConfig(), mode="diloco", inner_steps=h),
                   shards=(ShardInfo(0, "00" * 32, 1, 1),), validation=ShardInfo(-1, "00" * 32, 1, 1))
    data = corpus_sequences((args.warmup + args.batches) * mb + 64, args.seq_len)
    held_out, train = data[-64:], data[:-64]
    model = build_model(spec.model, spec.seed).to(args.device)
    params = list(model.parameters())
    opt = inner_optimizer(spec, model)
    shard = train[args.warmup * mb:]
    recorder = ShardRecorder(args.batches, args.segments, mb)
    cuda = args.device.startswith("cuda")
    losses, record_s, t0 = [], 0.0, None
    for i in range(args.warmup + args.batches):
        k = i - args.warmup
        if k == 0:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if k >= 0:
            t1 = time.perf_counter()
            recorder.before_batch(k, params, opt)
            record_s += time.perf_counter() - t1
        block = torch.from_numpy(train[i * mb:(i + 1) * mb].astype(np.int64)).to(args.device)
        with autocast(args.device):
            _, loss = model(block[:, :-1], block[:, 1:])
        (loss * len(block)).backward()
        torch._foreach_div_([p.grad for p in params], float(len(block)))
        torch.nn.utils.clip_grad_norm_(params, spec.optimizer.grad_clip)
        for g in opt.param_groups:
            g["lr"] = spec.optimizer.lr * lr_lambda(i, cfg=spec.optimizer)
        if k >= 0:
            recorder.record_lr(opt)
            losses.append((float(loss.detach()), 0))
        opt.step()
        opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    recorder.finish(params)
    digests = recorder.digests([])
    record_s += time.perf_counter() - t1
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0 - record_s
    keeper_model = build_model(spec.model, 1).to(args.keeper_device)
    segments = []
    for segment in range(1, len(recorder.bounds) + 1):
        t1 = time.perf_counter()
        check = check_proof(recorder.proof(segment), spec=spec, model=keeper_model, sequences=shard, losses=losses,
                            digests=digests, state_changes=[], segments=args.segments, segment=segment, tolerance=1.0,
                            held_out=held_out, device=args.keeper_device,
                            bf16=cuda)  # what the peer trained in: a CPU keeper replays a GPU peer's proof in bf16
        segments.append({"segment": segment, "valid_at_tolerance_1": check.valid, "loss_error": check.loss_error,
                         "end_error": check.end_error, "score": check.score,
                         "replay_seconds": round(time.perf_counter() - t1, 3), "detail": check.detail})
    worst_loss = max(s["loss_error"] for s in segments)
    worst_end = max(s["end_error"] for s in segments)
    replay_s = sum(s["replay_seconds"] for s in segments) / len(segments)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "keeper_device": args.keeper_device,
              "deterministic": args.deterministic, "lr": args.lr,
              "model": args.model, "micro_batch": mb, "seq_len": args.seq_len, "batches": args.batches,
              "train_seconds": round(train_s, 3), "segments": segments, "worst_loss_error": worst_loss,
              # the peer's cost of keeping a proof (states copied to the host, sha256 commitments), per shard
              "record_seconds": round(record_s, 3), "record_share": record_s / max(train_s, 1e-9),
              # the keeper's cost of one check (a segment's replay) against the shard's training
              "replay_seconds_per_check": round(replay_s, 3), "check_share": replay_s / max(train_s, 1e-9),
              "worst_end_error": worst_end,
              # the least --verify-tolerance under which every honest segment passes
              "tolerance_needed": max(worst_loss, worst_end / 4)}
    for s in segments:
        print(f"segment {s['segment']}: loss error {s['loss_error']:.2e}, end error {s['end_error']:.2e}, "
              f"score {s['score']:+.4f}, replay {s['replay_seconds']} s")
    print(f"{result['device']} -> keeper on {args.keeper_device}, {args.model}: worst loss error {worst_loss:.2e}, "
          f"worst end error {worst_end:.2e}; --verify-tolerance must be at least {result['tolerance_needed']:.2e}")
    print(f"shard of {args.batches} micro-batches: trained in {train_s:.3f} s; the proof's record took "
          f"{record_s:.3f} s ({result['record_share']:.1%}); a check replays in {replay_s:.3f} s "
          f"({result['check_share']:.1%})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
