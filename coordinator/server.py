"""The gRPC transport: a servicer that calls handlers and maps domain errors to status codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc

from coordinator import handlers
from coordinator.auth import SignatureInterceptor
from coordinator.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from hivefold.client import MAX_MESSAGE_BYTES
from hivefold.tls import ServerTLS
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Maps each RPC onto ``coordinator.handlers``; nothing else."""

    def __init__(self, ctx: handlers.Context, clock: Callable[[], float] = time.time):
        self.ctx, self.clock = ctx, clock

    def _call(self, handler, request, context: grpc.ServicerContext):
        try:
            return handler(request, self.ctx, self.clock())
        except DomainError as e:
            context.abort(STATUS_OF.get(type(e), grpc.StatusCode.FAILED_PRECONDITION), str(e))

    def _stream(self, handler, request, context: grpc.ServicerContext) -> Iterator:
        yield from self._call(handler, request, context)

    def Register(self, request, context):
        return self._call(handlers.register, request, context)

    def LeaseShard(self, request, context):
        return self._call(handlers.lease_shard, request, context)

    def FetchShard(self, request, context):
        return self._stream(handlers.fetch_shard, request, context)

    def SubmitResult(self, request, context):
        return self._call(handlers.submit_result, request, context)

    def SubmitProof(self, request, context):
        return self._call(handlers.submit_proof, request, context)

    def ReleaseLease(self, request, context):
        return self._call(handlers.release_lease, request, context)

    def Heartbeat(self, request, context):
        return self._call(handlers.heartbeat, request, context)

    def ExtendLease(self, request, context):
        return self._call(handlers.extend_lease, request, context)

    def Leave(self, request, context):
        return self._call(handlers.leave, request, context)

    def GetStatus(self, request, context):
        return self._call(handlers.get_status, request, context)

    def FetchCheckpoint(self, request, context):
        return self._stream(handlers.fetch_checkpoint, request, context)

    def SwarmToken(self, request, context):
        return self._call(handlers.swarm_token, request, context)


def start_server(ctx: handlers.Context, listen: str, *, clock: Callable[[], float] = time.time,
                 max_workers: int = 32, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 tls: ServerTLS | None = None) -> tuple[grpc.Server, int]:
    """Start serving on ``listen`` (HOST:PORT, port 0 picks one), over TLS when given ``tls``, else in
    plaintext; returns the server and its port."""
    # the signature check is innermost: metrics interceptors time refused requests too
    def claim_nonce(nonce: str, signed_at: float) -> bool:
        return ctx.ledger.claim_nonce(nonce, signed_at, now=clock())

    # other coordinators may serve a run on a shared ledger: a nonce is claimed there for all of them
    signatures = SignatureInterceptor(ctx.ledger.public_key_of, clock, rate=ctx.config.rpc_rate,
                                      claim_nonce=claim_nonce if ctx.ledger.shares_nonces else None)
    # requests are small (the largest, a result, is one loss per micro-batch): refuse big ones unread
    options = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         interceptors=[*interceptors, signatures], options=options)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(ctx, clock), server)
    try:
        port = (server.add_secure_port(listen, tls.grpc_credentials()) if tls is not None
                else server.add_insecure_port(listen))
    except RuntimeError:  # grpc raises this when the address cannot be bound
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not available")
    server.start()
    log.info("gRPC listening on %s (port %d, %s)", listen, port, "TLS" if tls is not None else "PLAINTEXT")
    return server, port
