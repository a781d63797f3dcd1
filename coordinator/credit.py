"""Credit: points per accepted result, Folding@Home's quick-return bonus, and signed receipts.

``points = base × max(1, sqrt(k × deadline / elapsed))``: ``base`` is proportional to the compute
the result cost (sequences × tokens per sequence × parameters), ``deadline`` the lease's allotted
time, ``elapsed`` from the lease's issue to the submission. Returning faster than ``k × deadline``
earns more, never less than the base. ``k`` is ``--qrb-k`` (0.75 by default, 0 turns the bonus off).
"""

from __future__ import annotations

import math
from pathlib import Path

from hivefold.identity import Identity
from hivefold.receipts import make_receipt

KEY_DIR = "credit"  # the coordinator's receipt-signing key: <workdir>/credit/identity.pem (mode 0600)


def base_points(samples: int, *, seq_len: int, parameters: int) -> float:
    """Points for the compute of ``samples`` sequences: billions of parameter-tokens (~FLOPs / 6e9)."""
    return samples * seq_len * parameters / 1e9


def quick_return_points(base: float, *, deadline_s: float, elapsed_s: float, k: float) -> float:
    """``base × max(1, sqrt(k × deadline / elapsed))``."""
    if base <= 0 or k <= 0:
        return max(base, 0.0)
    return base * max(1.0, math.sqrt(k * deadline_s / max(elapsed_s, 1e-3)))


class ReceiptSigner:
    """Signs receipts with the coordinator's key, made on first use in its workdir."""

    def __init__(self, workdir: Path, run_id: str, seq_len: int = 0):
        self.key = Identity.load_or_create(workdir / KEY_DIR)
        self.run_id, self.seq_len = run_id, seq_len

    @property
    def public_key_hex(self) -> str:
        return self.key.public_key.hex()

    def sign_result(self, *, samples: int, **fields) -> str:
        """A receipt for a result of ``samples`` sequences (the ledger's ``sign_receipt``: tokens from the run's
        sequence length)."""
        return self.sign(tokens=samples * self.seq_len, **fields)

    def sign(self, *, peer_id: str, lease_id: str, shard_id: int, tokens: int, points: float,
             accepted_at: float) -> str:
        return make_receipt({"run_id": self.run_id, "peer_id": peer_id, "lease_id": lease_id, "shard_id": shard_id,
                             "tokens": tokens, "points": round(points, 6), "accepted_at": round(accepted_at, 3)},
                            self.key)
