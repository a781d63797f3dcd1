"""A peer's side of verified work: what each shard keeps for a proof of training, and answering a check.

While a shard trains, a ``ShardRecorder`` (``hivefold.proof``) keeps the states a check may ask for. When
the coordinator answers a result with "pending verification" and names a segment, the peer uploads that
segment's proof, or says it has none (it restarted since it trained the shard) so the shard goes out
again at once. Pending results are asked about again for their verdict and receipt.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from hivefold.client import describe_rpc_error
from hivefold.errors import IntegrityError
from hivefold.proof import ShardRecorder
from protos import coordinator_pb2 as pb

log = logging.getLogger("hivefold.peer")

KEPT = 3  # shards whose records are kept (the one training, results not yet answered)
GONE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION)  # a parked result the coordinator will never answer for


class Proofs:
    def __init__(self):
        self.segments = 0  # from Register: 0 = the run does not verify results
        self._recorders: dict[str, ShardRecorder] = {}  # lease id -> its record
        self._lock = threading.Lock()  # the trainer adds, the submitter thread takes
        self._polled_at = 0.0

    def recorder(self, lease_id: str, n_batches: int, micro_batch: int) -> ShardRecorder | None:
        """What to keep while training ``lease_id``; None if the run does not verify."""
        if not self.segments:
            return None
        recorder = ShardRecorder(n_batches, self.segments, micro_batch)
        with self._lock:
            while len(self._recorders) >= KEPT:  # the oldest: answered long ago, its proof is not wanted
                self._recorders.pop(next(iter(self._recorders)))
            self._recorders[lease_id] = recorder
        return recorder

    def drop(self, lease_id: str) -> None:
        """Nothing of ``lease_id`` will be checked (answered, or given back unfinished)."""
        with self._lock:
            self._recorders.pop(lease_id, None)

    def answer(self, client, lease_id: str, resp: pb.SubmitResultResponse) -> None:
        """A result pending verification: upload the proof its answer asks for, or say there is none. A failed
        upload raises, and the record is kept: the result stays in the outbox and the proof goes with it again."""
        if not resp.proof_segment:
            self.drop(lease_id)  # sent before; the verdict comes later
            return
        with self._lock:
            recorder = self._recorders.get(lease_id)
        proof, why = None, "this peer restarted since it trained the shard"
        try:
            proof = recorder.proof(resp.proof_segment) if recorder else None
        except IntegrityError as e:
            why = str(e)
        if proof is not None and len(proof) > resp.proof_max_bytes:
            proof, why = None, f"it is {len(proof)} bytes, over the coordinator's {resp.proof_max_bytes}"
        if proof is None:
            log.warning("lease %s was picked for verification, but no proof can be sent (%s): it earns no credit",
                        lease_id, why)
            client.submit_proof(lease_id, resp.proof_segment, b"")  # say so: the shard goes out again now
        else:
            client.submit_proof(lease_id, resp.proof_segment, proof)
            log.info("lease %s picked for verification: sent the proof of segment %d (%.1f MB)", lease_id,
                     resp.proof_segment, len(proof) / 1e6)
        self.drop(lease_id)

    def poll(self, client, parked: list[pb.SubmitResultRequest], every: float):
        """``(request, answer)`` for each parked result, submitted again (at most every ``every`` seconds); the
        answer is None when the coordinator will never give one (the lease is unknown, the peer banned, ...)."""
        if time.monotonic() - self._polled_at < every:
            return
        self._polled_at = time.monotonic()
        for request in parked:
            try:
                yield request, client.submit(request)
            except grpc.RpcError as e:
                if e.code() not in GONE:
                    raise
                log.warning("forgetting the result for lease %s: %s", request.lease_id, describe_rpc_error(e))
                yield request, None
