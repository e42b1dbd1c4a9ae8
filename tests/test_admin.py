"""The admin HTTP server (SPEC §7) in-process against a real Bridge, a real Mosquitto and a
real HTTPS endpoint: health, readiness, metrics, and the webhook REST API end to end."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.admin import AdminServer
from bridge.config import ConfigError, load_config, webhook_from_mapping
from bridge.daemon import Bridge

from .support import Certificates, Endpoint, Mosquitto, Publisher, free_port, wait_for

TOKEN = "admin-token-0123456789abcdef"
API = "/api/v1/webhooks"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def write_config(tmp: Path, mqtt_port: int, webhooks: list[dict[str, Any]],
                 token: str | None = TOKEN) -> Path:
    admin: dict[str, Any] = {"listen": None}  # the test starts its own AdminServer
    if token is not None:
        admin["token"] = token
    config = {
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": f"wb-{tmp.name}",
                 "keepalive": 5},
        "store": {"path": str(tmp / "state" / "queue.db")},
        "admin": admin,
        "log": {"format": "json", "level": "info"},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry",
                     "qos": 1, "format": "json"}],
        "webhooks": webhooks,
    }
    path = tmp / "etc" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def hook(name: str, endpoint: Endpoint, certs: Certificates, path: str,
         **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": endpoint.url + path, "tls": {"ca_file": str(certs.ca_file)},
            "retry": {"initial": "100ms", "max": "1s"}, **extra}


@dataclass
class Admin:
    bridge: Bridge
    server: AdminServer
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, path, json=body, data=raw,
                                        headers=headers) as response:
            text = await response.text()
            if response.status == 204:
                assert text == ""
                return 204, None
            assert response.content_type == "application/json", text
            return response.status, await response.json()

    async def samples(self) -> Samples:
        async with self.session.get("/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await response.text()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@contextlib.asynccontextmanager
async def running(config_path: Path) -> AsyncIterator[Admin]:
    bridge = Bridge(load_config(str(config_path)))
    await bridge.start()
    server = AdminServer(bridge, listen="127.0.0.1:0")
    await server.start()
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}")
    try:
        yield Admin(bridge, server, session)
    finally:
        await session.close()
        await server.stop()
        await bridge.stop()


async def ready(admin: Admin) -> None:
    await wait_for(lambda: admin.bridge.ready, what="the bridge to connect to the broker")


def conf_d(config_path: Path, name: str) -> Path:
    return config_path.parent / "conf.d" / f"{name}.yaml"


# -- health, readiness, metrics ---------------------------------------------------------

async def test_health_and_readiness_follow_the_broker(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: the bridge cannot connect
    async with running(write_config(tmp_path, closed, [])) as admin:
        assert await admin.call("GET", "/healthz", token=None) == (200, {"status": "ok"})
        assert await admin.call("GET", "/readyz", token=None) == (
            503, {"ready": False, "mqtt": False, "store": True})
        broker = Mosquitto(tmp_path)
        broker.port = closed
        broker.conf.write_text(f"listener {closed} 127.0.0.1\nallow_anonymous true\n")
        broker.start()
        try:
            # The source retries with a backoff of at most 30 s.
            await wait_for(lambda: admin.bridge.ready, timeout=40, what="the reconnect")
            assert await admin.call("GET", "/readyz", token=None) == (
                200, {"ready": True, "mqtt": True, "store": True})
        finally:
            broker.stop()


async def test_metrics_count_messages_events_and_deliveries(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port,
                        [hook("cloud", endpoint, certs, "/ingest/{device_id}")])
    async with running(path) as admin:
        await ready(admin)
        publisher = Publisher(mosquitto.port)
        try:
            await publisher.publish_all([(f"devices/d{i}/telemetry", {"seq": i})
                                         for i in range(3)])
        finally:
            publisher.close()
        await wait_for(lambda: len(endpoint.requests) == 3, what="3 deliveries")
        assert sorted(r.path for r in endpoint.requests) == [
            "/ingest/d0", "/ingest/d1", "/ingest/d2"]

        async def settled() -> Samples | None:
            samples = await admin.samples()
            delivered = sample(samples, "webhook_bridge_delivery_attempts_total",
                               webhook="cloud", outcome="delivered")
            depth = sample(samples, "webhook_bridge_queue_depth", webhook="cloud")
            return samples if delivered == 3 and depth == 0 else None

        samples = await wait_for(settled, what="the delivered counter and an empty queue")
        assert sample(samples, "webhook_bridge_messages_received_total") == 3
        assert sample(samples, "webhook_bridge_messages_accepted_total") == 3
        assert sample(samples, "webhook_bridge_messages_rejected_total") == 0
        assert sample(samples, "webhook_bridge_events_total",
                      source="telemetry", type="telemetry") == 3
        assert sample(samples, "webhook_bridge_attempt_duration_seconds_count",
                      webhook="cloud") == 3
        assert sample(samples, "webhook_bridge_queue_bytes") == 0
        assert sample(samples, "webhook_bridge_dead_letters", webhook="cloud") == 0
        assert sample(samples, "webhook_bridge_mqtt_connected") == 1
        assert {state: sample(samples, "webhook_bridge_webhook_state", webhook="cloud",
                              state=state)
                for state in ("ENABLED", "DISABLED", "DISABLED_DUE_TO_ERRORS")} == {
            "ENABLED": 1, "DISABLED": 0, "DISABLED_DUE_TO_ERRORS": 0}


# -- authentication ---------------------------------------------------------------------

async def test_api_needs_the_bearer_token(tmp_path: Path) -> None:
    async with running(write_config(tmp_path, free_port(), [])) as admin:
        for token in (None, "wrong-token", TOKEN + "x", ""):
            async with admin.session.get(
                    API, headers={} if token is None else {"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="webhook-bridge"'
                assert (await response.json())["error"].startswith("missing or wrong bearer")
        async with admin.session.get(API, headers={"Authorization": f"Basic {TOKEN}"}) as r:
            assert r.status == 401
        # Unknown API paths answer 401 too: nothing about the API shows without the token.
        assert (await admin.call("GET", API + "/nope/x", token=None))[0] == 401
        assert await admin.call("GET", API) == (200, {"webhooks": []})
        assert await admin.call("GET", "/healthz", token=None) == (200, {"status": "ok"})


async def test_api_is_refused_without_a_configured_token(tmp_path: Path) -> None:
    async with running(write_config(tmp_path, free_port(), [], token=None)) as admin:
        for method, path in (("GET", API), ("POST", API), ("DELETE", API + "/x")):
            status, body = await admin.call(method, path, token="anything")
            assert status == 403
            assert body == {"error": "the admin API is disabled because no token is "
                            "configured; set admin.token_file to a file holding a long "
                            "random token"}


# -- the webhook REST API ---------------------------------------------------------------

def expected_api_hook(endpoint: Endpoint, certs: Certificates, path: str,
                      **fields: Any) -> dict[str, Any]:
    return {"name": "api-hook", "url": endpoint.url + path, "description": "made by the API",
            "headers": {"X-Site": "plant-7"}, "auth": {"type": "bearer", "token": "***"},
            "tls": {"ca_file": str(certs.ca_file)}, "retry": {"initial": "100ms", "max": "1s"},
            "status": "ENABLED", "source": "api", "failureLimit": 10, "attemptCount": 0,
            "lastTriggeredTs": None, "queued": 0, "inFlight": 0, "delivered": 0, "failed": 0,
            "dead": 0, "consecutiveFailures": 0, "lastError": None, **fields}


async def test_create_deliver_update_delete(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port, [hook("cloud", endpoint, certs, "/cloud")])
    publisher = Publisher(mosquitto.port)
    async with running(path) as admin:
        await ready(admin)
        before = int(time.time() * 1000)
        status, created = await admin.call("POST", API, hook(
            "api-hook", endpoint, certs, "/a/{device_id}", description="made by the API",
            headers={"X-Site": "plant-7"}, auth={"type": "bearer", "token": "s3cret-api"}))
        after = int(time.time() * 1000)
        assert status == 201, created
        assert before <= created["createdAt"] <= after
        assert created == expected_api_hook(endpoint, certs, "/a/{device_id}",
                                            createdAt=created["createdAt"],
                                            lastModifiedTs=created["lastModifiedTs"])
        assert await admin.call("GET", API + "/api-hook") == (200, created)

        # The conf.d file: private, the real secret, and what the loader reads back.
        file = conf_d(path, "api-hook")
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600
        assert yaml.safe_load(file.read_text()) == {"webhooks": [{
            "name": "api-hook", "url": endpoint.url + "/a/{device_id}",
            "description": "made by the API", "headers": {"X-Site": "plant-7"},
            "auth": {"type": "bearer", "token": "s3cret-api"},
            "tls": {"ca_file": str(certs.ca_file)}, "retry": {"initial": "100ms", "max": "1s"},
        }]}

        status, listed = await admin.call("GET", API)
        assert status == 200
        assert [(w["name"], w["source"]) for w in listed["webhooks"]] == [
            ("cloud", "config"), ("api-hook", "api")]

        # It delivers, with its auth and headers.
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])
        await wait_for(lambda: [r.path for r in endpoint.requests if r.path.startswith("/a/")],
                       what="the API webhook's delivery")
        first = next(r for r in endpoint.requests if r.path.startswith("/a/"))
        assert (first.path, first.headers["Authorization"], first.headers["X-Site"]) == (
            "/a/d1", "Bearer s3cret-api", "plant-7")
        assert first.json()["payload"] == {"seq": 1}

        async def counted() -> dict[str, Any] | None:
            body = (await admin.call("GET", API + "/api-hook"))[1]
            return body if body["delivered"] == 1 else None

        got = await wait_for(counted, what="the delivery to be counted")
        assert (got["attemptCount"], got["lastError"], got["queued"]) == (1, None, 0)
        assert got["lastTriggeredTs"] >= before

        # PUT what GET gave, with a new path: read-only fields and "***" are accepted, and
        # the secret is kept.
        status, updated = await admin.call("PUT", API + "/api-hook",
                                           {**got, "url": endpoint.url + "/b/{device_id}"})
        assert status == 200, updated
        assert updated["url"] == endpoint.url + "/b/{device_id}"
        assert updated["auth"] == {"type": "bearer", "token": "***"}
        assert updated["lastModifiedTs"] >= got["lastModifiedTs"]
        saved = yaml.safe_load(file.read_text())["webhooks"][0]
        assert (saved["url"], saved["auth"]) == (
            endpoint.url + "/b/{device_id}", {"type": "bearer", "token": "s3cret-api"})

        await publisher.publish_all([("devices/d2/telemetry", {"seq": 2})])
        await wait_for(lambda: any(r.path == "/b/d2" for r in endpoint.requests),
                       what="delivery to the new path")
        api_requests = [r for r in endpoint.requests if not r.path.startswith("/cloud")]
        assert [(r.path, r.headers["Authorization"]) for r in api_requests] == [
            ("/a/d1", "Bearer s3cret-api"), ("/b/d2", "Bearer s3cret-api")]

        # Conflicts.
        assert (await admin.call("POST", API, hook("api-hook", endpoint, certs, "/x")))[0] == 409
        status, body = await admin.call("POST", API, hook("cloud", endpoint, certs, "/x"))
        assert (status, body) == (409, {"error": "a webhook named 'cloud' exists already; "
                                        "PUT /api/v1/webhooks/cloud changes it"})
        status, body = await admin.call("PUT", API + "/api-hook",
                                        {"name": "other", "url": endpoint.url})
        assert (status, body) == (422, {"errors": [
            "name: renaming is not supported; POST /api/v1/webhooks a new webhook and "
            "DELETE /api/v1/webhooks/api-hook"]})

        # DELETE.
        assert await admin.call("DELETE", API + "/api-hook") == (204, None)
        assert await admin.call("GET", API + "/api-hook") == (
            404, {"error": "no webhook named 'api-hook'"})
        assert await admin.call("DELETE", API + "/api-hook") == (
            404, {"error": "no webhook named 'api-hook'"})
        assert not file.exists()
        status, listed = await admin.call("GET", API)
        assert [w["name"] for w in listed["webhooks"]] == ["cloud"]
    publisher.close()


async def test_api_webhook_survives_a_restart(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port, [])
    async with running(path) as admin:
        status, created = await admin.call("POST", API, hook(
            "api-hook", endpoint, certs, "/a", status="DISABLED"))
        assert (status, created["status"]) == (201, "DISABLED")
    async with running(path) as admin:
        assert [w.name for w in admin.bridge.config.webhooks] == ["api-hook"]
        assert await admin.call("GET", API) == (200, {"webhooks": [created]})


async def test_main_config_webhooks_are_read_only(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, free_port(), [hook("cloud", endpoint, certs, "/cloud"),
                                                hook("off", endpoint, certs, "/off",
                                                     enabled=False)])
    async with running(path) as admin:
        refused = {"error": "webhook 'cloud' is defined in a configuration file written by an "
                   f"operator ({path} or its conf.d/); edit that file and reload (the API "
                   "changes only the webhooks it created)"}
        assert await admin.call("PUT", API + "/cloud", hook("cloud", endpoint, certs, "/x")) \
            == (409, refused)
        assert await admin.call("DELETE", API + "/cloud") == (409, refused)
        status, off = await admin.call("GET", API + "/off")
        assert (status, off["status"], off["enabled"], off["source"]) == (
            200, "DISABLED", False, "config")
        assert await admin.call("POST", API + "/off/enable") == (409, {
            "error": "webhook 'off' has 'enabled: false' in its configuration file; set it "
                     "to true there (the file wins)"})
        assert not (path.parent / "conf.d").exists()


async def test_bad_bodies_are_422_with_every_problem(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, free_port(), [])
    bad = {"name": "bad", "url": "ftp://example.com/x", "retries": 3, "sources": ["nope"]}
    with pytest.raises(ConfigError) as loader:
        webhook_from_mapping(dict(bad), origin="api:bad", sources=["telemetry"],
                             base_dir=str(path.parent))
    async with running(path) as admin:
        status, body = await admin.call("POST", API, bad)
        assert (status, body) == (422, {"errors": loader.value.problems})
        assert len(body["errors"]) == 3  # the url, the unknown key, the unknown source
        assert await admin.call("POST", API, {**hook("x", endpoint, certs, "/"),
                                              "status": "PAUSED"}) == (422, {"errors": [
            "status: unknown value 'PAUSED'; use ENABLED or DISABLED"]})
        # Untrusted bodies may not read files or the environment.
        status, body = await admin.call("POST", API, {**hook("x", endpoint, certs, "/"),
                                                      "auth": {"type": "bearer",
                                                               "token_file": "/etc/shadow"}})
        assert status == 422 and len(body["errors"]) == 1, body
        status, body = await admin.call("POST", API, [1, 2])
        assert (status, body) == (422, {"errors": [
            "body: expected a JSON object with the webhook's keys (name, url, ...)"]})
        status, body = await admin.call("POST", API, raw=b"{not json")
        assert status == 400 and body["error"].startswith("the body is not valid JSON")
        assert not (path.parent / "conf.d").exists()
        assert await admin.call("GET", API) == (200, {"webhooks": []})


async def test_test_endpoint_sends_one_event(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, free_port(), [hook("cloud", endpoint, certs,
                                                     "/cloud/{device_id}")])
    async with running(path) as admin:
        status, body = await admin.call("POST", API + "/cloud/test", {"temp": 5})
        assert status == 200, body
        assert body == {"delivered": True, "status": 200, "cause": "", "response": "ok",
                        "elapsedMs": body["elapsedMs"], "eventId": body["eventId"]}
        assert isinstance(body["elapsedMs"], int) and body["elapsedMs"] >= 0
        (request,) = endpoint.requests
        sent = request.json()
        assert (request.path, request.headers["webhook-id"]) == (
            "/cloud/test-device", body["eventId"])
        assert (sent["id"], sent["device_id"], sent["type"], sent["payload"]) == (
            body["eventId"], "test-device", "telemetry", {"temp": 5})

        # A full envelope is sent as given; the endpoint's answer is reported as is.
        endpoint.responder = lambda r: aiohttp.web.Response(status=500, text="boom")
        envelope = {"id": "evt_TEST", "type": "alarm", "source": "telemetry",
                    "topic": "devices/d9/telemetry", "device_id": "d9",
                    "received_at": "2026-01-01T00:00:00.000Z", "labels": {},
                    "payload": {"alarm": "hot"}}
        status, body = await admin.call("POST", API + "/cloud/test", envelope)
        assert (status, body["delivered"], body["status"], body["response"],
                body["eventId"]) == (200, False, 500, "boom", "evt_TEST")
        assert endpoint.requests[1].json() == envelope
        assert await admin.call("POST", API + "/nope/test") == (
            404, {"error": "no webhook named 'nope'"})


async def test_test_endpoint_sends_what_the_test_command_sends(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    """A batching webhook gets a one-event batch from the API's test, as from
    `webhook-bridge test` (one function builds both)."""
    path = write_config(tmp_path, free_port(), [hook("batched", endpoint, certs, "/b",
                                                     batch={"max_events": 10})])
    async with running(path) as admin:
        status, body = await admin.call("POST", API + "/batched/test", {"temp": 5})
        assert (status, body["delivered"]) == (200, True), body
        (request,) = endpoint.requests
        sent = request.json()
        assert request.headers["webhook-id"] == sent["batch_id"]
        assert sent["batch_id"].startswith("bat_")
        assert [(i["id"], i["payload"]) for i in sent["result"]] == [("0", {"temp": 5})]
        assert sent["result"][0]["event_id"] == body["eventId"]


async def test_enable_and_disable(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port, [hook("cloud", endpoint, certs, "/cloud")])
    async with running(path) as admin:
        await ready(admin)
        status, body = await admin.call("POST", API + "/cloud/disable")
        assert (status, body["status"]) == (200, "DISABLED")
        publisher = Publisher(mosquitto.port)
        try:
            await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])
            got = await wait_for(
                lambda: _queued(admin, "cloud", 1), what="the message to be queued")
            assert (got["status"], endpoint.requests) == ("DISABLED", [])
            status, body = await admin.call("POST", API + "/cloud/enable")
            assert (status, body["status"]) == (200, "ENABLED")
            await wait_for(lambda: len(endpoint.requests) == 1, what="the queued delivery")
            assert endpoint.requests[0].json()["payload"] == {"seq": 1}
        finally:
            publisher.close()


async def _queued(admin: Admin, name: str, count: int) -> dict[str, Any] | None:
    body = (await admin.call("GET", f"{API}/{name}"))[1]
    return body if body["queued"] == count else None
