"""Logging setup: stdlib logging, one line per event, the role in every line."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(role: str, level: str | None = None) -> None:
    """Log to stderr as ``time level role logger: message``; ``HIVEFOLD_LOG`` overrides the level."""
    level = (level or os.environ.get("HIVEFOLD_LOG", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hivemind logs through its own handler by default; route it through ours, one line per event.
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(os.environ.get("HIVEFOLD_HIVEMIND_LOG", "WARNING").upper())


def log_to_console(console) -> None:
    """Send log lines through a rich console, so they scroll above its live progress bar instead of tearing it."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
