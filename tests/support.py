"""Real parts for integration tests: a Mosquitto broker on a free loopback port, HTTPS
endpoints (aiohttp + trustme certificates) that record every request, the daemon as a
subprocess, and waiting on conditions with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trustme
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


async def wait_for(condition: Callable[[], Any], timeout: float = 20.0,
                   what: str = "condition", interval: float = 0.02) -> Any:
    """Poll ``condition`` until it is truthy; fail with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Mosquitto:
    """A private Mosquitto on a free loopback port (no persistence, big offline queues)."""

    def __init__(self, workdir: Path, persistence: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # As root Mosquitto would switch to the 'mosquitto' user, who cannot write
            # its persistence file in the test's directory.
            + ("user root\n" if os.geteuid() == 0 else "")
            + (f"persistence true\npersistence_location {workdir}/\n" if persistence
               else "persistence false\n") +
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "set_tcp_nodelay true\n"
        )

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()


class Publisher:
    """A plain paho-mqtt client for the test side (QoS 1, waits for each PUBACK batch)."""

    def __init__(self, port: int, client_id: str = "test-publisher",
                 protocol: int = paho.MQTTv5) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1,
                retain: bool = False) -> paho.MQTTMessageInfo:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    async def publish_all(self, items: list[tuple[str, Any]], qos: int = 1) -> None:
        """Publish and wait for every PUBACK (in a thread: the loop keeps serving)."""
        infos = [self.publish(t, p, qos) for t, p in items]
        await asyncio.to_thread(lambda: [i.wait_for_publish(30) for i in infos])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained message on ``topic`` (None when there is none)."""
    got: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time()}")
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect("127.0.0.1", port)
    client.subscribe(topic, 1)
    client.loop_start()
    end = time.monotonic() + timeout
    while not got and time.monotonic() < end:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    return got[0] if got else None


@dataclass
class Received:
    method: str
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float
    host: str
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[["Received"], "web.StreamResponse | Awaitable[web.StreamResponse]"]


@dataclass
class Endpoint:
    """An HTTP(S) server that records every request and answers via ``responder``."""

    ssl_context: ssl.SSLContext | None = None
    responder: Responder | None = None
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(request.method, request.path, request.raw_path,
                            request.query_string, dict(request.headers), await request.read(),
                            time.time(), request.host)
        self.requests.append(received)
        if self.responder is None:
            response: web.StreamResponse = web.Response(status=200, text="ok")
        else:
            answer = self.responder(received)
            response = await answer if isinstance(answer, Awaitable) else answer
        received.status = response.status
        return response

    async def start(self, port: int | None = None) -> Endpoint:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = port or self.port or free_port()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def bodies(self) -> list[Any]:
        return [r.json() for r in self.requests]


class Certificates:
    """A trustme CA, a server certificate for 127.0.0.1/localhost, and file paths."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        if require_client_cert:
            self.ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class Daemon:
    """``webhook-bridge run`` as a real subprocess on a config file written by the test."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None
                 ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "daemon.log"

    def start(self) -> Daemon:
        runs = len(list(self.workdir.glob("daemon*.log")))
        self.log_path = self.workdir / f"daemon{runs}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rewrite(self, config: dict[str, Any] | str) -> None:
        """Replace the config file atomically (the daemon also watches it)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        temp = self.config_path.with_suffix(".tmp")
        temp.write_text(text)
        os.replace(temp, self.config_path)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "-c", str(self.config_path), env=self.env, timeout=timeout)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=timeout)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="wb-test-"))


# -- shared by the integration tests ---------------------------------------------------

def base_config(tmp: Path, broker: Mosquitto, webhooks: list[dict[str, Any]],
                sources: list[dict[str, Any]] | None = None, **mqtt: Any) -> dict[str, Any]:
    return {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": f"wb-{tmp.name}",
                 "keepalive": 5, **mqtt},
        "store": {"path": str(tmp / "state" / "queue.db")},
        "admin": {"listen": None},
        "log": {"format": "json", "level": "info"},
        "sources": sources or [{"name": "telemetry", "topic": "devices/{device_id}/telemetry",
                                "qos": 1, "format": "json"}],
        "webhooks": webhooks,
    }


def https_webhook(name: str, endpoint: Endpoint, certs: Certificates, path: str = "/ingest",
                  **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": endpoint.url + path, "tls": {"ca_file": str(certs.ca_file)},
            "retry": {"initial": "100ms", "max": "1s"}, **extra}


async def started(daemon: Daemon, times: int = 1) -> Daemon:
    """Wait until the daemon is subscribed (its ``times``-th 'mqtt connected' line)."""
    await wait_for(lambda: daemon.output().count('"mqtt connected"') >= times
                   or daemon.proc.poll() is not None, 20, "the daemon to connect")
    assert daemon.proc.poll() is None, daemon.output()
    return daemon


def seqs(requests: list[Received]) -> list[int]:
    return [r.json()["payload"]["seq"] for r in requests]


def queued(tmp: Path) -> int:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]




def paced_publish(publisher: Publisher, numbers: range, rate: float,
                  topic: str = "devices/d1/telemetry", wait: bool = True
                  ) -> list[paho.MQTTMessageInfo]:
    """Publish ``{"seq": n}`` at ``rate`` a second (from a thread: the sleep is the load's
    pace, not a synchronisation), then, with ``wait``, wait for the broker's
    acknowledgements."""
    start = time.monotonic()
    infos = []
    for n, seq in enumerate(numbers):
        infos.append(publisher.publish(topic, {"seq": seq}))
        ahead = start + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    if wait:
        for info in infos:
            info.wait_for_publish(30)
    return infos
