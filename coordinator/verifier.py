"""The keeper's verification of sampled results: replay each queued proof of training, record the verdict.

Runs inside the keeper's loop (``coordinator.keeper``), one proof at a time and within a time budget
per poll, so checkpointing never waits long. See ``hivefold.proof`` for what a replay checks and
``coordinator.ledger.verification`` for what a verdict does (credit and receipt, or a strike and,
past the operator's threshold, a ban).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from coordinator.credit import ReceiptSigner
from coordinator.ledger import Ledger
from coordinator.run import SHARD_DIR
from hivefold.errors import IntegrityError
from hivefold.model import build_model
from hivefold.proof import Check, check_proof
from hivefold.shards import decode_shard, shard_filename
from hivefold.spec import RunSpec

log = logging.getLogger("hivefold.keeper")

BUDGET_S = 4.0  # verification time per keeper poll, at most (a proof is always finished once started)


def replay_device(peer_device: str) -> tuple[str, bool]:
    """Where the keeper replays a peer's proof, and whether in bf16.

    A GPU peer trained in bf16 autocast: its segment is replayed on the keeper's GPU in bf16 (seconds, and
    the same kind of arithmetic), or, on a keeper without one, in the CPU's bf16. Anything else trained in
    fp32 and is replayed in fp32 on the CPU, where the arithmetic is closest to the peer's.
    """
    if peer_device == "cuda":
        return ("cuda" if torch.cuda.is_available() else "cpu"), True
    return "cpu", False


class Verifier:
    def __init__(self, workdir: Path, spec: RunSpec, ledger: Ledger, *, tolerance: float, ban_after: int,
                 held_out: np.ndarray | None = None, online_seconds: float = 30.0):
        self.workdir, self.spec, self.ledger = workdir, spec, ledger
        self.tolerance, self.ban_after, self.held_out = tolerance, ban_after, held_out
        self.online_seconds = online_seconds  # a peer silent this long is offline: its missing proof will not come
        self.models: dict[str, torch.nn.Module] = {}  # scratch, per device: every replay overwrites its parameters
        self.signer = ReceiptSigner(workdir, spec.run_id, spec.seq_len)

    def _model(self, device: str) -> torch.nn.Module:
        if device not in self.models:
            self.models[device] = build_model(self.spec.model, self.spec.seed).to(device)
        return self.models[device]

    def _sequences(self, shard_id: int) -> np.ndarray:
        info = self.spec.shards[shard_id]
        data = (self.workdir / SHARD_DIR / shard_filename(shard_id)).read_bytes()
        return decode_shard(data, sha256=info.sha256, seq_len=self.spec.seq_len, vocab_size=self.spec.model.vocab_size)

    def run_pending(self, budget_s: float = BUDGET_S) -> int:
        """Check queued proofs for up to ``budget_s``; how many were checked. Late proofs expire first."""
        for lease_id in self.ledger.expire_proofs(time.time(), self.online_seconds):
            log.warning("lease %s: no proof of training came in time; the result earns nothing", lease_id)
        done, deadline = 0, time.monotonic() + budget_s
        while time.monotonic() < deadline:
            task = self.ledger.next_proof()
            if task is None:
                break
            t0 = time.perf_counter()
            try:
                sequences = self._sequences(task.shard_id)
            except (OSError, IntegrityError, IndexError) as e:  # the coordinator's own data: not the peer's fault
                log.error("cannot verify lease %s: shard %d unreadable (%s)", task.lease_id, task.shard_id, e)
                self.ledger.record_verification(task.lease_id, valid=True, detail=f"unchecked: shard unreadable ({e})",
                                                now=time.time(), sign_receipt=self.signer.sign_result)
                continue
            device, bf16 = replay_device(task.device_kind)
            try:
                check = check_proof(task.proof, spec=self.spec, model=self._model(device), sequences=sequences,
                                    losses=task.losses, digests=task.digests, state_changes=task.state_changes,
                                    segments=task.segments, segment=task.segment,
                                    tolerance=self.tolerance, held_out=self.held_out, device=device, bf16=bf16)
            except Exception as e:  # noqa: BLE001 - a hostile proof must cost its sender, never the keeper
                check = Check(False, f"the replay failed: {type(e).__name__}: {e}"[:200])
            seconds = time.perf_counter() - t0
            banned = self.ledger.record_verification(
                task.lease_id, valid=check.valid, detail=check.detail, now=time.time(),
                score=None if check.score != check.score else check.score, keeper_seconds=seconds,
                ban_after=self.ban_after, sign_receipt=self.signer.sign_result)
            level = logging.INFO if check.valid else logging.WARNING
            log.log(level, "verified lease %s of peer %s (segment %d/%d, %.2fs on %s for a %.2fs shard): %s, %s",
                    task.lease_id, task.peer_id, task.segment, task.segments, seconds, device, task.train_seconds,
                    "valid" if check.valid else "INVALID", check.detail)
            if banned:
                log.warning("peer %s banned: its results failed verification %d times", task.peer_id, self.ban_after)
            done += 1
        return done
