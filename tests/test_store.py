"""The queue's own guarantees, on a real Store in a temp dir: exact quota accounting, leases
owned by the store (rows being sent are never dropped, prefetched ones lose their lease to
the quota), queue order and handoff of the due-query, ids that are never reused, rows read
back bit for bit, and stores written by earlier versions."""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from bridge.leases import Leases
from bridge.store import (
    _FETCH_SQL,
    _MARKS,
    ID_BLOCK,
    ROW_OVERHEAD,
    Delivery,
    DueRows,
    NewDelivery,
    Store,
    _deliveries,
    connect,
    dead_replay,
)

COLUMNS = "id, webhook, event_id, device_id, event, created, due, attempts, batch_id"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(str(tmp_path / "queue.db"))
    await opened.start()
    yield opened
    await opened.close()


def items(count: int, webhook: str = "a", size: int = 100, start: int = 0
          ) -> list[NewDelivery]:
    return [NewDelivery(webhook, f"evt_{start + n}", f"dev-{(start + n) % 3}",
                        b"{" + b"x" * (size - 2) + b"}") for n in range(count)]


def all_rows(conn: sqlite3.Connection) -> list[Delivery]:
    return [Delivery(*r) for r in conn.execute(f"SELECT {COLUMNS} FROM deliveries ORDER BY id")]


async def rows_of(store: Store) -> list[Delivery]:
    return await store.read(all_rows)


async def stored_bytes(store: Store) -> int:
    return await store.read(
        lambda c: c.execute("SELECT COALESCE(SUM(size), 0) FROM deliveries").fetchone()[0])


async def counters(store: Store, webhook: str) -> dict[str, Any]:
    def read(conn: sqlite3.Connection) -> dict[str, Any]:
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM webhooks WHERE name = ?", (webhook,)).fetchone()
        finally:
            conn.row_factory = None
        return dict(row) if row else {}
    return await store.read(read)


class Holder:
    """A lease holder standing in for a worker: keeps what the store hands it."""

    def __init__(self) -> None:
        self.handed: list[Delivery] = []
        self.offers: list[list[Delivery]] = []

    def offer(self, rows: list[Delivery]) -> None:
        self.handed.extend(rows)
        self.offers.append(rows)


WORKER = Holder()


async def lease(store: Store, webhook: str, limit: int, exclude: Iterable[int] = (),
                handoff: bool = False, holder: Holder = WORKER) -> list[Delivery]:
    query = Store.q_due(webhook, None, limit, set(exclude))
    rows: list[Delivery] = await store.write(store.op_lease(holder, query, handoff=handoff))
    return rows


# -- quota accounting -------------------------------------------------------------------


async def test_bytes_queued_stays_exact_through_every_kind_of_delete(store: Store) -> None:
    await store.enqueue(items(40, "a") + items(30, "b", size=250))
    assert store.bytes_queued == await stored_bytes(store) == 40 * 196 + 30 * 346
    rows = await rows_of(store)
    a_ids = [r.id for r in rows if r.webhook == "a"]
    await store.delivered("a", a_ids[:10], 1.0)
    assert store.bytes_queued == await stored_bytes(store)
    await store.write(store.op_dead("a", a_ids[10:15], "gone", 410, "no", 2.0))
    assert store.bytes_queued == await stored_bytes(store)
    # A repeated id, and ids already gone, free nothing twice.
    await store.delivered("a", [a_ids[15], a_ids[15], a_ids[0]], 3.0)
    assert store.bytes_queued == await stored_bytes(store)
    assert await store.write(store.op_dead_all("b", "removed")) == 30
    assert store.bytes_queued == await stored_bytes(store) == 24 * 196
    counts = await counters(store, "a")  # ``delivered`` counts the ids it was given
    assert (counts["delivered"], counts["attempts"], counts["dead"]) == (13, 3, 5)


async def test_bytes_queued_stays_exact_for_rows_handed_out(store: Store) -> None:
    worker = Holder()
    await store.enqueue(items(30, size=150))
    leased = await lease(store, "a", 20, holder=worker)  # sizes noted from the rows read
    store.leases.start_handoff("a", worker)
    await store.enqueue(items(10, size=300, start=30))  # sizes noted at the insert
    handed = worker.handed
    assert len(handed) == 10
    await store.delivered("a", [r.id for r in leased[:15] + handed[:5]], 1.0)
    assert store.bytes_queued == await stored_bytes(store) == 15 * 246 + 5 * 396
    # A leased row that another process deleted meanwhile: counted again, still exact.
    gone = leased[15].id
    other = connect(store.path)
    other.execute("DELETE FROM deliveries WHERE id = ?", (gone,))
    other.close()
    await store.write(store.op_dead("a", [r.id for r in leased[15:] + handed[5:]], "x",
                                    None, None, 2.0, attempted=False))
    assert store.bytes_queued == await stored_bytes(store) == 10 * 246


async def test_delete_of_more_ids_than_one_statement_takes(store: Store) -> None:
    await store.enqueue(items(1300))
    ids = [r.id for r in await rows_of(store)]
    await store.delivered("a", ids[:1203], 1.0)  # 512 + 512 + 179 (padded to 256)
    left = await rows_of(store)
    assert [r.id for r in left] == ids[1203:]
    assert store.bytes_queued == await stored_bytes(store) == 97 * 196
    assert (await counters(store, "a"))["delivered"] == 1203


async def test_drop_oldest_drops_the_oldest_rows_not_being_sent_and_counts_them(
        tmp_path: Path) -> None:
    store = Store(str(tmp_path / "queue.db"), max_size=196 * 600)
    await store.start()
    try:
        await store.enqueue(items(300, "a") + items(300, "b"))
        rows = await rows_of(store)
        # The oldest 400 are leased; "a"'s 300 are being sent: the quota must skip those,
        # and drop the prefetched ones of "b" first, oldest first.
        a, b = Holder(), Holder()
        assert len(await lease(store, "a", 300, holder=a)) == 300
        assert len(await lease(store, "b", 100, holder=b)) == 100
        sending = {r.id for r in rows[:300]}
        assert store.claim(a, sending)
        future = store.enqueue(items(150, "c"))
        dropped: list[dict[str, int]] = []
        store.on_enqueued = lambda d, _: dropped.append(d)
        await future
        after = {r.id for r in await rows_of(store)}
        assert sending <= after
        gone = [r for r in rows if r.id not in after]
        assert [r.id for r in gone] == [r.id for r in rows[300:450]]
        assert dropped == [{"b": 150}]
        assert (await counters(store, "b"))["dropped"] == 150
        assert store.bytes_queued == await stored_bytes(store) == 196 * 600
        # The dropped prefetched rows lost their lease, so b holds nothing and its claim
        # of one fails; a's leases are untouched.
        assert store.leases.ids(b) == set()
        assert not store.claim(b, [rows[300].id])
        assert store.leases.ids(a) == sending
    finally:
        await store.close()


async def test_a_group_larger_than_the_quota_keeps_only_its_newest(tmp_path: Path) -> None:
    """One commit can hold more than the whole quota (a burst of 1,000 messages against a
    small store): drop_oldest then drops the group's own oldest items as well."""
    store = Store(str(tmp_path / "queue.db"), max_size=196 * 100)
    await store.start()
    try:
        await store.enqueue(items(60, "a"))
        old = await rows_of(store)
        worker_a, worker_b = Holder(), Holder()
        await lease(store, "a", 10, holder=worker_a)
        assert store.claim(worker_a, [r.id for r in old[:10]])  # being sent: never dropped
        dropped: list[dict[str, int]] = []
        store.leases.start_handoff("b", worker_b)
        handed = worker_b.handed
        store.on_enqueued = lambda d, h: dropped.append(d)
        await store.enqueue(items(250, "b", start=1000))
        rows = await rows_of(store)
        assert [r.event_id for r in rows] == [r.event_id for r in old[:10]] + [
            f"evt_{n}" for n in range(1160, 1250)]
        assert dropped == [{"a": 50, "b": 160}]
        assert (await counters(store, "a"))["dropped"] == 50
        assert (await counters(store, "b"))["dropped"] == 160
        assert [(r.id, r.event_id) for r in handed] == [(r.id, r.event_id) for r in rows[10:]]
        assert store.bytes_queued == await stored_bytes(store) == 196 * 100
    finally:
        await store.close()


async def test_drop_oldest_reads_past_a_long_head_being_sent(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "queue.db"), max_size=196 * 1000)
    await store.start()
    try:
        await store.enqueue(items(1000))
        rows = await rows_of(store)
        await lease(store, "a", 700)
        assert store.claim(WORKER, [r.id for r in rows[:700]])  # more than a page of the scan
        await store.enqueue(items(3, start=1000))
        after = {r.id for r in await rows_of(store)}
        assert {r.id for r in rows if r.id not in after} == {r.id for r in rows[700:703]}
        assert store.bytes_queued == await stored_bytes(store)
    finally:
        await store.close()


async def test_quota_is_exact_after_a_failed_group(store: Store) -> None:
    await store.enqueue(items(10))

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO nowhere VALUES (1)")

    failing = store.submit(broken)
    good = store.enqueue(items(5, start=10))
    with pytest.raises(Exception, match="nowhere"):
        await failing
    await good
    assert store.bytes_queued == await stored_bytes(store) == 15 * 196


# -- ids --------------------------------------------------------------------------------


async def test_ids_are_never_reused_not_even_after_the_queue_empties(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    seen: set[int] = set()
    for _ in range(3):
        store = Store(path)
        await store.start()
        await store.enqueue(items(5))
        ids = [r.id for r in await rows_of(store)]
        assert not seen & set(ids)
        assert ids == sorted(ids) and ids[-1] - ids[0] == 4
        seen |= set(ids)
        await store.delivered("a", ids, 1.0)
        assert await rows_of(store) == []
        await store.close()
    conn = connect(path)
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'").fetchone()
    assert seq[0] >= max(seen)
    conn.close()


async def test_ids_come_from_a_reserved_block(store: Store) -> None:
    def sequence(conn: sqlite3.Connection) -> int:
        return int(conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'").fetchone()[0])

    await store.enqueue(items(3))
    reserved = await store.read(sequence)
    assert reserved == ID_BLOCK  # one write of sqlite_sequence for the next ID_BLOCK ids
    for _ in range(5):
        await store.enqueue(items(100))
    assert await store.read(sequence) == reserved
    assert [r.id for r in await rows_of(store)] == list(range(1, 504))


async def test_another_process_inserting_meanwhile_never_collides(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    store = Store(path)
    await store.start()
    try:
        await store.enqueue(items(3))
        rows = await rows_of(store)
        await store.write(store.op_dead("a", [rows[0].id], "bad", 400, None, 1.0))
        other = connect(path)  # the CLI, replaying the dead letter
        assert dead_replay(other, "a") == 1
        other.close()
        await store.remeasure()
        await store.enqueue(items(ID_BLOCK + 5, start=3))  # past the reserved block, too
        ids = [r.id for r in await rows_of(store)]
        assert len(ids) == len(set(ids)) == 2 + 1 + ID_BLOCK + 5
        assert store.bytes_queued == await stored_bytes(store)
    finally:
        await store.close()


async def test_handed_rows_are_the_stored_rows(store: Store) -> None:
    worker = Holder()
    store.leases.start_handoff("a", worker)
    await store.enqueue(items(3, "a") + items(2, "b") + items(70, "a", start=3))
    stored = {r.id: r for r in await rows_of(store)}
    handed = worker.handed
    assert len(handed) == 73 and len(worker.offers) == 1
    assert all(stored[r.id] == r for r in handed)
    assert {r.id for r in handed} == store.leases.ids()
    assert [r.event_id for r in handed] == [f"evt_{n}" for n in range(73)]


async def test_a_rerun_enqueue_releases_the_leases_of_its_first_run(store: Store) -> None:
    worker = Holder()
    handed = worker.offers
    store.leases.start_handoff("a", worker)

    def broken(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    enqueued = store.enqueue(items(4))
    failing = store.submit(broken)
    await enqueued
    with pytest.raises(Exception, match="disk I/O"):
        await failing
    stored = await rows_of(store)
    assert [r.id for r in handed[-1]] == [r.id for r in stored]
    assert store.leases.ids() == {r.id for r in stored}  # none of the rolled-back ids


async def test_rows_of_a_failed_enqueue_are_never_handed_out(store: Store) -> None:
    worker = Holder()
    store.leases.start_handoff("a", worker)
    await store.enqueue(items(2))
    seen: list[dict[str, int]] = []
    store.on_enqueued = lambda d, _: seen.append(d)
    # The enqueue fails however it runs (alone or with others): no row, no lease, no offer.
    enqueued = store.enqueue(items(3, start=2), also=lambda c: c.execute("SELECT * FROM x"))
    with pytest.raises(Exception, match="no such table"):
        await enqueued
    assert [r.event_id for r in worker.handed] == ["evt_0", "evt_1"]
    assert store.leases.ids() == {r.id for r in worker.handed}
    assert seen == []


async def test_leases_end_with_the_commit_of_the_outcome(store: Store) -> None:
    """The store takes leases back: delivered, retry and dead end them with their commit,
    release at once; a retired holder is granted nothing, and keeps only what it sends."""
    await store.enqueue(items(8))
    worker = Holder()
    rows = await lease(store, "a", 8, holder=worker)
    ids = [r.id for r in rows]
    assert store.claim(worker, ids[:6])
    assert not store.claim(Holder(), ids[6:])  # not someone else's to send
    await store.delivered("a", ids[:2], 1.0, holder=worker)
    await store.write(store.op_retry("a", ids[2:4], 503, "HTTP 503", True, 2.0, holder=worker))
    await store.write(store.op_dead("a", ids[4:5], "HTTP 400", 400, "", 3.0, holder=worker))
    store.release(worker, ids[6:7])
    assert store.leases.ids() == {ids[5], ids[7]}
    # The retried rows are queued again for anyone; the released one too.
    other = Holder()
    again = await lease(store, "a", 8, holder=other)
    assert [r.id for r in again] == [ids[2], ids[3], ids[6]]
    store.retire(worker)  # ids[5] is being sent: kept until its outcome; ids[7] released
    assert store.leases.ids(worker) == {ids[5]}
    assert await lease(store, "a", 8, holder=worker) == []  # retired: granted nothing
    await store.write(store.op_retry("a", [ids[5]], None, "timed out", False, 4.0,
                                     holder=worker))
    assert store.leases.ids(worker) == set()
    assert [r.id for r in await lease(store, "a", 8, holder=other)] == [ids[5], ids[7]]


# -- the due-query --------------------------------------------------------------------------


def reference_due(conn: sqlite3.Connection, webhook: str, now: float, limit: int,
                  exclude: set[int], leased: set[int]) -> tuple[list[Delivery], bool]:
    """The due-query as it was: every column of the whole window, filtered in Python."""
    window = limit + len(exclude)
    rows = conn.execute(f"SELECT {COLUMNS} FROM deliveries WHERE webhook = ? AND due <= ?"
                        " ORDER BY due, id LIMIT ?", (webhook, now, window)).fetchall()
    result = [Delivery(*r) for r in rows if r[0] not in exclude]
    exhausted = len(rows) < window and len(result) <= limit
    return [r for r in result[:limit] if r.id not in leased], exhausted


async def test_due_query_matches_the_reference_on_shuffled_queues(store: Store) -> None:
    rng = random.Random(7)

    def fill(conn: sqlite3.Connection) -> None:
        for n in range(600):
            due = rng.choice([100.0, 200.0, 200.5, rng.uniform(0, 400)])
            conn.execute("INSERT INTO deliveries (webhook, event_id, device_id, event, size,"
                         " created, due, batch_id) VALUES (?, ?, ?, ?, 9, ?, ?, ?)",
                         (rng.choice("ab"), f"e{n}", rng.choice([None, "d"]), b"{}",
                          due - 1, due, rng.choice([None, "bat_1"])))

    await store.write(fill)
    ids = [r.id for r in await rows_of(store)]
    for trial in range(60):
        now = rng.uniform(0, 450)
        limit = rng.choice([1, 5, 64, 200])
        exclude = set(rng.sample(ids, rng.choice([0, 3, 50, 300])))
        store.leases = Leases()
        elsewhere = Holder()
        store.leases.grant(elsewhere, rng.sample(ids, rng.choice([0, 10, 100])))
        leased = store.leases.ids()
        webhook = rng.choice("ab")
        expected, exhausted = await store.read(
            lambda c, w=webhook, n=now, lim=limit, ex=exclude, le=leased:
            reference_due(c, w, n, lim, ex, le))
        got = await store.write(store.op_lease(WORKER, Store.q_due(webhook, now, limit,
                                                                   exclude), handoff=True))
        assert got == expected, trial
        assert (store.leases.handoff_holder(webhook) is WORKER) == exhausted, trial
        assert store.leases.ids() == leased | {r.id for r in got}
        assert store.leases.ids(WORKER) == {r.id for r in got}
        # Read directly (no lease), the query skips nothing but ``exclude``.
        direct = await store.read(Store.q_due(webhook, now, limit, exclude))
        assert isinstance(direct, DueRows) and direct.exhausted == exhausted
        assert direct == (await store.read(
            lambda c, w=webhook, n=now, lim=limit, ex=exclude:
            reference_due(c, w, n, lim, ex, set())))[0]


async def test_handoff_starts_only_when_the_query_saw_the_end(store: Store) -> None:
    await store.enqueue(items(10))
    first = await lease(store, "a", 4, handoff=True)
    assert [r.event_id for r in first] == [f"evt_{n}" for n in range(4)]
    assert not store.hands_off_to(WORKER)
    rest = await lease(store, "a", 64, exclude=[r.id for r in first], handoff=True)
    assert len(rest) == 6 and store.hands_off_to(WORKER)
    store.stop_handoff(WORKER)
    # Rows skipped as leased elsewhere (not excluded) do not count as the end of the queue.
    assert await lease(store, "a", 10, handoff=True) == []
    assert not store.hands_off_to(WORKER)
    store.release(WORKER, [r.id for r in rest])
    assert await lease(store, "a", 11, handoff=True) == rest  # saw the end: 10 < 11
    assert store.hands_off_to(WORKER)


async def test_rows_are_read_back_bit_for_bit(store: Store) -> None:
    # Times in [1, 2**53), which go as an integer part and a fraction in 2**-52 steps, and
    # times outside (then the rows are read the plain way): both must come back unchanged.
    nice = [1.0, 1700000000.123456, 3.3, 1.0 + 2 ** -52, 2.0 ** 53 - 1, 12345.678, 7.0,
            1e15 + 0.5]
    odd = [0.5, 0.0, -1.5, 0.1, 1e-300, 5e-324, 1e300, 1e19, math.inf, -0.0, 2.0 ** 60]
    texts = ["plain", "a,b", 'qu"o\\te', "\u00e9\u4e2d\U0001f600", "nul\x00byte", "\n\t", ""]

    def fill(conn: sqlite3.Connection) -> None:
        for n, created in enumerate(nice + odd):
            due = (nice + odd)[-1 - n] if n >= len(nice) else nice[-1 - n]
            if n % 3 == 0:
                due = created  # the common case: sent once
            text = texts[n % len(texts)]
            event: bytes | str = bytes(range(256)) * (n % 3) + b"\x00end"
            if n == len(nice) + 1:
                event = "an event stored as TEXT"
            conn.execute("INSERT INTO deliveries (webhook, event_id, device_id, event, size,"
                         " created, due, attempts, batch_id) VALUES (?, ?, ?, ?, 1, ?, ?, ?,"
                         " ?)", ("a", text, None if n % 2 else text, event, created, due, n,
                                 None if n % 4 else text))

    await store.write(fill)
    expected = await rows_of(store)
    ids = [r.id for r in expected]
    plain = ids[:len(nice)]
    marks = _MARKS[len(nice)]
    assert await store.read(lambda c: c.execute(_FETCH_SQL[marks], plain).fetchone()[2]) == 0
    for chosen in (plain, ids, ids[len(nice):]):
        got = await store.read(lambda c, ch=chosen: _deliveries(c, list(reversed(ch))))
        want = [r for r in reversed(expected) if r.id in set(chosen)]
        assert [r.id for r in got] == [r.id for r in want]
        for a, b in zip(got, want):
            assert a == b
            assert type(a.event) is type(b.event)
            assert math.copysign(1, a.created) == math.copysign(1, b.created)


async def test_next_due_leaves_out_any_number_of_ids(store: Store) -> None:
    def fill(conn: sqlite3.Connection) -> None:
        conn.executemany("INSERT INTO deliveries (webhook, event_id, event, size, created,"
                         " due) VALUES ('a', 'e', x'00', 1, 0, ?)",
                         [(float(n),) for n in range(2000)])

    await store.write(fill)
    ids = [r.id for r in await rows_of(store)]
    for count in (0, 1, 3, 511, 512, 513, 1500, 2000):
        due = await store.read(Store.q_next_due("a", set(ids[:count])))
        assert due == (None if count == 2000 else float(count))


# -- batches, counters --------------------------------------------------------------------


async def test_assign_batch_pins_every_id(store: Store) -> None:
    await store.enqueue(items(700))
    ids = [r.id for r in await rows_of(store)]
    await store.write(store.op_assign_batches([(ids[:600], "bat_x")]))
    await lease(store, "a", 10)  # the worker holds some members already
    rows = await store.write(store.op_lease(WORKER, Store.q_batch("a", "bat_x"),
                                            mine_too=True))
    assert [r.id for r in rows] == ids[:600]
    assert all(r.batch_id == "bat_x" for r in rows)
    assert store.leases.ids() == set(ids[:600])


async def test_counters_come_back_after_the_webhook_row_was_removed(store: Store) -> None:
    await store.enqueue(items(6))
    ids = [r.id for r in await rows_of(store)]
    await store.delivered("a", ids[:2], 5.0)
    assert (await counters(store, "a"))["delivered"] == 2
    await store.write(store.op_forget_webhook("a"))
    assert await counters(store, "a") == {}
    await store.delivered("a", ids[2:5], 6.0)
    counts = await counters(store, "a")
    assert (counts["delivered"], counts["attempts"], counts["last_triggered"]) == (3, 1, 6.0)
    assert counts["state"] == "ENABLED" and counts["created"] is not None


# -- stores written before ----------------------------------------------------------------


async def test_a_store_written_by_an_earlier_version_opens_and_continues(
        tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    # What the previous version left: AUTOINCREMENT ids, sqlite_sequence at the last one
    # (deliveries since deleted), and a delivery in progress.
    conn = connect(path)
    conn.executemany("INSERT INTO deliveries (webhook, event_id, device_id, event, size,"
                     " created, due) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [("a", f"old_{n}", "dev", b"{}", 2 + ROW_OVERHEAD, 10.0 + n, 10.0 + n)
                      for n in range(8)])
    conn.execute("DELETE FROM deliveries WHERE id > 5")
    conn.close()
    store = Store(path)
    await store.start()
    try:
        assert store.bytes_queued == 5 * (2 + ROW_OVERHEAD)
        old = await lease(store, "a", 64)
        assert [r.event_id for r in old] == [f"old_{n}" for n in range(5)]
        await store.enqueue(items(2))
        new = [r for r in await rows_of(store) if r.event_id.startswith("evt")]
        assert [r.id for r in new] == [9, 10]  # above the old sequence (8), not max id (5)
        await store.delivered("a", [r.id for r in old], 20.0)
        assert store.bytes_queued == await stored_bytes(store) == 2 * 196
    finally:
        await store.close()
