"""``overflow: drop_oldest`` under an endpoint outage while the worker holds prefetched rows
(SPEC §5): the oldest queued deliveries go first whatever is prefetched, a newer one is
never dropped while an older one waits, only a request on the wire is spared, and every
published message is either delivered or counted as dropped.

In process, to run 20 times in seconds: a real Store (SQLite in a temp dir), the real
WebhookWorker and Sender, and a real aiohttp endpoint on loopback that answers 503 slowly
(so the worker's ready queue is full of leased rows when the quota bites), then heals."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

from aiohttp import web

from bridge.config import RetryConfig, WebhookConfig
from bridge.delivery import USER_AGENT, Sender
from bridge.dispatch import WebhookWorker
from bridge.events import Event, dumps
from bridge.render import Renderer
from bridge.store import ROW_OVERHEAD, NewDelivery, Store

from .support import free_port, wait_for

PUBLISHED = 400
CONCURRENCY = 4


class Outage:
    """The endpoint: 503 after ``delay`` while down, 200 once healed; records the seqs."""

    def __init__(self) -> None:
        self.down = True
        self.delay = 0.2
        self.delivered: list[int] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        seq = json.loads(await request.read())["payload"]["seq"]
        if self.down:
            await asyncio.sleep(self.delay)
            return web.Response(status=503)
        self.delivered.append(seq)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def event(seq: int) -> NewDelivery:
    body = Event("telemetry", "telemetry", "devices/d1/telemetry", {"seq": seq}, "d1")
    return NewDelivery("w", body.id, "d1", dumps(body.envelope()))


def counted_drops(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT dropped FROM webhooks WHERE name = 'w'").fetchone()
        dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    finally:
        conn.close()
    assert dead == 0
    return int(row[0]) if row else 0


async def one_run(tmp: Path, endpoint: Outage, rng: random.Random) -> tuple[int, int]:
    """One outage: returns (dropped, old survivors: delivered rows older than the newest
    dropped one)."""
    endpoint.down, endpoint.delivered = True, []
    endpoint.delay = rng.uniform(0.05, 0.3)
    row_size = len(event(0).event) + ROW_OVERHEAD
    store = Store(str(tmp / "queue.db"), "process_crash", max_size=row_size * 60,
                  overflow="drop_oldest")
    await store.start()
    webhook = WebhookConfig(name="w", url=f"http://127.0.0.1:{endpoint.port}/ingest",
                            allow_insecure_http=True, concurrency=CONCURRENCY,
                            failure_limit=0, retry=RetryConfig(initial=0.01, max=0.05))
    sender = Sender(webhook)
    await sender.start()
    worker = WebhookWorker(webhook, store, sender, Renderer(webhook, USER_AGENT))
    try:
        # Some rows queued before the worker starts (it reads them ahead), the rest
        # arriving in commit groups while the first slow 503s are in flight.
        head = rng.randint(0, 50)
        await store.enqueue([event(n) for n in range(head)])
        worker.task = asyncio.create_task(worker.run())
        seq = head
        while seq < PUBLISHED:
            group = min(rng.randint(1, 12), PUBLISHED - seq)
            await store.enqueue([event(n) for n in range(seq, seq + group)])
            seq += group
        assert store.bytes_queued <= store.max_size
        endpoint.down = False
        await wait_for(lambda: PUBLISHED - 1 in endpoint.delivered, 20, "the newest message")

        def drained() -> bool:
            return not worker._tasks and store.bytes_queued == 0

        await wait_for(drained, 20, "the queue to drain")
        # Every lease came back to the store: none held for a row that is gone.
        await wait_for(lambda: not store.leases.ids(), 5, "the last leases to end")
    finally:
        await worker.stop(5)
        if worker.task is not None:
            worker.task.cancel()
        await sender.close()
        await store.close()
    delivered = set(endpoint.delivered)
    dropped = counted_drops(store.path)
    assert len(delivered) + dropped == PUBLISHED, (len(delivered), dropped)
    lost = set(range(PUBLISHED)) - delivered
    survivors = [s for s in delivered if lost and s < max(lost)]
    return dropped, len(survivors)


async def test_drop_oldest_under_an_outage_with_prefetch_20_runs(tmp_path: Path) -> None:
    endpoint = Outage()
    await endpoint.start()
    try:
        results = []
        for run in range(20):
            directory = tmp_path / f"run{run}"
            directory.mkdir()
            results.append(await one_run(directory, endpoint, random.Random(run)))
    finally:
        await endpoint.stop()
    print("dropped per run:", [d for d, _ in results],
          "old survivors per run:", [s for _, s in results])
    # Every run dropped (the quota holds 60 of 400), and the newest were kept: a delivery
    # older than a dropped one survived only while it was on the wire at the last drop.
    assert all(dropped >= PUBLISHED - 60 - CONCURRENCY for dropped, _ in results), results
    assert max(survivors for _, survivors in results) <= CONCURRENCY, results
