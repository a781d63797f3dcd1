"""Who may join, end to end: an invite-only coordinator refuses a peer without an invite, admits one with an
invite from ``hivefold coordinator invite`` (once), whose swarm token is renewed through the coordinator, and
``hivefold coordinator ban`` stops a training peer."""

from __future__ import annotations

import json

import pytest

from coordinator.ledger import Ledger
from hivefold.identity import Identity
from tests.conftest import Processes, hivefold, wait_for

pytestmark = pytest.mark.integration

RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--shard-sequences", "32", "--inner-steps", "8", "--warmup-steps", "2"]


def test_invite_only_run_and_a_ban(tmp_path):
    procs = Processes(tmp_path)
    try:
        workdir = tmp_path / "coordinator"
        # swarm tokens short enough to see the peer renew its own through the coordinator
        procs.start("coordinator", "coordinator", "--workdir", str(workdir), "--listen", "127.0.0.1:0", "--http", "",
                    "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", "--invite-only",
                    "--heartbeat-interval", "4", "--swarm-token-seconds", "20", *RUN_FLAGS)
        path = workdir / "coordinator.json"
        address = wait_for(lambda: path.exists() and json.loads(path.read_text())["grpc"], timeout=180,
                           what="the coordinator to serve", procs=procs)

        def peer(name: str, *extra: str):
            return procs.start(name, "peer", "--coordinator", address, "--workdir", str(tmp_path / name),
                               "--name", name, "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                               "--no-progress", *extra)

        stranger = peer("stranger")
        assert stranger.wait(120) == 2
        assert "this run is invite-only: ask its operator for an invite" in stranger.log.read_text()

        made = hivefold("coordinator", "invite", "--workdir", str(workdir), "--uses", "1", "--expires", "1h")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        assert token.startswith("hfinv-")
        friend = peer("friend", "--invite", token)
        friend_id = Identity.load_or_create(tmp_path / "friend").peer_id
        ledger = Ledger(workdir / "ledger.sqlite")

        def accepted():
            return ledger._read("SELECT COUNT(*) FROM results WHERE peer_id = ? AND verdict = 'accepted'",
                                (friend_id,))[0][0]

        wait_for(accepted, timeout=240, what="the invited peer's first accepted result", procs=procs)
        wait_for(lambda: friend.log.read_text().count("renewed the swarm token") >= 2, timeout=120,
                 what="the peer to renew its swarm token twice", procs=procs)
        again = peer("again", "--invite", token)  # a second peer with the same one-use invite
        assert again.wait(120) == 2
        assert "this invite is used up" in again.log.read_text()

        # by the 8 digits `hivefold status` shows
        banned = hivefold("coordinator", "ban", friend_id[:8], "--workdir", str(workdir), "--reason", "testing bans")
        assert banned.returncode == 0 and f"peer {friend_id} banned" in banned.stdout, banned.stderr
        assert friend.wait(120) == 2, procs.tail()
        assert f"peer {friend_id} is banned from this run" in friend.log.read_text()
        active = ledger._read("SELECT COUNT(*) FROM leases WHERE peer_id = ? AND state = 'active'", (friend_id,))
        assert active[0][0] == 0
        wrong = hivefold("coordinator", "ban", "0123456789abcdef", "--workdir", str(workdir))
        assert wrong.returncode == 2 and "no peer '0123456789abcdef' in this run" in wrong.stderr
        assert hivefold("coordinator", "unban", friend_id, "--workdir", str(workdir)).returncode == 0
        assert not ledger.is_banned(friend_id)
        ledger.close()
    finally:
        procs.close()
