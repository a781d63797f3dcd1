"""``--upload-cap``: bytes this peer sends per UTC day, counted across restarts.

The peer feeds :meth:`UploadBudget.update` a running total of the bytes it sent since it started
(its coordinator client's payloads, and in diloco the all-reduce's estimated payload); the budget
adds what is new to today's count, starts from zero when the UTC day changes, and keeps the count
in ``workdir/upload.json`` so a restart does not reset the day.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

log = logging.getLogger("hivefold.peer")

UPLOAD_FILE = "upload.json"  # {"day": "YYYY-MM-DD" (UTC), "bytes": sent that day}
SAVE_EVERY_S = 10.0  # how often the count is written while it grows


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UploadBudget:
    def __init__(self, cap: int, workdir: Path, *, now=utc_now):
        self.cap, self.path, self.now = cap, workdir / UPLOAD_FILE, now
        self.day = self.now().date().isoformat()
        self.used = 0
        self._last_total = 0
        self._saved_at: datetime | None = None
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("day") == self.day:
                self.used = int(saved.get("bytes", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # none yet, or damaged: today starts from what this process sends

    def update(self, total_sent: int) -> bool:
        """Count ``total_sent`` (bytes sent since this process started, never decreasing); True once today's
        count reaches the cap."""
        now = self.now()
        day = now.date().isoformat()
        if day != self.day:
            self.day, self.used = day, 0
        new = max(0, total_sent - self._last_total)
        self._last_total = max(self._last_total, total_sent)
        if new:
            self.used += new
            if self._saved_at is None or (now - self._saved_at).total_seconds() >= SAVE_EVERY_S or self.exhausted:
                self.save()
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        return self.used >= self.cap

    def seconds_to_next_day(self) -> float:
        now = self.now()
        tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
        return (tomorrow - now).total_seconds()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"day": self.day, "bytes": self.used}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not save today's upload count to %s (%s)", self.path, e)
        self._saved_at = self.now()


def human_bytes(n: float) -> str:
    """``1.5 GB``, ``500 MB``, ``12 kB``, ``800 B`` (powers of 1000, as --upload-cap reads them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
