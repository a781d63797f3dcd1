"""A DiLoCo member in its own process, for tests/integration/test_diloco.py (no coordinator needed).

    python -m tests.integration.diloco_worker --index I --dir DIR [--rounds K] [--compression int8]

Worker 0 starts the DHT and writes its multiaddrs to DIR/maddrs; the others bootstrap from them.
Every worker trains a tiny model on a learnable synthetic stream of its own (token i+1 follows
token i, from per-worker random starts), and after each outer step saves the global parameters,
the outer step's time and the latest training loss to DIR/w<I>-<step>.pt. It exits after K outer
steps, or runs until killed with --rounds 0.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from hivefold.averaging.diloco import DiLoCo
from hivefold.dht import SwarmDHT
from hivefold.model import build_model
from hivefold.spec import AveragingConfig, ModelConfig, OptimizerConfig, RunSpec, ShardInfo

MICRO_BATCH, SEQ = 8, 32


def make_spec(compression: str) -> RunSpec:
    return RunSpec(run_id="diloco-test", seed=3, tokenizer="bytes", seq_len=SEQ, micro_batch=MICRO_BATCH,
                   target_batch_size=MICRO_BATCH, model=ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64,
                                                                    max_seq_len=SEQ),
                   optimizer=OptimizerConfig(lr=1e-2, warmup_steps=2, decay_steps=1000),
                   averaging=AveragingConfig(mode="diloco", inner_steps=30, matchmaking_time=1.0,
                                             averaging_timeout=8.0, compression=compression),
                   shards=(ShardInfo(0, "0" * 64, 1, 1),), validation=ShardInfo(-1, "0" * 64, 1, 1))


def join(index: int, directory: Path) -> SwarmDHT:
    """Worker 0 starts the DHT and writes its multiaddrs to DIR/maddrs; the others bootstrap from them."""
    maddrs_file = directory / "maddrs"
    if index == 0:
        dht = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        maddrs_file.write_text("\n".join(str(m) for m in dht.get_visible_maddrs()))
        return dht
    while not maddrs_file.exists():
        time.sleep(0.2)
    return SwarmDHT(initial_peers=maddrs_file.read_text().split(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)


def start_together(index: int, directory: Path, members: int) -> None:
    """Wait until ``members`` workers are ready, as peers already in a swarm would be."""
    (directory / f"w{index}.ready").touch()
    while len(list(directory.glob("w*.ready"))) < members:
        time.sleep(0.1)


def batch(gen: torch.Generator) -> torch.Tensor:
    """A micro-batch of the learnable stream: token i+1 follows token i, from random starts."""
    starts = torch.randint(0, 64, (MICRO_BATCH, 1), generator=gen)
    return (starts + torch.arange(SEQ + 1)) % 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--poison", choices=("nan", "huge", "nan-once", "flip"),
                        help="nan, huge: a hostile member, no guard of its own, every tensor of its local model "
                             "poisoned at every step; flip: a hostile member sending its "
                             "pseudo-gradient negated and scaled by 16; "
                             "nan-once: an honest member whose local model goes non-finite once")
    parser.add_argument("--members", type=int, default=2, help="members that start together")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s w{args.index} %(name)s: %(message)s")
    torch.set_num_threads(1)
    dht = join(args.index, args.dir)
    spec = make_spec(args.compression)
    model = build_model(spec.model, spec.seed)
    diloco = DiLoCo(spec, model, dht)
    if args.poison in ("nan", "huge"):
        diloco.guard.check_outgoing = lambda own: (0.0, None)
    elif args.poison == "flip":
        diloco.guard.check_outgoing = lambda own: ([d.mul_(-16.0) for d in own], (0.0, None))[1]
    start_together(args.index, args.dir, args.members)
    gen = torch.Generator().manual_seed(100 + args.index)
    saved, poisoned = 0, False
    while args.rounds == 0 or diloco.epoch < args.rounds:
        block = batch(gen)
        _, loss = model(block[:, :-1], block[:, 1:])
        (loss * MICRO_BATCH).backward()
        diloco.step(MICRO_BATCH)
        if args.poison in ("nan", "huge"):
            # Every tensor: whichever member reduces a part gets a poisoned slice. (With one tensor poisoned, where
            # the poisoner reduced that part itself its own reducer, this project's, left its slice out: nothing
            # reached an honest member, nobody caught it, and in one test run in five or so, nothing was to see.)
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(1e6 if args.poison == "huge" else float("nan"))
        elif args.poison == "nan-once" and diloco.epoch == 1 and not poisoned:
            poisoned = True
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        if diloco.epoch > saved:
            saved = diloco.epoch
            torch.save({"params": [g.clone() for g in diloco.global_params], "time": time.time(),
                        "loss": float(loss), "stats": diloco.stats(),
                        "refused_in": diloco.guard.refused_in, "refused_out": diloco.guard.refused_out,
                        "flagged": dict(diloco.flagged), "libp2p_id": dht.peer_id.to_base58()},
                       args.dir / f"w{args.index}-{saved}.pt")
        time.sleep(0.05)  # a steady pace: rounds last longer than the progress trackers take to see each other
    diloco.settle()
    diloco.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
