"""Issue 6: running it on a gateway. Live reload under a steady stream (nothing lost or
duplicated, a broken file keeps the old config) and logs that never show a secret."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    Received,
    base_config,
    https_webhook,
    paced_publish,
    seqs,
    started,
    wait_for,
)


async def test_reload_under_a_steady_stream(tmp_path: Path, mosquitto: Mosquitto,
                                            certs: Certificates) -> None:
    keep, moved, gone, added = [await Endpoint(ssl_context=certs.server_context()).start()
                                for _ in range(4)]
    config = base_config(tmp_path, mosquitto, [
        https_webhook("keep", keep, certs),
        https_webhook("moved", moved, certs, "/v1"),
        https_webhook("gone", gone, certs),
    ])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        stream = asyncio.create_task(
            asyncio.to_thread(paced_publish, publisher, range(2000), 500.0))
        await wait_for(lambda: len(keep.requests) >= 500, 20, "the stream to flow")
        changed = copy.deepcopy(config)
        changed["webhooks"] = [https_webhook("keep", keep, certs),
                               https_webhook("moved", moved, certs, "/v2"),
                               https_webhook("added", added, certs)]
        daemon.rewrite(changed)
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: '"configuration reloaded"' in daemon.output(), 10, "reload")
        reloaded_at = time.time()
        await wait_for(lambda: len(keep.requests) >= 1500, 20, "more of the stream")
        daemon.rewrite("webhooks: [\n  - name: keep\n    url: https://x\n")  # broken YAML
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "configuration not reloaded" in daemon.output(), 10,
                       "the broken reload to be refused")
        await stream
        await wait_for(lambda: set(seqs(keep.requests)) == set(range(2000)), 30,
                       "every message on the unchanged webhook")
        # Unchanged webhook: each message exactly once, across both reloads.
        assert sorted(seqs(keep.requests)) == list(range(2000))
        # Changed URL: every message once, the old path before the reload, the new after.
        await wait_for(lambda: set(seqs(moved.requests)) == set(range(2000)), 30, "moved")
        assert Counter(seqs(moved.requests)).most_common(1)[0][1] == 1
        assert {r.path for r in moved.requests if r.at > reloaded_at + 1} == {"/v2"}
        assert {r.path for r in moved.requests} == {"/v1", "/v2"}
        # Added: only what came after the reload; removed: nothing after it, and what it
        # still had queued went to the dead letters with the reason.
        assert added.requests and min(seqs(added.requests)) > 0
        assert not [r for r in gone.requests if r.at > reloaded_at + 1]
        with sqlite3.connect(tmp_path / "state" / "queue.db") as conn:
            reasons = {r[0] for r in conn.execute(
                "SELECT reason FROM dead_letters WHERE webhook = 'gone'")}
            assert reasons <= {"webhook removed from the configuration"}
            dead_gone = conn.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE webhook = 'gone'").fetchone()[0]
        assert len(set(seqs(gone.requests))) + dead_gone <= 2000
        # The broken file did not stop anything: one more message still flows.
        await publisher.publish_all([("devices/d1/telemetry", {"seq": 5000})])
        await wait_for(lambda: 5000 in seqs(keep.requests), 10, "a message after the "
                       "refused reload")
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        for endpoint in (keep, moved, gone, added):
            await endpoint.stop()


SECRETS = ["pw-SECRET-basic-1", "tok-SECRET-bearer-2", "hdr-SECRET-value-3",
           "cs-SECRET-oauth-4", "at-SECRET-token-5", "mqtt-SECRET-pass-6"]


async def test_logs_never_show_secrets(tmp_path: Path, certs: Certificates,
                                       endpoint: Endpoint) -> None:
    token = await Endpoint(ssl_context=certs.server_context()).start()
    token.responder = lambda r: web.json_response(
        {"access_token": SECRETS[4], "expires_in": 3600, "token_type": "Bearer"})
    failures = [0]

    def flaky(request: Received) -> web.Response:
        failures[0] += 1
        # Echo the credentials back in an error body: a careless log would print it.
        echo = request.headers.get("Authorization", "") + request.headers.get("X-AUTH-TOKEN", "")
        return web.Response(status=500 if failures[0] % 3 else 401, text=f"denied {echo}")

    endpoint.responder = flaky
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(broker.conf.read_text().replace(
        "allow_anonymous true", f"allow_anonymous false\npassword_file {tmp_path}/passwd"))
    (tmp_path / "passwd").write_text("")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_passwd", "-b", str(tmp_path / "passwd"), "bridge", SECRETS[5])
    assert await proc.wait() == 0
    broker.start()
    secret_file = tmp_path / "signing.secret"
    secret_file.write_text("whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==\n")
    SECRETS.append("whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==")
    hook = {"failure_limit": 0, "retry": {"initial": "50ms", "max": "200ms"}}
    config = base_config(tmp_path, broker, [
        https_webhook("basic", endpoint, certs, auth={
            "type": "basic", "username": "u", "password": SECRETS[0]}, **hook),
        https_webhook("bearer", endpoint, certs, auth={"type": "bearer", "token": SECRETS[1]},
                      signing={"scheme": "standard-webhooks",
                               "secret_file": str(secret_file)}, **hook),
        https_webhook("header", endpoint, certs, auth={"type": "header", "value": SECRETS[2]},
                      **hook),
        https_webhook("oauth", endpoint, certs, auth={
            "type": "oauth2", "token_url": token.url + "/token", "client_id": "c",
            "client_secret": SECRETS[3]}, tls={"ca_file": str(certs.ca_file)}, **hook),
    ], username="bridge", password=SECRETS[5])
    config["log"]["level"] = "debug"
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(broker.port)
    publisher.client.username_pw_set("bridge", SECRETS[5])
    publisher.client.reconnect()
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": n}) for n in range(3)])
        await wait_for(lambda: all(f'"webhook": "{name}"' in daemon.output()
                                   for name in ("basic", "bearer", "header", "oauth"))
                       and daemon.output().count('"delivery failed"') >= 8, 20,
                       "failures on every webhook")
        outputs = [daemon.output()]
        for name in ("basic", "bearer", "header", "oauth"):
            result = await asyncio.to_thread(daemon.cli, "test", name)  # the loop serves
            outputs.append(result.stdout + result.stderr)
        assert daemon.terminate() == 0
        outputs.append(daemon.output())
        text = "\n".join(outputs)
        assert "Authorization" in text or "denied" in text  # the lines we looked at exist
        leaked = [s for s in SECRETS if s in text]
        assert leaked == [], leaked
        statuses = json.loads(daemon.cli("status", "--json").stdout)
        assert SECRETS[1] not in json.dumps(statuses)
    finally:
        SECRETS.pop()
        publisher.close()
        broker.stop()
        await token.stop()
