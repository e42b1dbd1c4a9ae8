"""Webhook state has one truth and live changes are atomic (SPEC §5), against the running
daemon: a real Mosquitto, a real HTTPS endpoint, the daemon as a subprocess, the CLI as a
subprocess and the admin API over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    free_port,
    https_webhook,
    seqs,
    started,
    wait_for,
)

TOKEN = "state-test-token-0123456789"
TOPIC = "devices/d1/telemetry"


class Notices:
    """Every retained status notice the daemon publishes for one webhook, in order."""

    def __init__(self, port: int, topic: str) -> None:
        self.seen: list[dict[str, Any]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"notices-{time.time()}")
        self.client.on_message = lambda c, u, m: m.payload and self.seen.append(
            json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 1)
        self.client.loop_start()

    @property
    def last(self) -> dict[str, Any] | None:
        return self.seen[-1] if self.seen else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored(tmp: Path, name: str) -> tuple[str, int]:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        row = conn.execute("SELECT state, state_version FROM webhooks WHERE name = ?",
                           (name,)).fetchone()
    return row[0], row[1]


class Api:
    def __init__(self, port: int) -> None:
        self.session = aiohttp.ClientSession(f"http://127.0.0.1:{port}",
                                             headers={"Authorization": f"Bearer {TOKEN}"})

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, "/api/v1/webhooks" + path,
                                        json=body) as response:
            return response.status, (await response.json() if response.status != 204
                                     else None)

    async def state(self, name: str, state: str) -> None:
        verb = "enable" if state == "ENABLED" else "disable"
        status, body = await self.call("POST", f"/{name}/{verb}")
        assert (status, body["status"]) == (200, state), body


def state_config(tmp: Path, broker: Mosquitto, endpoint: Endpoint, certs: Certificates,
                 admin_port: int) -> dict[str, Any]:
    config = base_config(tmp, broker, [https_webhook("w", endpoint, certs)])
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}
    # "Delivered at once" below is checked within a second: keep the commit window (1 s by
    # default, for flash wear) out of that bound.
    config["store"]["commit_window"] = "100ms"
    return config


async def test_the_last_writer_wins_between_cli_and_api(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates
) -> None:
    admin_port = free_port()
    daemon = Daemon(tmp_path, state_config(tmp_path, mosquitto, endpoint, certs,
                                           admin_port)).start()
    notices = Notices(mosquitto.port, f"webhook-bridge/wb-{tmp_path.name}/webhooks/w/status")
    publisher = Publisher(mosquitto.port)
    api = Api(admin_port)
    sent = 0

    async def cli(state: str) -> None:
        done = await asyncio.to_thread(daemon.cli, "enable" if state == "ENABLED"
                                       else "disable", "w")
        assert done.returncode == 0, done.stderr

    async def holds(state: str) -> None:
        """The daemon runs with ``state``: its notice says so, and a new message is
        delivered at once (ENABLED) or stays queued (DISABLED)."""
        nonlocal sent
        expected_version = stored(tmp_path, "w")
        assert expected_version[0] == state
        await wait_for(lambda: notices.last is not None and (
            notices.last["status"], notices.last["version"]) == (state, expected_version[1]),
            1.0, f"the notice of {state} v{expected_version[1]}")
        sent += 1
        publisher.publish(TOPIC, {"seq": sent})
        if state == "ENABLED":
            await wait_for(lambda: len(endpoint.requests) == sent, 1.0, "the delivery")
        else:  # a window of three follows of the store: nothing may go out
            end = time.monotonic() + 0.6
            while time.monotonic() < end:
                assert len(endpoint.requests) < sent, "delivered while DISABLED"
                await wait_for(lambda: True, 0.1)
            await api.state("w", "ENABLED")  # what was held goes out once enabled
            await wait_for(lambda: len(endpoint.requests) == sent, 2.0, "the held delivery")
            await api.state("w", "DISABLED")
            await wait_for(lambda: notices.last["status"] == "DISABLED", 1.0, "re-disable")

    try:
        await started(daemon)
        await wait_for(lambda: api_ready(admin_port), 10, "the admin server")

        async def write(who: str, state: str) -> None:
            await (cli(state) if who == "cli" else api.state("w", state))

        # Two writers within a fraction of a second, in both orders and to both states:
        # the second always wins (the daemon follows the CLI's write after the API's).
        pairs = [("cli", "DISABLED", "api", "ENABLED"), ("api", "DISABLED", "cli", "ENABLED"),
                 ("cli", "ENABLED", "api", "DISABLED"), ("api", "ENABLED", "cli", "DISABLED")]
        for _ in range(2):
            for first, first_state, second, second_state in pairs:
                await write(first, first_state)
                await write(second, second_state)
                await holds(second_state)
        # The state survives a restart, and so does a change made while the daemon is down.
        assert daemon.terminate() == 0
        await cli("ENABLED")
        daemon.start()
        await started(daemon)
        sent += 1
        publisher.publish(TOPIC, {"seq": sent})
        await wait_for(lambda: len(endpoint.requests) == sent, 5.0, "delivery after restart")
        await api.state("w", "DISABLED")
        assert daemon.terminate() == 0
        daemon.start()
        await started(daemon)
        await wait_for(lambda: api_ready(admin_port), 10, "the admin server")
        status, body = await api.call("GET", "/w")
        assert (status, body["status"]) == (200, "DISABLED")
        await holds("DISABLED")
    finally:
        await api.session.close()
        publisher.close()
        notices.close()
        if daemon.proc.poll() is None:
            daemon.terminate()


def publish_until(publisher: Publisher, stop: threading.Event, rate: float) -> int:
    """Publish ``{"seq": n}`` at ``rate`` a second until ``stop`` (from a thread: the
    pace of the load, not a synchronisation); wait for the broker's acks; the count."""
    infos, start = [], time.monotonic()
    while not stop.is_set():
        infos.append(publisher.publish(TOPIC, {"seq": len(infos)}))
        ahead = start + len(infos) / rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
    for info in infos:
        info.wait_for_publish(30)
    return len(infos)


def api_ready(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


async def test_a_change_that_cannot_be_applied_changes_nothing(
        tmp_path: Path, mosquitto: Mosquitto, certs: Certificates) -> None:
    """A reload and an API PUT whose CA file does not load: 422 / one log line, the old
    configuration keeps delivering without a gap, `status` and /readyz name the failed
    change until a good one applies."""
    main, api_end = [await Endpoint(ssl_context=certs.server_context()).start()
                     for _ in range(2)]
    bad_ca = tmp_path / "bad-ca.pem"
    bad_ca.write_text("this is not a certificate\n")
    admin_port = free_port()
    config = state_config(tmp_path, mosquitto, main, certs, admin_port)
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    api = Api(admin_port)
    api_hook = https_webhook("api", api_end, certs, "/a1")

    async def status() -> str:
        # In a thread: this process's event loop serves the endpoints meanwhile.
        done = await asyncio.to_thread(daemon.cli, "status")
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def readyz() -> dict[str, Any]:
        async with api.session.get("/readyz") as response:
            return await response.json()

    try:
        await started(daemon)
        await wait_for(lambda: api_ready(admin_port), 10, "the admin server")
        assert (await api.call("POST", "", api_hook))[0] == 201
        stop = threading.Event()
        stream = asyncio.create_task(asyncio.to_thread(publish_until, publisher, stop, 100.0))
        await wait_for(lambda: len(api_end.requests) >= 100, 20, "the stream to flow")

        marks = {"put": time.time()}
        # An API PUT with a CA file that does not load.
        status_code, body = await api.call(
            "PUT", "/api", {**api_hook, "url": api_end.url + "/a2",
                            "tls": {"ca_file": str(bad_ca)}})
        assert status_code == 422, body
        assert len(body["errors"]) == 1 and str(bad_ca) in body["errors"][0], body
        shown = await status()
        assert "CHANGE NOT APPLIED" in shown and "(API change of webhook api)" in shown
        assert (await readyz())["failed_change"]["problems"] == body["errors"]
        assert (await api.call("GET", "/api"))[1]["url"] == api_end.url + "/a1"

        # A reload (SIGHUP) with the main file's webhook on that CA file.
        broken = {**config, "webhooks": [https_webhook("w", main, certs, "/v2",
                                                       tls={"ca_file": str(bad_ca)})]}
        daemon.rewrite(broken)
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "configuration not reloaded" in daemon.output(), 10,
                       "the failed reload")
        # `status` cannot read this file either: it says so, with check's words.
        done = await asyncio.to_thread(daemon.cli, "status")
        assert done.returncode == 78
        assert done.stderr.startswith("CHANGE NOT APPLIED: the configuration on disk does "
                                      "not load"), done.stderr
        assert f"webhooks[0].tls.ca_file: cannot load CA certificates from '{bad_ca}'" \
            in done.stderr
        assert (await readyz())["failed_change"]["change"] == "SIGHUP"
        failed_at = time.time()
        marks["failed reload"] = failed_at
        await wait_for(lambda: len([r for r in main.requests if r.at > failed_at]) > 20,
                       10, "deliveries after the failed reload")

        # Good changes apply (the file first: the API's change reloads it too), and the
        # failure is no longer shown.
        reloads = daemon.output().count('"configuration reloaded"')
        marks["good reload"] = time.time()
        daemon.rewrite({**config, "webhooks": [https_webhook("w", main, certs, "/v3")]})
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: daemon.output().count('"configuration reloaded"') > reloads,
                       10, "the good reload")
        status_code, body = await api.call("PUT", "/api", {**api_hook,
                                                            "url": api_end.url + "/a3"})
        assert status_code == 200, body
        marks["good put"] = time.time()
        assert "CHANGE NOT APPLIED" not in await status()
        assert "failed_change" not in await readyz()
        stop.set()
        published = await stream
        for endpoint in (main, api_end):
            await wait_for(lambda e=endpoint: set(seqs(e.requests)) >= set(range(published)),
                           30, "every message")
            times = sorted(r.at for r in endpoint.requests)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            worst = max(range(len(gaps)), key=gaps.__getitem__)
            # At 100 messages a second a stalled worker shows as a gap without end; the
            # bound leaves room for a loaded test machine (2 cores shared by many).
            assert gaps[worst] < 3.0, (f"a {gaps[worst]:.2f}s gap in the deliveries at "
                                       f"{times[worst]} (changes made at {marks})")
        # What comes after the good changes goes where they say.
        after = range(published, published + 5)
        await publisher.publish_all([(TOPIC, {"seq": n}) for n in after])
        for endpoint, path in ((main, "/v3"), (api_end, "/a3")):
            await wait_for(lambda e=endpoint: set(seqs(e.requests)) >= set(after), 10,
                           "the messages after the good changes")
            assert {r.path for r in endpoint.requests if r.json()["payload"]["seq"] in after
                    } == {path}
        assert {r.path for r in main.requests} == {"/ingest", "/v3"}
        assert {r.path for r in api_end.requests} == {"/a1", "/a3"}
        output = daemon.output()
        assert output.count("configuration not reloaded") == 2  # one line per failure
        assert "Task exception was never retrieved" not in output
        assert "Traceback" not in output
    finally:
        await api.session.close()
        publisher.close()
        if daemon.proc.poll() is None:
            daemon.terminate()
        for endpoint in (main, api_end):
            await endpoint.stop()


async def test_a_sender_that_cannot_be_built_changes_nothing(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates
) -> None:
    """The build-then-swap itself (in process): a CA file that stops loading between the
    check and the build leaves config, rules and workers as they were, and the next good
    change applies (no KeyError)."""
    from dataclasses import replace

    from bridge.config import TLSConfig, load_config
    from bridge.daemon import Bridge
    from bridge.errors import ChangeError

    config = state_config(tmp_path, mosquitto, endpoint, certs, free_port())
    config["admin"] = {"listen": None}
    Daemon(tmp_path, config)  # writes config.yaml
    bridge = Bridge(load_config(str(tmp_path / "config.yaml")))
    await bridge.start()
    try:
        running, worker = bridge.config, bridge.workers["w"]
        bad_ca = tmp_path / "bad-ca.pem"
        bad_ca.write_text("not a certificate\n")
        webhook = running.webhooks[0]
        broken = replace(running, webhooks=(
            replace(webhook, url=endpoint.url + "/v2", tls=TLSConfig(ca_file=str(bad_ca))),
            replace(webhook, name="added")))
        try:
            await bridge._apply(broken)
            raise AssertionError("the change applied")
        except ChangeError as error:
            assert error.problems == [
                f"webhook w: its TLS files do not load (tls.ca_file {bad_ca}): [X509: "
                "NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154); "
                "fix the file or the path"]
        assert bridge.config is running and bridge.workers == {"w": worker}
        assert not worker.task.done() and bridge.rules.match is not None
        good = replace(running, webhooks=(replace(webhook, url=endpoint.url + "/v3"),))
        assert await bridge._apply(good) is True
        assert bridge.config == good and bridge.workers["w"] is not worker
        assert bridge.workers["w"].webhook.url == endpoint.url + "/v3"
    finally:
        await bridge.stop()
