"""The keeper's final checkpoint retries a failed download while a peer is online, within a bounded window."""

from types import SimpleNamespace

import pytest

from coordinator import keeper as keeper_mod
from coordinator.ledger import Ledger
from hivefold.spec import ShardInfo


@pytest.fixture
def keeper(monkeypatch):
    """A keeper whose swarm is at step 7 with a peer online, its download scripted by ``outcomes``."""
    monkeypatch.setattr(keeper_mod, "FINAL_RETRY_S", 0.01)
    led = Ledger(":memory:")
    led.init_run(run_id="run", spec_hash="h" * 64, shards=[ShardInfo(0, "0" * 64, 100, 8)], seed=0, data_passes=0,
                 now=0.0)
    led.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="cpu", device_name="", memory_bytes=0,
                      now=0.0)
    k = keeper_mod.Keeper.__new__(keeper_mod.Keeper)
    k.ledger, k.online_seconds, k.last_step = led, 30.0, 0
    k.own_maddrs = ["/ip4/127.0.0.1/tcp/2/p2p/QmKeeper"]
    led.set_keeper_maddrs(k.own_maddrs)  # the keeper itself is always listed: it does not count as a peer
    k.averaging = SimpleNamespace(global_epoch=7)
    k.outcomes, k.tries, k.written = [], [], []

    def catch_up(want_step, timeout):
        k.tries.append((want_step, timeout))
        return k.outcomes.pop(0) if k.outcomes else False
    k.catch_up = catch_up
    k.evaluate_and_checkpoint = k.written.append
    k.online = lambda online: led.heartbeat("a", epoch=7, samples=0, recent_loss=None, samples_per_second=0.0,
                                            now=1e12 if online else 1.0, dht_maddrs=["/ip4/127.0.0.1/tcp/1/p2p/QmA"])
    yield k
    led.close()


def test_a_download_that_fails_for_a_moment_is_tried_again(keeper, monkeypatch):
    monkeypatch.setattr(keeper_mod.time, "time", lambda: 1e12)
    keeper.online(True)
    keeper.outcomes = [False, False, True]
    keeper.final_checkpoint()
    assert keeper.written == ["final"] and len(keeper.tries) == 3
    assert all(want == 7 and 1.0 <= timeout <= keeper_mod.DOWNLOAD_TIMEOUT_S for want, timeout in keeper.tries)


def test_with_no_peer_online_the_keeper_does_not_wait(keeper, monkeypatch, caplog):
    monkeypatch.setattr(keeper_mod.time, "time", lambda: 1e12)
    keeper.online(False)
    keeper.final_checkpoint()
    assert keeper.written == [] and len(keeper.tries) == 1
    assert "NOT written: the swarm is at step 7 but no peer is online" in caplog.text


def test_the_retries_end_when_the_window_closes(keeper, monkeypatch, caplog):
    monkeypatch.setattr(keeper_mod.time, "time", lambda: 1e12)
    monkeypatch.setattr(keeper_mod, "FINAL_WINDOW_S", 0.2)
    keeper.online(True)
    keeper.final_checkpoint()
    assert keeper.written == [] and 2 <= len(keeper.tries) <= 40
    assert "NOT written: the swarm is at step 7 but none served it in 0s" in caplog.text


def test_nothing_is_downloaded_when_the_latest_checkpoint_is_the_swarms_state(keeper):
    keeper.last_step = 7
    keeper.final_checkpoint()
    assert keeper.tries == [] and keeper.written == []
