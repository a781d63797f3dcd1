"""The keeper's part of the status document: its downloads, errors and lag, on every ledger backend."""

import pytest


def keeper(led, now=1000.0):
    return led.status(now=now, online_seconds=30.0, seq_len=16)["keeper"]


def test_keeper_health_is_empty_before_the_keeper_reports(ledger):
    assert keeper(ledger) == {"checkpoint_every": None, "last_download_at": None, "last_download_step": None,
                              "last_error": None, "last_error_at": None, "checkpoint_step": None,
                              "checkpoint_age_steps": None, "warning": None}


def test_keeper_downloads_errors_and_the_lag_warning(ledger):
    ledger.set_checkpoint_every(10)
    ledger.record_checkpoint(0, "/x/step-0.pt", 5.0, now=1.0)
    ledger.record_keeper_download(step=12, error=None, now=100.0)
    k = keeper(ledger)
    assert (k["checkpoint_every"], k["last_download_at"], k["last_download_step"]) == (10, 100.0, 12)
    assert (k["checkpoint_step"], k["checkpoint_age_steps"], k["warning"]) == (0, 12, None)  # the download raised it

    ledger.record_keeper_download(step=None, error="no peer answered within 30s", now=140.0)
    k = keeper(ledger)
    assert (k["last_error"], k["last_error_at"]) == ("no peer answered within 30s", 140.0)
    assert (k["last_download_at"], k["last_download_step"]) == (100.0, 12)  # the last success stays

    ledger.observe_global_step(20)
    assert keeper(ledger)["warning"] is None  # two intervals behind is still normal
    ledger.observe_global_step(21)
    assert keeper(ledger)["warning"] == ("the latest checkpoint is 21 swarm steps behind (checkpoint every 10): the "
                                         "keeper cannot download the swarm's state: no peer answered within 30s")

    ledger.record_keeper_download(step=21, error=None, now=200.0)  # a success clears the error ...
    k = keeper(ledger)
    assert (k["last_error"], k["last_error_at"], k["last_download_step"]) == (None, None, 21)
    assert "is the keeper running" in k["warning"]  # ... but the lag stays until a checkpoint is written
    ledger.record_checkpoint(21, "/x/step-21.pt", 4.0, now=210.0)
    k = keeper(ledger)
    assert (k["checkpoint_step"], k["checkpoint_age_steps"], k["warning"]) == (21, 0, None)


def test_keeper_warns_when_no_checkpoint_was_ever_written(ledger):
    ledger.set_checkpoint_every(5)
    ledger.observe_global_step(10)
    assert keeper(ledger)["warning"] is None
    ledger.observe_global_step(11)
    ledger.record_keeper_download(step=None, error="DHT unreachable", now=50.0)
    assert keeper(ledger)["warning"] == ("no checkpoint yet at swarm step 11 (checkpoint every 5): the keeper cannot "
                                         "download the swarm's state: DHT unreachable")


def test_keeper_recording_refuses_nonsense(ledger):
    with pytest.raises(ValueError, match="needs the step"):
        ledger.record_keeper_download(step=None, error=None, now=1.0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        ledger.set_checkpoint_every(0)
    ledger.set_checkpoint_every(3)
    ledger.set_checkpoint_every(4)  # a restart with another --checkpoint-every replaces it
    assert keeper(ledger)["checkpoint_every"] == 4
