"""Signed requests: every RPC a peer makes after ``Register`` carries an Ed25519 signature of the peer's key.

The signature covers the method's name, the sha256 of the request's serialized body, a timestamp and a
random nonce, so a request cannot be altered, sent to another method, replayed later (the coordinator
keeps a clock-skew window, ``MAX_SKEW_S``) or replayed within the window (it remembers the nonces it
saw). They travel as gRPC metadata; the peer's client adds them (``SigningInterceptor``), the
coordinator checks them before any handler runs (``coordinator.auth``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

import grpc

from protos import coordinator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
# The methods whose requests name a peer (a PeerAuth field): every one after Register; GetStatus and
# FetchCheckpoint are public (anyone may watch the swarm and take the trained model).
SIGNED_METHODS = frozenset(f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods
                           if "auth" in m.input_type.fields_by_name)
MAX_SKEW_S = 60.0  # a request signed further from the coordinator's clock is refused
PEER, TIMESTAMP, NONCE, SIGNATURE = "hf-peer", "hf-ts", "hf-nonce", "hf-sig"


def signed_message(method: str, body_sha256: bytes, timestamp: str, nonce: str) -> bytes:
    return b"hivefold-rpc-v1\n" + "\n".join((method, body_sha256.hex(), timestamp, nonce)).encode()


def sign_metadata(method: str, body: bytes, *, peer_id: str, sign: Callable[[bytes], bytes]) -> list[tuple[str, str]]:
    """The metadata that signs one request to ``method`` with serialized ``body``."""
    timestamp, nonce = f"{time.time():.3f}", secrets.token_hex(16)
    signature = sign(signed_message(method, hashlib.sha256(body).digest(), timestamp, nonce))
    return [(PEER, peer_id), (TIMESTAMP, timestamp), (NONCE, nonce), (SIGNATURE, signature.hex())]


class SigningInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Signs every call to a ``SIGNED_METHODS`` method with ``signer()``: (peer id, sign function), or None
    before the peer registered (the call then goes unsigned and the coordinator refuses it)."""

    def __init__(self, signer: Callable[[], tuple[str, Callable[[bytes], bytes]] | None]):
        self.signer = signer

    def _sign(self, details, request):
        who = self.signer() if details.method in SIGNED_METHODS else None
        if who is None:
            return details
        peer_id, sign = who
        metadata = [*(details.metadata or ()),
                    *sign_metadata(details.method, request.SerializeToString(), peer_id=peer_id, sign=sign)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details, request), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details, request), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression
