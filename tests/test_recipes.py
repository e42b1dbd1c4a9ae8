"""Issue 4: the platform recipes, end to end. Messages flow through a real Mosquitto and
the daemon as a real subprocess to real HTTPS endpoints; signatures are checked with the
reference ``standardwebhooks`` package and a receiver written from the Biotz text, never
with our own signing code."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest
import trustme
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .support import (
    ROOT,
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    Received,
    base_config,
    https_webhook,
    run_cli,
    started,
    wait_for,
)

EVENT_ID = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")


# -- helpers ------------------------------------------------------------------------------

config_for = base_config


def hook(name: str, endpoint: Endpoint, certs: Certificates, path: str = "/hook",
         **extra: Any) -> dict[str, Any]:
    return https_webhook(name, endpoint, certs, path, **extra)


async def cli(daemon: Daemon, *args: str) -> Any:
    """A CLI command in a thread, so the endpoints in this event loop keep answering."""
    return await asyncio.to_thread(daemon.cli, *args)


def dead_letters(tmp: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        return conn.execute("SELECT webhook, reason FROM dead_letters").fetchall()


def field(output: str, name: str) -> str:
    match = re.search(rf"^{name}: (\S+)", output, re.MULTILINE)
    assert match, f"no '{name}:' line in:\n{output}"
    return match.group(1)


def clean_env(**extra: str) -> dict[str, str]:
    """No ${VAR} of the recipes set: their defaults must carry them through `check`."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **extra}


def write_config(tmp: Path, config: dict[str, Any]) -> Path:
    import yaml

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- a. Standard Webhooks, verified by the reference package, through a rotation ----------

async def test_standard_webhooks_verify_with_reference_package_through_rotation(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        hook("signed", endpoint, certs, signing={"scheme": "standard-webhooks"})])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        shown = await cli(daemon, "secret", "show", "signed")
        assert shown.returncode == 0, shown.stderr
        old = field(shown.stdout, "current")
        assert old.startswith("whsec_")

        await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])
        await wait_for(lambda: len(endpoint.requests) == 1, what="the first delivery")
        first = endpoint.requests[0]
        assert len(first.headers["webhook-signature"].split(" ")) == 1
        assert Webhook(old).verify(first.body, first.headers)["payload"] == {"seq": 1}

        rotated = await cli(daemon, "secret", "rotate", "signed")
        assert rotated.returncode == 0, rotated.stderr
        new = field(rotated.stdout, "new secret")
        assert new != old and "24 h" in rotated.stdout

        # The daemon re-reads the secrets file when it changes: the next delivery already
        # carries both signatures.
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 2})])
        await wait_for(lambda: len(endpoint.requests) == 2, what="the delivery after rotate")
        during = endpoint.requests[1]
        entries = during.headers["webhook-signature"].split(" ")
        assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
        for secret in (new, old):
            assert Webhook(secret).verify(during.body, during.headers)["payload"] == {"seq": 2}
        stranger = base64.b64encode(b"k" * 32).decode()
        with pytest.raises(WebhookVerificationError):
            Webhook(stranger).verify(during.body, during.headers)
        tampered = during.body.replace(b'"seq":2', b'"seq":3')
        assert tampered != during.body
        for secret in (new, old):
            with pytest.raises(WebhookVerificationError):
                Webhook(secret).verify(tampered, during.headers)
        with pytest.raises(WebhookVerificationError):  # a replayed signature on another id
            Webhook(new).verify(during.body, {**during.headers,
                                              "webhook-id": first.headers["webhook-id"]})
        assert daemon.terminate() == 0
    finally:
        publisher.close()


# -- b. hmac-sha256, verified by a receiver written from the Biotz text --------------------

def biotz_verify(secret: str, header: str, body: bytes) -> bool:
    """From the Biotz page: t= is a timestamp, v1= the HMAC-SHA256 (hex) keyed with the
    webhook secret over the timestamp, '.', and the body of the POST."""
    fields = dict(part.split("=", 1) for part in header.split(",") if part)
    signed_payload = fields["t"] + "." + body.decode("utf-8")
    digest = hmac.new(secret.encode("utf-8"), signed_payload.encode("utf-8"),
                      hashlib.sha256).hexdigest()
    return hmac.compare_digest(digest, fields["v1"])


async def test_hmac_sha256_biotz_signature(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    sources = [{"name": "alarms", "topic": "devices/{device_id}/alarms", "format": "json",
                "type": "alarm"}]
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        hook("biotz", endpoint, certs, events=["alarm"],
             signing={"scheme": "hmac-sha256", "header": "Biotz-IoT-Signature"})],
        sources)).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        secret = field((await cli(daemon, "secret", "show", "biotz")).stdout, "current")
        await publisher.publish_all([("devices/d1/alarms", {"alarm": "overheat", "t": 91})])
        await wait_for(lambda: endpoint.requests, what="the alarm")
        request = endpoint.requests[0]
        header = request.headers["Biotz-IoT-Signature"]
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header), header
        assert abs(int(header[2:header.index(",")]) - time.time()) < 60
        assert biotz_verify(secret, header, request.body)
        assert request.json()["type"] == "alarm"
        assert not biotz_verify(secret, header, request.body.replace(b"91", b"19"))
        assert not biotz_verify(secret + "x", header, request.body)
        assert daemon.terminate() == 0
    finally:
        publisher.close()


# -- c. OAuth2 client credentials ------------------------------------------------------------

async def test_oauth2_token_is_cached_refreshed_on_expiry_and_after_401(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    token_calls: list[Received] = []

    def issue(request: Received) -> web.Response:
        token_calls.append(request)
        n = len(token_calls)
        # The first token lives 4 s (so the test can outlive it); later ones an hour.
        return web.json_response({"access_token": f"tok-{n}", "token_type": "Bearer",
                                  "expires_in": 4 if n == 1 else 3600})

    tokens = await Endpoint(ssl_context=certs.server_context(), responder=issue).start()
    refuse_next = [False]

    def answer(request: Received) -> web.Response:
        if refuse_next[0]:
            refuse_next[0] = False
            return web.Response(status=401, text="token revoked")
        return web.Response(status=200)

    endpoint.responder = answer
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        hook("blynk", endpoint, certs, auth={
            "type": "oauth2", "token_url": tokens.url + "/oauth2/token",
            "client_id": "gw-7", "client_secret": "${BLYNK_SECRET}", "scope": "webhooks"})]),
        env={"BLYNK_SECRET": "s3cr3t-value"}).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": i}) for i in range(6)])
        await wait_for(lambda: len(endpoint.requests) == 6, what="six deliveries")
        assert len(token_calls) == 1
        assert {r.headers["Authorization"] for r in endpoint.requests} == {"Bearer tok-1"}
        form = parse_qs(token_calls[0].body.decode())
        assert token_calls[0].method == "POST" and token_calls[0].path == "/oauth2/token"
        assert form == {"grant_type": ["client_credentials"], "client_id": ["gw-7"],
                        "client_secret": ["s3cr3t-value"], "scope": ["webhooks"]}

        await asyncio.sleep(4.1)  # outlive tok-1: the passing of time is what is tested
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 6})])
        await wait_for(lambda: len(endpoint.requests) == 7, what="the delivery after expiry")
        assert len(token_calls) == 2
        assert endpoint.requests[6].headers["Authorization"] == "Bearer tok-2"

        refuse_next[0] = True
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 7})])
        await wait_for(lambda: len(endpoint.requests) == 9, what="the 401 and its retry")
        refused, retried = endpoint.requests[7:9]
        assert (refused.status, refused.headers["Authorization"]) == (401, "Bearer tok-2")
        assert (retried.status, retried.headers["Authorization"]) == (200, "Bearer tok-3")
        assert refused.headers["webhook-id"] == retried.headers["webhook-id"]
        assert len(token_calls) == 3
        assert "s3cr3t-value" not in daemon.output()
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await tokens.stop()


# -- d. mTLS, and an endpoint whose certificate we must refuse -------------------------------

async def test_mtls_client_certificate_and_unknown_ca_refused(
        tmp_path: Path, mosquitto: Mosquitto, certs: Certificates) -> None:
    client = certs.ca.issue_cert("gateway-7.example")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    mtls = await Endpoint(ssl_context=certs.server_context(require_client_cert=True)).start()
    impostor_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(impostor_context)
    impostor = await Endpoint(ssl_context=impostor_context).start()
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        {**hook("mtls", mtls, certs), "tls": {"ca_file": str(certs.ca_file),
                                              "cert_file": str(cert_file),
                                              "key_file": str(key_file)}},
        hook("impostor", impostor, certs),
    ])).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])
        await wait_for(lambda: mtls.requests, what="the mTLS delivery")
        assert mtls.requests[0].json()["payload"] == {"seq": 1}

        async def impostor_error() -> str | None:
            status = await cli(daemon, "status", "--json")
            rows = {r["name"]: r for r in json.loads(status.stdout)["webhooks"]}
            return rows["impostor"]["last_error"]

        error = await wait_for(impostor_error, what="the impostor's last_error")
        assert "certificate verify failed" in error, error
        assert impostor.requests == []
        tested = await cli(daemon, "test", "impostor")
        assert tested.returncode != 0
        assert "certificate verify failed" in tested.stdout, tested.stdout
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await mtls.stop()
        await impostor.stop()


# -- e. templates: body types, no break-out, header injection, URL placeholders -------------

async def test_body_header_and_url_templates(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    injected = await Endpoint(ssl_context=certs.server_context()).start()
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        hook("templated", endpoint, certs, "/ingest/{device_id}?site={payload.site}", body={
            "device": "{device_id}", "temp": "{payload.temp}", "meta": "{payload.meta}",
            "note": "{payload.note}", "text": "t={payload.temp}", "brace": "{{literal}}",
            "nested": ["{payload.temp}", {"k": "{device_id}"}],
        }),
        hook("headers", injected, certs, headers={"X-Note": "{payload.note}",
                                                  "X-Device": "{device_id}"}),
    ])).start()
    publisher = Publisher(mosquitto.port)
    breakout = '"}, "admin": true, "x": {"'
    try:
        await started(daemon)
        await publisher.publish_all([
            ("devices/d1/telemetry", {"temp": 21.5, "meta": {"fw": "1.2", "ch": [1, 2]},
                                      "note": breakout, "site": "a&b=c/../d#e"}),
            ("devices/d2/telemetry", {"temp": 1, "meta": None, "note": "line\r\nX-Evil: 1",
                                      "site": "s"}),
        ])
        await wait_for(lambda: len(endpoint.requests) == 1, what="the templated body")
        request = endpoint.requests[0]
        assert request.json() == {"device": "d1", "temp": 21.5,
                                  "meta": {"fw": "1.2", "ch": [1, 2]}, "note": breakout,
                                  "text": "t=21.5", "brace": "{literal}",
                                  "nested": [21.5, {"k": "d1"}]}
        assert request.host == f"127.0.0.1:{endpoint.port}"
        assert request.raw_path.split("?")[0] == "/ingest/d1"
        assert request.query.count("=") == 1 and "&" not in request.query
        assert unquote(request.query.partition("=")[2]) == "a&b=c/../d#e"

        # d2: a CR/LF header value is refused: dead letter naming the header, nothing sent.
        await wait_for(lambda: injected.requests and any(
            w == "headers" for w, _ in dead_letters(tmp_path)), what="d1 and d2's dead letter")
        reasons = [r for w, r in dead_letters(tmp_path) if w == "headers"]
        assert len(reasons) == 1 and "X-Note" in reasons[0], reasons
        assert [r.headers["X-Device"] for r in injected.requests] == ["d1"]
        await publisher.publish_all([("devices/d3/telemetry", {"note": "fine", "temp": 2,
                                                               "meta": {}, "site": "x"})])
        await wait_for(lambda: len(injected.requests) == 2, what="the sentinel")
        assert [r.headers["X-Note"] for r in injected.requests] == [breakout, "fine"]
        assert all("X-Evil" not in r.headers for r in injected.requests)
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        await injected.stop()


def test_body_template_as_json_text_blynk_style(tmp_path: Path) -> None:
    """Blynk writes the body template as JSON text; it must validate and render as the
    parsed structure (numbers stay numbers)."""
    path = write_config(tmp_path, {
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(tmp_path / "state" / "queue.db")},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry"}],
        "webhooks": [{"name": "blynk", "url": "https://blynk.example.com/webhook/{device_id}",
                      "body": '{"device_id": "{device_id}", "temp": "{payload.temp}"}'}],
    })
    checked = run_cli("check", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    shown = run_cli("test", "blynk", "--dry-run", "-c", str(path))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.split("\n\n")[1]) == {"device_id": "test-device",
                                                          "temp": 21.5}


# -- f. `webhook-bridge test` ----------------------------------------------------------------

async def test_test_command_dry_run_500_and_200(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    failing = [True]
    endpoint.responder = lambda r: (web.Response(status=500, text="boom") if failing[0]
                                    else web.json_response({"ok": True}))
    path = write_config(tmp_path, {
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(tmp_path / "state" / "queue.db")},
        "admin": {"listen": None},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry"}],
        "webhooks": [{**hook("cloud", endpoint, certs, "/ingest/{device_id}"),
                      "method": "PUT", "headers": {"X-Site": "plant-7"},
                      "auth": {"type": "bearer", "token": "tok-secret-123"}}],
    })

    def run(*args: str) -> Any:
        return asyncio.to_thread(run_cli, *args, "-c", str(path))

    dry = await run("test", "cloud", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    head, _, rest = dry.stdout.partition("\n\n")
    lines = head.splitlines()
    assert lines[0] == f"PUT {endpoint.url}/ingest/test-device"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("webhook-bridge/")
    assert headers["X-Site"] == "plant-7"
    assert EVENT_ID.match(headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["Authorization"] == "Bearer ***"
    assert "tok-secret-123" not in dry.stdout + dry.stderr
    body = json.loads(rest.split("\n\n")[0])
    assert body["id"] == headers["webhook-id"] and body["type"] == "telemetry"
    assert body["device_id"] == "test-device" and body["payload"] == {"test": True,
                                                                       "temp": 21.5}
    assert endpoint.requests == []

    failed = await run("test", "cloud")
    assert failed.returncode != 0
    assert "HTTP 500" in failed.stdout and "boom" in failed.stdout, failed.stdout
    assert "retry" in failed.stdout
    assert len(endpoint.requests) == 1

    failing[0] = False
    ok = await run("test", "cloud")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "HTTP 200" in ok.stdout and "result: delivered" in ok.stdout
    sent = endpoint.requests[1]
    printed = dict(line.split(": ", 1) for line in ok.stdout.split("\n\n")[0].splitlines()[1:])
    assert sent.method == "PUT" and sent.path == "/ingest/test-device"
    assert sent.headers["webhook-id"] == printed["webhook-id"]
    assert sent.headers["Authorization"] == "Bearer tok-secret-123"
    assert sent.json()["id"] == printed["webhook-id"]


# -- g. every shipped config passes `check` --------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_config_passes_check(path: Path) -> None:
    result = run_cli("check", "-c", str(path), env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_every_platform_has_a_recipe() -> None:
    names = {p.stem for p in (ROOT / "config").glob("*.yaml")}
    assert {"coiote", "biotz", "zerynth", "blynk", "iottly", "example"} <= names


# -- h. methods, content types, envelopes, payload_only, auth --------------------------------

async def test_methods_content_types_envelopes_and_auth(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    sources = [{"name": "telemetry", "topic": "devices/{device_id}/telemetry"},
               {"name": "alerts", "topic": "devices/{device_id}/alerts"}]
    form_body = {"device": "{device_id}", "temp": "{payload.temp}", "note": "{payload.note}"}
    tele = {"sources": ["telemetry"]}
    daemon = Daemon(tmp_path, config_for(tmp_path, mosquitto, [
        hook("put", endpoint, certs, "/put", method="PUT", **tele),
        hook("patch-form", endpoint, certs, "/form", method="PATCH", content_type="form",
             body=form_body, **tele),
        hook("text", endpoint, certs, "/text", content_type="text",
             body="{device_id} temp={payload.temp}", **tele),
        hook("payload", endpoint, certs, "/payload", envelope="payload", **tele),
        hook("iottly", endpoint, certs, "/iottly", envelope="iottly", **tele,
             headers={"X-Project": "plant-7", "X-Device": "{device_id}"}),
        hook("channel", endpoint, certs, "/channel", sources=["alerts"], channel="alerts",
             payload_only=True),
        hook("basic", endpoint, certs, "/basic", **tele,
             auth={"type": "basic", "username": "gw-7", "password": "${BASIC_PW}"}),
        hook("bearer", endpoint, certs, "/bearer", **tele,
             auth={"type": "bearer", "token": "tok-abc"}),
        hook("header", endpoint, certs, "/header", **tele,
             auth={"type": "header", "value": "zt-123"}),
    ], sources), env={"BASIC_PW": "p:ss w&rd"}).start()
    publisher = Publisher(mosquitto.port)
    payload = {"temp": 21.5, "note": "a&b=c d"}
    try:
        await started(daemon)
        await publisher.publish_all([
            ("devices/d1/telemetry", payload),
            ("devices/d1/alerts", {"webhook_channel": "other", "webhook_payload": {"no": 1}}),
            ("devices/d1/alerts", {"webhook_channel": "alerts",
                                   "webhook_payload": {"alarm": "hot"}}),
        ])
        await wait_for(lambda: len(endpoint.requests) >= 9, what="nine deliveries")
        by_path = {r.path: r for r in endpoint.requests}
        assert len(endpoint.requests) == 9 and len(by_path) == 9

        put = by_path["/put"]
        assert put.method == "PUT" and put.headers["Content-Type"] == "application/json"
        assert put.json()["payload"] == payload and EVENT_ID.match(put.json()["id"])

        form = by_path["/form"]
        assert form.method == "PATCH"
        assert form.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert parse_qs(form.body.decode("ascii")) == {
            "device": ["d1"], "temp": ["21.5"], "note": ["a&b=c d"]}

        text = by_path["/text"]
        assert text.method == "POST"
        assert text.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert text.body == b"d1 temp=21.5"

        assert by_path["/payload"].json() == payload
        iottly = by_path["/iottly"]
        assert iottly.json() == {"msg": payload}
        assert (iottly.headers["X-Project"], iottly.headers["X-Device"]) == ("plant-7", "d1")
        assert by_path["/channel"].json() == {"alarm": "hot"}

        pair = base64.b64encode(b"gw-7:p:ss w&rd").decode()
        assert by_path["/basic"].headers["Authorization"] == f"Basic {pair}"
        assert by_path["/bearer"].headers["Authorization"] == "Bearer tok-abc"
        assert by_path["/header"].headers["X-AUTH-TOKEN"] == "zt-123"
        assert "Authorization" not in by_path["/header"].headers
        for request in endpoint.requests:
            assert request.headers["User-Agent"].startswith("webhook-bridge/")
            assert request.headers["webhook-id"].startswith("evt_")
        assert daemon.terminate() == 0
    finally:
        publisher.close()


def test_recipes_dry_run_show_the_documented_requests(tmp_path: Path) -> None:
    """The recipes' shapes as docs/recipes.md shows them (dry run: nothing is sent)."""
    for name in ("coiote", "biotz", "zerynth", "blynk", "iottly"):
        (tmp_path / f"{name}.yaml").write_bytes((ROOT / "config" / f"{name}.yaml").read_bytes())

    def dry(recipe: str, webhook: str) -> tuple[dict[str, str], Any]:
        result = run_cli("test", webhook, "--dry-run", "-c", str(tmp_path / f"{recipe}.yaml"),
                         env=clean_env())
        assert result.returncode == 0, result.stderr
        head, _, rest = result.stdout.partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
        headers[":request"] = head.splitlines()[0]
        body = rest.split("\n\n")[0]
        with_json = json.loads(body) if headers["Content-Type"] == "application/json" else body
        return headers, with_json

    headers, body = dry("biotz", "biotz-alarms")
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", headers["Biotz-IoT-Signature"])
    assert body["type"] == "alarm"
    headers, body = dry("zerynth", "zerynth-data")
    assert headers["X-AUTH-TOKEN"] == "***"
    assert body["batch_id"] == headers["webhook-id"] and body["result"][0]["id"] == "0"
    assert body["result"][0]["tag"] == "d1" and body["result"][0]["fleet_id"] == "flt-1234"
    headers, body = dry("blynk", "blynk-json")
    assert headers[":request"] == "POST https://blynk.example.com/webhook/test-device"
    assert body == {"device_id": "test-device", "temp": 21.5}
    headers, body = dry("blynk", "blynk-form")
    assert body == "device_id=test-device&temp=21.5"
    headers, body = dry("iottly", "iottly-messages")
    assert body == {"msg": {"test": True, "temp": 21.5}}
    headers, body = dry("iottly", "iottly-alerts")
    assert body == {"test": True}
    headers, body = dry("coiote", "coiote-telemetry")
    assert headers[":request"].startswith("PUT https://iot.example.com/devices/test-device/")
    assert headers["Authorization"] == "Bearer ***"
