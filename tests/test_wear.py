"""Issue 13: flash wear. The commit window (fewer commits at low rates, bounded added
latency), the page size of new stores, and the write rate shown by status."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from bridge import wear
from bridge.store import (
    EARLY_COMMIT_BYTES,
    EARLY_COMMIT_ITEMS,
    INTAKE_SHARE,
    PAGE_SIZE,
    NewDelivery,
    Store,
    connect,
)


def _item(n: int) -> NewDelivery:
    return NewDelivery("hook", f"evt_{n}", None, b'{"n": %d}' % n)


async def test_commit_window_groups_enqueues_and_bounds_the_wait(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "queue.db"), commit_window=0.3)
    await store.start()
    try:
        started = time.monotonic()
        first = store.enqueue([_item(0)])
        await asyncio.sleep(0.05)  # the load's pace: a second message 50 ms later
        second = store.enqueue([_item(1)])
        assert first is second  # one commit for both
        await asyncio.wait_for(first, 2.0)
        waited = time.monotonic() - started
        # The store waits the window less the MQTT intake's share (Connection.pace), so
        # an ack waits at most the window after its message reached our socket.
        assert store.intake_pace == 0.3 * INTAKE_SHARE
        assert 0.3 - store.intake_pace - 0.02 <= waited < 1.0, waited
        assert store.commits == 1
        # A commit's worth of deliveries does not wait for the window.
        started = time.monotonic()
        await asyncio.wait_for(store.enqueue([_item(n) for n in range(EARLY_COMMIT_ITEMS)]),
                               2.0)
        assert time.monotonic() - started < 0.25
        # Nor does a commit's worth of bytes (a higher rate of larger events).
        commits = store.commits
        started = time.monotonic()
        half = b'"%s"' % (b"x" * (EARLY_COMMIT_BYTES // 2))
        first = store.enqueue([NewDelivery("hook", "evt_a", None, half)])
        assert store.commits == commits  # half of it waits for company
        await asyncio.wait_for(store.enqueue([NewDelivery("hook", "evt_b", None, half)]), 2.0)
        assert first.done() and time.monotonic() - started < 0.25
        assert store.commits == commits + 1
    finally:
        await store.close()


def test_new_stores_use_small_pages(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "queue.db"))
    assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 1024
    conn.close()


def test_status_rate_note(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "meta.db")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    meter = wear.WearMeter()
    assert wear.recorded(conn) is None
    meter._samples.extend([(0.0, 0), (100.0, 1_000_000)])  # 10 kB/s
    meter.op_record()(conn)
    note = wear.recorded(conn)
    assert note is not None
    assert note["bytes_per_s"] == 10_000.0
    assert round(note["gb_per_day"], 3) == 0.864
    # A note from a daemon that stopped long ago is not shown.
    conn.execute("UPDATE meta SET value = ?",
                 (json.dumps({"at": time.time() - 3600, "bytes_per_s": 1.0}),))
    assert wear.recorded(conn) is None
