"""TLS end to end with the real commands: the coordinator prints its certificate's fingerprint at every start
and keeps the certificate across restarts; ``status`` trusts on first use and says so; a wrong pin stops a
peer and fails ``doctor`` with the reason; bad certificate flags are refused before anything starts."""

from __future__ import annotations

import json
import re

import pytest

from hivefold.tls import fingerprint
from tests.conftest import Processes, hivefold, wait_for

pytestmark = pytest.mark.integration

RUN_FLAGS = ["--corpus", "stdlib", "--max-corpus-mb", "1", "--model", "tiny", "--seq-len", "64", "--micro-batch", "8",
             "--shard-sequences", "32"]


def start(procs: Processes, workdir, incarnation: int) -> dict:
    path = workdir / "coordinator.json"
    path.unlink(missing_ok=True)
    proc = procs.start(f"coordinator-{incarnation}", "coordinator", "--workdir", str(workdir), "--listen",
                       "127.0.0.1:0", "--http", "", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", *RUN_FLAGS)
    info = wait_for(lambda: path.exists() and json.loads(path.read_text()), timeout=180,
                    what="the coordinator to serve", procs=procs)
    return {**info, "proc": proc}


def printed_fingerprints(proc) -> list[str]:
    return re.findall(r"SHA-256 fingerprint ([0-9a-f]{64})", proc.log.read_text(errors="replace"))


def test_fingerprint_printed_kept_across_restarts_and_trusted_on_first_use(tmp_path, known_coordinators):
    procs = Processes(tmp_path)
    try:
        workdir = tmp_path / "coordinator"
        first = start(procs, workdir, 1)
        pin = fingerprint((workdir / "tls" / "cert.pem").read_bytes())
        assert first["tls"] and first["fingerprint"] == pin and printed_fingerprints(first["proc"]) == [pin]
        r = hivefold("status", "--coordinator", first["grpc"], "--json")
        assert r.returncode == 0, r.stderr
        assert "on first use" in r.stderr and pin in r.stderr
        assert f"{first['grpc']} {pin}" in known_coordinators.read_text()
        r = hivefold("status", "--coordinator", first["grpc"], "--json")
        assert r.returncode == 0 and "on first use" not in r.stderr
        assert procs.stop(first["proc"]) == 0
        second = start(procs, workdir, 2)  # same workdir: the same certificate, printed again
        assert printed_fingerprints(second["proc"]) == [pin]
        r = hivefold("status", "--coordinator", second["grpc"], "--coordinator-fingerprint", pin.upper())
        assert r.returncode == 0, r.stderr

        wrong = "0" * 64
        peer = procs.start("peer", "peer", "--coordinator", second["grpc"], "--coordinator-fingerprint", wrong,
                           "--workdir", str(tmp_path / "peer"), "--dht-listen", "/ip4/127.0.0.1/tcp/0",
                           "--no-progress")
        assert peer.wait(120) == 2
        assert f"presents a certificate with fingerprint {pin}, not {wrong}" in peer.log.read_text()
        r = hivefold("doctor", "--coordinator", second["grpc"], "--coordinator-fingerprint", wrong, "--device", "cpu",
                     "--json", "--timeout", "10")
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert r.returncode == 1 and checks["coordinator"]["status"] == "FAIL"
        assert f"not {wrong}" in checks["coordinator"]["detail"]
        r = hivefold("status", "--coordinator", second["grpc"], "--insecure")
        assert r.returncode == 2 and "speaks TLS: drop --insecure" in r.stderr
    finally:
        procs.close()


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.pem"], "cannot read the TLS certificate or key"),
    (["--insecure", "--tls-cert", "a", "--tls-key", "b"], "contradict"),
])
def test_bad_certificate_flags_are_refused_before_anything_starts(tmp_path, flags, message):
    r = hivefold("coordinator", "--workdir", str(tmp_path / "w"), "--listen", "127.0.0.1:0", "--http", "",
                 "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-keeper", *RUN_FLAGS, *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
