"""The durable queue: SQLite in WAL mode, written in group commits.

Owns every byte on disk: queued deliveries (one row per event and webhook, carrying the
event's JSON so a delivery is self-contained and is gone in one DELETE when it succeeds),
dead letters, per-webhook state and counters, and the group commit. One writer thread owns
the write connection; every change is an *operation* (a function of the connection)
submitted to :class:`Store`, and all operations submitted while the previous commit was
being made are applied in one transaction and one fsync. A caller's future resolves only
after its operation is committed, which is what lets the MQTT source acknowledge a message
only once it is safe on disk. Reads use a second connection in their own thread, so a
slow fsync never blocks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from . import clock as queue_clock
from .leases import Holder, Leases

try:  # the events are made with orjson when it is installed (see events.dumps)
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - orjson is a dependency
    from json import loads as _json_loads

log = structlog.get_logger("bridge.store")
T = TypeVar("T")

ENABLED, DISABLED, DISABLED_DUE_TO_ERRORS = "ENABLED", "DISABLED", "DISABLED_DUE_TO_ERRORS"
ROW_OVERHEAD = 96  # bytes a delivery row costs beyond its event JSON (ids, times, index)
# Delivery ids are reserved this many at a time in sqlite_sequence (see _allocate_ids).
ID_BLOCK = 1024
# How long a delivered mark may wait for another operation to share its commit.
DELIVERED_COMMIT_DELAY = 0.05
# The share of the commit window the MQTT intake may spend gathering messages into fewer
# socket reads (Connection.pace); the store waits the rest from the first enqueue, so an
# ack still waits at most the window after its message reached our socket.
INTAKE_SHARE = 0.25
PAGE_SIZE = 1024
# Enqueues of this many deliveries, or of this many bytes, commit at once without waiting
# for the window: a commit this full already spreads its fixed pages (the page header,
# the index and table roots, the freelist) over many messages, so waiting longer saves
# little flash and only adds latency. At 30 msg/s of ~450-byte events the window decides;
# from ~40 msg/s on, the bytes do (commits of ~16 KB, a few tens of ms apart at 500 msg/s).
EARLY_COMMIT_ITEMS = 256
EARLY_COMMIT_BYTES = 16 * 1024
# A commit that failed for lack of space is retried after these many seconds, doubling.
FULL_RETRY_INITIAL, FULL_RETRY_MAX = 0.1, 5.0
# The WAL is copied into the database (checkpointed) when it holds this many bytes of
# frames: the queue's pages are rewritten many times within it, and a checkpoint copies
# each page once, so a larger WAL copies fewer bytes per message. The WAL file is reused
# from its start after each checkpoint, so this also bounds its size on disk.
CHECKPOINT_BYTES = 10 * 1024 * 1024
_FULL_CODES = {13, 10}  # SQLITE_FULL, SQLITE_IOERR (a failed write or fsync: ENOSPC)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    -- AUTOINCREMENT: an id is never reused, so a worker's in-memory sets (in flight,
    -- leased) can never confuse a new delivery with one that just finished.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook TEXT NOT NULL,
    event_id TEXT NOT NULL,
    device_id TEXT,
    event BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (webhook, due, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    webhook TEXT NOT NULL,
    event_id TEXT NOT NULL,
    device_id TEXT,
    event BLOB NOT NULL,
    created REAL NOT NULL,
    died REAL NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER,
    reason TEXT NOT NULL,
    response TEXT,
    batch_id TEXT,  -- the webhook-id the endpoint saw, when the letter was in a batch
    size INTEGER  -- bytes it takes, for store.dead_letters.max_size
);
CREATE INDEX IF NOT EXISTS dead_letters_webhook ON dead_letters (webhook, id);
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'ENABLED',
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0,
    last_triggered REAL,
    last_error TEXT,
    created REAL,
    modified REAL,
    -- Bumped by every state change (CLI, API, failure policy; see write_state): the
    -- order in which they happened, so the last writer wins.
    state_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    source TEXT,
    topic TEXT,
    first_seen REAL NOT NULL,
    ever_registered INTEGER NOT NULL DEFAULT 0,
    registered INTEGER NOT NULL DEFAULT 0,
    lifetime INTEGER,
    last_registration REAL
);
-- LwM2M firmware update progress (Object 5) per device and instance: see registry.py
CREATE TABLE IF NOT EXISTS firmware (
    device TEXT NOT NULL,
    instance INTEGER NOT NULL,
    state INTEGER,
    result INTEGER,
    armed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, instance)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
-- MQTT messages committed but maybe not acknowledged (SPEC §5): a DUP redelivery of one
-- (same packet id, topic and payload digest) is acknowledged without queuing it again.
-- Rows are written with an empty topic and an 8-byte key of topic and digest (_ack_key),
-- so that a commit's worth of them stays within one page (flash wear).
CREATE TABLE IF NOT EXISTS unacked (mid INTEGER PRIMARY KEY, topic TEXT NOT NULL,
                                    digest BLOB NOT NULL);
"""
SCHEMA_VERSION = "1"


class StoreError(Exception):
    """The store cannot be opened or written (disk full, permissions, corruption)."""


@dataclass(slots=True)
class Delivery:
    id: int
    webhook: str
    event_id: str
    device_id: str | None
    event: bytes
    created: float
    due: float
    attempts: int
    batch_id: str | None


class DueRows(list):  # type: ignore[type-arg]
    """Rows of a due-query; ``exhausted`` when the query reached the end of the queue."""

    exhausted = False


@dataclass(slots=True)
class NewDelivery:
    webhook: str
    event_id: str
    device_id: str | None
    event: bytes


@dataclass(slots=True)
class _EnqueueBatch:
    items: list[NewDelivery] = field(default_factory=list)
    bytes: int = 0  # of the items' events
    also: list[Any] = field(default_factory=list)
    acks: dict[int, bytes] = field(default_factory=dict)  # mid: _ack_key(topic, digest)
    forget: set[int] = field(default_factory=set)  # mids acknowledged since
    forget_all: bool = False
    now: float = field(default_factory=time.time)
    future: asyncio.Future[Any] | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    handed: list[tuple[Holder, Delivery]] = field(default_factory=list)


_DELIVERY_COLUMNS = "id, webhook, event_id, device_id, event, created, due, attempts, batch_id"

# Statements here take lists of ids in a few fixed lengths: sqlite3 compiles and caches a
# statement per SQL text, so a list as long as its ids would be a new statement (a compile,
# and an eviction from the cache) for every new length. Shorter lists are padded by
# repeating an id, which changes nothing for IN and NOT IN.
_LIST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_MARKS = {n: ",".join("?" * n) for n in _LIST_SIZES}

# Python's sqlite3 releases the GIL around every step of a statement: each row fetched,
# each parameter set of an executemany. In the daemon the event loop is busy, and every
# release is a round trip of the GIL between the threads that costs the writer thread
# several times the step itself (a 70-row due-query took ~0.9 ms instead of ~0.08). So the
# hot paths read many rows in one step, as an aggregate, and write many in one statement.
# SQLite feeds an aggregate in the order of an ORDER BY ... LIMIT subquery (such a subquery
# is never flattened into an aggregate), which keeps the queue order.
_DUE_IDS = ("SELECT json_group_array(id) FROM (SELECT id FROM deliveries WHERE webhook = ?"
            " AND due <= ? ORDER BY due, id LIMIT ?)")
_OLDEST = ("SELECT json_group_array(json_array(id, webhook, size)) FROM (SELECT id, webhook,"
           " size FROM deliveries WHERE id > ? ORDER BY id LIMIT ?)")
# Deliveries in one step, exactly: the events concatenated (their lengths alongside), the
# text through JSON, and each time as its integer part and its fraction times 2**52. For
# 1 <= x < 2**53 both are exact integers (x minus its integer part is exact there, and a
# multiple of x's spacing, at least 2**-52), so x is rebuilt bit for bit; ``due`` is sent
# only when it differs from ``created``. The last column counts rows outside that range
# (or whose event is not a BLOB): then the rows are read the plain way.
_FRACTION = 4503599627370496  # 2**52
_FETCH = (
    "SELECT json_group_array(json_array(id, webhook, event_id, device_id, length(event),"
    " attempts, batch_id, CAST(created AS INTEGER),"
    " CAST((created - CAST(created AS INTEGER)) * 4503599627370496.0 AS INTEGER),"
    " CASE WHEN due = created THEN NULL ELSE CAST(due AS INTEGER) END,"
    " CASE WHEN due = created THEN NULL"
    " ELSE CAST((due - CAST(due AS INTEGER)) * 4503599627370496.0 AS INTEGER) END, size)),"
    " CAST(group_concat(event, '') AS BLOB),"
    " SUM(typeof(event) <> 'blob' OR NOT (created >= 1.0 AND created < 9007199254740992.0"
    " AND due >= 1.0 AND due < 9007199254740992.0))"
    " FROM deliveries WHERE id IN ({marks})")
_FETCH_SQL = {marks: _FETCH.format(marks=marks) for marks in _MARKS.values()}
_INSERT_ROWS = 64  # rows per INSERT statement (8 parameters each: under SQLite's old 999)
_INSERT_SQL = {n: "INSERT INTO deliveries (id, webhook, event_id, device_id, event, size,"
                  " created, due) VALUES " + ",".join(["(?,?,?,?,?,?,?,?)"] * n)
               for n in range(1, _INSERT_ROWS + 1)}
_MAX_SIZES = 1 << 16  # row sizes remembered at most (rows released, not deleted, stay)

Operation = Callable[[sqlite3.Connection], Any]
# Queue time for due-queries made in this process (the open Store's clock, bridge.clock).
queue_now: Callable[[], float] = time.time


def connect(path: str, durability: str = "power_loss") -> sqlite3.Connection:
    """Open (and create) the database with the pragmas our guarantees rest on."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        # Room for every statement the writer uses (one INSERT per group length among them).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=30.0, cached_statements=256)
        # Page size of a new store (an existing one keeps its own): every commit writes
        # whole pages to the WAL, so smaller pages write less for the few rows a commit
        # at a low rate touches (flash wear, see README "SD cards and flash wear").
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit (survives power loss); NORMAL survives a
        # process crash and leaves the fsync to checkpoints.
        sync = "FULL" if durability == "power_loss" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("PRAGMA busy_timeout=30000")
        # Debian's SQLite zeroes deleted content (SECURE_DELETE), writing every page freed
        # when delivered rows go: FAST zeroes only within pages written anyway. Queued
        # events are in this file by design; what is freed is overwritten as the queue
        # reuses its pages.
        conn.execute("PRAGMA secure_delete=FAST")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1000, CHECKPOINT_BYTES // page_size)}")
        conn.executescript(_SCHEMA)
        _add_columns(conn)
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                     (SCHEMA_VERSION,))
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
    return conn


def _add_columns(conn: sqlite3.Connection) -> None:
    """Columns added since a database may have been made (CREATE TABLE IF NOT EXISTS
    leaves an older table as it is)."""
    for table, column, kind in (("webhooks", "state_version", "INTEGER NOT NULL DEFAULT 0"),
                                ("dead_letters", "batch_id", "TEXT"),
                                ("dead_letters", "size", "INTEGER")):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            with contextlib.suppress(sqlite3.OperationalError):  # another process was first
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class Store:
    """The queue: group-committed writes and non-blocking reads, from asyncio."""

    def __init__(self, path: str, durability: str = "power_loss", max_size: int = 0,
                 overflow: str = "drop_oldest", commit_window: float = 0.0) -> None:
        self.path = path
        # An enqueue waits up to this long for company before its commit (fewer commits,
        # fewer pages written per message at low rates; acks wait that much longer).
        self.commit_window = commit_window
        self.intake_pace = commit_window * INTAKE_SHARE
        self.durability = durability
        self.max_size = max_size  # 0 = no quota
        self.overflow = overflow
        self._writer = connect(path, durability)
        # Queue times (created, due, max_age) on a clock that wall-clock steps do not move
        # (bridge.clock); due-queries of this process use it too.
        self.clock = queue_clock.load(self._writer)
        queue_clock.save(self._writer, self.clock)
        global queue_now
        queue_now = self.clock.now
        self._reader = connect(path, durability)
        # Used on the event loop's thread, only by :meth:`generation` (see there).
        self._watcher = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=1.0)
        self._data_version: int | None = None
        self._generation: str | None = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._pending: list[tuple[Operation, asyncio.Future[Any]]] = []
        self._enqueue_batch: _EnqueueBatch | None = None
        self._delivered_batch: dict[str, tuple[list[int], int, float]] | None = None
        self._delivered_future: asyncio.Future[Any] | None = None
        self.on_enqueued: Callable[[dict[str, int], list[Delivery]], None] | None = None
        self._wake: asyncio.Event | None = None
        self._lazy_wake: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.failed = False  # the last group commit failed (disk full, I/O error)
        # The disk is full (commits fail with SQLITE_FULL or an I/O error): operations
        # wait and are retried; ``on_full(full, cause)`` is told when this changes.
        self.full = False
        self.on_full: Callable[[bool, str], None] | None = None
        self._closing = asyncio.Event()
        self.commits = 0
        self.space_freed = asyncio.Event()
        self._freed = False
        self.bytes_pending = 0  # submitted, not yet committed (owned by the event loop)
        # Which worker holds which deliveries; only the store changes it (bridge.leases).
        # The quota never drops a row being sent (so a sent one is never counted as
        # dropped); it does drop prefetched rows, oldest first.
        self.leases = Leases()
        # Packet ids of committed messages not known to be acknowledged (loop thread).
        self.unacked: dict[int, bytes] = {
            m: _ack_key(t, d) if t else d for m, t, d in self._writer.execute(
                "SELECT mid, topic, digest FROM unacked")}
        self._forget: set[int] = set()
        self._forget_all = False
        self.bytes_queued = self._measure(self._writer)
        # Ids of the block reserved in sqlite_sequence (writer thread only).
        self._next_id = 1
        self._id_ceiling = 0
        # The size of each row handed to a worker (writer thread only): deleting such rows
        # needs no SELECT SUM(size) to keep bytes_queued exact, one statement fewer in the
        # commit of every delivered group.
        self._sizes: dict[int, int] = {}

    @staticmethod
    def _measure(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM deliveries").fetchone()[0])

    async def remeasure(self) -> None:
        """Recount the queue's bytes (after another process, a CLI command, changed it)."""
        self.bytes_queued = await self.write(self._measure)

    def has_room(self, size: int) -> bool:
        used = self.bytes_queued + self.bytes_pending
        return not self.max_size or used + size <= self.max_size

    # -- the group commit -------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._commit_loop(), name="store-commit")

    def submit(self, operation: Operation, within: float = 0.0) -> asyncio.Future[Any]:
        """Queue ``operation`` for a group commit; the future resolves after it. With
        ``within`` the commit may wait that long for company (any other operation starts
        it at once)."""
        if self._closed or self._wake is None:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((operation, future))
        if not within:
            self._wake.set()
        elif self._lazy_wake is None:
            self._lazy_wake = loop.call_later(within, self._wake.set)
        return future

    async def write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(operation)

    # The two operations of the hot path coalesce: every enqueue (and every delivered
    # mark) made while the previous commit was in progress becomes ONE operation of the
    # next group, with one shared future.

    def enqueue(self, items: list[NewDelivery], also: Operation | None = None,
                ack: tuple[int, str, bytes] | None = None) -> asyncio.Future[Any]:
        """Queue ``items`` (plus the registry change ``also``) in the next commit; ``ack``
        (packet id, topic, payload digest) is remembered in the same commit until
        :meth:`acked` (see :meth:`redelivered`)."""
        batch = self._enqueue_batch
        if batch is None:
            batch = self._enqueue_batch = _EnqueueBatch(now=self.clock.now())
            future = self.submit(self.op_enqueue_batch(batch),
                                 within=self.commit_window - self.intake_pace)
            batch.future = future
            # Acks sent since the last commit are forgotten in this one (no commit of
            # their own: a forgotten entry costs nothing until its packet id returns).
            batch.forget, self._forget = self._forget, set()
            batch.forget_all, self._forget_all = self._forget_all, False
        if ack is not None:
            batch.acks[ack[0]] = _ack_key(ack[1], ack[2])
        batch.items.extend(items)
        for item in items:
            batch.bytes += len(item.event)
        if self.commit_window and self._wake and (len(batch.items) >= EARLY_COMMIT_ITEMS
                                                  or batch.bytes >= EARLY_COMMIT_BYTES):
            self._wake.set()  # a high rate fills a commit without waiting
        if also is not None:
            batch.also.append(also)
        return batch.future

    def delivered(self, webhook: str, ids: list[int], now: float,
                  holder: Holder | None = None) -> asyncio.Future[Any]:
        """Mark deliveries done (one attempt) in the next commit; ``holder``'s leases on
        them end with that commit (the rows stay out of every query until then)."""
        batch = self._delivered_batch
        if batch is None:
            batch = self._delivered_batch = {}
            # A delivered mark is not what keeps a reading safe (the queued row is), so
            # at low rates it rides with the next enqueue's commit instead of paying an
            # fsync of its own; a crash meanwhile at worst resends with the same id.
            self._delivered_future = self.submit(
                self.op_delivered_batch(batch),
                within=max(DELIVERED_COMMIT_DELAY, self.commit_window))
        ids_, attempts, _, holders = batch.get(webhook, ([], 0, 0.0, []))
        ids_.extend(ids)
        if holder is not None:
            holders.append((holder, ids))
        batch[webhook] = (ids_, attempts + 1, now, holders)
        return self._delivered_future

    # -- leases: the only code that changes them (see bridge.leases) ---------------------

    def claim(self, holder: Holder, ids: Collection[int]) -> bool:
        """``holder`` is about to send these rows: from now on the quota leaves them alone.
        False (nothing claimed) when one of them was dropped meanwhile."""
        return self.leases.claim(holder, ids)

    def release(self, holder: Holder, ids: Iterable[int]) -> None:
        """``holder`` gives back rows it will not send now (they are queued again)."""
        self.leases.release(holder, ids)

    def retire(self, holder: Holder) -> None:
        """``holder`` stops: see :meth:`Leases.retire`."""
        self.leases.retire(holder)

    def stop_handoff(self, holder: Holder) -> None:
        """New rows are no longer handed to ``holder`` (it reads the queue instead)."""
        self.leases.stop_handoff(holder)

    def hands_off_to(self, holder: Holder) -> bool:
        return self.leases.hands_off_to(holder)

    def redelivered(self, mid: int, topic: str, digest: bytes) -> bool:
        """A DUP redelivery of a message already committed (acknowledge it, queue
        nothing)."""
        return self.unacked.get(mid) == _ack_key(topic, digest)

    def acked(self, mid: int) -> None:
        """The ack of packet ``mid`` went out: forget it (in the next enqueue's commit)."""
        if self.unacked.pop(mid, None) is not None:
            self._forget.add(mid)

    def new_session(self) -> None:
        """The broker kept no session: it will redeliver nothing, forget every entry."""
        if self.unacked:
            self.unacked.clear()
            self._forget_all = True

    def generation(self) -> str | None:
        """The generation CLI commands bump when they change the store (see
        :func:`bump_generation`), read on the event loop's own thread because it is asked
        several times a second for the bridge's whole life: ``PRAGMA data_version`` costs
        microseconds and no I/O, and changes only when a commit was made on another
        connection (ours included) since the last call; the meta row is read only then.
        A thread round trip per call cost more CPU at idle than everything else."""
        version = self._watcher.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self._generation = self.q_generation(self._watcher)
        return self._generation

    async def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_thread, query, self._reader)

    async def _commit_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        # Operations whose commit failed because the disk is full (or its writes fail):
        # kept, with their futures unresolved, and retried with backoff. Nothing they
        # would hand out leaves the store, and every caller simply waits (the MQTT ack,
        # a delivered mark whose rows stay leased) until space returns.
        carry: list[tuple[Operation, asyncio.Future[Any]]] = []
        delay = FULL_RETRY_INITIAL
        while True:
            if carry:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, FULL_RETRY_MAX)
            else:
                await self._wake.wait()
            self._wake.clear()
            if self._lazy_wake is not None:
                self._lazy_wake.cancel()
                self._lazy_wake = None
            batch, self._pending, carry = carry + self._pending, [], []
            self._enqueue_batch, self._delivered_batch = None, None
            if not batch:
                if self._closed:
                    return
                continue
            self._freed = False
            outcomes = await loop.run_in_executor(self._write_thread, self._apply, batch)
            full: BaseException | None = None
            for (op, future), (ok, value) in zip(batch, outcomes):
                again = (not ok and not future.done() and _is_full(value)
                         and not self._closed)
                # Leases follow the outcome (here, before the next group can run): taken
                # back with a commit, kept by an operation that waits for space.
                _settle(op, ok, again)
                owner = getattr(op, "batch", None)
                if ok and isinstance(owner, _EnqueueBatch):
                    self._hand_out(owner)
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                elif again:
                    carry.append((op, future))
                    full = value
                else:
                    future.set_exception(value)
            if self._freed:
                self.space_freed.set()
            if full is not None:
                log.debug("commit failed for lack of space; retrying", cause=str(full),
                          operations=len(carry), retry_in=delay)
            self._note_full(full)
            if not carry:
                delay = FULL_RETRY_INITIAL
            if self._closed:
                self._wake.set()  # drain what came in meanwhile, then return when empty

    def _hand_out(self, enqueued: _EnqueueBatch) -> None:
        """After a commit that queued deliveries: give each caught-up worker its new rows
        (leased to it in that commit), then tell the listener."""
        self.unacked.update(enqueued.acks)
        by_holder: dict[int, tuple[Holder, list[Delivery]]] = {}
        for holder, row in enqueued.handed:
            by_holder.setdefault(id(holder), (holder, []))[1].append(row)
        try:
            for holder, rows in by_holder.values():
                holder.offer(rows)
            if self.on_enqueued is not None:
                self.on_enqueued(enqueued.dropped, [row for _, row in enqueued.handed])
        except Exception as exc:  # a listener must not stop the commits
            log.error("enqueue listener failed", cause=f"{type(exc).__name__}: {exc}")

    def _note_full(self, error: BaseException | None) -> None:
        """Enter or leave the disk-full state (one call of ``on_full`` each way)."""
        if (error is not None) == self.full:
            return
        self.full = error is not None
        self.failed = self.full
        if self.on_full is not None:
            try:
                self.on_full(self.full, str(error) if error is not None else "")
            except Exception as exc:  # a listener must not stop the commits
                log.error("store-full listener failed", cause=f"{type(exc).__name__}: {exc}")

    def _apply(self, batch: list[tuple[Operation, asyncio.Future[Any]]]
               ) -> list[tuple[bool, Any]]:
        """Apply a group in one transaction; if any operation fails, fall back to one
        transaction each so one bad operation cannot fail its neighbours."""
        conn = self._writer
        if len(self._sizes) > _MAX_SIZES:
            self._sizes.clear()  # a bound on what released rows leave behind
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [(True, op(conn)) for op, _ in batch]
            conn.execute("COMMIT")
            self.commits += 1
            self.failed = False
            return results
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._rolled_back(conn)
        outcomes: list[tuple[bool, Any]] = []
        for op, _ in batch:
            try:
                conn.execute("BEGIN IMMEDIATE")
                value = op(conn)
                conn.execute("COMMIT")
                outcomes.append((True, value))
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._rolled_back(conn)
                self.failed = isinstance(exc, sqlite3.Error)
                error = exc
                if isinstance(exc, sqlite3.Error):
                    error = StoreError(f"queue database {self.path}: {exc}")
                    error.__cause__ = exc
                outcomes.append((False, error))
        return outcomes

    def _rolled_back(self, conn: sqlite3.Connection) -> None:
        """Forget what a rolled-back transaction did to our in-memory view of the disk."""
        self.bytes_queued = self._measure(conn)
        self._id_ceiling = 0  # the reservation may be undone; _next_id stays ahead anyway
        self._sizes.clear()  # rows may be back (a delete undone) or never were (an insert)

    async def close(self) -> None:
        """Commit what is pending, then close both connections."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._wake is not None and self._task is not None:
            self._wake.set()
            await self._task
        # The floor of queue time after a reboot (bridge.clock).
        with contextlib.suppress(sqlite3.Error):
            self._write_thread.submit(queue_clock.save, self._writer, self.clock).result()
        self._write_thread.submit(self._writer.close).result()
        self._read_thread.submit(self._reader.close).result()
        self._watcher.close()
        self._write_thread.shutdown()
        self._read_thread.shutdown()

    # -- operations (run in the writer thread, inside a transaction) -------------------

    def _insert(self, conn: sqlite3.Connection, items: list[NewDelivery], now: float
                ) -> tuple[dict[str, int], int, list[NewDelivery]]:
        """Queue deliveries; with ``overflow: drop_oldest`` make room first by dropping the
        oldest queued deliveries, and when a group is larger than all that may be dropped,
        its own oldest items too. Returns ``({webhook: dropped}, first id, the items
        stored)``: the stored items have ids ``first``, ``first + 1``, ... in order."""
        if not items:
            return {}, 0, items
        sizes = [len(d.event) + ROW_OVERHEAD for d in items]
        total = sum(sizes)
        dropped: dict[str, int] = {}
        excess = self.bytes_queued + total - self.max_size
        if self.max_size and excess > 0 and self.overflow == "drop_oldest":
            dropped = self._drop_oldest(conn, excess)
            skipped: dict[str, int] = {}
            skip = 0
            while skip < len(items) and self.bytes_queued + total > self.max_size:
                total -= sizes[skip]
                skipped[items[skip].webhook] = skipped.get(items[skip].webhook, 0) + 1
                skip += 1
            if skip:
                _count_dropped(conn, skipped)
                for webhook, count in skipped.items():
                    dropped[webhook] = dropped.get(webhook, 0) + count
                items, sizes = items[skip:], sizes[skip:]
                if not items:
                    return dropped, 0, items
        first = self._allocate_ids(conn, len(items))
        # Multi-row INSERTs rather than executemany: one sqlite3 step per 64 rows.
        for start in range(0, len(items), _INSERT_ROWS):
            chunk = items[start:start + _INSERT_ROWS]
            params: list[Any] = []
            for offset, d in enumerate(chunk, start):
                params += (first + offset, d.webhook, d.event_id, d.device_id, d.event,
                           sizes[offset], now, now)
            conn.execute(_INSERT_SQL[len(chunk)], params)
        self.bytes_queued += total
        return dropped, first, items

    def _allocate_ids(self, conn: sqlite3.Connection, count: int) -> int:
        """The first of ``count`` new delivery ids. AUTOINCREMENT rewrites the
        sqlite_sequence page in every transaction that inserts (a WAL frame per group
        commit); an INSERT with an explicit id at or below the stored sequence leaves it
        alone. So ids are reserved ID_BLOCK at a time by raising the sequence, in the same
        transaction as the first insert that uses them, and handed out from memory. The
        guarantee stays: every id is above any id ever used, in this process or by another
        one (which allocates above the sequence, and so above our block)."""
        first = self._next_id
        if first + count - 1 > self._id_ceiling:
            top = conn.execute(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence"
                " WHERE name = 'deliveries'), 0), COALESCE((SELECT MAX(id) FROM deliveries),"
                " 0))").fetchone()[0]
            first = max(first, int(top) + 1)
            ceiling = first + max(count, ID_BLOCK) - 1
            if not conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'deliveries'",
                                (ceiling,)).rowcount:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('deliveries', ?)",
                             (ceiling,))
            self._id_ceiling = ceiling
        self._next_id = first + count
        return first

    def op_enqueue_batch(self, batch: _EnqueueBatch) -> Operation:
        """The coalesced enqueue: registry changes, quota, one INSERT for everything, and
        leases for rows whose worker takes them directly (reported via ``on_enqueued``)."""
        def enqueue(conn: sqlite3.Connection) -> None:
            # This may run twice (a failed group is retried op by op): the first run's
            # rows were rolled back, so their leases end.
            _release_handed(self.leases, batch)
            if batch.forget_all:
                conn.execute("DELETE FROM unacked")
            elif batch.forget:
                for marks, chunk in _id_lists(list(batch.forget)):
                    conn.execute(f"DELETE FROM unacked WHERE mid IN ({marks})", chunk)
            if batch.acks:
                conn.executemany("INSERT OR REPLACE INTO unacked (mid, topic, digest)"
                                 " VALUES (?, '', ?)", list(batch.acks.items()))
            for also in batch.also:
                also(conn)
            batch.dropped, first, stored = self._insert(conn, batch.items, batch.now)
            if not stored:
                return
            now = batch.now
            holders: dict[str, Holder | None] = {}
            wanted: dict[int, tuple[Holder, list[int]]] = {}  # one grant per holder
            for offset, item in enumerate(stored):
                holder = holders.get(item.webhook, False)
                if holder is False:
                    holder = holders[item.webhook] = self.leases.handoff_holder(item.webhook)
                if holder is not None:
                    wanted.setdefault(id(holder), (holder, []))[1].append(offset)
            for holder, offsets in wanted.values():
                if not self.leases.grant(holder, [first + o for o in offsets]):
                    continue  # retired meanwhile: the rows wait in the queue
                for offset in offsets:
                    item, row_id = stored[offset], first + offset
                    self._sizes[row_id] = len(item.event) + ROW_OVERHEAD  # as _insert stored
                    batch.handed.append((holder, Delivery(
                        row_id, item.webhook, item.event_id, item.device_id, item.event, now,
                        now, 0, None)))

        def settle(committed: bool, again: bool) -> None:
            # Rows are handed out only once their commit succeeded (a rerun hands anew).
            if not committed:
                _release_handed(self.leases, batch)

        enqueue.batch = batch  # type: ignore[attr-defined]
        enqueue.settle = settle  # type: ignore[attr-defined]
        return enqueue

    def op_delivered_batch(self, batch: dict[str, tuple[list[int], int, float,
                                                        list[tuple[Holder, list[int]]]]]
                           ) -> Operation:
        def delivered(conn: sqlite3.Connection) -> None:
            for webhook, (ids, attempts, now, _) in batch.items():
                self._delete(conn, ids)
                _update_webhook(
                    conn, webhook,
                    "UPDATE webhooks SET delivered = delivered + ?, attempts = attempts + ?,"
                    " consecutive_failures = 0, last_triggered = ?, last_error = NULL"
                    " WHERE name = ?", (len(ids), attempts, now, webhook))

        def settle(committed: bool, again: bool) -> None:
            if again:  # a delivered mark waiting for space keeps its rows leased
                return
            for _, _, _, holders in batch.values():
                for holder, ids in holders:
                    self.leases.release(holder, ids)

        delivered.settle = settle  # type: ignore[attr-defined]
        return delivered

    def _drop_oldest(self, conn: sqlite3.Connection, excess: int) -> dict[str, int]:
        victims: list[int] = []
        dropped: dict[str, int] = {}
        freed = 0
        after, page = 0, 256  # the head of the queue may be in flight: read it in pages
        leases = self.leases
        while freed < excess:
            rows = _json_loads(conn.execute(_OLDEST, (after, page)).fetchone()[0])
            for delivery_id, webhook, size in rows:
                after = delivery_id
                # A prefetched row loses its lease at once (its worker's claim fails and
                # it reads the queue again; had this commit failed, the row would simply
                # be found there again); a row being sent is not dropped.
                if not leases.revoke_unless_sending(delivery_id):
                    continue
                victims.append(delivery_id)
                self._sizes[delivery_id] = size  # read here: no SUM needed to delete it
                dropped[webhook] = dropped.get(webhook, 0) + 1
                freed += size
                if freed >= excess:
                    break
            if len(rows) < page:
                break
        self._delete(conn, victims)
        _count_dropped(conn, dropped)
        return dropped

    def op_retry(self, webhook: str, ids: list[int], status: int | None, error: str,
                 counts_as_failure: bool, now: float, holder: Holder | None = None
                 ) -> Operation:
        """An attempt failed in a way worth retrying: keep the rows in their place in
        line (the webhook-level backoff decides when the next probe goes out) and note
        the cause; ``holder``'s leases end with the commit. Returns the webhook's
        consecutive failures."""
        def retry(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?,"
                " last_error = ? WHERE id = ?", [(status, error, i) for i in ids])
            return self._note_failure(conn, webhook, error, counts_as_failure, now)

        return self._releasing(retry, holder, ids)

    def op_dead(self, webhook: str, ids: list[int], reason: str, status: int | None,
                response: str | None, now: float, attempted: bool = True,
                counts_as_failure: bool = False, holder: Holder | None = None) -> Operation:
        """Move deliveries to the dead letters (counting the attempt that killed them);
        ``holder``'s leases end with the commit. Returns the webhook's consecutive
        failures."""
        def dead(conn: sqlite3.Connection) -> int:
            move_to_dead_letters(conn, ids, reason, status, response, now,
                                 1 if attempted else 0)
            self._delete(conn, ids)
            failures = 0
            if attempted:
                failures = self._note_failure(conn, webhook, reason, counts_as_failure, now)
            # `status` shows why deliveries died, also those that died unsent (too old).
            _update_webhook(conn, webhook, "UPDATE webhooks SET dead = dead + ?,"
                            " last_error = ? WHERE name = ?",
                            (len(ids), f"dead letter: {reason}", webhook))
            return failures

        return self._releasing(dead, holder, ids)

    def _releasing(self, op: Operation, holder: Holder | None, ids: list[int]) -> Operation:
        """``op``, after whose commit (or failure: the rows are then still queued as they
        were) ``holder``'s leases on ``ids`` end."""
        if holder is not None:
            def settle(committed: bool, again: bool) -> None:
                if not again:  # waiting for space: the rows stay leased meanwhile
                    self.leases.release(holder, ids)

            op.settle = settle  # type: ignore[attr-defined]
        return op

    def op_lease(self, holder: Holder, query: Callable[[sqlite3.Connection], list[Delivery]],
                 *, mine_too: bool = False, handoff: bool = False) -> Operation:
        """Run a due-query in the writer thread and lease what it returns to ``holder``, so
        the quota cannot drop a row between the query and the lease. Rows leased by
        anyone are left out (with ``mine_too``, those ``holder`` has are kept). With
        ``handoff``, an answer that saw the end of the queue means the worker has caught
        up: from this very commit on, new rows of the webhook are handed to it (set here,
        in the writer thread, so no row can fall between the query and the handoff)."""
        leases = self.leases
        granted: list[int] = []

        def lease(conn: sqlite3.Connection) -> list[Delivery]:
            leases.release(holder, granted)  # a rerun (its group failed): start afresh
            if not mine_too and isinstance(query, DueQuery):
                # Leased rows are not even read; the sizes of the rest are noted.
                found: list[Delivery] = query(conn, skip=leases, sizes=self._sizes)
            else:
                found = query(conn)
            mine = leases.ids(holder) if mine_too else set()
            granted[:] = leases.grant(holder, [r.id for r in found if r.id not in mine])
            keep = mine.union(granted)
            # Caught up only when the query saw the end of the queue (rows it skipped as
            # already leased do not count as the end).
            if handoff and isinstance(query, DueQuery) and getattr(found, "exhausted", False):
                leases.start_handoff(query.webhook, holder)
            return [r for r in found if r.id in keep]

        def settle(committed: bool, again: bool) -> None:
            if not committed:  # the worker gets an error (or a later answer), not these
                leases.release(holder, granted)
                if handoff:
                    leases.stop_handoff(holder)

        lease.settle = settle  # type: ignore[attr-defined]
        return lease

    def op_assign_batches(self, batches: list[tuple[list[int], str]]) -> Operation:
        """Pin deliveries to batches (ids, batch_id) so every retry sends the same batch
        with the same id."""
        def assign(conn: sqlite3.Connection) -> None:
            for ids, batch_id in batches:
                for marks, chunk in _id_lists(ids):
                    conn.execute(f"UPDATE deliveries SET batch_id = ? WHERE id IN ({marks})",
                                 [batch_id, *chunk])

        return assign

    def op_in_flight(self, counts: dict[str, int]) -> Operation:
        def in_flight(conn: sqlite3.Connection) -> None:
            for webhook, count in counts.items():
                _ensure_webhook(conn, webhook)
                conn.execute("UPDATE webhooks SET in_flight = ? WHERE name = ?",
                             (count, webhook))

        return in_flight

    def op_forget_webhook(self, webhook: str) -> Operation:
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM webhooks WHERE name = ?", (webhook,))

        return forget

    def op_dead_all(self, webhook: str, reason: str) -> Operation:
        """Every queued delivery of ``webhook`` to the dead letters (webhook removed)."""
        def dead_all(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute("SELECT id FROM deliveries WHERE webhook = ?",
                                               (webhook,))]
            move_to_dead_letters(conn, ids, reason, None, None, time.time(), 0)
            self._delete(conn, ids)
            return len(ids)

        return dead_all

    def op_set_state(self, webhook: str, state: str, reason: str | None = None,
                     only_if: str | None = None) -> Operation:
        """:func:`write_state` as an operation; returns the new state version, or None
        when ``only_if`` did not hold."""
        return lambda conn: write_state(conn, webhook, state, reason, only_if)

    def _note_failure(self, conn: sqlite3.Connection, webhook: str, error: str,
                      counts: bool, now: float) -> int:
        _ensure_webhook(conn, webhook)
        conn.execute(
            "UPDATE webhooks SET attempts = attempts + 1, failed = failed + 1,"
            " last_triggered = ?, last_error = ?,"
            " consecutive_failures = consecutive_failures + ? WHERE name = ?",
            (now, error, 1 if counts else 0, webhook))
        row = conn.execute("SELECT consecutive_failures FROM webhooks WHERE name = ?",
                           (webhook,)).fetchone()
        return int(row[0])

    def _delete(self, conn: sqlite3.Connection, ids: Collection[int]) -> None:
        unique = list(dict.fromkeys(ids))  # a repeated id frees its bytes once
        sizes = self._sizes
        remeasure = False
        for start in range(0, len(unique), _LIST_SIZES[-1]):
            part = unique[start:start + _LIST_SIZES[-1]]
            marks, params = _id_list(part)
            known = [sizes.pop(i, -1) for i in part]
            if -1 in known:
                freed = int(conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM deliveries"
                                         f" WHERE id IN ({marks})", params).fetchone()[0])
                conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", params)
            else:
                freed = sum(known)
                deleted = conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})",
                                       params).rowcount
                # Fewer rows than ids: some were deleted elsewhere (another process), so
                # which sizes to count is unknown; count them all again.
                remeasure = remeasure or deleted != len(part)
            self.bytes_queued -= freed
            if freed:
                self._freed = True
        if remeasure:
            self.bytes_queued = self._measure(conn)

    # -- queries (run in the reader thread) ---------------------------------------------

    @staticmethod
    def q_due(webhook: str, now: float | None, limit: int, exclude: Collection[int]
              ) -> DueQuery:
        """The oldest due deliveries not in ``exclude``, in queue order. ``now`` None is
        the moment the query runs (a row committed just before it is due)."""
        return DueQuery(webhook, now, limit, exclude)

    @staticmethod
    def q_batch(webhook: str, batch_id: str) -> Callable[[sqlite3.Connection], list[Delivery]]:
        def batch(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE webhook = ? AND batch_id = ?"
                " ORDER BY id", (webhook, batch_id)).fetchall()
            return [Delivery(*r) for r in rows]

        return batch

    @staticmethod
    def q_next_due(webhook: str, exclude: Collection[int] = ()
                   ) -> Callable[[sqlite3.Connection], float | None]:
        def next_due(conn: sqlite3.Connection) -> float | None:
            lists = _id_lists(list(exclude))
            params: list[Any] = [webhook]
            for _, chunk in lists:
                params += chunk
            where = "".join(f" AND id NOT IN ({marks})" for marks, _ in lists)
            row = conn.execute(f"SELECT MIN(due) FROM deliveries WHERE webhook = ?{where}",
                               params).fetchone()
            return row[0]

        return next_due

    @staticmethod
    def q_generation(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return row[0] if row else None


class DueQuery:
    """:meth:`Store.q_due`: a callable query, which :meth:`Store.op_lease` also asks to
    leave out leased rows before their events are read."""

    __slots__ = ("exclude", "limit", "now", "webhook")

    def __init__(self, webhook: str, now: float | None, limit: int,
                 exclude: Collection[int]) -> None:
        self.webhook = webhook
        self.now = now
        self.limit = limit
        self.exclude = exclude

    def __call__(self, conn: sqlite3.Connection, skip: Collection[int] = (),
                 sizes: dict[int, int] | None = None) -> DueRows:
        """The rows, minus those in ``skip`` (which still count towards ``limit`` and do
        not make the answer exhausted); their stored sizes go to ``sizes``."""
        at = queue_now() if self.now is None else self.now
        exclude, limit = self.exclude, self.limit
        window = limit + len(exclude)
        # Ids first, from the covering index: excluded rows (in flight, ready) are often
        # most of the window, and their events would be read only to be thrown away.
        ids = _json_loads(conn.execute(_DUE_IDS, (self.webhook, at, window)).fetchone()[0])
        chosen = [i for i in ids if i not in exclude]
        exhausted = len(ids) < window and len(chosen) <= limit
        rows = _deliveries(conn, [i for i in chosen[:limit] if i not in skip], sizes)
        if any((a.due, a.id) > (b.due, b.id) for a, b in itertools.pairwise(rows)):
            rows.sort(key=lambda r: (r.due, r.id))  # aggregate order is not a promise
        result = DueRows(rows)
        result.exhausted = exhausted
        return result


def _ack_key(topic: str, digest: bytes) -> bytes:
    """What the unacked table keeps of a message: 8 bytes for its topic and payload
    digest (a false match needs the same packet id, the DUP flag and a 2**-64 chance)."""
    return hashlib.blake2b(topic.encode() + b"\0" + digest, digest_size=8).digest()


def _release_handed(leases: Leases, batch: _EnqueueBatch) -> None:
    by_holder: dict[int, tuple[Holder, list[int]]] = {}
    for holder, row in batch.handed:
        by_holder.setdefault(id(holder), (holder, []))[1].append(row.id)
    for holder, ids in by_holder.values():
        leases.release(holder, ids)
    batch.handed = []


def _settle(op: Operation, committed: bool, again: bool) -> None:
    """Run what ``op`` does once its transaction committed or failed (``again``: it will
    be tried again, when there is space): the leases it hands out or takes back."""
    settle = getattr(op, "settle", None)
    if settle is not None:
        settle(committed, again)


def _deliveries(conn: sqlite3.Connection, ids: list[int],
                sizes: dict[int, int] | None = None) -> list[Delivery]:
    """The deliveries ``ids`` in that order (those still queued); their stored sizes go to
    ``sizes``."""
    found: dict[int, Delivery] = {}
    noted: dict[int, int] = {}
    for marks, chunk in _id_lists(ids):
        listed, events, odd = conn.execute(_FETCH_SQL[marks], chunk).fetchone()
        if odd:
            for row in conn.execute(f"SELECT {_DELIVERY_COLUMNS}, size FROM deliveries"
                                    f" WHERE id IN ({marks})", chunk):
                found[row[0]] = Delivery(*row[:-1])
                noted[row[0]] = row[-1]
            continue
        end = 0
        for (row_id, webhook, event_id, device_id, length, attempts, batch_id, whole,
             fraction, due_whole, due_fraction, size) in _json_loads(listed):
            start, end = end, end + length
            created = whole + fraction / _FRACTION
            due = created if due_whole is None else due_whole + due_fraction / _FRACTION
            found[row_id] = Delivery(row_id, webhook, event_id, device_id, events[start:end],
                                     created, due, attempts, batch_id)
            noted[row_id] = size
    if sizes is not None:
        sizes.update(noted)
    return [found[i] for i in ids if i in found]


def _is_full(error: BaseException) -> bool:
    """A commit failed for lack of space (or its writes failed): worth retrying later."""
    cause = error.__cause__ if isinstance(error, StoreError) else error
    code = getattr(cause, "sqlite_errorcode", None)
    return isinstance(cause, sqlite3.OperationalError) and code is not None \
        and code & 0xFF in _FULL_CODES


def _id_list(ids: Sequence[int]) -> tuple[str, list[int]]:
    """Placeholders and parameters for 1 to 512 ``ids``, padded to one of the _LIST_SIZES
    by repeating the last id."""
    size = next(n for n in _LIST_SIZES if n >= len(ids))
    params = list(ids)
    params += [params[-1]] * (size - len(params))
    return _MARKS[size], params


def _id_lists(ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """``ids`` as :func:`_id_list` chunks of at most 512."""
    return [_id_list(ids[start:start + _LIST_SIZES[-1]])
            for start in range(0, len(ids), _LIST_SIZES[-1])]


def _ensure_webhook(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO webhooks (name, created, modified) VALUES (?, ?, ?)",
                 (name, time.time(), time.time()))


def _update_webhook(conn: sqlite3.Connection, name: str, sql: str, params: Sequence[Any]
                    ) -> None:
    """Run ``sql``, an UPDATE of the webhook's row; create the row first if it is missing.
    Trying the UPDATE first saves a statement on every hot-path commit, and unlike a cache
    of the rows that exist it cannot be fooled by a row deleted meanwhile."""
    if not conn.execute(sql, params).rowcount:
        _ensure_webhook(conn, name)
        conn.execute(sql, params)


def _count_dropped(conn: sqlite3.Connection, dropped: dict[str, int]) -> None:
    for webhook, count in dropped.items():
        _update_webhook(conn, webhook, "UPDATE webhooks SET dropped = dropped + ? WHERE name = ?",
                        (count, webhook))


def webhook_rows(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per-webhook state and counters plus queued counts, for status and the admin API."""
    conn.row_factory = sqlite3.Row
    try:
        rows = {r["name"]: dict(r) for r in conn.execute("SELECT * FROM webhooks")}
        for name, queued in conn.execute(
                "SELECT webhook, COUNT(*) FROM deliveries GROUP BY webhook"):
            rows.setdefault(name, {"name": name, "state": ENABLED})["queued"] = queued
        for name, dead in conn.execute(
                "SELECT webhook, COUNT(*) FROM dead_letters GROUP BY webhook"):
            rows.setdefault(name, {"name": name, "state": ENABLED})["dead_letters"] = dead
    finally:
        conn.row_factory = None
    return rows


def oldest_queued(conn: sqlite3.Connection) -> dict[str, float]:
    """Per webhook, when its oldest queued delivery was created (for the age gauge)."""
    return dict(conn.execute("SELECT webhook, MIN(created) FROM deliveries GROUP BY webhook"))


def move_to_dead_letters(conn: sqlite3.Connection, ids: list[int], reason: str,
                         status: int | None, response: str | None, now: float,
                         extra_attempts: int) -> None:
    conn.executemany(
        "INSERT INTO dead_letters (webhook, event_id, device_id, event, created, died,"
        " attempts, last_status, reason, response, batch_id, size)"
        " SELECT webhook, event_id, device_id, event, created, ?, attempts + ?,"
        " COALESCE(?, last_status), ?, COALESCE(?, last_error), batch_id,"
        f" LENGTH(event) + LENGTH(COALESCE(?, last_error, '')) + {ROW_OVERHEAD}"
        " FROM deliveries WHERE id = ?",
        [(now, extra_attempts, status, reason, response, response, i) for i in ids])


def prune_dead_letters(conn: sqlite3.Connection, max_age: float, max_size: int,
                       now: float) -> dict[str, int]:
    """Bound the dead letters (store.dead_letters): delete those older than ``max_age``,
    then the oldest until they take at most ``max_size`` bytes. Returns the count
    deleted per webhook. Runs inside the caller's transaction."""
    pruned: dict[str, int] = {}
    for webhook, count in conn.execute("SELECT webhook, COUNT(*) FROM dead_letters"
                                       " WHERE died < ? GROUP BY webhook", (now - max_age,)):
        pruned[webhook] = count
    if pruned:
        conn.execute("DELETE FROM dead_letters WHERE died < ?", (now - max_age,))
    total = conn.execute(f"SELECT COALESCE(SUM({_DEAD_SIZE}), 0) FROM dead_letters"
                         ).fetchone()[0]
    if total > max_size:
        excess, last = total - max_size, None
        for letter, webhook, size in conn.execute(
                f"SELECT id, webhook, {_DEAD_SIZE} FROM dead_letters ORDER BY id"):
            pruned[webhook] = pruned.get(webhook, 0) + 1
            excess, last = excess - size, letter
            if excess <= 0:
                break
        conn.execute("DELETE FROM dead_letters WHERE id <= ?", (last,))
    return pruned


# Rows written before the size column existed are sized from their event.
_DEAD_SIZE = f"COALESCE(size, LENGTH(event) + {ROW_OVERHEAD})"


def write_failed_change(conn: sqlite3.Connection, change: dict[str, Any] | None) -> None:
    """Record (None: clear) the live change the daemon could not apply, for ``status``."""
    if change is None:
        conn.execute("DELETE FROM meta WHERE key = 'failed_change'")
    else:
        conn.execute("INSERT INTO meta (key, value) VALUES ('failed_change', ?) ON CONFLICT"
                     " (key) DO UPDATE SET value = excluded.value",
                     (json.dumps(change, separators=(",", ":")),))


def read_failed_change(conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'failed_change'").fetchone()
    return json.loads(row[0]) if row else None


def bump_generation(conn: sqlite3.Connection) -> None:
    """Tell a running daemon that another process changed the store (it re-reads)."""
    conn.execute("INSERT INTO meta (key, value) VALUES ('generation', ?) ON CONFLICT (key)"
                 " DO UPDATE SET value = excluded.value", (repr(time.time()),))


# -- dead letters, for the CLI and the admin API (any process, any time) ------------------

_DEAD_COLUMNS = ("id, webhook, event_id, batch_id, device_id, created, died, attempts,"
                 " last_status, reason, response")


def _dead_filter(webhook: str | None, since: float | None, ids: list[int] | None
                 ) -> tuple[str, list[Any]]:
    clauses, params = ["1 = 1"], []
    if webhook is not None:
        clauses.append("webhook = ?")
        params.append(webhook)
    if since is not None:
        clauses.append("died >= ?")
        params.append(since)
    if ids:
        clauses.append(f"id IN ({','.join('?' * len(ids))})")
        params.extend(ids)
    return " AND ".join(clauses), params


def dead_list(conn: sqlite3.Connection, webhook: str | None = None,
              since: float | None = None, ids: list[int] | None = None,
              with_event: bool = False) -> list[dict[str, Any]]:
    where, params = _dead_filter(webhook, since, ids)
    columns = _DEAD_COLUMNS + (", event" if with_event else "")
    names = [c.strip() for c in columns.split(",")]
    rows = conn.execute(f"SELECT {columns} FROM dead_letters WHERE {where} ORDER BY id",
                        params).fetchall()
    return [dict(zip(names, r)) for r in rows]


def dead_replay(conn: sqlite3.Connection, webhook: str | None = None,
                since: float | None = None, ids: list[int] | None = None) -> int:
    """Re-queue dead letters as fresh deliveries (attempts and age start again)."""
    where, params = _dead_filter(webhook, since, ids)
    now = queue_clock.load(conn).now()  # queue time, as the daemon of this boot reads it
    with transaction(conn):
        cursor = conn.execute(
            "INSERT INTO deliveries (webhook, event_id, device_id, event, size, created, due)"
            f" SELECT webhook, event_id, device_id, event, LENGTH(event) + {ROW_OVERHEAD},"
            f" ?, ? FROM dead_letters WHERE {where} ORDER BY id", [now, now, *params])
        count = cursor.rowcount
        conn.execute(f"DELETE FROM dead_letters WHERE {where}", params)
        bump_generation(conn)
    return count


def dead_purge(conn: sqlite3.Connection, webhook: str | None = None,
               since: float | None = None, ids: list[int] | None = None) -> int:
    where, params = _dead_filter(webhook, since, ids)
    with transaction(conn):
        count = conn.execute(f"DELETE FROM dead_letters WHERE {where}", params).rowcount
        bump_generation(conn)
    return count


def write_state(conn: sqlite3.Connection, webhook: str, state: str,
                reason: str | None = None, only_if: str | None = None) -> int | None:
    """The one way a webhook's state changes (CLI, API and failure policy alike): set it
    and bump its ``state_version``, so every change has a place in one order and the
    daemon applies only changes newer than the one it holds. With ``only_if`` the change
    is made only while the stored state is that one (the failure policy disables only a
    webhook that is still enabled). Returns the new version, or None when nothing was
    changed. Runs inside the caller's transaction."""
    _ensure_webhook(conn, webhook)
    reset = ", consecutive_failures = 0" if state == ENABLED else ""
    guard, params = (" AND state = ?", [only_if]) if only_if is not None else ("", [])
    changed = conn.execute(
        f"UPDATE webhooks SET state = ?, state_version = state_version + 1, modified = ?,"
        f" last_error = COALESCE(?, last_error){reset} WHERE name = ?{guard}",
        [state, time.time(), reason, webhook, *params]).rowcount
    if not changed:
        return None
    row = conn.execute("SELECT state_version FROM webhooks WHERE name = ?",
                       (webhook,)).fetchone()
    return int(row[0])


def set_state(conn: sqlite3.Connection, webhook: str, state: str,
              reason: str | None = None) -> int:
    """Change a webhook's state from any process; a running daemon follows within a
    fraction of a second (see :func:`bump_generation`). Returns the state version."""
    with transaction(conn):
        version = write_state(conn, webhook, state, reason)
        bump_generation(conn)
    assert version is not None
    return version


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit write transaction (connections here are in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
