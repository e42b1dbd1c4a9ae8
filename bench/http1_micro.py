"""Micro-benchmark of bridge/http1.py's per-request work (issue 13: CPU per message).

Three figures, each the best and the median of ``--runs`` runs (the spread says how noisy
the machine was):

- ``parse``: a typical keep-alive response (aiohttp's 200 with a small JSON body, all in one
  read) fed to a fresh :class:`bridge.http1.ResponseParser`, plus ``Response.text()``.
- ``parse-unique``: the same, but every response head differs (an ``X-Request-Id``), as
  some endpoints send: the parsed-head memo never hits.
- ``serialise``: the head of a typical delivery request (the headers
  ``Sender.final_headers`` builds, a small JSON body) built by
  ``ConnectionPool._serialise``.
- ``loop``: CPU (``time.process_time`` of this process only: the server runs in another
  one) per ``ConnectionPool.request`` + ``Response.text()``, one POST after another on one
  keep-alive connection to a local aiohttp server on 127.0.0.1.

Also prints the Python function calls per request (cProfile: builtins included) of each.

``--compare REV`` also loads bridge/http1.py as it is at git revision REV and measures both
in the same process, alternating run by run (a shared, noisy machine hits both alike).

Run from the repository root:
``/work/main/.venv/bin/python bench/http1_micro.py [--runs 15] [--compare main] [--no-loop]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import itertools
import multiprocessing
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import http1  # noqa: E402

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: 16\r\nDate: Sat, 05 Dec 2026 09:00:00 GMT\r\n"
            b"Server: Python/3.11 aiohttp/3.9.5\r\n\r\n{\"status\": \"ok\"}")
URL = "http://127.0.0.1:8080/ingest/device-17"
HEADERS = {"Content-Type": "application/json", "User-Agent": "webhook-bridge/1.0",
           "webhook-id": "msg_2b7d5c1e9a4f4e0b", "webhook-timestamp": "1796461200",
           "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="}
BODY = b'{"topic": "sensors/17/temp", "payload": {"seq": 1, "t": 21.5}, "ts": 1796461200.1}'


def load_revision(rev: str) -> ModuleType:
    """bridge/http1.py as of git revision ``rev``, as module ``bridge._http1_<rev>``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:bridge/http1.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "http1.py"
    path.write_text(source)
    name = f"bridge._http1_{''.join(c if c.isalnum() else '_' for c in rev)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def workloads(module: Any) -> dict[str, Callable[[], object]]:
    pool = module.ConnectionPool(1, 5.0)
    target = pool._target(URL)

    def parse() -> object:
        parser = module.ResponseParser()
        parser.feed(RESPONSE)
        return parser.response.text()

    unique = [RESPONSE.replace(b"\r\n\r\n", f"\r\nX-Request-Id: {i:08x}\r\n\r\n".encode())
              for i in range(4096)]
    cycle = itertools.cycle(unique)

    def parse_unique() -> object:
        parser = module.ResponseParser()
        parser.feed(next(cycle))
        return parser.response.text()

    def serialise() -> object:
        return pool._serialise("POST", target, HEADERS, BODY)

    return {"parse": parse, "parse-unique": parse_unique, "serialise": serialise}


def calls(function: Callable[[], object], repeat: int = 1000) -> float:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeat):
        function()
    profile.disable()
    return pstats.Stats(profile).total_calls / repeat  # type: ignore[attr-defined]


def show(label: str, values: list[float]) -> None:
    print(f"  {label:22s} best {min(values):7.2f} us  median {statistics.median(values):7.2f}"
          f" us  max {max(values):7.2f} us  ({len(values)} runs)")


def serve(port: int, ready: Any) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def request_loop(modules: dict[str, Any], port: int, requests: int, runs: int
                       ) -> None:
    url = f"http://127.0.0.1:{port}/ingest/device-17"
    pools = {label: module.ConnectionPool(1, 5.0) for label, module in modules.items()}

    async def batch(pool: Any, n: int) -> None:
        for _ in range(n):
            response = await pool.request("POST", url, HEADERS, BODY)
            response.text()

    for pool in pools.values():
        await batch(pool, 200)  # warm up: connection open, caches filled
    cpu: dict[str, list[float]] = {label: [] for label in pools}
    for _ in range(runs):
        for label, pool in pools.items():
            started = time.process_time()
            await batch(pool, requests)
            cpu[label].append((time.process_time() - started) / requests * 1e6)
    for label, pool in pools.items():
        profile = cProfile.Profile()
        profile.enable()
        await batch(pool, 200)
        profile.disable()
        per_request = pstats.Stats(profile).total_calls / 200  # type: ignore[attr-defined]
        show(f"loop CPU ({label})", cpu[label])
        print(f"  {'':22s} {per_request:.0f} calls per request (cProfile, client side"
              " incl. asyncio)")
        assert pool.connections_opened == 1, "keep-alive was not used"
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--number", type=int, default=5000, help="timeit loops per run")
    parser.add_argument("--requests", type=int, default=2000, help="requests per loop run")
    parser.add_argument("--compare", metavar="REV", help="also measure http1.py at REV")
    parser.add_argument("--no-loop", action="store_true", help="skip the request loop")
    args = parser.parse_args()

    modules: dict[str, Any] = {"worktree": http1}
    if args.compare:
        modules[args.compare] = load_revision(args.compare)
    loads = {label: workloads(module) for label, module in modules.items()}
    for name in ("parse", "parse-unique", "serialise"):
        print(f"{name}:")
        times: dict[str, list[float]] = {label: [] for label in loads}
        for _ in range(args.runs):
            for label, work in loads.items():
                elapsed = timeit.timeit(work[name], number=args.number)
                times[label].append(elapsed / args.number * 1e6)
        for label, work in loads.items():
            show(label, times[label])
            print(f"  {'':22s} {calls(work[name]):.0f} calls per request (cProfile)")
    if args.no_loop:
        return

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the aiohttp server did not start")
        print("request loop:")
        asyncio.run(request_loop(modules, port, args.requests, args.runs))
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
