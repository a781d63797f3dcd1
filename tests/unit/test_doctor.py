"""``hivefold doctor``'s judgements that need no network: which versions fit, how addresses are scoped, usage errors."""

import subprocess
import sys

import pytest

from peer.doctor import FAIL, PASS, WARN, Check, version_problems
from peer.doctor_probes import scope
from tests.conftest import REPO

REQUIRES = ["hivemind==1.1.12", "torch>=2.1", "grpcio>=1.85.1", "protobuf>=7.35.1", 'pytest>=8; extra == "dev"']
STUBS = {"protobuf": "7.35.1", "grpcio": "1.85.1"}
MINE = {"python": "3.11.9", "hivefold": "0.1.0", "torch": "2.13.0+cpu", "hivemind": "1.1.12", "protobuf": "7.36.2",
        "grpcio": "1.85.3"}


def problems(installed=None, coordinator=None, requires=REQUIRES, requires_python=">=3.10"):
    found = version_problems({**MINE, **(installed or {})}, requires, requires_python, STUBS, coordinator)
    return [(level, text) for level, text in found if level != PASS]


def test_a_machine_that_fits_has_no_problems_and_extras_are_not_required():
    assert problems() == []  # pytest (a dev extra) is not installed in MINE
    notes = version_problems(MINE, REQUIRES, ">=3.10", STUBS, {**MINE, "torch": "2.4.0+cu124"})
    assert (PASS, "the coordinator runs torch 2.4.0+cu124, this machine 2.13.0+cpu (fine)") in notes
    assert not [n for n in notes if n[0] != PASS]


def test_hivemind_must_match_the_swarms_minor_version_only():
    found = problems(coordinator={**MINE, "hivemind": "1.2.0"})
    assert found and found[0][0] == FAIL and "the swarm runs hivemind 1.2.0" in found[0][1]
    assert "pip install hivemind==1.2.0" in found[0][1]
    assert problems(coordinator={**MINE, "hivemind": "1.1.13"}) == []  # a patch release speaks the same protocol


@pytest.mark.parametrize("dist,version,message", [
    ("protobuf", "7.30.0", "protobuf 7.30.0 does not satisfy hivefold's protobuf>=7.35.1"),
    ("grpcio", "1.80.0", "grpcio 1.80.0 is older than the 1.85.1 the generated stubs need"),
    ("hivemind", "1.1.11", "hivemind 1.1.11 does not satisfy hivefold's hivemind==1.1.12"),
    ("torch", None, "torch is not installed"),
    ("python", "3.9.18", "python 3.9.18 does not satisfy hivefold's >=3.10"),
])
def test_what_does_not_fit_fails_with_the_fix(dist, version, message):
    found = problems({dist: version})
    assert any(level == FAIL and message in text for level, text in found), found


def test_stub_minimums_apply_even_where_the_requirements_are_looser():
    found = problems({"protobuf": "7.0.0"}, requires=["protobuf>=5"])
    assert found == [(FAIL, "protobuf 7.0.0 is older than the 7.35.1 the generated stubs need: "
                            "pip install 'protobuf>=7.35.1'")]


def test_another_hivefold_on_the_coordinator_is_a_warning_and_an_old_coordinator_is_noted():
    assert problems(coordinator={**MINE, "hivefold": "0.2.0"})[0][0] == WARN
    assert problems(coordinator={}) == [(WARN, "the coordinator does not report its versions (an older hivefold)")]


def test_address_scopes():
    assert scope("/ip4/127.0.0.1/tcp/1/p2p/QmX") == "loopback"
    assert [scope(f"/ip4/{ip}/tcp/1") for ip in ("10.1.2.3", "192.168.1.2", "100.64.0.1", "169.254.1.1")] == [
        "private"] * 4
    assert scope("/ip4/8.8.8.8/tcp/1") == scope("/ip6/2001:4860::1/tcp/1") == scope("/dns4/a.example/tcp/1") == "public"


def test_check_lines():
    assert Check("device", PASS, "cpu ok", advice="ignored").line() == "PASS  device         cpu ok"
    assert Check("coordinator", FAIL, "no answer", "check it").line() == "FAIL  coordinator    no answer — check it"


@pytest.mark.parametrize("flags,message", [
    (["--coordinator", "nonsense"], "--coordinator must be HOST:PORT"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_usage_errors_exit_2(flags, message):
    r = subprocess.run([sys.executable, "-m", "hivefold", "doctor", *flags], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
