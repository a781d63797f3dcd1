"""Logging setup: stdlib logging, one line per event, the role in every line.

hivemind logs expected, recoverable events (a departed peer's state cannot be downloaded, a swarm
member is unreachable for a moment) as errors with full tracebacks; :class:`ExpectedNoise` turns
those into one info line, since a user can do nothing about them. (The keeper still records why a
download failed: :class:`LastError` sees the original record.)
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Messages of hivemind's that describe a recoverable event: logged as one line, without a traceback.
EXPECTED_PREFIXES = ("Failed to download state from", "Failed to load state from peers",
                     "Averager could not load state from peers", "Averaging step failed: could not find a group",
                     "Attempted to load state from peers, but no peers responded",
                     "Caught an exception when running a coroutine")  # a task hivemind lost, see addressbook


class ExpectedNoise(logging.Filter):
    """Demote hivemind's expected failures to one info line without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("hivemind", "asyncio")) and record.levelno >= logging.WARNING:
            message = record.getMessage()
            # asyncio reports leftovers of hivemind's own event loops: a task pending at exit, a cancelled
            # averaging round that hivemind still tried to complete.
            hivemind_leftover = record.name == "asyncio" and ("hivemind" in message or message.startswith(
                "Task was destroyed but it is pending"))
            if message.startswith(EXPECTED_PREFIXES) or hivemind_leftover:
                record.msg, record.args = message.splitlines()[0], None
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(role: str, level: str | None = None) -> None:
    """Log to stderr as ``time level role logger: message``; ``HIVEFOLD_LOG`` overrides the level."""
    level = (level or os.environ.get("HIVEFOLD_LOG", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    handler.addFilter(ExpectedNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hivemind logs through its own handler by default; route it through ours, one line per event.
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(os.environ.get("HIVEFOLD_HIVEMIND_LOG", "WARNING").upper())
    quiet_expected_warnings()


def quiet_expected_warnings() -> None:
    """Warnings that describe what hivefold does on purpose."""
    # hivemind moves the LR schedule to the swarm's epoch when a peer joins or loads state, without an optimizer step.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    # hivemind's 8-bit codec quantizes with a torch function that torch plans to remove; it works today.
    warnings.filterwarnings("ignore", message=r"torch.quantize_per_tensor", category=UserWarning)


def log_to_console(console) -> None:
    """Send log lines through a rich console, so they scroll above its live progress bar instead of tearing it."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(ExpectedNoise())
    logging.getLogger().handlers[:] = [handler]


class LastError(logging.Handler):
    """Remembers the latest warning or error logged under ``logger_name`` (say, why a state download failed)."""

    def __init__(self, logger_name: str):
        super().__init__(level=logging.WARNING)
        self.message: str | None = None
        self._logger = logging.getLogger(logger_name)
        self._logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()

    def clear(self) -> None:
        self.message = None

    def close(self) -> None:
        self._logger.removeHandler(self)
        super().close()
