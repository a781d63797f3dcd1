"""``hivefold peer``: the volunteer's daemon, wiring the peer's parts together.

lock the workdir and open the control channel (``peer.control``) → register, join the DHT, load the
swarm's state (``peer.session``) → heartbeats in the background (``peer.heartbeat``) → loop { lease →
fetch → train → submit } (``peer.work``) → leave. The volunteer's controls (``hivefold peer
pause|resume|finish``, ``--idle-only``, ``--upload-cap``, ``--max-hours``) reach the work loop through
the gate (``peer.gate``), set from one background thread (``peer.governor``). SIGINT/SIGTERM finish
the current micro-batch, hand the lease back and leave the swarm. While the coordinator is
unreachable the peer retries with backoff and jitter; finished results wait in ``workdir/outbox``
and are submitted when it is back.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from hivefold.errors import HivefoldError
from hivefold.retry import Stopped
from hivefold.signals import install_stop_handlers
from peer.config import PeerConfig
from peer.control import ControlChannel
from peer.gate import Gate
from peer.governor import Governor
from peer.heartbeat import heartbeat_loop
from peer.idle import check_supported
from peer.session import Session
from peer.work import WorkLoop, make_progress

log = logging.getLogger("hivefold.peer")

SHUTDOWN_TIMEOUT_S = 60.0
STOP_MESSAGE = "finishing the micro-batch, then leaving"


def run(config: PeerConfig, stop: threading.Event) -> None:
    if config.idle_only is not None:
        check_supported()
    if config.threads:
        torch.set_num_threads(config.threads)
    channel = ControlChannel(config.workdir).open()  # first: one peer per workdir (one identity, one outbox)
    try:
        _run(config, stop, channel)
    finally:
        channel.close()


def _run(config: PeerConfig, stop: threading.Event, channel: ControlChannel) -> None:
    session = Session(config, stop)
    gate = Gate(session.peer_id)
    governor = Governor(config, gate, channel, sent_bytes=session.sent_bytes).start()
    left = threading.Event()  # set once the work loop is over: heartbeats run until then
    try:
        session.join()
        # hivemind's averagers set SIGINT to SIG_IGN in this process when they start: take Ctrl-C back.
        install_stop_handlers(stop, what=STOP_MESSAGE)
        threading.Thread(target=heartbeat_loop, args=(session, left, gate), name="heartbeat", daemon=True).start()
        work = WorkLoop(session, stop, gate)
        progress = make_progress(config.progress)
        if progress is not None:
            with progress:
                work.run(progress)
        else:
            work.run(None)
        left.set()
        session.leave("stopped" if stop.is_set() else f"finished ({gate.finishing})" if gate.finishing else "finished")
    except Stopped:
        log.info("stopped while waiting for the coordinator")
    finally:
        stop.set()
        left.set()
        governor.close()
        # hivemind's shutdown waits on its helper processes; if one died, it would wait forever.
        watchdog = threading.Timer(SHUTDOWN_TIMEOUT_S, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        session.shutdown()
        watchdog.cancel()
        log.info("peer %s left the swarm", session.peer_id)
    if session.banned:
        raise HivefoldError(f"{session.banned}; ask the run's operator why")


def _force_exit() -> None:
    log.error("shutdown did not finish in %.0fs; exiting anyway", SHUTDOWN_TIMEOUT_S)
    logging.shutdown()
    os._exit(3)
