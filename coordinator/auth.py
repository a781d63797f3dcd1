"""Checks every signed request (``hivefold.rpcsign``) before a handler sees it.

A request to a signed method must carry the peer's id, a timestamp within ``MAX_SKEW_S`` of the
coordinator's clock, a nonce not seen before in that window, and an Ed25519 signature by the key the
peer registered over the method, the sha256 of the body exactly as received, the timestamp and the
nonce; and the body must name the same peer as the signature. Anything else is refused with
``UNAUTHENTICATED`` (who you are cannot be established) or ``PERMISSION_DENIED`` (you are someone else
than the request says), and a message that says which check failed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import grpc

from hivefold.identity import verify_signature
from hivefold.rpcsign import MAX_SKEW_S, NONCE, PEER, SIGNATURE, SIGNED_METHODS, TIMESTAMP, signed_message

NONCES_MAX = 1_000_000  # nonces remembered at once (a window's worth at ~16k requests/s); beyond it, refuse


class _Received:
    """A request as deserialized, with the sha256 of its bytes on the wire (what the peer signed)."""

    __slots__ = ("digest", "message")

    def __init__(self, raw: bytes, deserialize: Callable[[bytes], object]):
        self.digest = hashlib.sha256(raw).digest()
        self.message = deserialize(raw)


class SignatureInterceptor(grpc.ServerInterceptor):
    """``public_key(peer_id)``: the raw key the peer registered, or None for an unknown peer."""

    def __init__(self, public_key: Callable[[str], bytes | None], clock: Callable[[], float] = time.time):
        self.public_key, self.clock = public_key, clock
        self._nonces: dict[str, float] = {}  # nonce -> its timestamp, for MAX_SKEW_S
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method not in SIGNED_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        method, deserialize = details.method, handler.request_deserializer

        def receive(raw: bytes) -> _Received:
            return _Received(raw, deserialize)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(received: _Received, context):
                self._check(method, metadata, received, context)
                return inner(received.message, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=receive,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(received: _Received, context):
                self._check(method, metadata, received, context)
                yield from inner_stream(received.message, context)

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=receive,
                                                        response_serializer=handler.response_serializer)
        return handler

    def _check(self, method: str, metadata: dict, received: _Received, context) -> None:
        deny = context.abort
        missing = [k for k in (PEER, TIMESTAMP, NONCE, SIGNATURE) if not metadata.get(k)]
        if missing:
            deny(grpc.StatusCode.UNAUTHENTICATED, f"request not signed (no {', '.join(missing)}): every call after "
                 "Register must carry the peer's signature; upgrade the peer")
        peer_id, timestamp, nonce = metadata[PEER], metadata[TIMESTAMP], metadata[NONCE]
        try:
            skew = float(timestamp) - self.clock()
            signature = bytes.fromhex(metadata[SIGNATURE])
        except ValueError:
            deny(grpc.StatusCode.UNAUTHENTICATED, "malformed signature metadata (hf-ts must be a number, hf-sig hex)")
        if not abs(skew) <= MAX_SKEW_S:
            deny(grpc.StatusCode.UNAUTHENTICATED, f"request signed {skew:+.0f}s from the coordinator's clock, outside "
                 f"the {MAX_SKEW_S:.0f}s window: a stale or replayed request, or this machine's clock is off (NTP)")
        if len(nonce) > 64 or len(peer_id) > 64:
            deny(grpc.StatusCode.UNAUTHENTICATED, "malformed signature metadata (nonce or peer id too long)")
        key = self.public_key(peer_id)
        if key is None:
            deny(grpc.StatusCode.UNAUTHENTICATED, f"unknown peer {peer_id!r}; call Register first")
        if not verify_signature(key, signed_message(method, received.digest, timestamp, nonce), signature):
            deny(grpc.StatusCode.UNAUTHENTICATED, f"bad signature: this request was not signed by peer {peer_id}'s "
                 "key, or was altered on the way")
        named = getattr(getattr(received.message, "auth", None), "peer_id", "")
        if named != peer_id:
            deny(grpc.StatusCode.PERMISSION_DENIED, f"the request names peer {named!r} but is signed by peer "
                 f"{peer_id}")
        if not self._first_use(nonce, float(timestamp)):
            deny(grpc.StatusCode.UNAUTHENTICATED, "replayed request: this nonce was already used")

    def _first_use(self, nonce: str, timestamp: float) -> bool:
        """Remember ``nonce``; False if it was seen within the window (or the memory is full)."""
        now = self.clock()
        with self._lock:
            if now >= self._next_prune:
                self._nonces = {n: t for n, t in self._nonces.items() if now - t <= MAX_SKEW_S}
                self._next_prune = now + 1.0
            if nonce in self._nonces or len(self._nonces) >= NONCES_MAX:
                return False
            self._nonces[nonce] = timestamp
            return True
