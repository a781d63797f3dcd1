"""Peer identity: an Ed25519 key kept in the peer's workdir.

The peer id is derived from the public key, so a volunteer keeps its id (and its credit) across
restarts, and nobody can register under someone else's id without their key. ``Register`` carries
a signature over the display name and a timestamp, which the coordinator checks; every later call is
signed too (``hivefold.rpcsign``). The key file is created with mode 0600, and one that other users
could read or change is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hivefold.errors import ConfigError

KEY_FILENAME = "identity.pem"


def peer_id_from_public_key(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def register_message(name: str, timestamp: float) -> bytes:
    return f"hivefold-register|{name}|{timestamp:.3f}".encode()


class Identity:
    """A peer's signing key."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public_key = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def load_or_create(cls, workdir: Path) -> "Identity":
        path = workdir / KEY_FILENAME
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(f"{path} is this peer's private key but other users may read or change it "
                                  f"(mode {mode:03o}); run: chmod 600 {path}")
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as e:
                raise ConfigError(f"{path} is not a valid identity key ({e}); move it away to create a new "
                                  "identity (your peer id and credit will change)") from e
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{path} is not an Ed25519 key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        workdir.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False
