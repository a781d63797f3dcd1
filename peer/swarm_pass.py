"""A peer's pass into the swarm (hivefold.swarm_access): a fresh DHT identity and key at every start, a token
from the coordinator before joining the DHT, renewed and republished while the peer runs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey

from hivefold.errors import HivefoldError
from hivefold.swarm_access import SwarmAuthorizer, file_source, new_dht_identity, publish, token_problem, write_token

log = logging.getLogger("hivefold.peer")

IDENTITY_FILE, TOKEN_FILE = "dht-identity.key", "swarm-token.bin"
RENEW_TRY_S = 5.0  # how long one renewal may wait for the coordinator (it runs in the heartbeat thread)


class SwarmPass:
    def __init__(self, workdir: Path, coordinator_key: bytes):
        self.identity_path, self.token_path = workdir / IDENTITY_FILE, workdir / TOKEN_FILE
        self.coordinator_key = coordinator_key
        self.dht_key = RSAPrivateKey()
        self.libp2p_id = new_dht_identity(self.identity_path)
        self.token: AccessToken | None = None
        self.expires = self.lifetime = 0.0

    def obtain(self, client, give_up_after: float | None = None) -> None:
        """Ask the coordinator for a token (raises grpc.RpcError as the client does: a ban is PERMISSION_DENIED)."""
        raw, expires = client.swarm_token(self.libp2p_id, self.dht_key.get_public_key().to_bytes(),
                                          give_up_after=give_up_after)
        token = AccessToken.FromString(raw)
        now = time.time()
        problem = token_problem(token, self.coordinator_key, now)
        if problem is not None:  # e.g. this machine's clock is far off the coordinator's
            raise HivefoldError(f"the coordinator's swarm token is {problem} here; check this machine's clock (NTP)")
        write_token(self.token_path, token)
        self.token, self.expires, self.lifetime = token, expires, expires - now

    def dht_kwargs(self) -> dict:
        """What ``join_dht`` needs to sign and check DHT traffic with this pass."""
        return dict(identity_path=str(self.identity_path), check_if_identity_free=False,
                    authorizer=SwarmAuthorizer(self.dht_key, self.coordinator_key, file_source(self.token_path),
                                               refresh_margin=self.lifetime / 4))

    def renew_if_due(self, client, dht) -> None:
        """Past half its life, take the next token and announce it (the DHT process reads the file). Never
        raises: a coordinator that is down is asked again at the next heartbeat (the token still has half its
        life: a coordinator outage longer than that takes the peer out of the DHT until it is back)."""
        if time.time() < self.expires - self.lifetime / 2:
            return
        try:
            self.obtain(client, give_up_after=RENEW_TRY_S)
        except (grpc.RpcError, HivefoldError) as e:
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            log.warning("could not renew the swarm token (%s); trying again at the next heartbeat", why)
            return
        if not publish(dht, self.token):
            log.warning("could not announce the renewed swarm token in the DHT; trying again at the next heartbeat")
            self.expires = time.time() + self.lifetime / 2  # due again at once
            return
        log.info("renewed the swarm token for %.0fs", self.lifetime)
