"""The swarm's progress, written by the keeper: the global step, evaluations, checkpoints, state downloads."""

from __future__ import annotations

from pathlib import Path

from coordinator.errors import InvalidArgument
from coordinator.ledger.backend import Connection
from coordinator.ledger.store import LedgerStore, _event, _meta, _set_meta


class KeeperProgress(LedgerStore):
    """What the keeper records as it follows the swarm (the coordinator sets ``checkpoint_every``)."""

    def set_checkpoint_every(self, n: int) -> None:
        """The coordinator's ``--checkpoint-every``, written at start-up: the status document measures the
        keeper's lag against it."""
        if n < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {n}")
        with self._tx() as c:
            _set_meta(c, "checkpoint_every", str(n))

    def observe_global_step(self, step: int) -> int:
        with self._tx() as c:
            return _raise_global_step(c, step, trusted=True)

    def record_keeper_download(self, *, step: int | None, error: str | None, now: float) -> None:
        """The keeper's latest attempt to download the swarm's state: a success at swarm ``step`` when
        ``error`` is None, else a failure and its reason, which stays in the status document until the
        next success."""
        with self._tx() as c:
            if error is None:
                if step is None:
                    raise ValueError("a successful download needs the step it reached")
                _set_meta(c, "keeper_last_download_at", repr(now))
                _set_meta(c, "keeper_last_download_step", str(step))
                c.execute("DELETE FROM meta WHERE key IN ('keeper_last_error', 'keeper_last_error_at')")
                _raise_global_step(c, step, trusted=True)
            else:
                _set_meta(c, "keeper_last_error", error)
                _set_meta(c, "keeper_last_error_at", repr(now))

    def record_evaluation(self, step: int, val_loss: float, *, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO evaluations VALUES (?, ?, ?) ON CONFLICT (step) DO UPDATE SET "
                      "val_loss = excluded.val_loss, created_at = excluded.created_at", (step, val_loss, now))

    def record_checkpoint(self, step: int, path: str, val_loss: float | None, *, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?) ON CONFLICT (step) DO UPDATE SET "
                      "path = excluded.path, val_loss = excluded.val_loss, created_at = excluded.created_at",
                      (step, path, val_loss, now))
            _raise_global_step(c, step, trusted=True)
            _event(c, now, "checkpoint", detail=f"step {step}")

    def forget_checkpoint(self, step: int) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM checkpoints WHERE step = ?", (step,))

    def latest_checkpoint(self, *, on_disk: bool = False) -> tuple[int, str] | None:
        """(step, path) of the newest checkpoint; ``on_disk``: the newest whose file this machine has (with a
        shared ledger, another coordinator's keeper may have written the newest on its own disk)."""
        for step, path in self._read("SELECT step, path FROM checkpoints ORDER BY step DESC"):
            if not on_disk or Path(path).is_file():
                return step, path
        return None


STEP_JUMP_MAX = 10_000  # a report this far ahead of the swarm's step is a lie or a bug, not progress


def _raise_global_step(c: Connection, step: int, *, trusted: bool = False) -> int:
    """The swarm's step only moves forward; peers' reports can be stale or out of order, and are refused when
    implausibly far ahead (one report must not fling the swarm's step, the keeper's cadence and the charts).
    ``trusted``: the keeper's, which follows the swarm's real state."""
    current = int(_meta(c, "global_step"))
    if step > current + STEP_JUMP_MAX and not trusted:
        raise InvalidArgument(f"step {step} is implausibly far ahead of the swarm's step {current}")
    if step > current:
        c.execute("UPDATE meta SET value = ? WHERE key = 'global_step'", (str(step),))
        return step
    return current
