"""Metrics added for operators: the process and Python runtime, build_info, attempt
counters named as attempts, and the age of the oldest queued delivery per webhook."""

from __future__ import annotations

import platform
from pathlib import Path

from aiohttp import web
from prometheus_client import generate_latest

from bridge import __version__
from bridge.metrics import Metrics

from .support import Certificates, Endpoint, Mosquitto, Publisher, wait_for
from .test_admin import hook, ready, running, sample, write_config


def test_process_platform_and_build_info() -> None:
    text = generate_latest(Metrics().registry).decode()
    lines = text.splitlines()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                 "process_open_fds", "python_gc_collections_total"):
        assert any(line.startswith(name) for line in lines), name
    assert any(line.startswith("python_info{") for line in lines)
    build = [line for line in lines if line.startswith("webhook_bridge_build_info{")]
    assert build == [f'webhook_bridge_build_info{{python="{platform.python_version()}",'
                     f'version="{__version__}"}} 1.0']
    # Attempts are named as attempts; the old name is gone.
    assert "# TYPE webhook_bridge_delivery_attempts_total counter" in text
    assert "webhook_bridge_deliveries_total" not in text


async def test_oldest_queued_age_per_webhook(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    endpoint.responder = lambda request: web.Response(status=503)
    path = write_config(tmp_path, mosquitto.port, [
        hook("down", endpoint, certs, "/down", retry={"initial": "1h", "max": "1h"}),
        hook("idle", endpoint, certs, "/idle", events=["alarm"])])
    async with running(path) as admin:
        await ready(admin)
        publisher = Publisher(mosquitto.port)
        try:
            await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])
        finally:
            publisher.close()
        await wait_for(lambda: len(endpoint.requests) == 1, what="the first (failing) attempt")

        async def aged(minimum: float) -> float | None:
            samples = await admin.samples()
            age = sample(samples, "webhook_bridge_oldest_queued_seconds", webhook="down")
            assert sample(samples, "webhook_bridge_oldest_queued_seconds", webhook="idle") == 0
            return age if age is not None and age >= minimum else None

        first = await wait_for(lambda: aged(0.0), what="an age for the waiting delivery")
        assert 0.0 <= first < 30.0
        # Refreshed at each scrape: the same delivery is older at a later scrape.
        later = await wait_for(lambda: aged(first + 0.2), what="an older age")
        assert later > first
