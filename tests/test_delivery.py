"""Issue 3: the delivery engine (retry policy, auto-disable, backoff probes, quota,
ordering, batching, broker restarts) against a real Mosquitto and real HTTPS endpoints,
with the daemon as a subprocess and the CLI as the operator would use it."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

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
    retained,
    seqs,
    started,
    wait_for,
)


def status(daemon: Daemon, name: str) -> dict[str, Any]:
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return next(w for w in json.loads(result.stdout)["webhooks"] if w["name"] == name)


def queue_bytes(tmp: Path) -> int:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        return conn.execute("SELECT COALESCE(SUM(size), 0) FROM deliveries").fetchone()[0]


def telemetry(device: str, seqs_: range) -> list[tuple[str, dict[str, Any]]]:
    return [(f"devices/{device}/telemetry", {"seq": n}) for n in seqs_]


async def test_retry_after_is_honoured(tmp_path: Path, mosquitto: Mosquitto,
                                       endpoint: Endpoint, certs: Certificates) -> None:
    endpoint.responder = lambda r: (
        web.Response(status=429, headers={"Retry-After": "3"}) if len(endpoint.requests) == 1
        else web.Response(status=200))
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [
        https_webhook("cloud", endpoint, certs)])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(1)))
        await wait_for(lambda: len(endpoint.requests) == 2, 15, "the retry")
        first, second = endpoint.requests
        assert second.at - first.at >= 3.0
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        assert status(daemon, "cloud")["consecutive_failures"] == 0  # 429 never counts
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_failure_limit_disables_then_enable_drains(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    healthy = False
    endpoint.responder = lambda r: web.Response(status=200 if healthy else 500, text="boom")
    client_id = f"wb-{tmp_path.name}"
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [https_webhook(
        "cloud", endpoint, certs, failure_limit=3, concurrency=1)])).start()
    publisher = Publisher(mosquitto.port)
    topic = f"webhook-bridge/{client_id}/webhooks/cloud/status"
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(5)))
        await wait_for(lambda: status(daemon, "cloud")["state"] == "DISABLED_DUE_TO_ERRORS",
                       20, "the webhook to be disabled")
        assert len(endpoint.requests) == 3
        assert {r.json()["payload"]["seq"] for r in endpoint.requests} == {0}
        row = status(daemon, "cloud")
        assert row["queued"] == 5 and row["consecutive_failures"] == 3
        assert row["last_error"].startswith("3 consecutive failures (failure_limit 3)")
        notice = json.loads(retained(mosquitto.port, topic) or b"{}")
        assert notice["webhook"] == "cloud" and notice["status"] == "DISABLED_DUE_TO_ERRORS"
        await publisher.publish_all(telemetry("d1", range(5, 8)))
        await wait_for(lambda: status(daemon, "cloud")["queued"] == 8, what="8 queued")
        assert len(endpoint.requests) == 3  # nothing is sent while disabled
        healthy = True
        result = daemon.cli("enable", "cloud")
        assert result.returncode == 0 and result.stdout.strip() == "cloud: ENABLED"
        await wait_for(lambda: sorted(set(seqs(endpoint.requests))) == list(range(8)), 20,
                       "the backlog after enable")
        await wait_for(lambda: json.loads(retained(mosquitto.port, topic) or b"{}").get(
            "status") == "ENABLED", what="the ENABLED notice")
        assert status(daemon, "cloud")["queued"] == 0
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_unreachable_endpoint_never_disables(
        tmp_path: Path, mosquitto: Mosquitto, certs: Certificates) -> None:
    endpoint = Endpoint(ssl_context=certs.server_context(), port=free_port())
    webhook = https_webhook("cloud", endpoint, certs, failure_limit=3)
    webhook["retry"] = {"initial": "50ms", "max": "200ms"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [webhook])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(20)))
        # Connection refused many times the failure limit: still enabled.
        await wait_for(lambda: status(daemon, "cloud")["attempts"] >= 15, 30,
                       "15 refused attempts")
        row = status(daemon, "cloud")
        assert row["state"] == "ENABLED" and row["consecutive_failures"] == 0
        assert row["last_error"].startswith("connection failed")
        await endpoint.start()
        await wait_for(lambda: sorted(set(seqs(endpoint.requests))) == list(range(20)), 20,
                       "delivery once the endpoint is up")
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await endpoint.stop()


async def test_outage_sees_one_probe_at_a_time_then_everything_arrives(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    heal_at = [float("inf")]
    active = [0]
    overlap_after_first_failure: list[int] = []

    async def responder(request: Received) -> web.Response:
        active[0] += 1
        try:
            failing = time.monotonic() < heal_at[0]
            if failing and len(endpoint.requests) > 4:
                overlap_after_first_failure.append(active[0])
            await asyncio.sleep(0.02)  # an endpoint that takes a moment to answer
            return web.Response(status=503 if failing else 200)
        finally:
            active[0] -= 1

    endpoint.responder = responder
    webhook = https_webhook("cloud", endpoint, certs, failure_limit=0, concurrency=4)
    webhook["retry"] = {"initial": "200ms", "max": "2s"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [webhook])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        heal_at[0] = time.monotonic() + 10.0
        await publisher.publish_all(telemetry("d1", range(1000)))
        await wait_for(lambda: time.monotonic() > heal_at[0], 15, "the outage to end")
        during = sum(1 for r in endpoint.requests if r.status == 503)
        # At most the first concurrent burst, then one probe per backoff step (a step is
        # at most 2 s and on average far less, so ~10-40 in 10 s), never one per event.
        assert 2 <= during <= 80, during
        assert overlap_after_first_failure and max(overlap_after_first_failure) == 1
        await wait_for(lambda: {r.json()["payload"]["seq"] for r in endpoint.requests
                                if r.status == 200} == set(range(1000)), 60, "all 1000")
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_quota_drop_oldest_counts_every_drop(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    down = [True]
    endpoint.responder = lambda r: web.Response(status=503 if down[0] else 200)
    config = base_config(tmp_path, mosquitto, [https_webhook("cloud", endpoint, certs,
                                                             failure_limit=0)])
    config["store"].update(max_size="200KB", overflow="drop_oldest")
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(2000)))
        await wait_for(lambda: status(daemon, "cloud")["dropped"] > 0, what="drops")
        assert queue_bytes(tmp_path) <= 200 * 1024
        down[0] = False
        await wait_for(lambda: queued(tmp_path) == 0, 60, "the queue to drain")
        delivered = sorted(set(seqs([r for r in endpoint.requests if r.status == 200])))
        row = status(daemon, "cloud")
        assert row["dropped"] == 2000 - len(delivered)
        assert row["delivered"] == len(delivered)
        # The newest survive (a few old ones a worker held as probes may survive too).
        assert set(range(2000 - len(delivered) + 40, 2000)) <= set(delivered)
        log = daemon.output()
        assert log.count("dropping the oldest deliveries") == 1  # once per burst
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_quota_backpressure_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    down = [True]
    endpoint.responder = lambda r: web.Response(status=503 if down[0] else 200)
    config = base_config(tmp_path, mosquitto, [https_webhook("cloud", endpoint, certs,
                                                             failure_limit=0)])
    config["store"].update(max_size="100KB", overflow="backpressure")
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(2000)))
        await wait_for(lambda: "holding MQTT acknowledgements" in daemon.output(),
                       what="backpressure")
        assert queue_bytes(tmp_path) <= 100 * 1024
        assert status(daemon, "cloud")["dropped"] == 0
        down[0] = False
        await wait_for(lambda: set(seqs([r for r in endpoint.requests if r.status == 200]))
                       == set(range(2000)), 90, "all 2000 after the outage")
        assert status(daemon, "cloud")["dropped"] == 0
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_ordered_keeps_each_device_in_order_through_failures(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    rng = random.Random(3)
    endpoint.responder = lambda r: web.Response(status=500 if rng.random() < 0.3 else 200)
    webhook = https_webhook("cloud", endpoint, certs, failure_limit=0, concurrency=4,
                            ordered=True)
    webhook["retry"] = {"initial": "10ms", "max": "50ms"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [webhook])).start()
    publisher = Publisher(mosquitto.port)
    devices = ["d1", "d2", "d3"]
    try:
        await started(daemon)
        await publisher.publish_all([item for n in range(50) for d in devices
                                     for item in telemetry(d, range(n, n + 1))])
        await wait_for(lambda: sum(1 for r in endpoint.requests if r.status == 200) >= 150,
                       60, "all 150 deliveries")
        assert any(r.status == 500 for r in endpoint.requests)
        for device in devices:
            attempts = [r.json()["payload"]["seq"] for r in endpoint.requests
                        if r.json()["device_id"] == device]
            ok = [r.json()["payload"]["seq"] for r in endpoint.requests
                  if r.json()["device_id"] == device and r.status == 200]
            assert ok == list(range(50)), device
            assert attempts == sorted(attempts), device  # a retry never jumps back
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_batches_have_the_zerynth_shape_and_keep_their_id(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    endpoint.responder = lambda r: web.Response(status=503 if len(endpoint.requests) == 1
                                                else 200)
    webhook = https_webhook("cloud", endpoint, certs, concurrency=1,
                            batch={"max_events": 10, "max_wait": "500ms"})
    webhook["retry"] = {"initial": "10ms", "max": "50ms"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [webhook])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(25)))
        await wait_for(lambda: sum(1 for r in endpoint.requests if r.status == 200) == 3, 20,
                       "three batches")
        failed, *good = endpoint.requests
        assert [len(r.json()["result"]) for r in good] == [10, 10, 5]
        assert failed.json() == good[0].json()  # the retry is the same batch
        assert failed.headers["webhook-id"] == good[0].headers["webhook-id"]
        for request in good:
            body = request.json()
            assert set(body) == {"batch_id", "result"}
            assert body["batch_id"].startswith("bat_")
            assert request.headers["webhook-id"] == body["batch_id"]
            assert [item["id"] for item in body["result"]] == [
                str(i) for i in range(len(body["result"]))]
            assert all(item["event_id"].startswith("evt_") and item["device_id"] == "d1"
                       for item in body["result"])
        assert [item["payload"]["seq"] for r in good for item in r.json()["result"]] == list(
            range(25))
        assert len({r.json()["batch_id"] for r in good}) == 3
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_broker_restart_mid_stream_loses_nothing(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    broker = Mosquitto(tmp_path, persistence=True).start()
    daemon = Daemon(tmp_path, base_config(tmp_path, broker, [
        https_webhook("cloud", endpoint, certs)])).start()
    publisher = Publisher(broker.port)
    try:
        await started(daemon)
        # The broker restarts mid-stream: the publisher's acknowledgements are awaited
        # after it is back.
        publishing = asyncio.create_task(asyncio.to_thread(
            paced_publish, publisher, range(2000), 1000.0, wait=False))
        await wait_for(lambda: len(endpoint.requests) > 300, 30, "the stream to flow")
        broker.stop()  # graceful: Mosquitto saves its sessions and queues
        broker.start()
        infos = await publishing
        # paho resends what the broker had not acknowledged once it reconnects.
        await wait_for(lambda: all(broker_acked(i) for i in infos), 60,
                       "the publisher's messages to be acknowledged")
        await wait_for(lambda: set(seqs(endpoint.requests)) == set(range(2000)), 60,
                       "every message after the broker restart")
        assert daemon.output().count('"mqtt connected"') >= 2
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        broker.stop()


def broker_acked(info: Any) -> bool:
    with info._condition:
        return bool(info._published)


async def test_dead_letter_commands(tmp_path: Path, mosquitto: Mosquitto,
                                    endpoint: Endpoint, certs: Certificates) -> None:
    reject = [True]
    endpoint.responder = lambda r: web.Response(status=422 if reject[0] else 200,
                                                text="unprocessable reading")
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [https_webhook(
        "cloud", endpoint, certs, failure_limit=0)])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(3)))
        await wait_for(lambda: status(daemon, "cloud")["dead"] == 3, what="3 dead letters")
        listed = json.loads(daemon.cli("dead", "list", "--json", "--webhook", "cloud").stdout)
        assert [(d["last_status"], d["attempts"], d["reason"], d["response"])
                for d in listed] == [(422, 1, "HTTP 422", "unprocessable reading")] * 3
        # Each letter names the webhook-id the endpoint saw; status says why they died.
        assert sorted(d["webhook_id"] for d in listed) == sorted(
            r.headers["webhook-id"] for r in endpoint.requests)
        assert status(daemon, "cloud")["last_error"] == "dead letter: HTTP 422"
        unknown = daemon.cli("dead", "show", "424242")
        assert (unknown.returncode, unknown.stderr) == (
            1, "webhook-bridge: no dead letter with id 424242; webhook-bridge dead list "
               "shows them\n")
        shown = json.loads(daemon.cli("dead", "show", str(listed[0]["id"])).stdout)
        assert [d["id"] for d in shown] == [listed[0]["id"]]
        assert shown[0]["event"]["id"] == listed[0]["event_id"]
        assert shown[0]["event"]["payload"]["seq"] in {0, 1, 2}
        text = daemon.cli("dead", "list").stdout
        assert "HTTP 422 / unprocessable reading" in text and "3 dead letters" in text
        reject[0] = False
        replay = daemon.cli("dead", "replay", "--webhook", "cloud", "--since", "1h")
        assert replay.stdout.strip() == "re-queued 3 dead letters"
        await wait_for(lambda: sorted(seqs([r for r in endpoint.requests if r.status == 200]))
                       == [0, 1, 2], 10, "the replayed deliveries (within a second or two)")
        # A replayed delivery keeps its event id (the receiver can deduplicate).
        assert {r.headers["webhook-id"] for r in endpoint.requests if r.status == 200} == {
            r.headers["webhook-id"] for r in endpoint.requests if r.status == 422}
        assert json.loads(daemon.cli("dead", "list", "--json").stdout) == []
        reject[0] = True
        await publisher.publish_all(telemetry("d1", range(3, 4)))
        await wait_for(lambda: status(daemon, "cloud")["dead"] == 1, what="a new dead letter")
        assert daemon.cli("dead", "purge").returncode == 1  # refuses without a filter
        assert daemon.cli("dead", "purge", "--all").stdout.strip() == "purged 1 dead letter"
        assert status(daemon, "cloud")["dead"] == 0
        assert daemon.terminate() == 0
    finally:
        publisher.close()


async def test_pause_holds_with_concurrency_and_retry_after(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    endpoint.responder = lambda r: web.Response(status=503, headers={"Retry-After": "1"})
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, [https_webhook(
        "cloud", endpoint, certs, failure_limit=3, concurrency=4)])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all(telemetry("d1", range(10)))
        await wait_for(lambda: status(daemon, "cloud")["state"] == "DISABLED_DUE_TO_ERRORS",
                       20, "the webhook to be disabled")
        sent = len(endpoint.requests)
        times = [r.at for r in endpoint.requests]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
        steps = [b for a, b in itertools.pairwise(times) if b - a >= 0.95]
        # One burst of at most `concurrency` requests (however spread out a loaded machine
        # sends them before the first answer), then one probe per backoff step, each at
        # least Retry-After after the request before it, and nothing beside the probes.
        assert steps == times[-2:], gaps
        assert 1 <= len(times) - 2 <= 4, gaps
        assert status(daemon, "cloud")["consecutive_failures"] == 3
        await publisher.publish_all(telemetry("d1", range(10, 11)))
        await wait_for(lambda: status(daemon, "cloud")["queued"] == 11, what="11 queued")
        assert len(endpoint.requests) == sent  # nothing goes out once disabled
        assert daemon.terminate() == 0
    finally:
        publisher.close()
