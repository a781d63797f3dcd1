"""``hivefold status``'s table: one line per row however it is piped, and the keeper's health."""

import io

import pytest

from coordinator.ledger import Ledger
from hivefold.spec import ShardInfo
from hivefold.status_view import PIPE_WIDTH, ago, make_console, print_status

LONG_NAME = "volunteer-with-a-rather-long-display-name-[gpu]-0123456789"  # '[gpu]' must not be read as markup


@pytest.fixture
def status():
    led = Ledger(":memory:")
    led.init_run(run_id="hivefold-0123456789ab", spec_hash="h" * 64,
                 shards=[ShardInfo(i, f"{i:064x}", 100, 8) for i in range(4)], seed=0, data_passes=0, now=0.0)
    for i in range(3):
        # 16 hex digits, as a real peer id
        led.register_peer(peer_id=f"{i}" * 16, name=f"{LONG_NAME}-{i}", public_key=bytes([i]) * 32,
                          device_kind="cpu", device_name="", memory_bytes=0, now=0.0)
        led.observe_global_step(123456)  # the keeper's word: peers may not jump the step this far
        led.heartbeat(f"{i}" * 16, epoch=123456, samples=987654, recent_loss=2.345678, samples_per_second=1234.5,
                      now=900.0)
    led.set_checkpoint_every(10)
    led.record_checkpoint(100000, "/a/long/path/to/the/workdir/checkpoints/step-00100000.pt", 2.5, now=800.0)
    led.record_keeper_download(step=123000, error=None, now=840.0)
    led.record_keeper_download(step=None, error="no peer answered [timeout 30s]", now=950.0)
    doc = led.status(now=1000.0, online_seconds=300.0, seq_len=128)
    led.close()
    return doc


def rendered(status, monkeypatch, columns=None) -> str:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()  # not a terminal, like `hivefold status | cat`
    print_status(status, make_console(out))
    return out.getvalue()


def test_piped_rows_are_never_wrapped(status, monkeypatch):
    text = rendered(status, monkeypatch)
    lines = text.splitlines()
    head = [line for line in lines if "hivefold-0123456789ab" in line]
    assert len(head) == 1 and "step 123456" in head[0] and "val loss" in head[0]
    for i in range(3):
        rows = [line for line in lines if line.lstrip().startswith(f"{i}" * 8)]
        assert len(rows) == 1, text
        assert f"{LONG_NAME}-{i}" in rows[0] and "1234.5" in rows[0] and rows[0].rstrip().endswith("123456")
    assert any(line.startswith("keeper: ") and "(checkpoint every 10)" in line for line in lines), text
    warning = [line for line in lines if line.startswith("warning: ")]
    assert len(warning) == 1 and warning[0].endswith("no peer answered [timeout 30s]"), text
    assert max(len(line) for line in lines) < PIPE_WIDTH  # tables take only the width they need


def test_columns_is_respected_when_set(status, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(io.StringIO()).width == 100
    text = rendered(status, monkeypatch, columns=100)
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.parametrize("columns", [80, 100])
def test_on_a_narrow_terminal_the_id_the_state_and_the_checks_are_never_cut(status, monkeypatch, columns):
    status["peers"][0].update(paused=True, results_valid=3)
    status["peers"][1].update(results_valid=2, results_invalid=1)
    text = rendered(status, monkeypatch, columns=columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    assert all(f"{i}" * 8 in text for i in range(3)), text  # what `coordinator ban` takes
    assert " paused " in text and " 3 ok " in text and " 2 ok 1 bad " in text, text


def test_keeper_line_says_how_long_ago_and_how_far_behind(status, monkeypatch):
    text = rendered(status, monkeypatch)
    assert ("keeper: state downloaded 2m ago (step 123000) · checkpoint at step 100000, 23456 swarm steps behind "
            "(checkpoint every 10)") in text
    assert ("warning: the latest checkpoint is 23456 swarm steps behind (checkpoint every 10): the keeper cannot "
            "download the swarm's state: no peer answered [timeout 30s]") in text
    assert "checkpoint: /a/long/path/to/the/workdir/checkpoints/step-00100000.pt (step 100000)" in text


def test_a_failed_download_without_lag_is_a_quiet_yellow_line(status, monkeypatch):
    status["keeper"].update(warning=None)
    text = rendered(status, monkeypatch)
    assert "warning:" not in text
    assert "keeper: the last state download failed 50s ago: no peer answered [timeout 30s]" in text


def test_an_older_coordinator_without_keeper_health_still_renders(status, monkeypatch):
    del status["keeper"]
    assert "keeper:" not in rendered(status, monkeypatch)


@pytest.mark.parametrize("seconds,text", [(0, "0s ago"), (59, "59s ago"), (60, "1m ago"), (7200, "2h ago"),
                                          (-3, "0s ago"), (90000, "1d ago"), (179, "2m ago")])
def test_ago(seconds, text):
    assert ago(seconds) == text


def test_the_access_line_shows_how_the_run_is_protected(status, monkeypatch):
    assert "access:" not in rendered(status, monkeypatch)  # an older coordinator's document: no line
    status["run"] = {"access": {"tls": False, "invite_only": True, "swarm_token_seconds": 600.0}}
    assert "access: PLAINTEXT (--insecure) · invite-only · swarm tokens live 600 s" in rendered(status, monkeypatch)
    status["run"]["access"]["ban_after_reports"] = 2
    assert "swarm tokens live 600 s · poisoners banned after 2 reports" in rendered(status, monkeypatch)
    status["run"]["access"]["ban_after_reports"] = 0
    assert "poisoners never banned automatically" in rendered(status, monkeypatch)


def test_a_paused_peer_shows_as_paused(status, monkeypatch):
    status["peers"][0].update(paused=True, pause_reason="paused by the volunteer")
    status["peers"][1].pop("paused")  # an older coordinator's document has no such field
    status["peers"][2].update(online=False)
    rows = {line.split()[0]: line for line in rendered(status, monkeypatch).splitlines()
            if line.lstrip()[:1].isdigit() and LONG_NAME in line}
    assert " paused " in rows["0" * 8] and " yes " in rows["1" * 8] and " no " in rows["2" * 8], rows


def test_the_verification_line_and_column_show_checked_work(status, monkeypatch):
    from hivefold.status_view import checked_cell, online_cell

    assert "verification:" not in rendered(status, monkeypatch)  # an older coordinator's document
    status["run"] = {"verification": {"segments": 4, "ban_after_invalid": 2}}
    status["verification"] = {"awaiting_proof": 1, "queued": 0, "valid": 9, "invalid": 2, "checked": 12,
                              "share_checked": 0.25, "keeper_seconds_per_check": 0.21, "train_seconds_per_check": 1.5}
    assert ("verification: 12 results checked (25%) · 9 valid, 2 invalid, 1 waiting · keeper 0.21s a check (shards "
            "trained in 1.50s) · banned after 2 invalid") in rendered(status, monkeypatch)
    status["run"]["verification"]["segments"] = 0
    assert "verification: off (results are credited unchecked)" in rendered(status, monkeypatch)
    status["run"]["verification"]["off"] = "sync averaging: the swarm replaces the parameters every step"
    assert ("verification: off (sync averaging: the swarm replaces the parameters every step: results are credited "
            "unchecked)") in rendered(status, monkeypatch)
    assert online_cell({"online": True, "results_valid": 3}) == "yes"
    assert online_cell({"online": True, "results_invalid": 1, "poison_reports": 2}) == "yes, reported 2"
    assert checked_cell({}) == "—" and checked_cell({"results_valid": 3, "reputation": 1.0}) == "3 ok"
    assert checked_cell({"results_valid": 2, "results_invalid": 1, "reputation": 0.43}) == "2 ok 1 bad"
