"""The ``hivefold`` command: answers to bad input (a clear message, exit code 2, nothing left behind),
a ``--help`` that shows every default, and a ``status`` that loads no machine-learning library."""

import argparse
import signal
import socket
import subprocess
import sys
import time

import pytest

from hivefold.cli import build_parser
from tests.conftest import REPO, hivefold, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("corpus,message", [("/nonexistent/corpus", "does not exist"), ("EMPTY", "is empty")])
def test_coordinator_refuses_a_bad_corpus(tmp_path, corpus, message):
    if corpus == "EMPTY":
        corpus = str(tmp_path / "empty.txt")
        (tmp_path / "empty.txt").write_text("\n")
    r = hivefold("coordinator", "--workdir", str(tmp_path / "w"), "--corpus", corpus, "--listen", "127.0.0.1:0")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--listen", "nonsense"], "--listen must be HOST:PORT"),
    (["--lease-seconds", "5", "--heartbeat-interval", "10"], "must exceed --heartbeat-interval"),
    (["--swarm-token-seconds", "20", "--heartbeat-interval", "10"], "must be at least 3 × --heartbeat-interval (10)"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--model", "gigantic"], "unknown model 'gigantic'"),
    (["--micro-batch", "64", "--target-batch-size", "32"], "--micro-batch (64) must be <= --target-batch-size (32)"),
])
def test_coordinator_flag_errors(tmp_path, flags, message):
    r = hivefold("coordinator", "--workdir", str(tmp_path / "w"), "--corpus", "stdlib", "--max-corpus-mb", "0.1",
                 *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--model", "L2-H3-D64"], "--model L2-H3-D64: model d_model (64) must be divisible by n_head (3)"),
    (["--micro-batch", "512"], "--micro-batch (512) must be <= --target-batch-size (256)"),  # against the default
])
def test_a_bad_run_definition_fails_before_the_corpus_is_read(tmp_path, flags, message):
    workdir = tmp_path / "w"
    r = hivefold("coordinator", "--workdir", str(workdir), "--corpus", "stdlib", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not workdir.exists()  # no stray shards/ (nor an empty workdir) left behind


HEAVY = ("torch", "hivemind", "numpy")


def test_status_imports_no_machine_learning_library():
    """``hivefold status`` must answer at once: the parser and the status path stay light."""
    probe = ("import sys\n"
             "from hivefold.cli import main\n"
             f"rc = main(['status', '--coordinator', '127.0.0.1:{free_port()}', '--timeout', '0.1'])\n"
             f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cannot reach the coordinator" in r.stderr
    assert r.stdout.split(None, 1) == ["2", "[]\n"], r.stdout


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["coordinator", "peer", "doctor", "status", "demo", "generate"])
def test_help_shows_every_default(command):
    sub = _subcommands(build_parser())[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.required or action.nargs == 0:  # --help, required flags and on/off switches have no default
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"hivefold {command} {action.option_strings[0]}: {text!r} shows no default"
        if action.default is not None:
            assert str(action.default) in text, f"{action.option_strings[0]}: {text!r}"


def test_status_of_an_unreachable_coordinator():
    r = hivefold("status", "--coordinator", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.returncode == 2
    assert "cannot reach the coordinator" in r.stderr and "Traceback" not in r.stderr


def test_peer_flag_errors(tmp_path):
    r = hivefold("peer", "--coordinator", "localhost", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "--coordinator must be HOST:PORT" in r.stderr
    r = hivefold("peer", "--coordinator", "127.0.0.1:1", "--device", "tpu", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "--device must be one of" in r.stderr
    r = hivefold("peer", "--coordinator", "127.0.0.1:1", "--micro-batch", "0", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "--micro-batch: must be 'auto' or >= 1" in r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--max-hours", "-1"], "--max-hours must be a number of hours >= 0"),
    (["--max-hours", "nan"], "--max-hours must be a number of hours >= 0"),
    (["--gpu-memory-fraction", "0"], "--gpu-memory-fraction must be in (0, 1]"),
    (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction must be in (0, 1]"),
    (["--idle-only", "1"], "--idle-only SHARE must be between 0 and 1"),
    (["--idle-only", "-0.1"], "--idle-only SHARE must be between 0 and 1"),
    (["--upload-cap", "5X"], "--upload-cap: expected a number of bytes like 500M"),
    (["--upload-cap=-5M"], "--upload-cap: expected a number of bytes like 500M"),
])
def test_volunteer_control_flag_errors(tmp_path, flags, message):
    r = hivefold("peer", "--coordinator", "127.0.0.1:1", "--workdir", str(tmp_path / "w"), *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()  # refused before the workdir is touched


def test_peer_runs_from_flags_as_before_and_takes_control_subcommands():
    """``hivefold peer --coordinator ...`` keeps working exactly as before the pause|resume|finish subcommands."""
    from peer.config import IDLE_SHARE_DEFAULT, PeerConfig, config_from_args

    parser = build_parser()
    args = parser.parse_args(["peer", "--coordinator", "127.0.0.1:7600", "--workdir", "/tmp/w", "--threads", "2",
                              "--max-shards", "3", "--no-progress", "--micro-batch", "auto"])
    assert args.peer_command is None
    config = config_from_args(args)
    assert (config.coordinator, str(config.workdir), config.threads, config.max_shards, config.progress) == (
        "127.0.0.1:7600", "/tmp/w", 2, 3, False)
    assert (config.max_hours, config.gpu_memory_fraction, config.idle_only, config.upload_cap) == (0, None, None, 0)
    assert config == PeerConfig(coordinator="127.0.0.1:7600", workdir=config.workdir, threads=2, max_shards=3,
                                progress=False)
    args = parser.parse_args(["peer", "--coordinator", "h:1", "--idle-only", "--upload-cap", "1.5Gi",
                              "--max-hours", "2.5", "--gpu-memory-fraction", "0.5"])
    config = config_from_args(args)
    assert (config.idle_only, config.upload_cap, config.max_hours, config.gpu_memory_fraction) == (
        IDLE_SHARE_DEFAULT, int(1.5 * 2**30), 2.5, 0.5)
    assert config_from_args(parser.parse_args(["peer", "--coordinator", "h:1", "--idle-only", "0.5"])).idle_only == 0.5
    for argv, workdir in ((["peer", "pause", "--workdir", "/tmp/a"], "/tmp/a"),
                          (["peer", "--workdir", "/tmp/b", "resume"], "/tmp/b"),
                          (["peer", "finish"], str(PeerConfig.workdir))):
        args = parser.parse_args(argv)
        assert (args.peer_command, str(args.workdir)) == (argv[1] if argv[1] != "--workdir" else "resume", workdir)


def test_peer_without_coordinator_or_running_peer_says_what_to_do(tmp_path):
    r = hivefold("peer", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "the following arguments are required: --coordinator" in r.stderr, r.stderr
    r = hivefold("peer", "pause", "--workdir", str(tmp_path / "nobody"))
    assert r.returncode == 2 and "no peer is running in" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "nobody").exists()


def test_peer_waits_for_an_unreachable_coordinator_and_stops_cleanly(tmp_path, processes):
    peer = processes.start("peer", "peer", "--coordinator", f"127.0.0.1:{free_port()}", "--workdir",
                           str(tmp_path / "p"), "--retry-cap", "1")
    wait_for(lambda: "Register at 127.0.0.1" in peer.log.read_text() and "retrying" in peer.log.read_text(),
             timeout=60, what="the peer to report the unreachable coordinator", procs=processes)
    time.sleep(1)
    peer.send_signal(signal.SIGTERM)
    assert peer.wait(30) == 0
    assert "stopped while waiting for the coordinator" in peer.log.read_text()


def test_generate_needs_a_real_checkpoint(tmp_path):
    r = hivefold("generate", "--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = hivefold("generate", "--checkpoint", str(tmp_path / "junk.pt"), "--prompt", "x")
    assert r.returncode == 2 and "is not a hivefold checkpoint" in r.stderr


def test_an_announced_dht_address_gets_the_node_id_peers_need():
    from hivefold.netaddr import with_peer_id

    assert with_peer_id("/ip4/203.0.113.10/tcp/7601", "QmX") == "/ip4/203.0.113.10/tcp/7601/p2p/QmX"
    assert with_peer_id("/ip4/203.0.113.10/tcp/7601/p2p/QmY", "QmX") == "/ip4/203.0.113.10/tcp/7601/p2p/QmY"


@pytest.mark.parametrize("text,tokens", [("123", 123), ("50k", 50_000), ("50M", 50_000_000), ("2G", 2 * 10**9),
                                         ("1.5B", 1_500_000_000), ("0", 0)])
def test_token_budgets_read_with_suffixes(text, tokens):
    from coordinator.config import token_count

    assert token_count(text) == tokens


@pytest.mark.parametrize("text", ["lots", "-5M", "nan", "5X"])
def test_a_bad_token_budget_says_what_is_expected(text):
    r = hivefold("coordinator", "--workdir", "/nonexistent/x", f"--token-budget={text}")
    assert r.returncode == 2 and "number of tokens" in r.stderr
