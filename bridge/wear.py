"""Owns the accounting of what the bridge writes to disk (flash wear on SD cards).

The kernel counts every block write of the process in ``/proc/self/io`` (``write_bytes``):
the queue's WAL frames, its checkpoints, and anything else the daemon writes to a file
(the queue is nearly all of it; logs go to stdout/journald). :class:`WearMeter` samples it
once a second for the metric ``webhook_bridge_store_bytes_written_total`` and, once a
minute, records the recent rate in the store's ``meta`` table so ``webhook-bridge status``
(another process) can show the write rate and the projected GB a day.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from typing import Any

RECORD_EVERY = 60.0  # seconds between rate notes in the store (one small write)
WINDOW = 300.0  # seconds the reported rate is averaged over
STALE_AFTER = 180.0  # a note older than this is from a daemon that is not running


def written_bytes() -> int | None:
    """Block writes of this process so far, or None where the kernel does not say."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class WearMeter:
    def __init__(self) -> None:
        self._last = written_bytes()
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0
        self._recorded = time.monotonic()

    def sample(self) -> int:
        """Bytes written since the previous sample (0 where unknown)."""
        now_bytes = written_bytes()
        if now_bytes is None or self._last is None:
            return 0
        delta, self._last = max(now_bytes - self._last, 0), now_bytes
        self._total += delta
        now = time.monotonic()
        self._samples.append((now, self._total))
        while self._samples and now - self._samples[0][0] > WINDOW:
            self._samples.popleft()
        return delta

    def rate(self) -> float | None:
        """Bytes a second over the last WINDOW (None before two samples)."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def due(self) -> bool:
        """Time to record the rate in the store."""
        if time.monotonic() - self._recorded < RECORD_EVERY:
            return False
        self._recorded = time.monotonic()
        return True

    def op_record(self) -> Any:
        note = json.dumps({"at": time.time(), "bytes_per_s": self.rate()})

        def record(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('writes', ?) ON CONFLICT (key)"
                         " DO UPDATE SET value = excluded.value", (note,))

        return record


def recorded(conn: sqlite3.Connection) -> dict[str, float] | None:
    """The running daemon's recent write rate: bytes_per_s and gb_per_day, or None."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'writes'").fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    try:
        note = json.loads(row[0])
        at, rate = float(note["at"]), note["bytes_per_s"]
    except (ValueError, TypeError, KeyError):
        return None
    if rate is None or time.time() - at > STALE_AFTER:
        return None
    return {"bytes_per_s": float(rate), "gb_per_day": float(rate) * 86400 / 1e9, "at": at}
