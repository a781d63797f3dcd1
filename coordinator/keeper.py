"""The keeper: an auxiliary hivemind peer that follows the swarm, checkpoints it and measures it.

It runs as its own process (``python -m coordinator.keeper``, started by the coordinator) because
hivemind's optimizer must be created in a process's main thread; it follows either averaging mode
through ``hivefold.averaging``. It never trains. Every
``checkpoint_every`` swarm steps (outer steps in ``diloco``) it downloads the swarm's state from the peers, computes the
validation loss on the held-out shard, writes a checkpoint atomically and records both in the
ledger, with the outcome of every download attempt (``hivefold status`` shows the keeper's health).
It also checks the results sampled for verification, by replaying their proofs of training
(``coordinator.verifier``). Its own state is shared with newcomers, so a run whose peers all left
(or a coordinator reopened from a checkpoint) resumes from the keeper.

Nothing a peer trained is lost on a clean exit: a peer that leaves while it alone holds a state
newer than the latest checkpoint waits (``Leave`` tells it to) until the keeper has downloaded and
checkpointed it. On SIGTERM the keeper takes a final checkpoint if the swarm is ahead of the
latest one and a peer still serves its state, and says plainly when it could not. It exits by
itself when the coordinator that started it is gone, so it can never be left behind.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import threading
import time
from pathlib import Path

import torch

from coordinator.credit import KEY_DIR
from coordinator.ledger import Ledger
from coordinator.run import CHECKPOINT_DIR, LEDGER_ENV, LEDGER_FILE, SHARD_DIR, SPEC_FILE
from coordinator.verifier import Verifier
from hivefold import addressbook
from hivefold.averaging import make_averaging
from hivefold.checkpoint import checkpoint_filename, load_checkpoint, save_checkpoint
from hivefold.dht import SwarmDHT
from hivefold.identity import Identity
from hivefold.logs import LastError, setup_logging
from hivefold.model import build_model
from hivefold.shards import VAL_FILENAME, decode_shard
from hivefold.signals import install_stop_handlers
from hivefold.spec import RunSpec
from hivefold.swarm_access import OwnPass
from hivefold.training import evaluate

log = logging.getLogger("hivefold.keeper")

DOWNLOAD_TIMEOUT_S = 30.0  # one attempt to download the swarm's state
FINAL_WINDOW_S = 40.0  # the final checkpoint retries a failed download this long (the coordinator waits 60 s in all)
FINAL_RETRY_S = 2.0
HANDOVER_WINDOW_S = 120.0  # how long after a clean leave the keeper still tries to take the peer's state
KEEPER_DHT_IDENTITY = "keeper-dht.key"  # a fresh libp2p identity at every start (its swarm token names it)


class Keeper:
    def __init__(self, workdir: Path, *, initial_peers: list[str], host_maddrs: list[str],
                 announce_maddrs: list[str], checkpoint_every: int, keep_checkpoints: int, online_seconds: float,
                 verify_tolerance: float = 0.02, ban_after_invalid: int = 2):
        self.workdir = workdir
        self.spec = RunSpec.from_json((workdir / SPEC_FILE).read_text())
        # the coordinator says where the ledger is (its --ledger); run by hand, the workdir's file
        self.ledger = Ledger(os.environ.get(LEDGER_ENV) or workdir / LEDGER_FILE)
        self.checkpoint_every, self.keep = checkpoint_every, keep_checkpoints
        self.online_seconds = online_seconds  # a peer silent for longer is offline (the coordinator's rule)
        val = self.spec.validation
        self.val = decode_shard((workdir / SHARD_DIR / VAL_FILENAME).read_bytes(), sha256=val.sha256,
                                seq_len=self.spec.seq_len, vocab_size=self.spec.model.vocab_size)
        self.model = build_model(self.spec.model, self.spec.seed)
        self.verifier = Verifier(workdir, self.spec, self.ledger, tolerance=verify_tolerance,
                                 ban_after=ban_after_invalid, held_out=self.val, online_seconds=online_seconds)
        latest = self.ledger.latest_checkpoint(on_disk=True)
        ckpt = load_checkpoint(Path(latest[1])) if latest else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model)
        # the keeper holds the coordinator's key: it signs its own swarm token (hivefold.swarm_access)
        key = Identity.load_or_create(workdir / KEY_DIR)
        self.swarm_pass = OwnPass(key, "keeper", workdir / KEEPER_DHT_IDENTITY, fresh=True)
        self.dht = SwarmDHT(initial_peers=initial_peers, host_maddrs=host_maddrs,
                            announce_maddrs=announce_maddrs or None, start=True, **self.swarm_pass.dht_kwargs())
        self.swarm_pass.announce_if_due(self.dht)
        self.averaging = make_averaging(self.spec, self.model, self.dht, trains=False, swarm_key=key.public_key)
        if ckpt is not None and ckpt.optimizer is not None:
            self.averaging.load_state_dict(ckpt.optimizer)
            log.info("resumed from checkpoint at step %d", ckpt.step)
        self.last_step = ckpt.step if ckpt else -1
        self.download_errors = LastError("hivemind.averaging")
        # Peers find the keeper (to load its state when no peer has one) through the coordinator's address book.
        self.own_maddrs = addressbook.own_maddrs(self.dht)
        self.ledger.set_keeper_maddrs(self.own_maddrs)

    def evaluate_and_checkpoint(self, reason: str) -> None:
        step = self.averaging.epoch
        now = time.time()  # when the swarm's state was this one (the evaluation below takes a while)
        if torch.cuda.is_available():  # the operator's GPU, if any, measures the loss as the peers' GPUs train
            val_loss = evaluate(copy.deepcopy(self.model).to("cuda"), self.val, device="cuda")
        else:
            val_loss = evaluate(self.model, self.val)
        self.ledger.record_evaluation(step, val_loss, now=now)
        if step == self.last_step:
            return
        path = self.workdir / CHECKPOINT_DIR / checkpoint_filename(step)
        save_checkpoint(path, spec=self.spec, step=step, model=self.model.state_dict(),
                        optimizer=self.averaging.state_dict(), val_loss=val_loss)
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

    def catch_up(self, want_step: int, timeout: float = DOWNLOAD_TIMEOUT_S) -> bool:
        """Download the swarm's newest state (one bounded attempt); True if it reached ``want_step``.

        The keeper must stay responsive to a stop, so it makes one attempt and records the outcome for
        ``hivefold status``.
        """
        online = self.ledger.swarm_maddrs(exclude_peer=None, online_seconds=self.online_seconds, now=time.time())
        addressbook.connect(self.dht, online)
        self.download_errors.clear()
        try:
            self.averaging.load_state_from_peers(timeout=timeout)
        except (TimeoutError, RuntimeError) as e:  # the averager's future timed out or its process failed
            self.download_errors.message = f"{type(e).__name__}: {e}"
        step = self.averaging.epoch
        if step >= want_step:
            self.ledger.record_keeper_download(step=step, error=None, now=time.time())
            return True
        error = self.download_errors.message or f"no peer served a state at step >= {want_step} (got step {step})"
        self.ledger.record_keeper_download(step=None, error=error, now=time.time())
        log.warning("could not download the swarm's state at step %d: %s", want_step, error)
        return False

    def run(self, stop: threading.Event, poll: float, parent_alive) -> None:
        if self.last_step < 0:
            self.evaluate_and_checkpoint("initial state")
        while not stop.wait(poll):
            if not parent_alive():
                log.error("the coordinator that started this keeper is gone; taking a final checkpoint and exiting")
                break
            self.swarm_pass.announce_if_due(self.dht)
            # The swarm's step: from hivemind's tracker (sync), and from what peers report to the coordinator.
            global_step = self.ledger.observe_global_step(self.averaging.global_epoch)
            now = time.time()
            handovers = self.ledger.handovers_wanted(since=now - HANDOVER_WINDOW_S, online_seconds=self.online_seconds,
                                                     now=now)
            if handovers:
                peer, epoch, maddrs = handovers[0]
                addressbook.connect(self.dht, maddrs)
                if self.catch_up(epoch):
                    self.evaluate_and_checkpoint(f"handed over by leaving peer {peer}")
            elif global_step >= self.last_step + self.checkpoint_every and self.catch_up(global_step):
                self.evaluate_and_checkpoint("periodic")
            self.verifier.run_pending()  # after the checkpoint: checks wait a poll, the swarm's state may not
        self.final_checkpoint()

    def final_checkpoint(self) -> None:
        """Checkpoint the swarm's newest state before exiting, retrying a failed download for FINAL_WINDOW_S.

        A download can fail for a moment (a peer mid-round, a token not yet seen by a peer's averager); the
        run's last steps would be lost for good, so while a peer is online the keeper tries again until the
        window closes.
        """
        ahead = max(self.averaging.global_epoch, int(self.ledger.get_meta("global_step", "0")))
        if ahead <= self.last_step:
            log.info("final checkpoint: the latest one (step %d) is already the swarm's newest state", self.last_step)
            return
        deadline = time.monotonic() + FINAL_WINDOW_S
        while not self.catch_up(ahead, timeout=max(1.0, min(DOWNLOAD_TIMEOUT_S, deadline - time.monotonic()))):
            online = [m for m in self.ledger.swarm_maddrs(exclude_peer=None, online_seconds=self.online_seconds,
                                                          now=time.time()) if m not in self.own_maddrs]
            if not online or time.monotonic() + FINAL_RETRY_S >= deadline:
                why = "no peer is online" if not online else f"none served it in {FINAL_WINDOW_S:.0f}s"
                log.warning("final checkpoint NOT written: the swarm is at step %d but %s; the latest checkpoint "
                            "stays at step %d", ahead, why, self.last_step)
                return
            time.sleep(FINAL_RETRY_S)
        self.evaluate_and_checkpoint("final")

    def shutdown(self) -> None:
        self.download_errors.close()
        self.averaging.shutdown()
        self.dht.shutdown()
        self.ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator.keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--initial-peer", action="append", default=[], help="bootstrap multiaddr (repeatable)")
    parser.add_argument("--dht-listen", action="append", default=[], help="listen multiaddr (repeatable)")
    parser.add_argument("--dht-announce", action="append", default=[], help="multiaddr to announce (repeatable)")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--keep-checkpoints", type=int, default=3)
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument("--online-seconds", type=float, default=30.0, help="a peer silent this long is offline")
    parser.add_argument("--verify-tolerance", type=float, default=0.02, help="see hivefold coordinator --help")
    parser.add_argument("--ban-after-invalid", type=int, default=2, help="see hivefold coordinator --help")
    args = parser.parse_args(argv)
    setup_logging("keeper")
    torch.set_num_threads(1)  # the keeper must not steal the peers' cores
    parent = os.getppid()
    stop = threading.Event()
    install_stop_handlers(stop, what="taking a final checkpoint, then exiting")
    keeper = Keeper(args.workdir, initial_peers=args.initial_peer,
                    host_maddrs=args.dht_listen or ["/ip4/0.0.0.0/tcp/0"], announce_maddrs=args.dht_announce,
                    checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                    online_seconds=args.online_seconds, verify_tolerance=args.verify_tolerance,
                    ban_after_invalid=args.ban_after_invalid)
    install_stop_handlers(stop, what="taking a final checkpoint, then exiting")  # hivemind took SIGINT
    try:
        keeper.run(stop, args.poll, parent_alive=lambda: os.getppid() == parent)
    finally:
        keeper.shutdown()


if __name__ == "__main__":
    main()
