"""Credit receipts: the coordinator signs every accepted result, so a volunteer can prove its credit.

A receipt is one JSON object: ``{"receipt": {...fields...}, "public_key": hex, "signature": hex}``,
the signature an Ed25519 signature by the coordinator's key over the fields as canonical JSON
(sorted keys, no spaces). Anyone holding the coordinator's public key (``/api/credit``, the status
document, ``Register``'s answer) can check one offline: :func:`verify_receipt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hivefold.errors import IntegrityError
from hivefold.identity import Identity, verify_signature

FIELDS = ("run_id", "peer_id", "lease_id", "shard_id", "tokens", "points", "accepted_at")


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def make_receipt(fields: dict, key: Identity) -> str:
    """A signed receipt for ``fields`` (exactly :data:`FIELDS`)."""
    if set(fields) != set(FIELDS):
        raise ValueError(f"a receipt holds exactly {FIELDS}, got {sorted(fields)}")
    return json.dumps({"receipt": fields, "public_key": key.public_key.hex(),
                       "signature": key.sign(_canonical(fields)).hex()}, sort_keys=True)


def verify_receipt(text: str, public_key: bytes | None = None) -> dict:
    """The receipt's fields if its signature holds (by ``public_key`` when given); IntegrityError if not."""
    try:
        doc = json.loads(text)
        fields, key, signature = doc["receipt"], bytes.fromhex(doc["public_key"]), bytes.fromhex(doc["signature"])
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"not a hivefold receipt: {e}") from None
    if not isinstance(fields, dict) or set(fields) != set(FIELDS):
        raise IntegrityError(f"a receipt holds exactly {FIELDS}")
    if public_key is not None and key != public_key:
        raise IntegrityError("the receipt was signed by another coordinator's key")
    if not verify_signature(key, _canonical(fields), signature):
        raise IntegrityError("the receipt's signature does not match its contents")
    return fields


class ReceiptBook:
    """A peer's receipts, one JSON line each in its workdir (``receipts.jsonl``): its proof of credit."""

    FILENAME = "receipts.jsonl"

    def __init__(self, workdir: Path):
        self.path = workdir / self.FILENAME

    def add(self, receipt: str, public_key: bytes | None) -> dict:
        """Verify (by the coordinator's key from Register, when known) and append; IntegrityError if forged."""
        fields = verify_receipt(receipt, public_key or None)
        with self.path.open("a") as f:
            f.write(receipt.replace("\n", " ") + "\n")
            f.flush()
            os.fsync(f.fileno())
        return fields

    def summary(self, public_key: bytes | None = None) -> dict:
        """Totals over the receipts that verify (optionally: all by ``public_key``), and the lines that do not."""
        good, bad, leases = [], [], set()
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                fields = verify_receipt(line, public_key)
            except IntegrityError as e:
                bad.append({"line": number, "error": str(e)})
                continue
            if fields["lease_id"] not in leases:  # an acknowledgement received twice is one result
                leases.add(fields["lease_id"])
                good.append(fields)
        return {"receipts": len(good), "points": round(sum(r["points"] for r in good), 6),
                "tokens": sum(r["tokens"] for r in good), "runs": sorted({r["run_id"] for r in good}),
                "invalid": bad}
