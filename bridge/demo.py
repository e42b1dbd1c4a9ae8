"""``webhook-bridge demo``: the whole path live in one process and one terminal.

Owns the demo set-up: a throwaway directory with a generated config (validated by
:func:`~bridge.config.load_config` like any other), the bridge with its embedded MQTT
broker, the ``listen`` receiver printing one line per delivery, and a simulated device
publishing telemetry every second. Needs no Mosquitto and leaves nothing behind.
``WEBHOOK_BRIDGE_DEMO_COUNT=N`` stops it after N deliveries (used by the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile

import yaml

from . import logs
from .config import Config, load_config
from .receiver import Receiver, serve, stop_on_signals
from .signing import generate_secret
from .sources.mqtt_client import MqttError, open_connection

DEVICE = "demo-1"
WEBHOOK = "demo-receiver"
COUNT_ENV = "WEBHOOK_BRIDGE_DEMO_COUNT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: str, broker_port: int, receiver_port: int, secret: str) -> str:
    """The demo's config file; returns its path."""
    config = {
        "mqtt": {"embedded": True, "host": "127.0.0.1", "port": broker_port,
                 "protocol": "3.1.1", "client_id": "webhook-bridge-demo", "keepalive": 10},
        "store": {"path": os.path.join(directory, "state", "queue.db"),
                  "durability": "process_crash"},
        "admin": {"listen": None},
        "log": {"format": "console", "level": "warning"},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry",
                     "qos": 1, "format": "json"}],
        "webhooks": [{
            "name": WEBHOOK,
            "description": "the demo's local receiver",
            "url": f"http://127.0.0.1:{receiver_port}/ingest/{{device_id}}",
            "allow_insecure_http": True,  # the receiver is in this process, on loopback
            "signing": {"scheme": "standard-webhooks", "secret": secret},
            "retry": {"initial": "200ms", "max": "2s"},
        }],
    }
    path = os.path.join(directory, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def banner(config: Config, receiver_port: int, directory: str) -> str:
    port = config.mqtt.port
    return f"""\
webhook-bridge demo: everything below runs in this one process.

  MQTT broker (embedded)  127.0.0.1:{port}
  bridge                  subscribes devices/{{device_id}}/telemetry, queue in {directory}
  receiver                http://127.0.0.1:{receiver_port}/ingest/{{device_id}}
                          verifies each request's Standard Webhooks signature
  simulated device        {DEVICE} publishes {{"temp": ..., "seq": n}} every second

Publish your own message from another terminal:
  mosquitto_pub -h 127.0.0.1 -p {port} -V mqttv311 -q 1 -t devices/my-sensor/telemetry \\
    -m '{{"temp": 30.5}}'

Each line below is one delivery the receiver got. Ctrl-C stops the demo.
"""


async def simulate_device(port: int, stop: asyncio.Event) -> None:
    """Publish a reading every second until ``stop`` (reconnecting if the broker blips)."""
    seq, temp = 0, 21.5
    while not stop.is_set():
        connection = None
        try:
            connection, _ = await open_connection(
                "127.0.0.1", port, ssl_context=None, client_id=f"{DEVICE}-sim", v5=False,
                keepalive=30, clean_start=True, username=None, password=None,
                session_expiry=0, receive_maximum=0, on_publish=lambda *_: None)
            while not stop.is_set():
                seq += 1
                temp = round(temp + random.uniform(-0.3, 0.3), 2)
                await connection.publish(f"devices/{DEVICE}/telemetry",
                                         json.dumps({"temp": temp, "seq": seq}).encode())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            connection.disconnect()
        except (MqttError, OSError) as exc:
            if connection is not None:
                connection.fail(MqttError("reconnecting"))
            print(f"simulated device: {exc}; reconnecting", file=sys.stderr, flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def _wanted_count() -> int | None:
    text = os.environ.get(COUNT_ENV, "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


async def _demo(directory: str) -> None:
    from .daemon import Bridge  # the daemon pulls in the MQTT stack; only load it here

    secret = generate_secret()
    receiver_port = _free_port()
    config = load_config(write_config(directory, _free_port(), receiver_port, secret))
    logs.setup(config.log.format, config.log.level)
    stop = asyncio.Event()
    stop_on_signals(stop)
    wanted = _wanted_count()

    def delivered(count: int) -> None:
        if wanted is not None and count >= wanted:
            stop.set()

    receiver = Receiver(secret, compact=True, on_delivery=delivered)
    runner = await serve(receiver, "127.0.0.1", receiver_port)
    bridge = Bridge(config)
    device: asyncio.Task[None] | None = None
    try:
        await bridge.start()
        # Publishing before the bridge has subscribed would lose the first readings.
        await asyncio.wait_for(bridge.source.connected.wait(), 30)
        print(banner(config, receiver_port, directory), flush=True)
        device = asyncio.create_task(simulate_device(config.mqtt.port, stop))
        await stop.wait()
    finally:
        stop.set()
        if device is not None:
            await device
        await bridge.stop()
        await runner.cleanup()
    print(f"demo stopped; the receiver got {receiver.count} deliveries", flush=True)


def run_demo() -> int:
    directory = tempfile.mkdtemp(prefix="webhook-bridge-demo-")
    try:
        asyncio.run(_demo(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0
