"""A ``sync`` member in its own process, for tests/integration/test_sync_poisoning.py (no coordinator needed).

    python -m tests.integration.sync_worker --index I --dir DIR [--steps K] [--poison nan|huge|flip] [--bad-batch S]
                                            [--serve-bad-state] [--late]

As diloco_worker.py: worker 0 starts the DHT, every worker trains the tiny model on its own learnable stream,
and after each swarm step saves its parameters, the latest loss, the members it caught and the micro-batches
it did not send to DIR/w<I>-<step>.pt. A hostile worker (``--poison``) sends, in place of its mean gradient,
NaNs (``nan``), the gradient times 1e6 (``huge``) or times -16 (``flip``). An honest worker with
``--bad-batch S`` computes non-finite gradients once, at swarm step S (a bf16 overflow, say). A hostile worker
with ``--serve-bad-state`` declares itself the newest member and serves NaN states to downloaders. A ``--late``
worker joins once worker 0 has taken 2 swarm steps, downloads the state, saves what it got to DIR/w<I>-loaded.pt
and exits. It runs until killed with --steps 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import hivemind.optim.state_averager
import torch

from hivefold.averaging.sync import SyncAveraging
from hivefold.model import build_model
from tests.integration.diloco_worker import MICRO_BATCH, batch, join, make_spec, start_together

MEMBERS = 3


def poison(sync: SyncAveraging, how: str) -> None:
    """Make this member hostile: its own averagers send what ``how`` says (their inputs, after all honest checks)."""
    averager = sync.opt.grad_averager
    load = averager.load_accumulators_into_averager_

    def hostile() -> None:
        load()
        with averager.get_tensors() as tensors:
            for t in tensors:
                if how == "nan":
                    t.fill_(float("nan"))
                else:
                    t.mul_({"huge": 1e6, "flip": -16.0}[how])

    averager.load_accumulators_into_averager_ = hostile
    honest_step = sync.step

    def hostile_step(samples: int) -> None:
        # its own model goes bad with what it sends (hivemind applies its local gradients when a round fails): it
        # keeps sending anyway, where an honest member would keep its non-finite gradients to itself
        for p in sync.model.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        honest_step(samples)

    sync.step = hostile_step


def serve_bad_state(sync: SyncAveraging) -> None:
    """Make this member declare itself the newest (whatever hivemind sets) and serve states with NaN moments."""
    averager = sync.opt.state_averager
    honest_class = type(averager)
    declared = honest_class.state_sharing_priority

    class Newest(honest_class):
        state_sharing_priority = property(declared.fget, lambda self, _: declared.fset(self, 1e9))

    averager.__class__ = Newest
    averager.state_sharing_priority = 1e9
    # hivemind serves the state through a weak reference to the method it had at start: what it calls is patched
    honest_dump = hivemind.optim.state_averager.dump_optimizer_state

    def hostile_dump(optimizer):
        metadata, tensors = honest_dump(optimizer)
        return metadata, [torch.full_like(t, float("nan")) for t in tensors]

    hivemind.optim.state_averager.dump_optimizer_state = hostile_dump


def late_download(sync: SyncAveraging, directory: Path, index: int) -> None:
    loaded = sync.load_state_from_peers(timeout=60)
    torch.save({"loaded": loaded, "epoch": sync.epoch, "flagged": dict(sync.flagged),
                "params": [p.detach().clone() for p in sync.model.parameters()]}, directory / f"w{index}-loaded.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--poison", choices=("nan", "huge", "flip"))
    parser.add_argument("--bad-batch", type=int, default=-1, help="swarm step at which one gradient is non-finite")
    parser.add_argument("--serve-bad-state", action="store_true", help="declare itself newest, serve NaN states")
    parser.add_argument("--members", type=int, default=MEMBERS, help="members that start together")
    parser.add_argument("--late", action="store_true", help="join after 2 swarm steps, download the state, exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s w{args.index} %(name)s: %(message)s")
    torch.set_num_threads(1)
    while args.late and not (args.dir / "w0-2.pt").exists():
        time.sleep(0.2)
    dht = join(args.index, args.dir)
    spec = make_spec("fp32")
    # every member's micro-batch makes a swarm step, and parameters are averaged every other step
    spec = dataclasses.replace(spec, target_batch_size=MEMBERS * MICRO_BATCH, averaging=dataclasses.replace(
        spec.averaging, mode="sync", average_state_every=2))
    model = build_model(spec.model, spec.seed)
    sync = SyncAveraging(spec, model, dht)
    if args.poison:
        poison(sync, args.poison)
    if args.serve_bad_state:
        serve_bad_state(sync)
    if args.late:
        late_download(sync, args.dir, args.index)
        sync.shutdown()
        dht.shutdown()
        return
    start_together(args.index, args.dir, args.members)
    gen = torch.Generator().manual_seed(100 + args.index)
    saved = 0
    while args.steps == 0 or sync.epoch < args.steps:
        block = batch(gen)
        _, loss = model(block[:, :-1], block[:, 1:])
        bad = sync.epoch == args.bad_batch and not sync.refused_out
        (loss * (float("inf") if bad else MICRO_BATCH)).backward()
        sync.step(MICRO_BATCH)
        if sync.epoch > saved:
            saved = sync.epoch
            torch.save({"params": [p.detach().clone() for p in model.parameters()], "loss": float(loss),
                        "flagged": dict(sync.flagged), "libp2p_id": dht.peer_id.to_base58(),
                        "refused_out": sync.refused_out},
                       args.dir / f"w{args.index}-{saved}.pt")
        time.sleep(0.05)
    sync.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
