"""Text from endpoints is untrusted (SPEC §8): a response that echoes the request's
credentials is stored and shown with every configured secret redacted, in every form the
secret travels in, and terminal control characters are escaped in CLI output.

The unit tests pin the forms and the edge cases; the end-to-end test runs the real daemon
against a real HTTPS endpoint that answers 400 with every request header (and the signing
secrets it knows) in its body, then reads the store files byte by byte, the CLI's
`dead list`/`dead show`/`status`/`test`, the admin API and the daemon's log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge import logs
from bridge.config import AuthConfig, SigningConfig, WebhookConfig
from bridge.delivery import DEAD, Outcome, redact_outcome
from bridge.http1 import Headers

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
    started,
    wait_for,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- units: the forms of a secret ---------------------------------------------------------

def test_every_form_of_a_webhook_secret_is_redacted() -> None:
    key = "whsec_" + b64("unit-signing-key-0123456789")
    hooks = [
        WebhookConfig(name="a", url="https://api.example/in",
                      auth=AuthConfig(type="basic", username="alice", password="unit-pw-1"),
                      signing=SigningConfig(scheme="standard-webhooks", secret=key)),
        WebhookConfig(name="b", url="https://bob:unit%2Fpw-2@api.example/in",
                      auth=AuthConfig(type="oauth2", token_url="https://t.example/token",
                                      client_id="cid", client_secret="unit-cs-3")),
    ]
    for hook in hooks:
        logs.register_secrets(logs.webhook_secrets(hook))
    forms = ["unit-pw-1", "alice:unit-pw-1", b64("alice:unit-pw-1"), key, key[6:],
             "unit%2Fpw-2", "unit/pw-2", "bob:unit%2Fpw-2", b64("bob:unit/pw-2"), "unit-cs-3",
             b64("cid:unit-cs-3"), json.dumps("unit/pw-2")[1:-1]]
    text = " | ".join(forms)
    redacted = logs.redact(text)
    assert [f for f in forms if f in redacted] == []
    assert redacted.count("***") == len(forms)


def test_a_secret_cut_by_the_excerpt_limit_is_removed_too() -> None:
    logs.register_secrets(["unit-cut-token-0123456789"])
    assert logs.redact_excerpt('{"auth": "Bearer unit-cut-tok') == '{"auth": "Bearer ***'
    assert logs.redact_excerpt("Bearer unit-cut-token-0123456789 and unit-cut") == (
        "Bearer *** and ***")
    assert logs.redact_excerpt("nothing secret: unit-") == "nothing secret: unit-"  # < 6


def test_a_rotated_token_is_forgotten_with_all_its_forms() -> None:
    logs.register_rotating("unit-slot", "unit-access/token-1")
    assert logs.redact("a unit-access%2Ftoken-1 b") == "a *** b"
    logs.register_rotating("unit-slot", "unit-access/token-2")
    assert logs.redact("unit-access/token-2") == "***"
    assert logs.redact("unit-access%2Ftoken-1") == "unit-access%2Ftoken-1"


def test_printable_escapes_terminal_controls() -> None:
    text = "a\x1b[31mb\x07\x9b2J\u202eevil\x7f\r\nnext\tcell\rover\x00"
    assert logs.printable(text) == (
        "a\\u001b[31mb\\u0007\\u009b2J\\u202eevil\\u007f\nnext\tcell\\u000dover\\u0000")
    shown = logs.printable(json.dumps({"r": "\x9b\x1b"}, ensure_ascii=False))
    assert json.loads(shown) == {"r": "\x9b\x1b"}  # still valid JSON, same value


def test_an_outcome_is_redacted_before_anyone_sees_it() -> None:
    logs.register_secrets(["unit-outcome-secret"])
    headers = Headers()
    headers.add("X-Echo", "Bearer unit-outcome-secret")
    outcome = redact_outcome(Outcome(DEAD, 400, "HTTP 302 redirect to https://x/?t="
                                     "unit-outcome-secret", response="got unit-outcome-secret",
                                     headers=headers))
    assert (outcome.cause, outcome.response, dict(outcome.headers or {})) == (
        "HTTP 302 redirect to https://x/?t=***", "got ***", {"X-Echo": "Bearer ***"})
    assert outcome.headers is not None and outcome.headers.get("x-echo") == "Bearer ***"


# -- end to end ---------------------------------------------------------------------------

S_BASIC = "pw-REDACT-basic-0001"
S_BEARER = "tok-REDACT-bearer-0002"
S_HEADER = "hdr-REDACT-value-0003"
S_CLIENT = "cs-REDACT-oauth-0004"
S_ACCESS = "at-REDACT-access-0005"
S_URL = "pw-REDACT-url-0006"
S_WHSEC = "whsec_" + b64("REDACT-signing-key-0007-abcdef")
S_ADMIN = "adm-REDACT-admin-0008-0123456789"
CONTROLS = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e"
NAMES = ("basic", "bearer", "header", "oauth", "userinfo", "hmac")


def generated_secrets(state: Path) -> list[str]:
    """The signing secrets the daemon generated (the endpoint 'knows' them)."""
    try:
        data = json.loads((state / "secrets.json").read_text())
    except (OSError, ValueError):
        return []
    return [entry["current"] for entry in data.values() if "current" in entry]


def secret_forms(state: Path) -> list[str]:
    forms = [S_BASIC, b64("u:" + S_BASIC), S_BEARER, S_HEADER, S_CLIENT, b64("c:" + S_CLIENT),
             S_ACCESS, S_URL, b64("user:" + S_URL), S_WHSEC, S_WHSEC[6:], S_ADMIN]
    for secret in generated_secrets(state):
        forms += [secret, secret[6:]]
    return forms


async def test_no_secret_in_the_store_the_cli_the_api_or_the_log(
        tmp_path: Path, certs: Certificates, endpoint: Endpoint, mosquitto: Mosquitto) -> None:
    state = tmp_path / "state"
    token = await Endpoint(ssl_context=certs.server_context()).start()
    token.responder = lambda r: web.json_response(
        {"access_token": S_ACCESS, "expires_in": 3600, "token_type": "Bearer"})

    def echo(request: Received) -> web.Response:
        # Every request header in the body (as a careless error page does), the signing
        # secrets this endpoint knows, terminal escapes; and the credentials in headers.
        known = [S_WHSEC, *generated_secrets(state)]
        body = json.dumps({"error": "bad request", "you sent": request.headers,
                           "expected secrets": known}) + CONTROLS + " " + " ".join(known)
        return web.Response(status=400, text=body, content_type="application/json", headers={
            "X-Echo-Authorization": request.headers.get("Authorization", "-"),
            "X-Echo-Token": request.headers.get("X-AUTH-TOKEN", "-")})

    endpoint.responder = echo
    hook: dict[str, Any] = {"failure_limit": 0}
    userinfo = https_webhook("userinfo", endpoint, certs, **hook)
    userinfo["url"] = userinfo["url"].replace("https://", f"https://user:{S_URL}@")
    config = base_config(tmp_path, mosquitto, [
        https_webhook("basic", endpoint, certs, auth={
            "type": "basic", "username": "u", "password": S_BASIC}, **hook),
        https_webhook("bearer", endpoint, certs, auth={"type": "bearer", "token": S_BEARER},
                      signing={"scheme": "standard-webhooks", "secret": S_WHSEC}, **hook),
        https_webhook("header", endpoint, certs, auth={"type": "header", "value": S_HEADER},
                      **hook),
        https_webhook("oauth", endpoint, certs, auth={
            "type": "oauth2", "token_url": token.url + "/token", "client_id": "c",
            "client_secret": S_CLIENT}, **hook),
        userinfo,
        https_webhook("hmac", endpoint, certs, signing={"scheme": "hmac-sha256"}, **hook),
    ])
    admin_port = free_port()
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}", "token": S_ADMIN}
    config["log"]["level"] = "debug"
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{admin_port}",
                                    headers={"Authorization": f"Bearer {S_ADMIN}"})
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 1})])

        def dead_letters() -> list[tuple[str, str]]:
            with sqlite3.connect(state / "queue.db") as conn:
                return conn.execute("SELECT webhook, response FROM dead_letters").fetchall()

        await wait_for(lambda: len(dead_letters()) == len(NAMES), 30, "a dead letter each")
        stored = dict(dead_letters())
        assert sorted(stored) == sorted(NAMES)
        # The endpoint did echo the credentials, and what was stored has them redacted.
        assert '"Authorization": "Basic ***"' in stored["basic"]
        assert '"Authorization": "Bearer ***"' in stored["bearer"]
        assert '"Authorization": "Bearer ***"' in stored["oauth"]
        assert '"X-AUTH-TOKEN": "***"' in stored["header"]
        assert '"Authorization": "Basic ***"' in stored["userinfo"]
        assert '"expected secrets": ["***", "***"]' in stored["hmac"]
        store_bytes = b"".join(p.read_bytes() for p in sorted(state.glob("queue.db*")))

        # The admin API: webhooks, the test call, and the console's views.
        api: list[str] = []
        for name in NAMES:
            for method, path in (("GET", ""), ("POST", "/test"), ("GET", "/activity"),
                                 ("GET", "/dead")):
                async with session.request(method, f"/api/v1/webhooks/{name}{path}"
                                           ) as response:
                    text = await response.text()
                    assert response.status == 200, (name, path, text)
                    api.append(text)
        tested = json.loads(api[1])
        assert tested["status"] == 400 and "Basic ***" in tested["response"]
        got = json.loads(api[NAMES.index("userinfo") * 4])
        assert got["url"].startswith("https://user:***@127.0.0.1:")

        # The CLI, as the operator runs it (the daemon keeps running meanwhile).
        commands = [("dead", "list"), ("dead", "show"), ("status",), ("status", "--json"),
                    *(("test", name) for name in NAMES)]
        results = await asyncio.gather(*(asyncio.to_thread(daemon.cli, *c) for c in commands))
        cli = {" ".join(c): r.stdout + r.stderr for c, r in zip(commands, results)}
        for command, output in cli.items():
            assert "Traceback" not in output, (command, output)
            for control in ("\x1b", "\x07", "\x9b", "\u202e"):
                assert control not in output, (command, control, output)
        assert "Bearer ***" in cli["dead show"] and "\\u009b31m" in cli["dead show"]
        assert "HTTP 400" in cli["test basic"] and "X-Echo-Authorization: Basic ***" in \
            cli["test basic"]
        assert daemon.terminate() == 0
        store_bytes += b"".join(p.read_bytes() for p in sorted(state.glob("queue.db*")))
        log = daemon.output()
        assert '"delivery dead-lettered"' in log

        forms = secret_forms(state)
        assert len(generated_secrets(state)) == 1  # the hmac webhook's
        places = {"store": store_bytes.decode("latin-1"), "log": log, "api": "\n".join(api),
                  **cli}
        leaks = {(place, form) for place, text in places.items() for form in forms
                 if form in text}
        assert leaks == set()
    finally:
        await session.close()
        publisher.close()
        await token.stop()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


def test_the_api_hides_url_passwords_and_a_put_back_keeps_them() -> None:
    from bridge.admin import redact, unredact

    current = {"name": "w", "url": "https://user:unit-url-pw@api.example/in",
               "auth": {"type": "oauth2", "token_url": "https://c:unit-t-pw@t.example/token",
                        "client_id": "c", "client_secret": "unit-cs"}}
    shown = redact(json.loads(json.dumps(current)))
    assert shown["url"] == "https://user:***@api.example/in"
    assert shown["auth"] == {"type": "oauth2", "token_url": "https://c:***@t.example/token",
                             "client_id": "c", "client_secret": "***"}
    assert unredact(json.loads(json.dumps(shown)), current) == current
    moved = {**json.loads(json.dumps(shown)), "url": "https://user:***@other.example/in"}
    assert unredact(moved, current)["url"] == "https://user:***@other.example/in"  # refused
