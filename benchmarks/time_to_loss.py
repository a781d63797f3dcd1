"""Time to loss: a hivefold swarm against one plain torch process on the same machine, same data.

    python benchmarks/time_to_loss.py [--mode diloco|sync] [--peers 2] [--seconds 180] [--json PATH] [--plot PNG]

In one run, on the same corpus shards, model, tokenizer and optimizer family:
  1. single: one plain torch process using the whole machine (every core, or the GPU), AdamW with
     the same warmup-then-cosine schedule at its own tuned batch and learning rate (--single-batch,
     --single-lr; see the README for the sweep that picked them), validation loss measured every
     --eval-every seconds on the run's held-out shard with the clock paused;
  2. swarm: a real coordinator (with its keeper, which measures the validation loss every
     --checkpoint-every outer or swarm steps) and N peer processes splitting the machine: on CPU each peer is
     pinned to its own cores with os.sched_setaffinity, so its hivemind helpers (DHT, averager,
     libp2p daemon) run in its share; on a GPU the peers share it.
Each gets --seconds of wall time. Printed and written as JSON: tokens per second of each and their
ratio; both validation-loss curves over wall time and tokens; the target loss (the single process's
validation loss at one third of its time); the time each took to reach it, and their ratio.
The swarm's clock starts when its first peer process has loaded Python and torch (its first log line),
as the single process's starts after its own imports: the rest of the swarm's start-up (registration,
the DHT, the micro-batch probe, the averager, the state download) counts against it. Samples count
once trained (accepted results and those a check still holds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hivefold.tls import KNOWN_ENV  # noqa: E402 - after the path is set

# Samples the swarm trained: accepted results and those a check still holds (their training is in the model
# already; a check takes seconds, and counting only checked ones would move the window's ends by that lag).
TRAINED = "verdict IN ('accepted', 'pending_verification')"


def build_run(workdir: Path, args) -> dict:
    """Create the run (shards, spec) with the coordinator's own code, then leave it for the swarm to reopen."""
    from coordinator.config import RunOptions
    from coordinator.run import open_run

    options = RunOptions(corpus=getattr(args, "corpus", "stdlib"), max_corpus_mb=getattr(args, "max_corpus_mb", 0.0),
                         model=args.model, seq_len=128,
                         shard_sequences=args.shard_sequences,
                         micro_batch=args.micro_batch, target_batch_size=args.target_batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, decay_steps=args.decay_steps, averaging=args.mode,
                         inner_steps=args.inner_steps, compression=args.compression, outer_lr=args.outer_lr,
                         outer_momentum=args.outer_momentum,
                         matchmaking_time=args.matchmaking_time,
                         averaging_timeout=getattr(args, "averaging_timeout", None))
    spec, ledger = open_run(workdir, options)
    ledger.close()
    return json.loads(spec.to_json())


# --- 1. the single process -------------------------------------------------------------------------


def single_worker(workdir: Path, seconds: float, batch: int, lr: float, eval_every: float, out: Path,
                  device: str) -> None:
    """Runs in its own process: plain torch over the run's shards, every core or the GPU."""
    import numpy as np
    import torch

    from hivefold.model import build_model
    from hivefold.shards import VAL_FILENAME, shard_filename
    from hivefold.spec import OptimizerConfig, RunSpec
    from hivefold.training import autocast, evaluate, lr_lambda, param_groups

    spec = RunSpec.from_json((workdir / "spec.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(spec.shards))
    data = np.concatenate([np.load(workdir / "shards" / shard_filename(spec.shards[i].shard_id)) for i in order])
    val = np.load(workdir / "shards" / VAL_FILENAME)
    model = build_model(spec.model, spec.seed).to(device)
    if batch == 0:  # auto: the size a peer would pick alone on this device (see peer.device.choose_micro_batch)
        from peer.device import choose_micro_batch

        batch, why = choose_micro_batch(0, run_micro_batch=spec.micro_batch, model=model, device=device,
                                        seq_len=spec.seq_len)
        print(f"single process: batch {batch} ({why})", flush=True)
    cfg = OptimizerConfig(lr=lr, warmup_steps=spec.optimizer.warmup_steps, decay_steps=spec.optimizer.decay_steps)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas,
                            fused=device.startswith("cuda"))
    # The run's schedule in this process's own steps, at the same tokens: a schedule step is a micro-batch of
    # the spec's in diloco (inner steps), a target batch in sync (swarm steps).
    per_step = spec.micro_batch if spec.averaging.mode == "diloco" else spec.target_batch_size
    scale = per_step / batch
    points, tokens, train_time, step = [], 0, 0.0, 0

    def record():
        points.append([train_time, tokens, evaluate(model, val, device=device)])

    record()
    last_eval = 0.0
    pos = 0
    while train_time < seconds:
        t0 = time.perf_counter()
        if pos + batch > len(data):
            pos = 0
        block = torch.from_numpy(data[pos:pos + batch].astype(np.int64)).to(device)
        pos += batch
        for group in opt.param_groups:
            group["lr"] = lr * lr_lambda(int(step / scale), cfg=cfg)
        with autocast(device):
            _, loss = model(block[:, :-1], block[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        step += 1
        tokens += batch * spec.seq_len
        train_time += time.perf_counter() - t0
        if train_time - last_eval >= eval_every:
            record()
            last_eval = train_time
    record()
    out.write_text(json.dumps({"points": points, "tokens": tokens, "seconds": train_time, "steps": step,
                               "batch": batch}))


def run_single(workdir: Path, args, root: Path) -> dict:
    out = root / "single.json"
    cmd = [sys.executable, __file__, "--single-worker", str(workdir), "--seconds", str(args.seconds),
           "--single-batch", str(args.single_batch), "--single-lr", str(args.single_lr), "--eval-every",
           str(args.eval_every), "--single-out", str(out), "--device", args.device]
    subprocess.run(cmd, check=True, cwd=REPO)
    r = json.loads(out.read_text())
    return {"tokens_per_s": r["tokens"] / r["seconds"], "curve": r["points"], "steps": r["steps"],
            "batch": r["batch"], "lr": args.single_lr}


# --- 2. the swarm ----------------------------------------------------------------------------------


def _cores_for(i: int, peers: int) -> set[int]:
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // peers)
    return set(cores[i * share:(i + 1) * share]) if len(cores) >= peers else set(cores)


def _imported(root: Path, peers: int) -> float | None:
    """When the first peer had its imports done (its log's first line, "registering with"), if one has."""
    times = []
    for i in range(peers):
        try:
            with (root / f"peer{i}.log").open() as f:
                line = f.readline()
        except OSError:
            continue
        if "registering with" in line:
            times.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return min(times) if times else None


def run_swarm(workdir: Path, args, root: Path, seq_len: int, *, listen: str = "127.0.0.1:0",
              dht_listen: str = "/ip4/127.0.0.1/tcp/0", peer_dht_listen: Callable[[int], str] | None = None,
              peer_prefix: Callable[[int], list[str]] | None = None,
              probe: Callable[[int], dict] | None = None) -> dict:
    """The swarm for ``args.seconds``; by default every process on loopback.

    For testbeds that place peers elsewhere (benchmarks/wan.py puts each in a network namespace):
    ``listen`` and ``dht_listen`` are the coordinator's gRPC and DHT addresses (its keeper listens on the
    DHT's interfaces too), ``peer_dht_listen(i)`` peer i's DHT multiaddr, ``peer_prefix(i)`` a command
    that peer i's process runs under (e.g. ``["ip", "netns", "exec", NAME]``). ``probe(i)``, when given,
    is called for every peer when the throughput window starts (the swarm's first results)
    and when it ends; its answers come back as ``probes``: ``[{"start": dict | None, "end": dict}]``.
    """
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(name, *cmd, cores=None, prefix=()):
        log = (root / f"{name}.log").open("wb")
        pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        p = subprocess.Popen([*prefix, sys.executable, "-m", "hivefold", *cmd], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre, env=env)
        procs.append(p)
        return p

    try:
        start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", listen, "--http", "",
              "--dht-listen", dht_listen, "--lease-seconds", "60",
              "--checkpoint-every", str(args.checkpoint_every), "--keeper-poll", "1", "--keep-checkpoints", "2",
              *(["--verify-ceiling", str(args.verify_ceiling)] if getattr(args, "verify_ceiling", None) is not None
                else []))
        endpoints = workdir / "coordinator.json"
        deadline = time.monotonic() + 180
        while not endpoints.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"coordinator did not start; see {root / 'coordinator.log'}")
            time.sleep(0.5)
        address = json.loads(endpoints.read_text())["grpc"]
        cuda = args.device == "cuda"
        t0 = time.time()
        for i in range(args.peers):
            cores = None if cuda else _cores_for(i, args.peers)
            threads = str(len(cores)) if cores else "0"
            start(f"peer{i}", "peer", "--coordinator", address, "--workdir", str(root / f"peer{i}"), "--name",
                  f"bench{i}", "--dht-listen", peer_dht_listen(i) if peer_dht_listen else "/ip4/127.0.0.1/tcp/0",
                  "--threads", threads, "--no-progress", "--device", args.device, cores=cores,
                  prefix=peer_prefix(i) if peer_prefix else ())
        db = sqlite3.connect(f"file:{workdir / 'ledger.sqlite'}?mode=ro", uri=True)

        def trained_samples() -> int:
            return db.execute(f"SELECT COALESCE(SUM(samples), 0) FROM results WHERE {TRAINED}").fetchone()[0]

        first = None  # (time, samples) when the swarm's first results arrived: start of the throughput window
        probes = [{"start": None, "end": None} for _ in range(args.peers)]
        launched = t0
        while time.time() - t0 < args.seconds:
            if t0 == launched:  # the swarm's clock starts where the single process's does: Python and torch loaded
                t0 = _imported(root, args.peers) or launched
            if first is None and trained_samples() > 0:
                first = (time.time(), trained_samples())
                for i in range(args.peers if probe else 0):
                    probes[i]["start"] = probe(i)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a swarm process exited early; see the logs in {root}")
            time.sleep(1.0)
        end = (time.time(), trained_samples())
        for i in range(args.peers if probe else 0):
            probes[i]["end"] = probe(i)
        evals = db.execute("SELECT step, val_loss, created_at FROM evaluations ORDER BY created_at").fetchall()
        # tokens at each evaluation: the results trained by then (each shard's samples, when it was submitted)
        results = db.execute(f"SELECT submitted_at, samples FROM results WHERE {TRAINED} "
                             "ORDER BY submitted_at").fetchall()
        curve = []
        for _step, val, at in evals:
            if at > t0 + args.seconds + 5:
                continue
            tokens = sum(n for ts, n in results if ts <= at) * seq_len
            curve.append([max(0.0, at - t0), tokens, val])
        util = [r[0] for r in db.execute("SELECT utilization FROM peers")]
        window = end[0] - first[0] if first else float("nan")
        out = {"tokens_per_s": (end[1] - first[1]) * seq_len / window if first else 0.0, "curve": curve,
               "peers": args.peers, "utilization": util, "startup_s": (first[0] - t0) if first else None}
        return out | {"probes": probes} if probe else out
    finally:
        for p in procs[1:] + procs[:1]:  # peers first, then the coordinator (its keeper checkpoints)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(90)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- comparing -------------------------------------------------------------------------------------


def time_to(curve: list, target: float) -> float | None:
    """First wall time (linear interpolation between measurements) at which the curve reaches ``target``."""
    for (t0, _, v0), (t1, _, v1) in zip(curve, curve[1:], strict=False):
        if v1 <= target:
            return t1 if v0 == v1 else t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


def loss_at(curve: list, t: float) -> float:
    for (t0, _, v0), (t1, _, v1) in zip(curve, curve[1:], strict=False):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return curve[-1][2]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("single", "-"), ("swarm", "-o")):
        c = result[name]["curve"]
        a.plot([p[0] for p in c], [p[2] for p in c], style, label=name, markersize=3)
        b.plot([p[1] / 1e6 for p in c], [p[2] for p in c], style, label=name, markersize=3)
    for ax in (a, b):
        ax.axhline(result["target_loss"], color="gray", linestyle=":", label="target")
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
    a.set_xlabel("wall time (s)")
    b.set_xlabel("tokens (M)")
    fig.suptitle(f"{result['mode']}: swarm of {result['swarm']['peers']} vs one process")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="diloco", choices=("diloco", "sync"))
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--corpus", default="stdlib",
                        help="as the coordinator's --corpus; on a GPU the standard library is a few passes a minute")
    parser.add_argument("--max-corpus-mb", type=float, default=0.0, help="read at most this many MB (0: all)")
    parser.add_argument("--shard-sequences", type=int, default=128,
                        help="sequences per work unit (larger on a GPU, or peers lease many a second)")
    parser.add_argument("--micro-batch", type=int, default=8, help="the run's (each peer's) micro-batch")
    parser.add_argument("--target-batch-size", type=int, default=128, help="sync: samples per swarm step")
    parser.add_argument("--inner-steps", type=int, default=64, help="diloco: micro-batches per outer round")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="diloco: outer Nesterov learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="diloco: outer Nesterov momentum")
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="the run's (inner) peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--decay-steps", type=int, default=3000)
    parser.add_argument("--single-batch", type=lambda s: 0 if s == "auto" else int(s), default=16,
                        help="the single process's batch; auto: what peer.device.choose_micro_batch picks alone on "
                             "the device (use on a GPU)")
    parser.add_argument("--single-lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=float, default=10.0, help="single: seconds between validation losses")
    parser.add_argument("--checkpoint-every", type=int, default=5,
                        help="swarm: the keeper's validation loss every N swarm steps (its CPU time counts against "
                             "the swarm, as in a real run; the single process's evaluations stop its clock)")
    parser.add_argument("--verify-ceiling", type=float,
                        help="swarm: the coordinator's --verify-ceiling (default: its own; 0 turns checks off)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the run's workdir and logs")
    parser.add_argument("--single-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--single-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_worker:
        single_worker(args.single_worker, args.seconds, args.single_batch, args.single_lr, args.eval_every,
                      args.single_out, args.device)
        return
    root = Path(tempfile.mkdtemp(prefix="hivefold-ttl-"))
    os.environ[KNOWN_ENV] = str(root / "known_coordinators")  # this run's coordinators, trusted on first use
    workdir = root / "coordinator"
    spec = build_run(workdir, args)
    single = run_single(workdir, args, root)
    swarm = run_swarm(workdir, args, root, spec["seq_len"])
    target = loss_at(single["curve"], args.seconds / 3)
    t_single, t_swarm = time_to(single["curve"], target), time_to(swarm["curve"], target)
    result = {
        "mode": args.mode, "device": args.device, "cores": len(os.sched_getaffinity(0)), "seconds": args.seconds,
        "single": single, "swarm": swarm, "tokens_per_s_ratio": swarm["tokens_per_s"] / single["tokens_per_s"],
        "target_loss": target, "single_time_to_target": t_single, "swarm_time_to_target": t_swarm,
        "time_to_loss_ratio": (t_swarm / t_single) if t_single and t_swarm else None,
        "single_final_loss": single["curve"][-1][2], "swarm_final_loss": swarm["curve"][-1][2] if swarm["curve"]
        else None, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "single_worker",
                                                                                  "single_out")} | {"spec": spec},
    }
    result["single"]["time_to_target"], result["swarm"]["time_to_target"] = t_single, t_swarm
    print(f"{args.mode}, {args.peers} peers vs one process, {args.seconds:.0f}s each, {result['cores']} cores")
    print(f"tokens/s        single {single['tokens_per_s']:9.0f}   swarm {swarm['tokens_per_s']:9.0f}   "
          f"ratio {result['tokens_per_s_ratio']:.3f}")
    print(f"target loss     {target:.3f} (the single process's at {args.seconds / 3:.0f}s)")
    print(f"time to target  single {t_single}s   swarm {t_swarm}s   ratio {result['time_to_loss_ratio']}")
    print(f"final val loss  single {result['single_final_loss']:.3f}   swarm {result['swarm_final_loss']}")
    print(f"peer utilization {swarm['utilization']}, swarm start-up {swarm['startup_s']}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
