"""The benchmark's webhook sink: a minimal aiohttp server on 127.0.0.1 (plain HTTP).

Every request outside ``/_ctl/`` is a delivery. In ``up`` mode the sink parses the JSON
body (one event, or a batch ``{"batch_id", "result": [...]}``), records for each message
its sequence number (``payload.seq``) and its latency (arrival ``time.time()`` minus
``payload.ts``, the publisher's clock at publish), and answers 200 at once. In ``down``
mode it answers 503 without reading the body into the records. Nothing is logged per
request (``access_log=None``).

Control endpoints (used by ``bench/run.py``, never per message):

- ``POST /_ctl/mode?status=200|503`` switch up/down
- ``GET /_ctl/progress`` small JSON: distinct seqs seen, deliveries, requests
- ``GET /_ctl/stats`` everything recorded (seq list, latency list, times, counts)
- ``POST /_ctl/reset`` forget everything recorded (the mode is kept)

Run: ``python bench/sink.py --port PORT`` (uses uvloop when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

CONTROL = "/_ctl/"


class Records:
    """What the sink saw since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seqs: list[int] = []
        self.latencies: list[float] = []
        self.seen: set[int] = set()
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.probes = 0
        self.probe_requests = 0
        self.undecodable = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.last_new_at: float | None = None
        self.first_ok_at: float | None = None

    def count_request(self, status: int, now: float) -> None:
        """Count a request that carried messages (or failed); probe-only ones are not."""
        self.requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if self.first_at is None:
            self.first_at = now
        if status == 200 and self.first_ok_at is None:
            self.first_ok_at = now
        self.last_at = now

    def record_body(self, body: bytes, now: float) -> bool:
        """Record the messages of one 200 response; False when it held only probes."""
        try:
            value = json.loads(body)
        except ValueError:
            self.undecodable += 1
            return True
        items = value.get("result") if isinstance(value, dict) and "batch_id" in value else None
        probes = self.probes
        items = items if isinstance(items, list) else [value]
        for item in items:
            self.record_item(item, now)
        return self.probes - probes < len(items)

    def record_item(self, item: Any, now: float) -> None:
        payload = item.get("payload", item) if isinstance(item, dict) else None
        if not isinstance(payload, dict) or "seq" not in payload:
            self.undecodable += 1
            return
        seq = payload["seq"]
        if seq < 0:  # readiness probes from the runner
            self.probes += 1
            return
        self.seqs.append(seq)
        self.latencies.append(now - float(payload.get("ts", now)))
        if seq not in self.seen:
            self.seen.add(seq)
            self.last_new_at = now

    def progress(self) -> dict[str, Any]:
        return {"distinct": len(self.seen), "deliveries": len(self.seqs),
                "requests": self.requests, "probes": self.probes,
                "probe_requests": self.probe_requests,
                "last_new_at": self.last_new_at}

    def stats(self) -> dict[str, Any]:
        return {**self.progress(), "by_status": self.by_status,
                "undecodable": self.undecodable, "first_at": self.first_at,
                "first_ok_at": self.first_ok_at, "last_at": self.last_at,
                "seqs": self.seqs, "latencies_s": self.latencies}


class Sink:
    """The aiohttp application around :class:`Records`."""

    def __init__(self) -> None:
        self.records = Records()
        self.status = 200

    async def deliver(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        status = self.status
        if status != 200 or self.records.record_body(body, now):
            self.records.count_request(status, now)
        else:
            self.records.probe_requests += 1
        return web.Response(status=status)

    async def control(self, request: web.Request) -> web.Response:
        action = request.path[len(CONTROL):]
        if action == "mode":
            self.status = int(request.query.get("status", "200"))
            return web.json_response({"status": self.status})
        if action == "reset":
            self.records.reset()
            return web.json_response({"reset": True})
        if action == "progress":
            return web.json_response(self.records.progress())
        if action == "stats":
            return web.json_response(self.records.stats())
        return web.json_response({"error": f"unknown control {action}"}, status=404)

    async def route(self, request: web.Request) -> web.Response:
        if request.path.startswith(CONTROL):
            return await self.control(request)
        return await self.deliver(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.route)
        return app


def install_uvloop() -> str:
    """Use uvloop when it is installed; return the loop's name."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    loop_name = install_uvloop()
    print(f"sink on {args.host}:{args.port} ({loop_name})", flush=True)
    web.run_app(Sink().app(), host=args.host, port=args.port, access_log=None,
                print=None, handle_signals=True)


if __name__ == "__main__":
    main()
