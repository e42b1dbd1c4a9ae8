"""Issue 13: wall-clock steps (a gateway without an RTC, NTP stepping the clock) neither
stall nor reorder the queue (a step back of 1 h) nor age it into the dead letters (a step
forward of 8 days). The wall clock is injected (time.time patched); queue time follows
CLOCK_MONOTONIC (bridge.clock)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bridge import clock as queue_clock
from bridge import store as store_module
from bridge.store import NewDelivery, Store

HOUR, DAY = 3600.0, 86400.0
MAX_AGE = 7 * DAY  # the default retry.max_age


class Wall:
    """An injectable wall clock: the real one plus a step."""

    def __init__(self) -> None:
        self.step = 0.0
        self.real = time.time

    def __call__(self) -> float:
        return self.real() + self.step


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Wall:
    clock = Wall()
    monkeypatch.setattr(time, "time", clock)
    return clock


def _item(n: int) -> NewDelivery:
    return NewDelivery("hook", f"evt_{n}", None, b'{"n": %d}' % n)


async def _due(store: Store) -> list[str]:
    rows = await store.read(Store.q_due("hook", None, 100, set()))
    return [r.event_id for r in rows]


async def test_steps_back_and_forward_neither_stall_reorder_nor_age(
        tmp_path: Path, wall: Wall) -> None:
    store = Store(str(tmp_path / "queue.db"))
    await store.start()
    try:
        await store.enqueue([_item(0)])
        wall.step = -HOUR  # NTP steps the clock back an hour
        await store.enqueue([_item(1)])
        # Nothing stalls (everything is due now) and the order is the arrival order.
        assert await _due(store) == ["evt_0", "evt_1"]
        wall.step = 8 * DAY  # ... and then forward 8 days
        await store.enqueue([_item(2)])
        rows = await store.read(Store.q_due("hook", None, 100, set()))
        assert [r.event_id for r in rows] == ["evt_0", "evt_1", "evt_2"]
        # The age dispatch compares with retry.max_age: seconds, not days.
        ages = [store.clock.now() - r.created for r in rows]
        assert all(0 <= age < 60 for age in ages), ages
        assert not [r for r in rows if store.clock.now() - r.created > MAX_AGE]
        assert abs(store.clock.wall_skew() - 8 * DAY) < 60
    finally:
        await store.close()


async def test_queue_time_continues_across_restarts_of_one_boot(tmp_path: Path,
                                                              wall: Wall) -> None:
    path = str(tmp_path / "queue.db")
    store = Store(path)
    await store.start()
    await store.enqueue([_item(0)])
    await store.close()
    wall.step = 8 * DAY  # stepped while the daemon was down, same boot
    reopened = Store(path)
    await reopened.start()
    try:
        [row] = await reopened.read(Store.q_due("hook", None, 10, set()))
        assert 0 <= reopened.clock.now() - row.created < 60
        # A dead letter replayed by a CLI process gets the same queue time.
        conn = sqlite3.connect(path, isolation_level=None)
        cli_now = queue_clock.load(conn).now()
        conn.close()
        assert abs(cli_now - reopened.clock.now()) < 1
    finally:
        await reopened.close()


async def test_after_a_reboot_queue_time_never_goes_back(tmp_path: Path, wall: Wall,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    path = str(tmp_path / "queue.db")
    store = Store(path)
    await store.start()
    await store.enqueue([_item(0)])
    last = store.clock.now()
    await store.close()
    # A reboot without an RTC: a new boot id, and the wall clock a day behind.
    monkeypatch.setattr(queue_clock, "boot_id", lambda: "another-boot")
    wall.step = -DAY
    reopened = Store(path)
    await reopened.start()
    try:
        assert reopened.clock.now() >= last
        await reopened.enqueue([_item(1)])
        assert await _due(reopened) == ["evt_0", "evt_1"]  # due now, in order
    finally:
        await reopened.close()
        store_module.queue_now = time.time
