"""Microbenchmark of the ingest path alone: CPU and Python calls per MQTT message.

    python bench/ingest_micro.py [--messages N] [--repeat R] [--profile] [--gap MS]
                                 [--root DIR]

Runs :meth:`bridge.ingest.Ingest.take` on ``N`` typical messages of ``bench/run.py`` (a
~200-byte JSON payload on ``bench/dev-{k}/data`` for 10 known devices, QoS 1, source
``format: json`` with the default fixed type, one webhook taking every event) against a
real :class:`bridge.store.Store` in a fresh temp dir. The commit window is an hour and the
event loop is not entered while messages are timed, so only the Python path from the parsed
message to the store's enqueue is measured (no commit, no thread, no wake-up): every
``GROUP`` messages (one commit's worth at 30 msg/s) are committed, untimed.
``time.process_time`` per message, one figure per round, and the median and spread over
the rounds.

``--gap MS`` sleeps before each message (not timed): every message starts a new
millisecond (a fresh id) after the CPU did something else, as at 30 msg/s.

``--profile`` runs one more round under cProfile and prints the calls per message and
the functions of the path. ``--root DIR`` imports ``bridge`` from another checkout (an
A/B: ``git archive <commit> bridge | tar -x -C /tmp/old``).

One JSON line on stdout: ``us_per_msg`` (each round), ``median``, ``min``, ``max``,
``calls_per_msg`` (with ``--profile``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 10
PAYLOAD_BYTES = 200
GROUP = 30  # messages a commit stores: 1 s of the commit window at 30 msg/s


def payload(seq: int, device: str) -> bytes:
    """As bench/run.py: seq, ts, device, padding (~200 bytes)."""
    head = f'{{"seq": {seq}, "ts": {time.time()!r}, "device": "{device}", "pad": "'
    return (head + "x" * max(0, PAYLOAD_BYTES - len(head) - 2) + '"}').encode()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.config import SourceConfig, WebhookConfig
    from bridge.ingest import Ingest
    from bridge.metrics import Metrics
    from bridge.registry import Registry
    from bridge.rules import RuleSet
    from bridge.sources.decode import SourceDecoder
    from bridge.sources.mqtt import Message
    from bridge.store import Store

    source = SourceConfig(name="bench", topic="bench/{device_id}/data", qos=1, format="json")
    hook = WebhookConfig(name="sink", url="http://127.0.0.1:1/ingest/{device_id}")
    with tempfile.TemporaryDirectory(prefix="wb-ingest-") as tmp:
        store = Store(str(Path(tmp) / "q.db"), "process_crash", commit_window=3600.0)
        await store.start()
        ingest = Ingest([SourceDecoder(source)], RuleSet((hook,)), Registry(), store,
                        Metrics(), backpressure=False)
        seq = 0

        def messages(n: int) -> list[Any]:
            nonlocal seq
            out = []
            for _ in range(n):
                seq += 1
                device = f"dev-{seq % DEVICES}"
                out.append(Message(f"bench/{device}/data", payload(seq, device), 1, False,
                                   None, seq % 65535 + 1))
            return out

        async def commit(future: Any) -> None:
            store._wake.set()  # type: ignore[union-attr]
            await future  # the writer thread is idle again before the next round

        async def take(batch: list[Any]) -> float:
            spent = 0.0
            for at in range(0, len(batch), GROUP):
                if args.gap:  # each message on its own, as at a low rate
                    for message in batch[at:at + GROUP]:
                        time.sleep(args.gap / 1000)
                        start = time.process_time()
                        future = ingest.take(message)
                        spent += time.process_time() - start
                else:
                    start = time.process_time()
                    for message in batch[at:at + GROUP]:
                        future = ingest.take(message)
                    spent += time.process_time() - start
                await commit(future)
            return spent

        await take(messages(200))  # the devices are known, the counters made
        rounds = []
        for _ in range(args.repeat):
            batch = messages(args.messages)
            rounds.append(await take(batch) / len(batch) * 1e6)
        import bridge

        result: dict[str, Any] = {
            "bridge": str(Path(bridge.__file__).parent), "messages": args.messages,
            "us_per_msg": [round(r, 2) for r in rounds],
            "median": round(statistics.median(rounds), 2), "min": round(min(rounds), 2),
            "max": round(max(rounds), 2)}
        if args.profile:
            batch = messages(args.messages)
            profile = cProfile.Profile()
            for at in range(0, len(batch), GROUP):
                profile.enable()
                for message in batch[at:at + GROUP]:
                    future = ingest.take(message)
                profile.disable()
                await commit(future)
            stats = pstats.Stats(profile)
            calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
            result["calls_per_msg"] = round(calls / len(batch), 2)
            stats.sort_stats("cumulative").print_stats(80)
        await store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gap", type=float, default=0.0,
                        help="ms slept before each message (untimed): a new millisecond, "
                             "cold caches, as at a low rate")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
