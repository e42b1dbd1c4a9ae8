"""Owns the queue's time: seconds like the wall clock's, that never step.

A gateway without a real-time clock boots with a wrong time and NTP steps it later, by
hours or days. Queue times (a delivery's ``created`` and ``due``, and ``retry.max_age``
measured from ``created``) must not follow such steps: a step back would leave every
queued delivery "not yet due" (a stall, new deliveries overtaking old ones), a step
forward would make a fresh queue look older than ``max_age``.

Queue time is ``CLOCK_MONOTONIC + offset``. The offset is fixed when a boot first opens
the store and kept in its ``meta`` table with the kernel's boot id, so every process of
the same boot (the daemon after a restart, a CLI command replaying dead letters) reads the
same queue time, whatever the wall clock did meanwhile. After a reboot (a new boot id)
the offset is taken from the wall clock again, but queue time never goes back below the
last one recorded. Times shown to people (event timestamps, ``last_triggered``, when a
letter died) stay wall-clock.
"""

from __future__ import annotations

import json
import sqlite3
import time

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""  # not Linux: every open counts as a new boot (wall clock, no going back)


class QueueClock:
    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall_skew(self) -> float:
        """How far the wall clock is from queue time (a step since the offset was set)."""
        return time.time() - self.now()


def load(conn: sqlite3.Connection) -> QueueClock:
    """The queue clock of the store behind ``conn`` (its ``meta`` table must exist)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        saved = json.loads(row[0]) if row else {}
        offset, last = float(saved.get("offset", 0.0)), float(saved.get("last", 0.0))
        same_boot = saved.get("boot_id") == boot_id() and bool(boot_id())
    except (sqlite3.Error, ValueError, TypeError, AttributeError):
        same_boot, offset, last = False, 0.0, 0.0
    if same_boot:
        return QueueClock(offset)
    clock = QueueClock(time.time() - time.monotonic())
    if clock.now() < last:  # the wall clock is behind what the queue has seen
        clock.offset = last - time.monotonic()
    return clock


def save(conn: sqlite3.Connection, clock: QueueClock) -> None:
    """Record the offset (and the queue time now, the floor after a reboot)."""
    note = json.dumps({"boot_id": boot_id(), "offset": clock.offset, "last": clock.now()})
    conn.execute("INSERT INTO meta (key, value) VALUES ('clock', ?) ON CONFLICT (key)"
                 " DO UPDATE SET value = excluded.value", (note,))
