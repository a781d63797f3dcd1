"""The volunteer's controls, piece by piece: byte sizes, the idle measurement over recorded /proc samples,
the gate that pauses and finishes, the daily upload count, and the control channel between two processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from hivefold.errors import ConfigError, HivefoldError
from peer.config import PeerConfig, parse_byte_size
from peer.control import ControlChannel, running_peer, send_command
from peer.gate import BUSY, UPLOAD_CAP, VOLUNTEER, Gate
from peer.idle import CpuSample, IdleDetector, others_share, parse_pid_stat, parse_proc_stat
from peer.upload import UploadBudget, human_bytes
from tests.conftest import REPO, wait_for

# --- byte sizes and flag validation -----------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("500M", 500 * 10**6), ("2G", 2 * 10**9), ("2g", 2 * 10**9), ("1.5G", 1_500_000_000),
    ("100kB", 100_000), ("1Gi", 2**30), ("1.5GiB", int(1.5 * 2**30)), ("3 TB", 3 * 10**12), ("0", 0), (".5M", 500_000),
])
def test_byte_sizes(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "5X", "-5M", "1.2.3G", "5 M B", "1e9"])
def test_bad_byte_sizes_say_which_forms_work(text):
    with pytest.raises(ValueError, match="expected a number of bytes like 500M, 2G or 1.5Gi"):
        parse_byte_size(text)


@pytest.mark.parametrize("field,value,message", [
    ("max_hours", -1.0, "--max-hours must be a number of hours >= 0"),
    ("max_hours", float("inf"), "--max-hours must be a number of hours >= 0"),
    ("gpu_memory_fraction", 0.0, "--gpu-memory-fraction must be in (0, 1]"),
    ("gpu_memory_fraction", float("nan"), "--gpu-memory-fraction must be in (0, 1]"),
    ("idle_only", 0.0, "--idle-only SHARE must be between 0 and 1"),
    ("idle_only", 1.0, "--idle-only SHARE must be between 0 and 1"),
    ("upload_cap", -1, "--upload-cap must be >= 0 bytes"),
])
def test_config_refuses_bad_control_settings(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PeerConfig(coordinator="127.0.0.1:1", **{field: value})


def test_gpu_memory_fraction_is_ignored_on_a_cpu_and_says_so(caplog):
    from peer.device import limit_memory

    with caplog.at_level("INFO", logger="hivefold.peer"):
        assert limit_memory(None, "cpu") == 1.0 and not caplog.records
        assert limit_memory(0.5, "cpu") == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "--gpu-memory-fraction 0.5 is ignored on cpu: it limits a CUDA device's memory only"]


def test_human_bytes():
    assert [human_bytes(n) for n in (800, 12_000, 500 * 10**6, 1.5e9)] == ["800 B", "12 kB", "500 MB", "1.5 GB"]


# --- the idle measurement, as pure functions over /proc samples -------------------------------------

PROC_STAT = """cpu  1000 20 300 5000 100 10 5 0 0 0
cpu0 500 10 150 2500 50 5 2 0 0 0
intr 12345
"""


def test_proc_stat_counts_iowait_as_idle():
    total, busy = parse_proc_stat(PROC_STAT)
    assert total == 1000 + 20 + 300 + 5000 + 100 + 10 + 5 + 0
    assert busy == total - 5000 - 100


def test_pid_stat_reads_past_a_name_with_spaces_and_parentheses():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
    text = "4242 (p2pd (x) y) S 4200 4242 4242 0 -1 4194560 100 0 0 0 70 30 5 1 20 0 8 0 99 0 0\n"
    assert parse_pid_stat(text) == (4200, 70 + 30 + 5 + 1)


def sample(at: float, total: int, busy: int, **own: int) -> CpuSample:
    return CpuSample(at=at, total=total, busy=busy, own={int(k[1:]): v for k, v in own.items()})


def test_others_share_leaves_this_peers_processes_out():
    before = sample(0, total=1000, busy=200, p10=100, p11=50)
    # 400 ticks of 1000 busy, 300 of them this peer's (main + helper): others used 100 of 1000.
    after = sample(1, total=2000, busy=600, p10=350, p11=100)
    assert others_share(before, after) == pytest.approx(0.1)
    # A helper that started in between counts in full (p12: 50), one that exited counts nothing (p11).
    assert others_share(before, sample(1, total=2000, busy=600, p10=350, p12=50)) == pytest.approx(0.1)
    assert others_share(before, sample(1, total=2000, busy=600, p10=350)) == pytest.approx(0.15)
    # Never below 0 or above 1.
    assert others_share(before, sample(1, total=2000, busy=300, p10=600)) == 0.0
    assert others_share(before, sample(1, total=1000, busy=300)) == 0.0  # no time passed


def feed(detector: IdleDetector, shares: list[float], *, start: float = 0.0) -> list[bool]:
    """One sample a second in which others used ``share`` of 100 ticks and this peer the rest."""
    out, total, busy, own = [], 0, 0, 0
    detector.update(CpuSample(at=start, total=0, busy=0, own={1: 0}))
    for i, share in enumerate(shares, 1):
        total += 100
        busy += 100
        own += 100 - round(100 * share)
        out.append(detector.update(CpuSample(at=start + i, total=total, busy=busy, own={1: own})))
    return out


def test_idle_detector_pauses_on_sustained_load_and_resumes_after_a_calm_spell():
    d = IdleDetector(0.25, window=5, calm=15)
    busy = feed(d, [0.05] * 10 + [0.9] * 10 + [0.05] * 30)
    assert not any(busy[:10])  # idle
    assert busy.index(True) in range(11, 14)  # a few seconds into the load, not at its first second
    assert d.last_share is not None
    back = busy.index(False, busy.index(True))
    assert back >= 20 + 10  # not as soon as the 5-second window calms: it waits for the 15-second one
    assert not any(busy[back:])


def test_idle_detector_ignores_a_short_burst_and_judges_nothing_without_history():
    d = IdleDetector(0.25, window=5, calm=15)
    assert feed(d, [1.0] * 3) == [False] * 3  # less than a window of history: no verdict yet
    d = IdleDetector(0.25, window=5, calm=15)
    assert not any(feed(d, [0.05] * 10 + [1.0] + [0.05] * 10))  # one busy second in five averages 24%


# --- the gate ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gate_reasons_apply_mid_shard_or_between_shards():
    gate = Gate("p")
    assert not gate.holds(mid_shard=True) and not gate.holds(mid_shard=False)
    assert gate.pause(UPLOAD_CAP, mid_shard=False)
    assert not gate.holds(mid_shard=True) and gate.holds(mid_shard=False)  # the shard is finished first
    assert gate.pause(BUSY) and not gate.pause(BUSY)
    assert gate.holds(mid_shard=True)
    assert gate.resume(BUSY) and not gate.resume(BUSY)
    gate.set(UPLOAD_CAP, False)
    assert gate.reasons() == []


def test_gate_wait_blocks_until_every_reason_lifts_and_reports_halted():
    gate, stop = Gate("p"), threading.Event()
    gate.pause(VOLUNTEER)
    gate.pause(BUSY)
    result = []
    waiter = threading.Thread(target=lambda: result.append(gate.wait(stop, mid_shard=True)))
    waiter.start()
    wait_for(lambda: gate.halted, timeout=5, interval=0.01, what="the waiter to halt")
    gate.resume(VOLUNTEER)
    time.sleep(0.3)
    assert waiter.is_alive() and gate.halted  # still busy
    gate.resume(BUSY)
    waiter.join(5)
    assert result == [True] and not gate.halted


def test_gate_wait_gives_up_on_timeout_or_stop():
    gate, stop = Gate("p"), threading.Event()
    gate.pause(VOLUNTEER)
    t0 = time.monotonic()
    assert gate.wait(stop, mid_shard=True, timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 2
    threading.Timer(0.2, stop.set).start()
    assert gate.wait(stop, mid_shard=False) is False
    assert gate.wait(threading.Event(), mid_shard=True, timeout=0) is False


def test_finishing_lifts_the_volunteers_own_pause_but_not_a_busy_machine():
    gate = Gate("p")
    gate.pause(VOLUNTEER)
    gate.pause(BUSY)
    assert gate.finish("asked") and not gate.finish("again")
    assert gate.finishing == "asked" and gate.reasons() == [BUSY]


def test_gate_counts_time_spent_training_not_paused():
    clock = FakeClock()
    gate = Gate("p", clock=clock)
    assert gate.active_seconds() == 0.0
    gate.start()
    clock.now += 60
    gate.pause(VOLUNTEER)
    stop = threading.Event()
    waiter = threading.Thread(target=gate.wait, args=(stop,), kwargs={"mid_shard": True})
    waiter.start()
    wait_for(lambda: gate.halted, timeout=5, interval=0.01, what="the waiter to halt")
    clock.now += 1000  # paused: does not count, while the pause lasts ...
    assert gate.active_seconds() == pytest.approx(60)
    gate.resume(VOLUNTEER)
    waiter.join(5)
    clock.now += 30  # ... nor after it
    assert gate.active_seconds() == pytest.approx(90)


# --- the daily upload count --------------------------------------------------------------------------


def test_upload_budget_counts_per_utc_day_and_survives_a_restart(tmp_path):
    now = [datetime(2026, 3, 1, 23, 0, tzinfo=timezone.utc)]
    budget = UploadBudget(1000, tmp_path, now=lambda: now[0])
    assert not budget.update(400)
    assert not budget.update(400)  # the same running total again: nothing new
    assert budget.update(1000) and budget.used == 1000
    assert budget.seconds_to_next_day() == 3600
    # A restart the same day: the count goes on from the file; the new process's total starts at 0.
    again = UploadBudget(1000, tmp_path, now=lambda: now[0])
    assert again.exhausted and not UploadBudget(2000, tmp_path, now=lambda: now[0]).exhausted
    now[0] += timedelta(hours=2)  # a new UTC day
    assert not again.update(300) and again.used == 300 and again.day == "2026-03-02"
    assert UploadBudget(1000, tmp_path, now=lambda: now[0]).used == 300


def test_upload_budget_ignores_a_damaged_file(tmp_path):
    (tmp_path / "upload.json").write_text("{not json")
    assert UploadBudget(10, tmp_path).used == 0


# --- the control channel, between two real processes -------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from peer.control import ControlChannel
    channel = ControlChannel(Path(sys.argv[1])).open()
    print("ready", flush=True)
    seen = []
    def apply(command):
        seen.append(command)
        return command != "finish", f"{command} #{len(seen)}"
    while "resume" not in seen or len(seen) < 3:
        channel.poll(apply)
        time.sleep(0.05)
    channel.close()
    print(" ".join(seen), flush=True)
""")


def test_commands_reach_the_running_peer_and_nothing_else(tmp_path):
    workdir = tmp_path / "peer"
    with pytest.raises(HivefoldError, match="no peer is running in"):
        send_command(workdir, "pause")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert running_peer(workdir)["pid"] == holder.pid
        with pytest.raises(ConfigError, match=f"in use by another peer \\(pid {holder.pid} "):
            ControlChannel(workdir).open()  # a second peer on the same workdir
        assert send_command(workdir, "pause") == (True, "pause #1")
        assert send_command(workdir, "finish") == (False, "finish #2")
        with pytest.raises(HivefoldError, match="unknown command"):
            send_command(workdir, "explode")
        assert send_command(workdir, "resume") == (True, "resume #3")
        out, _ = holder.communicate(timeout=30)
        assert holder.returncode == 0 and out.strip() == "pause finish resume"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert running_peer(workdir) is None  # the lock went with the process
    assert list((workdir / "control").iterdir()) == []  # every command taken, every answer collected
    with pytest.raises(HivefoldError, match="no peer is running in"):
        send_command(workdir, "resume")


def test_a_peer_that_never_answers_gets_its_command_withdrawn(tmp_path):
    workdir = tmp_path / "peer"
    script = ("import sys, time\nfrom pathlib import Path\nfrom peer.control import ControlChannel\n"
              "ControlChannel(Path(sys.argv[1])).open()\nprint('ready', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(HivefoldError, match="did not answer within 1s and the command was withdrawn"):
            send_command(workdir, "pause", timeout=1.0)
        assert list((workdir / "control").glob("*.cmd")) == []
    finally:
        holder.kill()
        holder.wait()
