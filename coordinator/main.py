"""``hivefold coordinator``: build or reopen a run, start the DHT bootstrap node, gRPC, HTTP and keeper."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import hivemind

from coordinator import handlers
from coordinator.config import CoordinatorConfig
from coordinator.credit import KEY_DIR
from coordinator.handlers import Context
from coordinator.http import make_metrics, start_http
from coordinator.ledger import is_postgres
from coordinator.ledger.schema import MAX_UNVERIFIED
from coordinator.lock import WorkdirLock
from coordinator.run import LEDGER_ENV, SPEC_FILE, ledger_location, open_run
from coordinator.server import start_server
from hivefold.dht import SwarmDHT
from hivefold.errors import ConfigError
from hivefold.identity import Identity
from hivefold.netaddr import with_peer_id
from hivefold.signals import install_stop_handlers
from hivefold.swarm_access import OwnPass
from hivefold.tls import INSECURE_WARNING, server_tls

log = logging.getLogger("hivefold.coordinator")

ENDPOINTS_FILE = "coordinator.json"  # written once serving: {"grpc": "host:port", "http": ..., "pid": ...}
KEEPER_STOP_TIMEOUT_S = 60.0  # the keeper's final checkpoint: one bounded state download, evaluation, save
KEEPER_RESTART_S = 30.0  # a crashed keeper is restarted at most this often, so a broken one cannot spin
DHT_KILL_AFTER_S = 5.0
HISTORY_EVERY_S = 5.0  # how often the swarm is sampled for the dashboard's charts (17,280 rows a day)


def _keeper_cmd(config: CoordinatorConfig, maddrs: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "coordinator.keeper", "--workdir", str(config.workdir),
           "--checkpoint-every", str(config.checkpoint_every), "--keep-checkpoints", str(config.keep_checkpoints),
           "--poll", str(config.keeper_poll), "--online-seconds", str(3 * config.heartbeat_interval),
           "--verify-tolerance", str(config.verify_tolerance), "--ban-after-invalid", str(config.ban_after_invalid)]
    for m in maddrs:
        cmd += ["--initial-peer", m]
    for m in config.dht_listen:  # same interfaces as the bootstrap node, any free port
        cmd += ["--dht-listen", "/".join(m.split("/")[:-1] + ["0"]) if "/tcp/" in m else m]
    return cmd


class KeeperProcess:
    """The keeper child: restarted when it crashes (at most once per KEEPER_RESTART_S), always reaped on exit.

    It runs in its own process group, so a Ctrl-C meant for the coordinator's terminal reaches it only
    through the coordinator, which asks it for a final checkpoint and waits; it holds a copy of the
    workdir lock's descriptor, so a second coordinator is refused while it lives.
    """

    def __init__(self, cmd: list[str], lock_fd: int, ledger: str):
        self.cmd, self.lock_fd, self.ledger = cmd, lock_fd, ledger
        self.proc: subprocess.Popen | None = None
        self.started = -float("inf")

    def supervise(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if time.monotonic() - self.started < KEEPER_RESTART_S:
            return
        if self.proc is not None:
            log.error("keeper exited with code %s; restarting it", self.proc.returncode)
        # the ledger's location goes in the environment: a URL may carry a password, and argv is public
        self.proc = subprocess.Popen(self.cmd, pass_fds=(self.lock_fd,), start_new_session=True,
                                     env={**os.environ, LEDGER_ENV: self.ledger})
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log.info("stopping the keeper (it checkpoints the swarm's newest state if it is ahead of the latest one)")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(KEEPER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("keeper did not stop in %.0fs; killing it", KEEPER_STOP_TIMEOUT_S)
        finally:  # also on a second Ctrl-C while waiting: never leave the keeper behind
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            else:
                _kill_group(self.proc.pid)  # its hivemind helpers and p2pd


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _shutdown_dht(dht: hivemind.DHT) -> None:
    """hivemind's shutdown waits for a graceful stop, then sends SIGTERM; make sure the process is gone."""
    dht.shutdown()
    dht.join(DHT_KILL_AFTER_S)
    if dht.is_alive():
        log.warning("the DHT process did not exit; killing it")
        dht.kill()
        dht.join(DHT_KILL_AFTER_S)


def _tls(config: CoordinatorConfig):
    if config.insecure:
        log.warning("%s", INSECURE_WARNING)
        return None, None
    hosts = tuple(h for h in (config.listen.rpartition(":")[0], config.http.rpartition(":")[0]) if h)
    tls, key_file = server_tls(config.workdir, config.tls_cert, config.tls_key,
                               hosts=tuple(h.strip("[]") for h in hosts))
    log.info("TLS certificate %s (%s), SHA-256 fingerprint %s: peers pin it with --coordinator-fingerprint %s",
             tls.cert_path, "self-signed" if tls.self_signed else "operator's", tls.fingerprint, tls.fingerprint)
    return tls, key_file


def _signing_key(config: CoordinatorConfig, ledger) -> Identity:
    """The key that signs receipts and swarm tokens; every coordinator of a run must hold the same one."""
    key = Identity.load_or_create(config.workdir / KEY_DIR)
    known = ledger.get_meta("signing_key")
    if known is None:
        ledger.set_meta("signing_key", key.public_key.hex())
    elif known != key.public_key.hex():
        raise ConfigError(f"this run's other coordinators sign with another key than {config.workdir / KEY_DIR}: "
                          "coordinators of one run must share it (peers check swarm tokens and receipts against "
                          "it); copy that directory from the first coordinator's workdir before starting this one")
    return key


def run(config: CoordinatorConfig, stop: threading.Event) -> None:
    """Serve until ``stop`` is set; always releases everything it started, in reverse order."""
    if not (config.workdir / SPEC_FILE).exists():
        config.run.with_defaults()  # a new run's options are checked before its workdir is even created
    with contextlib.ExitStack() as stack:
        lock = WorkdirLock(config.workdir).acquire(listen=config.listen)
        stack.callback(lock.release)
        tls, key_file = _tls(config)  # bad certificate files are refused before the run is opened
        spec, ledger = open_run(config.workdir, config.run, config.ledger)
        stack.callback(ledger.close)
        ledger.silent_seconds = config.silent_seconds
        key = _signing_key(config, ledger)
        if config.keeper:  # a keeper of an earlier session is gone; this one's announces itself
            ledger.set_keeper_maddrs([])
        elif config.verify_ceiling > 0 and is_postgres(config.ledger):
            log.warning("--no-keeper: results sampled for verification wait for the keeper of another coordinator "
                        "on this ledger; with none, pass --verify-ceiling 0 or peers stall after %d unchecked "
                        "results", MAX_UNVERIFIED)
        ledger.set_checkpoint_every(config.checkpoint_every)
        ledger.set_meta("averaging", spec.averaging.mode)
        ledger.set_sample_budget(-(-config.token_budget // spec.seq_len))  # whole sequences, rounded up
        # The bootstrap node keeps its libp2p identity (peers may have its address) and signs its own swarm
        # token with the coordinator's key: it serves DHT requests of token holders only (hivefold.swarm_access).
        swarm_pass = OwnPass(key, "coordinator", config.workdir / "dht.key", fresh=False)
        dht = SwarmDHT(host_maddrs=list(config.dht_listen), announce_maddrs=list(config.dht_announce) or None,
                       start=True, **swarm_pass.dht_kwargs())
        stack.callback(_shutdown_dht, dht)
        install_stop_handlers(stop, what="stopping (the keeper takes a final checkpoint first)")
        # An announced address (a public IP, a forwarded port) is given to peers with this node's id appended.
        maddrs = ([with_peer_id(m, str(dht.peer_id)) for m in config.dht_announce]
                  or [str(m) for m in dht.get_visible_maddrs()])
        log.info("DHT bootstrap node at %s", " ".join(maddrs))
        ctx = Context(config=config, spec=spec, ledger=ledger, dht_maddrs=maddrs)
        # The peers could not heartbeat while this coordinator was down: their leases start afresh from now.
        resumed = ledger.resume_leases(lease_seconds=config.lease_seconds, now=time.time())
        if resumed:
            log.info("%d leases were active: each gets %.0fs from now to hear from its peer", resumed,
                     config.lease_seconds)
        metrics = make_metrics(ctx)
        server, port = start_server(ctx, config.listen, interceptors=[metrics.interceptor()], tls=tls)
        stack.callback(lambda: server.stop(grace=2.0).wait())
        host = config.listen.rpartition(":")[0]
        info = {"grpc": f"{host}:{port}", "pid": os.getpid(), "run_id": spec.run_id, "dht": maddrs,
                "tls": tls is not None, "fingerprint": tls.fingerprint if tls else None,
                "cert": str(tls.cert_path) if tls else None}
        if config.http:
            http, http_port = start_http(ctx, config.http, metrics, tls=tls.ssl_context(key_file) if tls else None)
            stack.callback(http.shutdown)
            info["http"] = f"{config.http.rpartition(':')[0]}:{http_port}"
        endpoints = config.workdir / ENDPOINTS_FILE
        tmp = endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, endpoints)
        stack.callback(endpoints.unlink, missing_ok=True)
        lock.describe(grpc=info["grpc"], http=info.get("http"))
        keeper = (KeeperProcess(_keeper_cmd(config, maddrs), lock.fd, ledger_location(config.workdir, config.ledger))
                  if config.keeper else None)
        if keeper is not None:
            stack.callback(keeper.stop)  # first thing on the way out: the final checkpoint needs the DHT
        log.info("run %s serving %d shards on %s", spec.run_id, len(spec.shards), info["grpc"])
        next_sample = 0.0
        while not stop.is_set():
            if keeper is not None:
                keeper.supervise()
            if time.monotonic() >= next_sample:  # the dashboard's charts of the swarm over time
                next_sample = time.monotonic() + HISTORY_EVERY_S
                handlers.record_history(ctx, time.time(), min_interval=HISTORY_EVERY_S - 1)
            stop.wait(1.0)
    log.info("coordinator stopped")
