"""Checks every request before a handler sees it: its signature (``hivefold.rpcsign``) and its sender's rate.

A request to a signed method must carry the peer's id, a timestamp within ``MAX_SKEW_S`` of the
coordinator's clock, a nonce not seen before in that window, and an Ed25519 signature by the key the
peer registered over the method, the sha256 of the body exactly as received, the timestamp and the
nonce; and the body must name the same peer as the signature. Coordinators sharing one ledger also claim
each nonce there (``coordinator.ledger.nonces``), so a request is served once by all of them together.
Anything else is refused with ``UNAUTHENTICATED`` (who you are cannot be established) or
``PERMISSION_DENIED`` (you are someone else than the request says), and a message that says which check
failed.

Each signed-in peer may send ``rate`` requests a second (bursts of ``2 x rate``), counted after its
signature checks out so nobody can spend another peer's allowance; the public methods (Register,
GetStatus, FetchCheckpoint) are counted per client address. Past it: ``RESOURCE_EXHAUSTED``, with the
seconds to wait in the message and in the ``retry-after-s`` trailer (peers' clients back off and retry).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from coordinator.errors import Unavailable
from hivefold.identity import verify_signature
from hivefold.rpcsign import MAX_SKEW_S, NONCE, PEER, SIGNATURE, SIGNED_METHODS, TIMESTAMP, signed_message

NONCES_MAX = 1_000_000  # nonces remembered at once (a window's worth at ~16k requests/s); beyond it, refuse
RATE_KEYS_MAX = 100_000  # senders tracked at once; idle ones are forgotten first


class TokenBuckets:
    """Per-sender token buckets: ``rate`` per second, up to ``burst``."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> float:
        """0 if ``key`` may send now, else the seconds until it may."""
        with self._lock:
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if len(self._buckets) >= RATE_KEYS_MAX:
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < self.burst / self.rate}
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


class _Received:
    """A request as deserialized (None: it did not parse), with the sha256 of its bytes on the wire (what the
    peer signed). Parsing here, not in gRPC, turns garbage into INVALID_ARGUMENT instead of a logged traceback."""

    __slots__ = ("digest", "message")

    def __init__(self, raw: bytes, deserialize: Callable[[bytes], object]):
        self.digest = hashlib.sha256(raw).digest()
        try:
            self.message = deserialize(raw)
        except DecodeError:
            self.message = None


class SignatureInterceptor(grpc.ServerInterceptor):
    """``public_key(peer_id)``: the raw key the peer registered, or None for an unknown peer;
    ``claim_nonce(nonce, signed_at)``: where other coordinators serve the run too, records the nonce for all of
    them and says whether it was new (None: this coordinator alone serves the run)."""

    def __init__(self, public_key: Callable[[str], bytes | None], clock: Callable[[], float] = time.time,
                 rate: float = 100.0, claim_nonce: Callable[[str, float], bool] | None = None):
        self.public_key, self.clock, self.claim_nonce = public_key, clock, claim_nonce
        self.buckets = TokenBuckets(rate, max(20.0, 2 * rate))
        self._nonces: dict[str, float] = {}  # nonce -> its timestamp, for MAX_SKEW_S
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
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
        if received.message is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: not a {method.rsplit('/', 1)[1]} "
                          "message")
        if method not in SIGNED_METHODS:  # public: counted per client address
            return self._limit("ip " + context.peer().rpartition(":")[0], context)
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
        # A replay is refused before it costs its signer's rate allowance, and a request past the rate is refused
        # before its nonce is remembered: a peer flooding with fresh nonces would otherwise fill the memory that
        # every peer's requests need (NONCES_MAX), and its flood never reaches the shared claim's database.
        if self._seen(nonce):
            deny(grpc.StatusCode.UNAUTHENTICATED, "replayed request: this nonce was already used")
        self._limit("peer " + peer_id, context)
        if not self._first_use(nonce, float(timestamp)):
            deny(grpc.StatusCode.UNAUTHENTICATED, "replayed request: this nonce was already used")
        if self.claim_nonce is not None:
            try:
                first = self.claim_nonce(nonce, float(timestamp))
            except Unavailable as e:
                deny(grpc.StatusCode.UNAVAILABLE, str(e))
            if not first:
                deny(grpc.StatusCode.UNAUTHENTICATED, "replayed request: this nonce was already used (at another "
                     "coordinator of this run)")

    def _limit(self, key: str, context) -> None:
        wait = self.buckets.take(key, time.monotonic())
        if wait > 0:
            context.set_trailing_metadata([("retry-after-s", f"{wait:.3f}")])
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit: at most {self.buckets.rate:.0f} requests "
                          f"a second; retry in {wait:.2f}s")

    def _seen(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._nonces

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
