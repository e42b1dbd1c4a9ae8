"""Webhook state has one truth and live changes are atomic (SPEC §5), against the running
daemon: a real Mosquitto, a real HTTPS endpoint, the daemon as a subprocess, the CLI as a
subprocess and the admin API over HTTP."""

from __future__ import annotations

import json
import sqlite3
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
        done = daemon.cli("enable" if state == "ENABLED" else "disable", "w")
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
            await cli("ENABLED")  # what was held goes out once enabled
            await wait_for(lambda: len(endpoint.requests) == sent, 2.0, "the held delivery")
            await cli("DISABLED")
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


def api_ready(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False
