"""Issue 2: the whole pipeline against a real Mosquitto and real HTTPS endpoints, with the
daemon as a real subprocess (so SIGKILL is a real crash)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    Received,
    base_config,
    free_port,
    https_webhook,
    paced_publish,
    queued,
    seqs,
    started,
    wait_for,
)

ID = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_json_message_arrives_as_envelope_with_headers(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    iottly = await Endpoint(ssl_context=certs.server_context()).start()
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [
        https_webhook("cloud", endpoint, certs, "/ingest/{device_id}"),
        https_webhook("iottly", iottly, certs, "/hook", payload_only=True, channel="alerts",
                      headers={"X-Site": "plant-7", "X-Device": "{device_id}"}),
    ])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        sent_at = time.time()
        await publisher.publish_all([
            ("devices/d1/telemetry", {"temp": 21.5}),
            ("devices/d2/telemetry", {"webhook_channel": "alerts",
                                      "webhook_payload": {"alarm": "hot", "t": 88}}),
            ("devices/d3/telemetry", {"webhook_channel": "other", "webhook_payload": {"x": 1}}),
            ("devices/d4/other", {"not": "subscribed"}),
        ])
        await wait_for(lambda: len(endpoint.requests) >= 3 and len(iottly.requests) >= 1,
                       what="deliveries")
        first = next(r for r in endpoint.requests if r.path == "/ingest/d1")
        body = first.json()
        assert ID.match(body["id"]) and ISO_MS.match(body["received_at"])
        assert body == {"id": body["id"], "type": "telemetry", "source": "telemetry",
                        "topic": "devices/d1/telemetry", "device_id": "d1",
                        "received_at": body["received_at"], "labels": {},
                        "payload": {"temp": 21.5}}
        assert first.method == "POST"
        assert first.headers["Content-Type"] == "application/json"
        assert first.headers["User-Agent"].startswith("webhook-bridge/")
        assert first.headers["webhook-id"] == body["id"]
        assert abs(int(first.headers["webhook-timestamp"]) - sent_at) < 30
        hook = iottly.requests[0]
        assert hook.json() == {"alarm": "hot", "t": 88}
        assert hook.headers["X-Site"] == "plant-7" and hook.headers["X-Device"] == "d2"
        assert hook.headers["webhook-id"].startswith("evt_")
        # A sentinel published last: once it is in, d3 (other channel) and d4 (other
        # topic) would have been queued or delivered had they matched.
        await publisher.publish_all([("devices/d5/telemetry", {"webhook_channel": "alerts",
                                                         "webhook_payload": "sentinel"})])
        await wait_for(lambda: len(iottly.requests) == 2, what="the sentinel")
        await wait_for(lambda: len(endpoint.requests) == 4, what="the sentinel on cloud")
        assert [r.json() for r in iottly.requests] == [{"alarm": "hot", "t": 88}, "sentinel"]
        assert sorted(r.path for r in endpoint.requests) == [
            "/ingest/d1", "/ingest/d2", "/ingest/d3", "/ingest/d5"]
        # A delivered row is deleted by a commit that may wait briefly for company.
        await wait_for(lambda: queued(tmp_path) == 0, 5, "the delivered rows deleted")
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await iottly.stop()


async def test_outage_then_recovery_loses_nothing_and_400_is_dead_lettered(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    heal_at = time.monotonic() + 10.0

    def responder(request: Received) -> web.Response:
        if request.json()["payload"].get("poison"):
            return web.Response(status=400, text="bad reading")
        if time.monotonic() < heal_at:
            return web.Response(status=503, text="down for maintenance")
        return web.Response(status=200)

    endpoint.responder = responder
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [
        https_webhook("cloud", endpoint, certs, failure_limit=0)])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": i}) for i in range(500)])
        assert time.monotonic() < heal_at, "publishing took the whole outage"
        await wait_for(lambda: {r.json()["payload"]["seq"] for r in endpoint.requests
                                if r.status == 200} == set(range(500)),
                       60, "all 500 after the outage")
        assert any(r.status == 503 for r in endpoint.requests)
        by_seq: dict[int, set[str]] = {}
        for r in endpoint.requests:
            by_seq.setdefault(r.json()["payload"]["seq"], set()).add(r.headers["webhook-id"])
        assert all(len(ids) == 1 for ids in by_seq.values()), "a retry changed webhook-id"
        # 400: one attempt, then the dead letters (with the status and the body).
        before = len(endpoint.requests)
        await publisher.publish_all([("devices/d9/telemetry", {"poison": True})])
        await wait_for(lambda: len(endpoint.requests) > before, what="the poison request")
        await wait_for(lambda: _dead_letters(tmp_path), what="a dead letter")
        assert _dead_letters(tmp_path) == [("cloud", 400, "bad reading", 1, "HTTP 400")]
        assert len([r for r in endpoint.requests if r.json()["payload"].get("poison")]) == 1
        assert daemon.terminate() == 0
    finally:
        publisher.close()


def _dead_letters(tmp: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        return conn.execute("SELECT webhook, last_status, response, attempts, reason"
                            " FROM dead_letters").fetchall()


async def test_sigkill_while_messages_flow_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [https_webhook("cloud", endpoint, certs)])
    publisher = Publisher(mosquitto.port)
    rng = random.Random()
    daemon = Daemon(tmp_path, config).start()
    try:
        await started(daemon)
        for round_no in range(3):
            base = round_no * 2000
            # Publish at ~2,000 msg/s from a thread and SIGKILL the daemon at a random
            # moment in the middle, while messages are between the broker and the disk.
            publishing = asyncio.create_task(asyncio.to_thread(
                paced_publish, publisher, range(base, base + 2000), 2000.0))
            await wait_for(lambda b=base: len(seqs(endpoint.requests)) > b, 30,
                           "the round's first deliveries")
            await asyncio.sleep(rng.uniform(0.05, 0.6))  # the random moment, not a sync
            daemon.kill()
            await publishing
            daemon = await started(Daemon(tmp_path, config).start())
            await wait_for(lambda b=base: set(range(b, b + 2000)) <= set(
                seqs(endpoint.requests)), 90, f"every message of round {round_no}")
        assert set(seqs(endpoint.requests)) == set(range(6000))
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_messages_published_while_down_arrive_after_start(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [https_webhook("cloud", endpoint, certs)])
    daemon = await started(Daemon(tmp_path, config).start())
    assert daemon.terminate() == 0
    publisher = Publisher(mosquitto.port)
    try:
        await publisher.publish_all([("devices/d7/telemetry", {"seq": i}) for i in range(100)])
        assert endpoint.requests == []
        daemon = await started(Daemon(tmp_path, config).start())
        await wait_for(lambda: sorted(seqs(endpoint.requests)) == list(range(100)),
                       what="the messages published while down")
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_undecodable_payload_becomes_invalid_event(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    invalid = await Endpoint(ssl_context=certs.server_context()).start()
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [
        https_webhook("cloud", endpoint, certs),
        https_webhook("invalid", invalid, certs, events=["invalid"]),
    ])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", b"\xff{not json"),
                               ("devices/d1/telemetry", {"seq": 1})])
        await wait_for(lambda: invalid.requests and endpoint.requests, what="both deliveries")
        body = invalid.requests[0].json()
        assert body["type"] == "invalid" and body["device_id"] == "d1"
        assert body["payload_raw"] == "/3tub3QganNvbg=="
        assert body["decode_error"].startswith("not JSON")
        assert "payload" not in body
        assert [r.json()["payload"] for r in endpoint.requests] == [{"seq": 1}]
        assert len(invalid.requests) == 1
        assert daemon.proc.poll() is None
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await invalid.stop()


async def test_device_id_cannot_change_host_or_path_levels(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [
        https_webhook("cloud", endpoint, certs, "/api/ingest/{device_id}?d={device_id}")],
    )).start()
    publisher = Publisher(mosquitto.port)
    # A topic level cannot hold '/', '+' or '#'; the unit test below covers those.
    hostile = ["..", ".", "x@evil.com", "%2e%2e", "%2F..%2Fadmin", "a?b=c&d=e",
               "evil.com:443", "\\evil.com"]
    try:
        await started(daemon)
        await publisher.publish_all([(f"devices/{d}/telemetry", {"seq": i})
                               for i, d in enumerate(hostile)])
        await wait_for(lambda: len(endpoint.requests) >= len(hostile), what="deliveries")
        assert sorted(unquote(r.raw_path.split("/")[3].split("?")[0])
                      for r in endpoint.requests) == sorted(hostile)
        for request in endpoint.requests:
            assert request.host == f"127.0.0.1:{endpoint.port}"
            levels = request.raw_path.split("?")[0].split("/")
            assert levels[:3] == ["", "api", "ingest"] and len(levels) == 4, request.raw_path
            assert request.query.count("=") == 1 and "&" not in request.query
        assert daemon.terminate() == 0
    finally:
        publisher.close()


def test_url_placeholders_are_encoded_for_any_device_id() -> None:
    from bridge.config import WebhookConfig
    from bridge.events import Event
    from bridge.render import Renderer

    renderer = Renderer(WebhookConfig(name="w", url="https://api.example.com/i/{device_id}"
                                      "?d={device_id}"), "ua")
    for device in ["../admin", "a/b", "x@evil.com", "%2e%2e", "..", ".", "a?b#c", "@h:1/x"]:
        url = renderer.render([Event(type="t", source="s", topic="t", device_id=device)]).url
        head, _, query = url.partition("?")
        assert head.startswith("https://api.example.com/i/")
        level = head[len("https://api.example.com/i/"):]
        assert "/" not in level and level not in (".", "..") and "?" not in level
        assert "#" not in url and "&" not in query and query.count("=") == 1
        assert unquote(level) == device and unquote(query[2:]) == device


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


async def test_tls_to_the_broker(tmp_path: Path, endpoint: Endpoint,
                                 certs: Certificates) -> None:
    """The bridge reaches the broker over verified TLS (a second, plain listener is
    for the test's publisher)."""
    broker = Mosquitto(tmp_path)
    tls_port = free_port()
    server_pem, server_key = tmp_path / "broker.pem", tmp_path / "broker.key"
    certs.server.cert_chain_pems[0].write_to_path(str(server_pem))
    certs.server.private_key_pem.write_to_path(str(server_key))
    broker.conf.write_text(broker.conf.read_text() + (
        f"listener {tls_port} 127.0.0.1\ncafile {certs.ca_file}\n"
        f"certfile {server_pem}\nkeyfile {server_key}\n"))
    broker.start()
    config = base_config(tmp_path, broker, [https_webhook("cloud", endpoint, certs)])
    config["mqtt"].update(port=tls_port, tls={"ca_file": str(certs.ca_file)})
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(broker.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": n}) for n in range(5)])
        await wait_for(lambda: sorted(seqs(endpoint.requests)) == list(range(5)),
                       what="deliveries through the TLS connection")
        assert daemon.terminate() == 0
        # Without the CA the broker's certificate is refused, and the log says why.
        config["mqtt"]["tls"] = {}
        refused = Daemon(tmp_path, config).start()
        await wait_for(lambda: "certificate verify failed" in refused.output(), 20,
                       "the TLS refusal in the log")
        assert '"mqtt connected"' not in refused.output()
        assert refused.terminate() == 0
    finally:
        publisher.close()
        broker.stop()
