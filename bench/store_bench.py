"""Microbenchmark of the SQLite queue alone (no MQTT, no HTTP): writer-thread CPU per message.

    python bench/store_bench.py [--pattern steady|handoff|batch|all] [--messages N]
                                [--group K] [--busy-loop US] [--repeat R] [--store FILE]

Drives a real :class:`bridge.store.Store` in a fresh temp dir through the access patterns of
the daemon, one group commit per *tick*, deterministically:

``steady``
    every tick enqueues ``K`` deliveries (~300-byte events), marks ``K`` deliveries done
    (one ``delivered`` group) and starts ``K`` more; the worker keeps 8 in flight and
    refills its ready queue with ``op_lease(q_due(.., 64, in flight + ready))`` (handoff
    armed) whenever it runs low. A backlog of 1,000 rows keeps it behind, as in
    ``bench/run.py --scenario steady``, where almost every row comes from a refill.
``handoff``
    the same with an empty queue: the worker has caught up and every new row is handed
    to it by the enqueue itself (the store's handoff: ``offer``).
``batch``
    ``batch.max_events`` 100: every tick enqueues 4×``K`` deliveries; a batch finishes
    when all 8 request slots are busy; with a free slot and fewer than 100 ready rows the
    worker refills 200 (as ``WebhookWorker._next_batch`` does on every wake), pins full
    batches (``op_assign_batches``) and marks a whole batch delivered at once (backlog 2,000).

The writer thread's CPU (``time.thread_time``) is measured by wrapping the operations the
bench submits and the store's ``_apply`` (the bench does not change ``store.py``):
``commit`` is what ``_apply`` spends beyond the operations (BEGIN, COMMIT with its WAL
writes and fsync, autocheckpoints). Bytes written are ``write_bytes`` of
``/proc/self/io`` (the WAL, checkpoints and the main db; the temp dir must be on a real
disk, not tmpfs).

``--busy-loop US`` keeps the event loop busy meanwhile, as the daemon's is (MQTT, HTTP):
bursts of US µs of Python between passes through the selector. Python's sqlite3 releases
the GIL around every step of a statement (each row fetched, each parameter set of an
``executemany``), and with a busy loop each release costs a round trip of the GIL between
the threads, several times the step itself. ``sqlite_calls_per_msg`` counts those steps
in a separate, uninstrumented-for-time run: statements executed (``executemany``: one per
parameter set) plus rows fetched, in the writer thread, per message. It does not vary
from run to run, the times do (other load on the machine, fsync latency).

``--store FILE`` benchmarks another version of ``bridge/store.py`` (A/B: ``git show
HEAD:bridge/store.py > /tmp/old_store.py``). Prints one JSON line; with ``--repeat`` each
pattern runs R times in a fresh store and the run with the least writer CPU is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bridge.store
from bridge.store import Delivery, NewDelivery, Store

Operation = Callable[[sqlite3.Connection], Any]
WEBHOOK = "sink"
CONCURRENCY = 8
REFILL = 64
BATCH = 100
EVENT_BYTES = 300
BACKLOG = {"steady": 1000, "handoff": 0, "batch": 2000}


class WriterClock:
    """Writer-thread CPU per kind of operation, measured inside the writer thread."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall_apply = 0.0
        self.commits = 0
        self._ops_in_apply = 0.0

    def wrap(self, kind: str, op: Operation) -> Operation:
        def timed(conn: sqlite3.Connection) -> Any:
            start = time.thread_time()
            try:
                return op(conn)
            finally:
                spent = time.thread_time() - start
                self.cpu[kind] = self.cpu.get(kind, 0.0) + spent
                self._ops_in_apply += spent

        # The store recognises its coalesced enqueue by an attribute of the operation.
        timed.__dict__.update(getattr(op, "__dict__", {}))
        return timed

    def instrument(self, store: Store) -> None:
        """Route the store's own coalesced operations and its group commit through us."""
        apply = store._apply
        enqueue_batch = store.op_enqueue_batch
        delivered_batch = store.op_delivered_batch

        def timed_apply(batch: list[Any]) -> list[tuple[bool, Any]]:
            self._ops_in_apply = 0.0
            start, wall = time.thread_time(), time.perf_counter()
            try:
                return apply(batch)
            finally:
                total = time.thread_time() - start
                self.cpu["commit"] = self.cpu.get("commit", 0.0) + total - self._ops_in_apply
                self.wall_apply += time.perf_counter() - wall
                self.commits += 1

        store._apply = timed_apply  # type: ignore[method-assign]
        store.op_enqueue_batch = (  # type: ignore[method-assign]
            lambda batch: self.wrap("enqueue", enqueue_batch(batch)))
        store.op_delivered_batch = (  # type: ignore[method-assign]
            lambda batch: self.wrap("delivered", delivered_batch(batch)))

    def reset(self) -> None:
        self.cpu.clear()
        self.wall_apply = 0.0
        self.commits = 0


class StepCounter:
    """sqlite3 steps in the writer thread: statements run (``executemany``: one per
    parameter set) and rows fetched."""

    def __init__(self) -> None:
        self.on = False
        self.steps = 0

    @property
    def enabled(self) -> bool:
        return self.on and threading.current_thread().name.startswith("store-writer")


def counting_sqlite3(counter: StepCounter) -> types.ModuleType:
    """A stand-in for the ``sqlite3`` module whose connections count their steps."""

    class Cursor(sqlite3.Cursor):
        def __next__(self) -> Any:
            row = super().__next__()
            counter.steps += counter.enabled
            return row

        def fetchone(self) -> Any:
            row = super().fetchone()
            counter.steps += counter.enabled and row is not None
            return row

        def fetchall(self) -> list[Any]:
            rows = super().fetchall()
            counter.steps += counter.enabled * len(rows)
            return rows

    class Connection(sqlite3.Connection):
        def cursor(self, factory: Any = Cursor) -> Any:  # type: ignore[override]
            return super().cursor(factory)

        def execute(self, sql: str, params: Any = ()) -> Any:  # type: ignore[override]
            counter.steps += counter.enabled
            return self.cursor().execute(sql, params)

        def executemany(self, sql: str, seq: Any) -> Any:  # type: ignore[override]
            seq = list(seq)
            counter.steps += counter.enabled * len(seq)
            return self.cursor().executemany(sql, seq)

    shim = types.ModuleType("sqlite3")
    shim.__dict__.update(sqlite3.__dict__)
    shim.connect = (  # type: ignore[attr-defined]
        lambda *args, **kwargs: sqlite3.connect(*args, factory=Connection, **kwargs))
    return shim


def load_store(path: str | None) -> types.ModuleType:
    """``bridge.store``, or a fresh module made from the file ``path``."""
    if path is None:
        return bridge.store
    # Inside the bridge package, so the file's relative imports (.leases) resolve.
    name = f"bridge.store_under_test_{len(sys.modules)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


class Pattern:
    """One deterministic producer + worker pair around one store."""

    def __init__(self, lib: types.ModuleType, store: Store, clock: WriterClock) -> None:
        self.lib = lib
        self.store = store
        self.clock = clock
        self.seq = 0
        self.ready: deque[Delivery] = deque()
        self.in_flight: deque[list[Delivery]] = deque()  # requests, oldest first
        self.caught_up = False
        self.delivered = 0
        # The lease API: the store owns the leases (bridge/leases.py) and hands new rows
        # to this driver as a worker; a store.py from before that (``--store``) kept a
        # bare ``leased`` set and a ``handoff`` set that the caller changed.
        self.owned = hasattr(store, "leases")
        if not self.owned:
            store.on_enqueued = lambda _, handed: handed and self.offer(handed)

    def offer(self, handed: list[Delivery]) -> None:
        # As WebhookWorker.offer: take them while caught up, else release the leases.
        if self.caught_up and len(self.ready) < 256:
            self.ready.extend(handed)
        else:
            self.caught_up = False
            self._stop_handoff()
            self._release([r.id for r in handed])

    def _stop_handoff(self) -> None:
        if self.owned:
            self.store.stop_handoff(self)
        else:
            self.store.handoff.discard(WEBHOOK)

    def _release(self, ids: list[int]) -> None:
        if self.owned:
            self.store.release(self, ids)
        else:
            self.store.leased.difference_update(ids)

    def _handing_off(self) -> bool:
        return self.store.hands_off_to(self) if self.owned else WEBHOOK in self.store.handoff

    def items(self, count: int) -> list[NewDelivery]:
        out = []
        for _ in range(count):
            self.seq += 1
            device = f"dev-{self.seq % 10}"
            event = json.dumps({"id": f"evt_{self.seq:012d}", "device": device,
                                "seq": self.seq, "ts": 1.7e9 + self.seq}).encode()
            event += b" " * max(0, EVENT_BYTES - len(event))
            out.append(self.lib.NewDelivery(WEBHOOK, f"evt_{self.seq:012d}", device, event))
        return out

    def lease(self, want: int) -> asyncio.Future[Any]:
        exclude = {r.id for req in self.in_flight for r in req} | {r.id for r in self.ready}
        self.caught_up = False
        self._stop_handoff()
        query = self.lib.Store.q_due(WEBHOOK, None, want, exclude)
        if self.owned:
            op = self.store.op_lease(self, query, handoff=True)
        else:
            op = self.store.op_lease(query, handoff_if_short=(WEBHOOK, want))
        return self.store.submit(self.clock.wrap("lease", op))

    def finish(self, requests: list[list[Delivery]]) -> asyncio.Future[Any] | None:
        future = None
        for rows in requests:
            ids = [r.id for r in rows]
            if self.owned:  # the store takes the leases back with the commit
                future = self.store.delivered(WEBHOOK, ids, time.time(), holder=self)
            else:
                future = self.store.delivered(WEBHOOK, ids, time.time())
            self.delivered += len(rows)
        return future

    def release(self, requests: list[list[Delivery]]) -> None:
        for rows in requests:
            self._release([r.id for r in rows])

    async def prefill(self, rows: int) -> None:
        for start in range(0, rows, 500):
            await self.store.enqueue(self.items(min(500, rows - start)))

    async def steady_tick(self, enqueue: int) -> None:
        """One group commit: new rows in, finished requests out, a refill if short."""
        futures: list[asyncio.Future[Any]] = [self.store.enqueue(self.items(enqueue))]
        done = [self.in_flight.popleft() for _ in range(min(enqueue, len(self.in_flight)))]
        if (future := self.finish(done)) is not None:
            futures.append(future)
        refill = None
        if len(self.ready) < enqueue and not self.caught_up:
            refill = self.lease(REFILL)
            futures.append(refill)
        await asyncio.gather(*futures)
        self.release(done)
        if refill is not None:
            self.ready.extend(refill.result())
            self.caught_up = self._handing_off()
        while self.ready and len(self.in_flight) < CONCURRENCY:
            self.in_flight.append([self.ready.popleft()])

    async def batch_tick(self, enqueue: int) -> None:
        """One group commit of the batch pattern (see the module docstring)."""
        futures: list[asyncio.Future[Any]] = [self.store.enqueue(self.items(enqueue))]
        done = [self.in_flight.popleft()] if len(self.in_flight) >= CONCURRENCY else []
        if (future := self.finish(done)) is not None:
            futures.append(future)
        refill = None
        if len(self.ready) < BATCH:
            refill = self.lease(BATCH * 2)
            futures.append(refill)
        while len(self.ready) >= BATCH and len(self.in_flight) < CONCURRENCY:
            rows = [self.ready.popleft() for _ in range(BATCH)]
            op = self.store.op_assign_batches([(sorted(r.id for r in rows), f"bat_{rows[0].id}")])
            futures.append(self.store.submit(self.clock.wrap("assign_batch", op)))
            self.in_flight.append(rows)
        await asyncio.gather(*futures)
        self.release(done)
        if refill is not None:
            self.ready.extend(refill.result())
            self.caught_up = self._handing_off()


async def keep_loop_busy(stop: asyncio.Event, work_us: float) -> None:
    """Stand-in for the daemon's event loop: bursts of Python work, each followed by a
    pass through the selector (which releases the GIL)."""
    while not stop.is_set():
        end = time.perf_counter() + work_us / 1e6
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def run_pattern(lib: types.ModuleType, pattern: str, messages: int, group: int,
                      directory: str, busy_us: float = 0.0,
                      counter: StepCounter | None = None) -> dict[str, Any]:
    store: Store = lib.Store(str(Path(directory) / "queue.db"), max_size=2 * 1024 ** 3)
    clock = WriterClock()
    clock.instrument(store)
    await store.start()
    driver = Pattern(lib, store, clock)
    enqueue = group * 4 if pattern == "batch" else group
    tick = driver.batch_tick if pattern == "batch" else driver.steady_tick
    await driver.prefill(BACKLOG[pattern])
    # Warm up (caches, the first checkpoint, the handoff) outside the measurement.
    for _ in range(20):
        await tick(enqueue)
    stop = asyncio.Event()
    busy = asyncio.create_task(keep_loop_busy(stop, busy_us)) if busy_us else None
    clock.reset()
    if counter is not None:
        counter.on = True
    delivered_before = driver.delivered
    written, started = write_bytes(), time.perf_counter()
    ticks = messages // enqueue
    for _ in range(ticks):
        await tick(enqueue)
    wall = time.perf_counter() - started
    written = write_bytes() - written
    if counter is not None:
        counter.on = False
    stop.set()
    if busy is not None:
        await busy
    delivered = driver.delivered - delivered_before
    enqueued = ticks * enqueue
    await store.close()
    return {
        "messages": enqueued,
        "delivered": delivered,
        "commits": clock.commits,
        "msgs_per_commit": round(enqueued / clock.commits, 2),
        "writer_cpu_us_per_msg": round(sum(clock.cpu.values()) / enqueued * 1e6, 2),
        "writer_cpu_us_per_msg_by_op": {k: round(v / enqueued * 1e6, 2)
                                        for k, v in sorted(clock.cpu.items())},
        "apply_wall_us_per_commit": round(clock.wall_apply / clock.commits * 1e6, 1),
        "wall_msg_per_s": round(enqueued / wall),
        "bytes_written_per_msg": round(written / enqueued),
    }


def count_steps(path: str | None, pattern: str, messages: int, group: int,
                parent: str | None) -> float:
    """sqlite3 steps of the writer connection per message (a separate run)."""
    counter = StepCounter()
    lib = load_store(path or bridge.store.__file__)  # a copy of its own: patched here
    lib.sqlite3 = counting_sqlite3(counter)  # only connect() differs
    directory = tempfile.mkdtemp(prefix="wb-store-bench-", dir=parent)
    try:
        result = asyncio.run(run_pattern(lib, pattern, messages, group, directory, 0.0,
                                         counter))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return round(counter.steps / result["messages"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pattern", default="all",
                        choices=("steady", "handoff", "batch", "all"))
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--group", type=int, default=4,
                        help="deliveries enqueued per commit (batch: 4x this)")
    parser.add_argument("--busy-loop", type=float, default=0.0, metavar="US",
                        help="keep the event loop busy in bursts of US microseconds of Python"
                             " between selector passes, as the daemon's is (default 0: idle)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--store", default=None, metavar="FILE",
                        help="benchmark this store.py instead of bridge/store.py")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (a real disk)")
    args = parser.parse_args()
    patterns = ("steady", "handoff", "batch") if args.pattern == "all" else (args.pattern,)
    lib = load_store(args.store)
    result: dict[str, Any] = {"python": platform.python_version(),
                              "sqlite": sqlite3.sqlite_version, "store": args.store or
                              "bridge/store.py", "group": args.group,
                              "busy_loop_us": args.busy_loop}
    for pattern in patterns:
        runs = []
        for _ in range(args.repeat):
            directory = tempfile.mkdtemp(prefix="wb-store-bench-", dir=args.dir)
            try:
                runs.append(asyncio.run(run_pattern(lib, pattern, args.messages, args.group,
                                                    directory, args.busy_loop)))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        best = min(runs, key=lambda r: r["writer_cpu_us_per_msg"])
        best["sqlite_calls_per_msg"] = count_steps(args.store, pattern, args.messages,
                                                   args.group, args.dir)
        result[pattern] = best
    print(json.dumps(result))


if __name__ == "__main__":
    main()
