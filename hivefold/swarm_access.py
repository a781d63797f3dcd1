"""A moderated swarm: who may use the run's hivemind DHT and join its averaging.

The coordinator signs short-lived access tokens (hivemind's ``AccessToken``) with its Ed25519 key (the one
that signs receipts), each bound to one member: ``username`` is ``MEMBER@LIBP2P_PEER_ID`` (a hivefold peer
id, ``coordinator`` or ``keeper``), ``public_key`` the member's RSA key for DHT requests. Every DHT node of
the run (peers, the keeper, the coordinator's bootstrap node) signs its DHT requests and responses with its
token and refuses those without a valid one (:class:`SwarmAuthorizer`, hivemind's ``TokenAuthorizerBase``).
Members publish their tokens in the DHT under :data:`TOKENS_KEY`, and a diloco averager serves group joins
and state downloads only to a libp2p peer whose published token is valid (:class:`MemberCheck`).

A peer renews its token through the coordinator (the ``SwarmToken`` RPC) while it runs; a banned peer's is
not renewed, so it falls out of the DHT and the averaging within one token lifetime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from hivefold.identity import Identity, verify_signature

log = logging.getLogger(__name__)

TOKENS_KEY = "hivefold_swarm_tokens"  # DHT key; subkey: the member's libp2p peer id; value: its token
LIFETIME_S = 600.0  # a token's default lifetime: the longest a banned peer stays in the swarm
VERIFIED_CACHE = 4096  # distinct tokens whose signature a node remembers having checked
_DOMAIN = b"hivefold-swarm-token-v1\n"


def _message(token: AccessToken) -> bytes:
    return b"".join([_DOMAIN, token.username.encode(), b"\n", token.public_key, b"\n", token.expiration_time.encode()])


def issue_token(key: Identity, *, member: str, libp2p_id: str, dht_public_key: bytes, expires_at: float) -> AccessToken:
    """A token for ``member`` whose DHT node is ``libp2p_id`` and signs with ``dht_public_key``."""
    token = AccessToken(username=f"{member}@{libp2p_id}", public_key=dht_public_key,
                        expiration_time=f"{expires_at:.3f}")
    token.signature = key.sign(_message(token))
    return token


def expires_at(token: AccessToken) -> float:
    try:
        return float(token.expiration_time)
    except ValueError:
        return 0.0


def member_of(token: AccessToken) -> tuple[str, str]:
    """(member, libp2p peer id) the token names."""
    member, _, libp2p_id = token.username.rpartition("@")
    return member, libp2p_id


def token_problem(token: AccessToken, coordinator_key: bytes, now: float) -> str | None:
    """Why ``token`` does not admit its bearer now, or None if it does."""
    if not verify_signature(coordinator_key, _message(token), token.signature):
        return "not signed by this run's coordinator"
    if expires_at(token) <= now:
        return "expired"
    return None


def new_dht_identity(path: Path) -> str:
    """A fresh libp2p identity in ``path`` (a new peer id at every start); returns its peer id."""
    path.unlink(missing_ok=True)
    P2P.generate_identity(str(path))
    return libp2p_id_of(path)


def libp2p_id_of(identity_path: Path) -> str:
    return PeerID.from_identity(identity_path.read_bytes()).to_base58()


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's moderated-DHT protocol with tokens the coordinator signed.

    ``source`` gives this node's current token. It is called in the DHT's own process when the token
    it holds is about to expire: a peer's reads the file its daemon renews, the coordinator's and the
    keeper's sign one afresh.
    """

    def __init__(self, dht_key: RSAPrivateKey, coordinator_key: bytes, source: Callable[[], AccessToken],
                 refresh_margin: float = 30.0):
        super().__init__(dht_key)
        self.coordinator_key, self.source, self.refresh_margin = coordinator_key, source, refresh_margin
        # Every DHT request and response carries a token: verify each distinct one once (keyed by all it says and
        # its signature, so a signature moved onto other fields is verified afresh); expiry is checked every time.
        self._verified: dict[tuple[bytes, bytes], bool] = {}

    async def get_token(self) -> AccessToken:
        return self.source()

    def is_token_valid(self, access_token: AccessToken) -> bool:
        key = (_message(access_token), access_token.signature)
        signed = self._verified.get(key)
        if signed is None:
            signed = verify_signature(self.coordinator_key, *key)
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[key] = signed
        return signed and expires_at(access_token) > time.time()

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return expires_at(access_token) - time.time() < self.refresh_margin

    async def refresh_token_if_needed(self) -> None:
        try:
            await super().refresh_token_if_needed()
        except AssertionError:  # hivemind asserts the new token is valid: not renewed (banned), or not yet
            self._local_access_token = None
            raise PermissionError("this node holds no valid swarm token (not renewed by the coordinator)") from None


def file_source(path: Path) -> Callable[[], AccessToken]:
    """Tokens from the file a peer's daemon rewrites on every renewal."""
    def read() -> AccessToken:
        return AccessToken.FromString(path.read_bytes())
    return read


def write_token(path: Path, token: AccessToken) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(token.SerializeToString())
    tmp.replace(path)


def self_signed_source(key: Identity, member: str, libp2p_id: str, dht_key: RSAPrivateKey,
                       lifetime: float = LIFETIME_S) -> Callable[[], AccessToken]:
    """For the coordinator's node and the keeper, which hold the coordinator's key themselves."""
    public = dht_key.get_public_key().to_bytes()

    def sign() -> AccessToken:
        return issue_token(key, member=member, libp2p_id=libp2p_id, dht_public_key=public,
                           expires_at=time.time() + lifetime)
    return sign


class OwnPass:
    """The pass of a member that holds the coordinator's key itself (the coordinator's node, the keeper)."""

    def __init__(self, key: Identity, member: str, identity_path: Path, *, fresh: bool):
        if fresh or not identity_path.exists():
            new_dht_identity(identity_path)
        self.identity_path, self.key = identity_path, key
        self.dht_key = RSAPrivateKey()
        self.source = self_signed_source(key, member, libp2p_id_of(identity_path), self.dht_key)
        self.published_until = 0.0

    def dht_kwargs(self) -> dict:
        return dict(identity_path=str(self.identity_path), check_if_identity_free=False,
                    authorizer=SwarmAuthorizer(self.dht_key, self.key.public_key, self.source))

    def announce_if_due(self, dht) -> None:
        """Keep a valid token of this member in the DHT, for the averagers that check whom they serve."""
        if time.time() < self.published_until - LIFETIME_S / 2:
            return
        token = self.source()
        if publish(dht, token):
            self.published_until = expires_at(token)


def publish(dht, token: AccessToken) -> bool:
    """Announce this member's token in the DHT until it expires (others' averagers look it up)."""
    _, libp2p_id = member_of(token)
    return bool(dht.store(TOKENS_KEY, subkey=libp2p_id, value=token.SerializeToString(),
                          expiration_time=expires_at(token)))


class MemberCheck:
    """Whether a libp2p peer may talk to this averager: its token, published in the DHT, is valid and names it.

    Answers are cached until the token expires; an unknown peer costs one DHT lookup.
    """

    def __init__(self, dht, coordinator_key: bytes):
        self.dht, self.coordinator_key = dht, coordinator_key
        self.valid_until: dict[str, float] = {}

    async def allowed(self, remote_id) -> bool:
        peer = remote_id.to_base58() if hasattr(remote_id, "to_base58") else str(remote_id)
        now = time.time()
        if self.valid_until.get(peer, 0.0) > now:
            return True
        found = await self.dht.get(TOKENS_KEY, latest=True, return_future=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        for libp2p_id, item in entries.items():
            try:
                token = AccessToken.FromString(item.value)
            except Exception:  # noqa: BLE001 - anything a member published that does not parse admits nobody
                continue
            if member_of(token)[1] == libp2p_id and token_problem(token, self.coordinator_key, now) is None:
                self.valid_until[libp2p_id] = expires_at(token)
        if self.valid_until.get(peer, 0.0) > now:
            return True
        log.warning("refused an averaging request from %s: no valid swarm token", peer)
        return False
