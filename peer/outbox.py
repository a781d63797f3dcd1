"""Finished results not yet acknowledged by the coordinator: one file per lease, the source of truth.

A result is written here before it is submitted, so it survives a coordinator outage, a crash or a
restart of the peer; it is removed once the coordinator has answered for it. A result sampled for
verification is *parked* (``verifying/``) once its proof is sent, and asked about again until the
keeper's verdict comes back with its receipt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from google.protobuf.message import DecodeError

from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")


class Outbox:
    """Finished results not yet acknowledged by the coordinator, one file per lease."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, request: pb.SubmitResultRequest) -> None:
        path = self.dir / f"{request.lease_id}.pb"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(request.SerializeToString())
        os.replace(tmp, path)

    def pending(self) -> list[pb.SubmitResultRequest]:
        """The results not yet acknowledged; safe while the submitter removes acknowledged ones."""
        out = []
        for path in sorted(self.dir.glob("*.pb")):
            try:
                out.append(pb.SubmitResultRequest.FromString(path.read_bytes()))
            except FileNotFoundError:  # acknowledged (and removed) between the listing and the read
                continue
            except DecodeError:  # a torn or damaged file must not stop the peer
                log.warning("dropping unreadable outbox entry %s", path.name)
                path.unlink(missing_ok=True)
        return out

    def done(self, lease_id: str) -> None:
        (self.dir / f"{lease_id}.pb").unlink(missing_ok=True)

    def park(self, request: pb.SubmitResultRequest) -> None:
        """The coordinator holds the result pending verification: ask again later for the verdict."""
        parked = self.dir / "verifying"
        parked.mkdir(exist_ok=True)
        src = self.dir / f"{request.lease_id}.pb"
        if src.exists():
            os.replace(src, parked / src.name)

    def parked(self) -> list[pb.SubmitResultRequest]:
        out = []
        for path in sorted((self.dir / "verifying").glob("*.pb")):
            try:
                out.append(pb.SubmitResultRequest.FromString(path.read_bytes()))
            except (FileNotFoundError, DecodeError):
                path.unlink(missing_ok=True)
        return out

    def unpark(self, lease_id: str) -> None:
        (self.dir / "verifying" / f"{lease_id}.pb").unlink(missing_ok=True)

    def clear(self) -> None:
        for path in (*self.dir.glob("*.pb"), *self.dir.glob("verifying/*.pb")):
            path.unlink(missing_ok=True)
