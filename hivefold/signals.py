"""Clean stops on SIGINT/SIGTERM for every long-running hivefold process.

hivemind forks helper processes (DHT, averagers) that inherit Python-level signal handlers; a
handler that only sets an event would make such a child ignore ``terminate()`` and hang whoever
joins it. So the handler acts only in the process that installed it; in a forked child it restores
the default action and re-raises the signal, so the child dies as it would without us.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event, *, what: str = "finishing the current work, then leaving") -> None:
    """SIGINT/SIGTERM set ``stop``; a second signal exits at once (status 130).

    Call it again after starting hivemind averagers: they set SIGINT to SIG_IGN in the calling process.
    """
    main_pid = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != main_pid:  # a forked helper: die as it would by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop.is_set():
            log.warning("received %s again: leaving now", signal.Signals(signum).name)
            sys.exit(130)
        log.info("received %s: %s", signal.Signals(signum).name, what)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
