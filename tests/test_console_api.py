"""The console's own API calls (bridge.console) in-process against a real Bridge, a real
Mosquitto and a real HTTPS endpoint: check and test-send of an unsaved webhook, recent
attempts, rotate-secret, and the dead letters (list, show, replay, purge)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bridge.config import ConfigError, webhook_from_mapping
from bridge.signing import SecretKeeper

from .support import Certificates, Endpoint, Mosquitto, Publisher, Received, wait_for
from .test_admin import Admin, hook, ready, running, write_config

SECRET = "echoed-bearer-token-0815"


def echo_auth(status: int) -> web.Response:
    """An endpoint that quotes the request's Authorization in its answer."""
    def respond(received: Received) -> web.Response:
        return web.Response(status=status, text="you sent " + received.headers.get(
            "Authorization", "nothing"))
    return respond  # type: ignore[return-value]


async def test_check_and_test_send_of_an_unsaved_webhook(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port, [])
    async with running(path) as admin:
        bad = {"name": "Trial", "url": "ftp://x", "timeout": "soon"}
        status, body = await admin.call("POST", "/api/v1/console/check", bad)
        try:
            webhook_from_mapping(bad, origin="api:Trial", sources=["telemetry"],
                                 base_dir=str(path.parent))
            raise AssertionError("the loader accepted it")
        except ConfigError as error:
            assert (status, body) == (200, {"errors": error.problems})
        assert len(body["errors"]) == 3
        status, body = await admin.call("POST", "/api/v1/test", {"webhook": bad})
        assert status == 422 and len(body["errors"]) == 3
        assert endpoint.requests == []

        endpoint.responder = echo_auth(403)
        trial = hook("trial", endpoint, certs, "/t/{device_id}",
                     auth={"type": "bearer", "token": SECRET})
        assert await admin.call("POST", "/api/v1/console/check", trial) == (200, {"errors": []})
        status, body = await admin.call("POST", "/api/v1/test", {"webhook": trial})
        assert status == 200, body
        sent = endpoint.requests
        assert len(sent) == 1 and sent[0].path == "/t/test-device"
        assert sent[0].headers["Authorization"] == f"Bearer {SECRET}"
        assert body["result"] == "dead" and body["delivered"] is False
        assert body["request"]["method"] == "POST"
        assert body["request"]["url"] == endpoint.url + "/t/test-device"
        assert body["request"]["headers"]["Authorization"] == "Bearer ***"
        assert body["request"]["headers"]["webhook-id"] == sent[0].headers["webhook-id"]
        assert body["response"]["status"] == 403
        assert body["response"]["body"] == "you sent Bearer ***"
        assert SECRET not in str(body)
        assert (await admin.call("GET", "/api/v1/webhooks/trial"))[0] == 404


async def publish(mosquitto: Mosquitto, count: int) -> None:
    publisher = Publisher(mosquitto.port)
    try:
        await publisher.publish_all([(f"devices/d{i}/telemetry", {"seq": i})
                                     for i in range(count)])
    finally:
        publisher.close()


async def dead(admin: Admin, name: str, count: int) -> dict | None:
    status, body = await admin.call("GET", f"/api/v1/webhooks/{name}/dead")
    assert status == 200
    return body if body["total"] == count else None


async def test_dead_letters_attempts_and_replay(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    endpoint.responder = echo_auth(400)
    path = write_config(tmp_path, mosquitto.port, [
        hook("erp", endpoint, certs, "/erp", failure_limit=0,
             auth={"type": "bearer", "token": SECRET})])
    async with running(path) as admin:
        await ready(admin)
        await publish(mosquitto, 3)
        listed = await wait_for(lambda: dead(admin, "erp", 3), what="3 dead letters")
        letters = listed["deadLetters"]
        assert [d["eventId"] for d in letters] == [r.headers["webhook-id"]
                                                  for r in reversed(endpoint.requests)]
        assert all(d["lastStatus"] == 400 and d["response"] == "you sent Bearer ***"
                   for d in letters)
        status, one = await admin.call("GET", f"/api/v1/webhooks/erp/dead/{letters[0]['id']}")
        assert status == 200 and '"seq":2' in one["event"].replace(" ", "")
        assert (await admin.call("GET", "/api/v1/webhooks/erp/dead/99999"))[0] == 404

        status, activity = await admin.call("GET", "/api/v1/webhooks/erp/activity")
        assert [a["eventId"] for a in activity["attempts"]] == [d["eventId"] for d in letters]
        assert {(a["outcome"], a["status"], a["excerpt"]) for a in activity["attempts"]} == {
            ("dead", 400, "you sent Bearer ***")}
        assert len(activity["series"]) == 60
        assert sum(p["failed"] for p in activity["series"]) == 3
        assert SECRET not in str(activity) + str(listed) + str(one)

        purged = await admin.call("DELETE", f"/api/v1/webhooks/erp/dead?id={letters[2]['id']}")
        assert purged == (200, {"purged": 1})
        endpoint.responder = None  # the endpoint is fixed: 200 from now on
        sent_before = len(endpoint.requests)
        assert await admin.call("POST", "/api/v1/webhooks/erp/dead/replay",
                                {"ids": [letters[0]["id"]]}) == (200, {"replayed": 1})
        await wait_for(lambda: len(endpoint.requests) == sent_before + 1, what="the replay")
        assert endpoint.requests[-1].headers["webhook-id"] == letters[0]["eventId"]
        assert await admin.call("POST", "/api/v1/webhooks/erp/dead/replay") == (
            200, {"replayed": 1})
        await wait_for(lambda: len(endpoint.requests) == sent_before + 2, what="the rest")
        assert await wait_for(lambda: dead(admin, "erp", 0), what="no dead letters")
        assert await admin.call("DELETE", "/api/v1/webhooks/erp/dead") == (200, {"purged": 0})


async def test_rotate_secret(tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint,
                             certs: Certificates) -> None:
    path = write_config(tmp_path, mosquitto.port, [
        hook("generated", endpoint, certs, "/g", signing={"scheme": "standard-webhooks"}),
        hook("configured", endpoint, certs, "/c",
             signing={"scheme": "hmac-sha256", "secret": "configured-secret-1234"}),
        hook("unsigned", endpoint, certs, "/u")])
    async with running(path) as admin:
        status, body = await admin.call("POST", "/api/v1/webhooks/generated/rotate-secret")
        assert status == 200 and body["applied"] is True
        assert body["secret"].startswith("whsec_")
        keeper = SecretKeeper(admin.bridge.config.state_dir)
        assert keeper.show("generated", None)["current"] == body["secret"]
        status, body = await admin.call("POST", "/api/v1/webhooks/configured/rotate-secret")
        assert status == 200 and body["applied"] is False and body["secret"]
        assert "signing.secret" in body["note"]
        status, body = await admin.call("POST", "/api/v1/webhooks/unsigned/rotate-secret")
        assert status == 409 and "does not sign" in body["error"]
