"""The MQTT source: one persistent-session subscription for every configured source.

Owns the broker connection (:mod:`bridge.sources.mqtt_client`): MQTT 5 or 3.1.1, a
persistent session so the broker keeps QoS >= 1 messages while we are down, TLS,
reconnect with backoff, shared subscriptions, and manual acknowledgement. A message is
acknowledged only when the future its handler returns has resolved, which the daemon
arranges to happen after the SQLite commit; acks go out in the order messages arrived
(MQTT 4.6). A handler failure never acks: the connection is dropped so the broker
redelivers. While more than ``RECEIVE_MAXIMUM`` messages wait for their commit the
socket is not read, so a broker that ignores our Receive Maximum (Mosquitto 2.0 under a
large backlog) is held back by TCP flow control instead of filling our memory.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..config import MQTTConfig
from . import mqtt_packets as packets
from .mqtt_client import Connection, MqttError, open_connection

log = structlog.get_logger("bridge.mqtt")

# Tests only: exit right after a commit, before its ack (the redelivery window, SPEC §5).
_CRASH_BEFORE_ACK = os.environ.get("WEBHOOK_BRIDGE_TEST_CRASH_BEFORE_ACK") == "1"
FIRST_RETRY = 0.2  # seconds before the first reconnect attempt (jittered down to half)
RECEIVE_MAXIMUM = 1000  # unacknowledged messages the broker may send us (MQTT 5)
RESUME_BELOW = RECEIVE_MAXIMUM // 4
STABLE_AFTER = 30.0  # seconds a connection must last before the reconnect backoff resets


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    oversize: int | None = None
    """The payload's size when it was over ``mqtt.max_payload`` (``payload`` is then
    empty: it was read past, never held)."""
    mid: int = 0  # the packet id (QoS 1 and 2)
    dup: bool = False  # the broker sent it before (a redelivery)


Handler = Callable[[Message], "asyncio.Future[Any]"]


class _Session:
    """The messages of one connection that wait for their commit, in arrival order."""

    def __init__(self, source: MqttSource, connection: Connection) -> None:
        self.source = source
        self.connection = connection
        self.pending: deque[tuple[asyncio.Future[Any], int, int]] = deque()
        self.watched: asyncio.Future[Any] | None = None

    def take(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int,
             oversize: int | None) -> None:
        source = self.source
        source.received += 1
        future = source.handler(Message(topic, payload, qos, retain, oversize, mid,
                                        self.connection.dup))
        if not qos:
            return
        self.pending.append((future, mid, qos))
        # Messages stored by one commit share its future: watch each future once.
        if future is not self.watched:
            self.watched = future
            future.add_done_callback(self.settled)
        if len(self.pending) > RECEIVE_MAXIMUM:
            self.connection.pause_reading()

    def settled(self, _: asyncio.Future[Any] | None = None) -> None:
        """Acknowledge, in order, every message whose commit is done."""
        pending, connection = self.pending, self.connection
        open_ = not connection.closed.done()
        while pending and pending[0][0].done():
            future, mid, qos = pending.popleft()
            if future.cancelled() or future.exception() is not None:
                connection.fail(MqttError("a message could not be stored; reconnecting so "
                                          "the broker redelivers it"))
                pending.clear()
                return
            # A message of an earlier connection is never acked on a later one: its mid
            # may belong to another message there. The broker redelivers it instead.
            if open_:
                if _CRASH_BEFORE_ACK:  # tests: the fault between commit and ack
                    os._exit(70)
                connection.ack(mid, qos)
                self.source.acked += 1
                if self.source.on_acked is not None:
                    self.source.on_acked(mid)
        if connection.reading_paused and len(pending) < RESUME_BELOW \
                and not self.source._stopping and not self.source.intake_paused:
            connection.resume_reading()


class MqttSource:
    """Subscribes to ``filters`` and feeds every message to ``handler``."""

    def __init__(self, config: MQTTConfig, filters: list[tuple[str, int]],
                 handler: Handler, pace: float = 0.0) -> None:
        self.config = config
        # Seconds the socket rests after a small read (Connection.pace), once subscribed.
        self.pace = pace
        self.filters = filters
        self.handler = handler
        self.connected = asyncio.Event()
        self.received = 0
        self.acked = 0
        self.connects = 0
        self.on_connected: Callable[[], None] | None = None  # e.g. a metric
        self.on_acked: Callable[[int], None] | None = None  # packet id acknowledged
        self.on_session: Callable[[bool], None] | None = None  # CONNACK session present
        self._connection: Connection | None = None
        self._stopping = False
        self._retained: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._drain: Callable[[], Any] | None = None
        # Intake paused by the daemon (the store's disk is full): the socket is not read,
        # the connection and its keepalive stay, and the broker holds what we do not read.
        self.intake_paused = False
        self._session: _Session | None = None

    def subscription(self, topic_filter: str) -> str:
        group = self.config.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        return tls.client_context() if tls is not None else None

    async def _connect(self) -> tuple[Connection, _Session]:
        cfg = self.config
        v5 = cfg.protocol == "5"
        session: _Session | None = None

        def on_publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int,
                       oversize: int | None) -> None:
            assert session is not None
            session.take(topic, payload, qos, retain, mid, oversize)

        # The session exists before CONNECT: a resumed session's queued messages may
        # arrive in the same read as the CONNACK.
        def make_session(connection: Connection) -> None:
            nonlocal session
            session = _Session(self, connection)

        connection, connack = await open_connection(
            cfg.host, cfg.port, ssl_context=self._ssl_context(), client_id=cfg.client_id,
            v5=v5, keepalive=cfg.keepalive, clean_start=False, username=cfg.username,
            password=cfg.password, session_expiry=cfg.session_expiry,
            receive_maximum=RECEIVE_MAXIMUM, on_publish=on_publish,
            on_made=make_session, max_payload=cfg.max_payload)
        assert session is not None
        self._session = session
        if self.on_session is not None:
            self.on_session(connack.session_present)
        return connection, session

    async def run(self) -> None:
        """Connect, subscribe and consume until :meth:`stop`; reconnect on any failure."""
        # The first attempts are fast (a broker restarting is back within a second, and
        # messages published meanwhile may be dropped until we subscribe again), then
        # the pause doubles up to 30 s.
        delay = FIRST_RETRY
        while not self._stopping:
            try:
                connection, session = await self._connect()
            except (MqttError, OSError, ValueError, ssl.SSLError) as exc:
                log.error("mqtt connection failed", host=self.config.host,
                          port=self.config.port, cause=_describe(exc),
                          retry_in=round(delay, 2))
            else:
                self._connection = connection
                self.connects += 1
                if self.on_connected is not None:
                    self.on_connected()
                since = time.monotonic()
                try:
                    await self._serve(connection, session)
                except MqttError as exc:
                    if self._stopping:
                        break
                    # Only a connection that held resets the backoff: one the broker
                    # drops at once (ACL, takeover, a bug) must not make a tight loop.
                    if time.monotonic() - since >= STABLE_AFTER:
                        delay = FIRST_RETRY
                    log.warning("mqtt connection lost", host=self.config.host,
                                port=self.config.port, cause=str(exc),
                                retry_in=round(delay, 2))
                finally:
                    self._connection = None
                    self.connected.clear()
                    connection.fail(MqttError("closed"))
            if self._stopping:
                break
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)

    async def _serve(self, connection: Connection, session: _Session) -> None:
        if self.filters:
            await self._subscribe(connection, self.filters)
        log.info("mqtt connected", host=self.config.host, port=self.config.port,
                 client_id=self.config.client_id, subscriptions=len(self.filters))
        self.connected.set()
        # Not before: the SUBACK must not wait. At most a quarter of the keepalive, so a
        # PINGRESP is read long before the connection would be given up for lack of one.
        keepalive = connection.keepalive
        connection.pace = min(self.pace, keepalive / 4) if keepalive > 0 else self.pace
        if self.intake_paused:
            connection.pause_reading()
        for topic, payload in list(self._retained.items()):
            await connection.publish(topic, payload, retain=True)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({connection.closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if connection.closed.done():
            connection.closed.result()  # raises why it closed
            return
        # Stopping: take nothing more, commit what was taken so its acks go out now.
        connection.pause_reading()
        if self._drain is not None:
            await self._drain()
        await asyncio.sleep(0)  # let the commit's callbacks queue their acks
        session.settled()
        connection.disconnect()

    async def _subscribe(self, connection: Connection, filters: list[tuple[str, int]]
                         ) -> None:
        codes = await connection.subscribe([(self.subscription(f), q) for f, q in filters])
        for (topic_filter, _), code in zip(filters, codes):
            if code >= 0x80:
                log.error("mqtt subscription refused", filter=self.subscription(topic_filter),
                          cause=packets.reason_text(code, self.config.protocol == "5"),
                          fix="allow this client to subscribe to the topic in the "
                              "broker's ACL, or change the source's topic")

    async def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish a notice now if connected, and (retained ones) again on every connect."""
        if retain and payload:
            self._retained[topic] = payload
        elif retain:
            self._retained.pop(topic, None)  # an empty retained message clears the topic
        connection = self._connection
        if connection is not None and self.connected.is_set():
            try:
                await connection.publish(topic, payload, retain=retain)
            except MqttError as exc:
                log.warning("mqtt publish failed", topic=topic, cause=str(exc))

    async def set_filters(self, filters: list[tuple[str, int]]) -> None:
        """Change the subscriptions live (config reload): subscribe to what is new first,
        then unsubscribe from what is gone, so a filter kept under a new QoS never lapses."""
        old, self.filters = dict(self.filters), filters
        new = dict(filters)
        added = [(f, q) for f, q in filters if old.get(f) != q]
        removed = [f for f in old if f not in new]
        connection = self._connection
        if connection is None or not self.connected.is_set():
            return  # applied on the next connect
        try:
            if added:
                await self._subscribe(connection, added)
            if removed:
                await connection.unsubscribe([self.subscription(f) for f in removed])
        except MqttError as exc:
            log.warning("mqtt subscription change failed; applied on reconnect",
                        cause=str(exc))
        log.info("mqtt subscriptions changed", added=[f for f, _ in added], removed=removed)

    def pause_intake(self, paused: bool) -> None:
        """Stop (or start again) reading messages, keeping the connection."""
        self.intake_paused = paused
        connection, session = self._connection, self._session
        if connection is None or connection.closed.done():
            return
        if paused:
            connection.pause_reading()
        elif session is not None and session.connection is connection:
            session.settled()  # resumes reading unless too many messages still wait
        else:
            connection.resume_reading()

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
        except (asyncio.CancelledError, asyncio.TimeoutError, MqttError):
            self._task.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MqttError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
