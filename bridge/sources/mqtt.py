"""The MQTT source: one persistent-session subscription for every configured source.

Owns the broker connection (aiomqtt on paho-mqtt 2): MQTT 5 or 3.1.1, a persistent
session so the broker keeps QoS >= 1 messages while we are down, TLS, reconnect with
backoff, shared subscriptions, and manual acknowledgement. A message is acknowledged only
when the future its handler returns has resolved, which the daemon arranges to happen
after the SQLite commit; acks go out in the order messages arrived. A handler failure
never acks: the connection is dropped so the broker redelivers.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MQTTConfig

log = structlog.get_logger("bridge.mqtt")

RECEIVE_MAXIMUM = 1000  # unacknowledged messages the broker may send us (MQTT 5)


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


Handler = Callable[[Message], "asyncio.Future[Any]"]


class _ReadFlow:
    """Stop reading the broker's socket while too many messages wait to be handled.

    The broker should never send more than our Receive Maximum unacknowledged, but a
    broker that ignores it (seen with Mosquitto 2.0 under a 200,000-message backlog)
    would otherwise fill memory with decoded messages. TCP flow control then makes the
    broker hold them, where they belong."""

    HIGH = RECEIVE_MAXIMUM
    LOW = RECEIVE_MAXIMUM // 4

    def __init__(self, client: aiomqtt.Client, unacked: Callable[[], int]) -> None:
        self.client = client
        self.paho = client._client
        self.unacked = unacked
        self.loop = asyncio.get_running_loop()
        self.paused = False

    def check(self) -> None:
        """Called for every message taken and every ack: decoded-but-waiting plus
        taken-but-unacknowledged messages are what the broker made us hold."""
        waiting = self.client._queue.qsize() + self.unacked()
        sock = self.paho.socket()
        if sock is None:
            return
        if not self.paused and waiting > self.HIGH:
            self.loop.remove_reader(sock)
            self.paused = True
        elif self.paused and waiting < self.LOW:
            self.loop.add_reader(sock, self._read)
            self.paused = False

    def _read(self) -> None:
        # What aiomqtt's own reader does: a failed read means the connection is gone.
        try:
            while True:
                self.paho.loop_read()
                sock = self.paho.socket()
                if not (hasattr(sock, "pending") and sock.pending() > 0):
                    break
        except Exception as exc:
            disconnected = self.client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)


class MqttSource:
    """Subscribes to ``filters`` and feeds every message to ``handler``."""

    def __init__(self, config: MQTTConfig, filters: list[tuple[str, int]],
                 handler: Handler) -> None:
        self.config = config
        self.filters = filters
        self.handler = handler
        self.connected = asyncio.Event()
        self.received = 0
        self.acked = 0
        self._client: aiomqtt.Client | None = None
        self._stopping = False
        self._retained: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._drain: Callable[[], Any] | None = None

    def subscription(self, topic_filter: str) -> str:
        group = self.config.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = cfg.session_expiry
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        tls_params = None
        if cfg.tls is not None:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE)
        client = aiomqtt.Client(
            cfg.host, cfg.port, identifier=cfg.client_id, username=cfg.username,
            password=cfg.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=cfg.keepalive, properties=properties, tls_params=tls_params,
            tls_insecure=(not cfg.tls.verify) if cfg.tls is not None else None,
            max_inflight_messages=100, timeout=10)
        # Acknowledge only after the commit (paho-mqtt 2 manual acks).
        client._client.manual_ack_set(True)  # aiomqtt does not expose it
        return client

    async def run(self) -> None:
        """Connect, subscribe and consume until :meth:`stop`; reconnect on any failure."""
        delay = 1.0
        while not self._stopping:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    delay = 1.0
                    await self._on_connected(client)
                    await self._consume(client)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    break
                log.warning("mqtt connection lost", host=self.config.host,
                            port=self.config.port, cause=str(exc), retry_in=round(delay, 1))
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error("mqtt connection failed", host=self.config.host,
                          port=self.config.port, cause=f"{type(exc).__name__}: {exc}",
                          retry_in=round(delay, 1))
            finally:
                self._client = None
                self.connected.clear()
            if self._stopping:
                break
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)

    async def _on_connected(self, client: aiomqtt.Client) -> None:
        if self.filters:
            await client.subscribe([(self.subscription(f), qos) for f, qos in self.filters])
        log.info("mqtt connected", host=self.config.host, port=self.config.port,
                 client_id=self.config.client_id, subscriptions=len(self.filters))
        self.connected.set()
        for topic, payload in list(self._retained.items()):
            await client.publish(topic, payload, qos=1, retain=True)

    async def _consume(self, client: aiomqtt.Client) -> None:
        paho = client._client
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def acknowledge(mid: int, qos: int, future: asyncio.Future[Any]) -> None:
            unacked[0] -= 1
            if future.cancelled() or future.exception() is not None:
                if not failed.done():
                    failed.set_result(None)
                return
            # A message from an earlier connection must not be acked on this one: its mid
            # may now belong to another message. The broker redelivers it instead.
            if self._client is client and paho.is_connected():
                paho.ack(mid, qos)
                self.acked += 1
                flow.check()

        unacked = [0]  # QoS>0 messages taken and not yet acknowledged
        flow = _ReadFlow(client, lambda: unacked[0])

        async def consume() -> None:
            async for message in client.messages:
                self.received += 1
                flow.check()
                future = self.handler(Message(str(message.topic), bytes(message.payload or b""),
                                              message.qos, bool(message.retain)))
                if message.qos:
                    unacked[0] += 1
                    mid, qos = message.mid, message.qos
                    future.add_done_callback(lambda f, m=mid, q=qos: acknowledge(m, q, f))

        consumer = asyncio.create_task(consume())
        stop = asyncio.create_task(self._stop_requested.wait())
        try:
            done, _ = await asyncio.wait({consumer, failed, stop},
                                         return_when=asyncio.FIRST_COMPLETED)
            if failed in done:
                raise aiomqtt.MqttError("a message could not be stored; reconnecting so the "
                                        "broker redelivers it")
            if stop in done:
                consumer.cancel()
                if self._drain is not None:
                    await self._drain()  # commits what was taken, so its acks go out now
                await asyncio.sleep(0)
                return
            consumer.result()
        finally:
            consumer.cancel()
            stop.cancel()

    async def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish a notice now if connected, and (retained ones) again on every connect."""
        if retain and payload:
            self._retained[topic] = payload
        elif retain:
            self._retained.pop(topic, None)  # an empty retained message clears the topic
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt publish failed", topic=topic, cause=str(exc))

    async def set_filters(self, filters: list[tuple[str, int]]) -> None:
        """Change the subscriptions live (config reload): subscribe to what is new first,
        then unsubscribe from what is gone, so a filter kept under a new QoS never lapses."""
        old, self.filters = dict(self.filters), filters
        new = dict(filters)
        added = [(f, q) for f, q in filters if old.get(f) != q]
        removed = [f for f in old if f not in new]
        client = self._client
        if client is None or not self.connected.is_set():
            return  # applied on the next connect
        try:
            if added:
                await client.subscribe([(self.subscription(f), q) for f, q in added])
            if removed:
                await client.unsubscribe([self.subscription(f) for f in removed])
        except aiomqtt.MqttError as exc:
            log.warning("mqtt subscription change failed; applied on reconnect",
                        cause=str(exc))
        log.info("mqtt subscriptions changed", added=[f for f, _ in added], removed=removed)

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="mqtt-source")
        return self._task

    async def stop(self, drain: Callable[[], Any] | None = None) -> None:
        """Stop taking messages, let ``drain`` commit what was taken (so those are acked),
        then disconnect; anything unacknowledged stays with the broker."""
        self._stopping = True
        self._drain = drain
        self._stop_requested.set()
        if self._task is None or self._task.done():
            return
        if not self.connected.is_set():
            self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 15)
        except (asyncio.CancelledError, asyncio.TimeoutError, aiomqtt.MqttError):
            self._task.cancel()
