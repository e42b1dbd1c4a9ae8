"""Micro-benchmark of one delivery attempt around the HTTP request (no network).

Per message, as :meth:`bridge.dispatch.WebhookWorker._attempt_rows` does it on the common
path: ``Renderer.render_stored`` (URL with ``{device_id}``, static headers), ``Sender.send``
(final headers, optional signing, a 200 answer from a stub pool, classification,
redaction) and the per-attempt metrics (delivery counter, duration histogram, activity).
The stub pool answers at once, so the coroutine is driven without an event loop.

    python bench/render_micro.py [--messages N] [--runs R] [--signing] [--profile]

Prints CPU microseconds per message (time.process_time) for each run, then the median
and spread; ``--profile`` prints cProfile's function calls per message instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

# --tree DIR: the bridge package of another checkout (a before/after comparison).
_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv else None
sys.path.insert(0, _TREE or str(Path(__file__).resolve().parent.parent))

from bridge import http1  # noqa: E402
from bridge.config import SigningConfig, WebhookConfig  # noqa: E402
from bridge.delivery import USER_AGENT, Sender  # noqa: E402
from bridge.metrics import Metrics  # noqa: E402
from bridge.render import Renderer  # noqa: E402
from bridge.signing import SecretKeeper  # noqa: E402


class _Pool:
    """Answers every request with 200 and an empty body, at once."""

    def __init__(self) -> None:
        headers = http1.Headers()
        headers.add("Content-Length", "0")
        headers.add("Date", "Sat, 05 Dec 2026 09:00:00 GMT")
        self.response = http1.Response(200, "OK", "HTTP/1.1", headers)

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes
                      ) -> http1.Response:
        return self.response


def _drive(coro):  # type: ignore[no-untyped-def]
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the stub pool suspended")


def make(signing: bool, state_dir: str):  # type: ignore[no-untyped-def]
    webhook = WebhookConfig(
        name="bench", url="http://127.0.0.1:8080/ingest/{device_id}?src=bridge",
        headers={"X-Source": "webhook-bridge", "X-Tenant": "acme"},
        signing=SigningConfig("standard-webhooks", "whsec_" + "QUJD" * 8) if signing else None)
    renderer = Renderer(webhook, USER_AGENT)
    sender = Sender(webhook, SecretKeeper(state_dir) if signing else None)
    sender.pool = _Pool()  # type: ignore[assignment]
    return webhook, renderer, sender, Metrics()


def one_run(messages: int, signing: bool, state_dir: str) -> float:
    webhook, renderer, sender, metrics = make(signing, state_dir)
    name = webhook.name
    event = b'{"id":"evt_0123456789abcdef","type":"telemetry","device_id":"dev-042",' \
            b'"payload":{"t":21.5}}'
    devices = [f"dev-{i:03d}" for i in range(100)]
    recorder = metrics.attempts(name) if hasattr(metrics, "attempts") else None
    ids = [f"evt_{i:016x}" for i in range(messages)]
    started = time.process_time()
    for i in range(messages):
        request = renderer.render_stored(event, devices[i % 100])
        outcome = _drive(sender.send(request, ids[i]))
        if recorder is not None:
            recorder.record(ids[i], outcome, 1)
        else:  # a tree before Metrics.attempts()
            metrics.deliveries.labels(name, outcome.kind).inc(1)
            metrics.attempt_seconds.labels(name).observe(outcome.elapsed)
            metrics.activity.record(name, ids[i], outcome, 1)
    return (time.process_time() - started) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--signing", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tree", help="import bridge from this checkout instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state_dir:
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            one_run(args.messages, args.signing, state_dir)
            profile.disable()
            stats = pstats.Stats(profile)
            calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
            print(f"function calls per message: {calls / args.messages:.1f}")
            stats.sort_stats("tottime").print_stats(25)
            return
        one_run(2000, args.signing, state_dir)  # warm-up
        results = [one_run(args.messages, args.signing, state_dir) for _ in range(args.runs)]
    print("us/msg per run:", " ".join(f"{r:.2f}" for r in results))
    print(f"median {statistics.median(results):.2f} us/msg, min {min(results):.2f}, "
          f"max {max(results):.2f} (runs={args.runs}, messages={args.messages}, "
          f"signing={args.signing})")


if __name__ == "__main__":
    main()
