"""The keeper: an auxiliary hivemind peer that follows the swarm, checkpoints it and measures it.

It runs as its own process (``python -m coordinator.keeper``, started by the coordinator) because
``hivemind.Optimizer`` must be created in a process's main thread. It never trains. Every
``checkpoint_every`` swarm steps it downloads the swarm's state from the peers, computes the
validation loss on the held-out shard, writes a checkpoint atomically and records both in the
ledger. Its own state is shared with newcomers, so a run whose peers all left (or a coordinator
reopened from a checkpoint) resumes from the keeper. On SIGTERM it takes a final checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

import hivemind
import torch

from coordinator.ledger import Ledger
from coordinator.run import CHECKPOINT_DIR, LEDGER_FILE, SHARD_DIR, SPEC_FILE
from hivefold.checkpoint import checkpoint_filename, load_checkpoint, save_checkpoint
from hivefold.logs import setup_logging
from hivefold.model import build_model
from hivefold.shards import VAL_FILENAME, decode_shard
from hivefold.spec import RunSpec
from hivefold.training import evaluate, make_optimizer, sync_scheduler

log = logging.getLogger("hivefold.keeper")


class Keeper:
    def __init__(self, workdir: Path, *, initial_peers: list[str], host_maddrs: list[str], checkpoint_every: int,
                 keep_checkpoints: int):
        self.workdir = workdir
        self.spec = RunSpec.from_json((workdir / SPEC_FILE).read_text())
        self.ledger = Ledger(workdir / LEDGER_FILE)
        self.checkpoint_every, self.keep = checkpoint_every, keep_checkpoints
        val = self.spec.validation
        self.val = decode_shard((workdir / SHARD_DIR / VAL_FILENAME).read_bytes(), sha256=val.sha256,
                                seq_len=self.spec.seq_len, vocab_size=self.spec.model.vocab_size)
        self.model = build_model(self.spec.model, self.spec.seed)
        latest = self.ledger.latest_checkpoint()
        ckpt = load_checkpoint(Path(latest[1])) if latest else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model)
        self.dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=host_maddrs, start=True)
        self.opt = make_optimizer(self.spec, self.model, self.dht)
        if ckpt is not None and ckpt.optimizer is not None:
            self.opt.load_state_dict(ckpt.optimizer)
            sync_scheduler(self.opt)
            log.info("resumed from checkpoint at step %d", ckpt.step)
        self.last_step = ckpt.step if ckpt else -1

    def evaluate_and_checkpoint(self, reason: str) -> None:
        step = self.opt.local_epoch
        val_loss = evaluate(self.model, self.val)
        now = time.time()
        self.ledger.record_evaluation(step, val_loss, now=now)
        if step == self.last_step:
            return
        path = self.workdir / CHECKPOINT_DIR / checkpoint_filename(step)
        save_checkpoint(path, spec=self.spec, step=step, model=self.model.state_dict(),
                        optimizer=self.opt.state_dict(), val_loss=val_loss)
        self.ledger.record_checkpoint(step, str(path.resolve()), val_loss, now=now)
        self.last_step = step
        log.info("checkpoint at step %d (%s): val_loss %.4f -> %s", step, reason, val_loss, path)
        self._prune()

    def _prune(self) -> None:
        files = sorted((self.workdir / CHECKPOINT_DIR).glob("step-*.pt"))
        for old in files[: -self.keep]:
            step = int(old.stem.split("-")[1])
            self.ledger.forget_checkpoint(step)
            old.unlink(missing_ok=True)

    def catch_up(self) -> bool:
        """Download the swarm's newest state; True if it moved our step forward."""
        before = self.opt.local_epoch
        self.opt.load_state_from_peers()
        return self.opt.local_epoch > before

    def run(self, stop: threading.Event, poll: float) -> None:
        if self.last_step < 0:
            self.evaluate_and_checkpoint("initial state")
        while not stop.wait(poll):
            global_step = self.opt.tracker.global_epoch
            self.ledger.observe_global_step(global_step)
            if global_step >= self.last_step + self.checkpoint_every and self.catch_up():
                self.evaluate_and_checkpoint("periodic")
        if self.opt.tracker.global_epoch > self.last_step and self.catch_up():
            self.evaluate_and_checkpoint("final")

    def shutdown(self) -> None:
        self.opt.shutdown()
        self.dht.shutdown()
        self.ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator.keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--initial-peer", action="append", default=[], help="bootstrap multiaddr (repeatable)")
    parser.add_argument("--dht-listen", action="append", default=[], help="listen multiaddr (repeatable)")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--keep-checkpoints", type=int, default=3)
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    setup_logging("keeper")
    torch.set_num_threads(1)  # the keeper must not steal the peers' cores
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    keeper = Keeper(args.workdir, initial_peers=args.initial_peer,
                    host_maddrs=args.dht_listen or ["/ip4/0.0.0.0/tcp/0"], checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints)
    try:
        keeper.run(stop, args.poll)
    finally:
        keeper.shutdown()


if __name__ == "__main__":
    main()

