"""``hivefold coordinator``: build or reopen a run, start the DHT bootstrap node, gRPC, HTTP and keeper."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import hivemind

from coordinator.config import CoordinatorConfig
from coordinator.handlers import Context
from coordinator.http_status import start_http
from coordinator.run import open_run
from coordinator.server import start_server

log = logging.getLogger("hivefold.coordinator")

ENDPOINTS_FILE = "coordinator.json"  # written once serving: {"grpc": "host:port", "http": ..., "pid": ...}
KEEPER_STOP_TIMEOUT_S = 120.0
KEEPER_RESTART_S = 30.0  # the keeper's final checkpoint downloads the swarm's state first


def _keeper_cmd(config: CoordinatorConfig, maddrs: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "coordinator.keeper", "--workdir", str(config.workdir),
           "--checkpoint-every", str(config.checkpoint_every), "--keep-checkpoints", str(config.keep_checkpoints),
           "--poll", str(config.keeper_poll)]
    for m in maddrs:
        cmd += ["--initial-peer", m]
    for m in config.dht_listen:  # same interfaces as the bootstrap node, any free port
        cmd += ["--dht-listen", "/".join(m.split("/")[:-1] + ["0"]) if "/tcp/" in m else m]
    return cmd


def run(config: CoordinatorConfig, stop: threading.Event) -> None:
    """Serve until ``stop`` is set; always releases everything it started."""
    spec, ledger = open_run(config.workdir, config.run)
    dht = server = http = keeper = None
    endpoints = config.workdir / ENDPOINTS_FILE
    try:
        dht = hivemind.DHT(host_maddrs=list(config.dht_listen), identity_path=str(config.workdir / "dht.key"),
                           start=True)
        maddrs = list(config.dht_announce) or [str(m) for m in dht.get_visible_maddrs()]
        log.info("DHT bootstrap node at %s", " ".join(maddrs))
        ctx = Context(config=config, spec=spec, ledger=ledger, dht_maddrs=maddrs)
        server, port = start_server(ctx, config.listen)
        host = config.listen.rpartition(":")[0]
        info = {"grpc": f"{host}:{port}", "pid": os.getpid(), "run_id": spec.run_id, "dht": maddrs}
        if config.http:
            http, http_port = start_http(ctx, config.http)
            info["http"] = f"{config.http.rpartition(':')[0]}:{http_port}"
        tmp = endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, endpoints)
        log.info("run %s serving %d shards on %s", spec.run_id, len(spec.shards), info["grpc"])
        last_keeper_start = -float("inf")
        while True:
            # A crashed keeper is restarted, at most once per KEEPER_RESTART_S so a broken one cannot spin.
            due = time.monotonic() - last_keeper_start >= KEEPER_RESTART_S
            if config.keeper and (keeper is None or keeper.poll() is not None) and due:
                if keeper is not None:
                    log.error("keeper exited with code %s; restarting it", keeper.returncode)
                keeper = subprocess.Popen(_keeper_cmd(config, maddrs))
                last_keeper_start = time.monotonic()
            if stop.wait(1.0):
                break
    finally:
        if keeper is not None and keeper.poll() is None:
            log.info("stopping the keeper (final checkpoint)")
            keeper.send_signal(signal.SIGTERM)
            try:
                keeper.wait(KEEPER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("keeper did not stop in %.0fs; killing it", KEEPER_STOP_TIMEOUT_S)
                keeper.kill()
        endpoints.unlink(missing_ok=True)
        if server is not None:
            server.stop(grace=2.0).wait()
        if http is not None:
            http.shutdown()
        if dht is not None:
            dht.shutdown()
        ledger.close()
        log.info("coordinator stopped")
