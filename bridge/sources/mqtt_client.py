"""One MQTT connection, as an asyncio protocol: connect, subscribe, receive, acknowledge.

Why not paho-mqtt: at the rates a gateway sees after an outage, paho (through aiomqtt)
spent more CPU on each PUBLISH than the rest of the bridge together (reading a packet in
several system calls, building MQTT 5 property objects, one socket write per PUBACK).
This protocol parses a whole read buffer at once, skips properties it does not need and
writes every acknowledgement made in one event-loop pass in one write.

Acknowledgements are explicit: nothing is acknowledged until :meth:`Connection.ack` is
called (after the SQLite commit). QoS 2 is received with the PUBREC held back the same
way, so the broker keeps a message until it is stored. Keepalive pings are sent while
nothing else is; a missing PINGRESP counts only while we are reading the socket (a
bridge that pauses reading for backpressure is not a dead connection).

A PUBLISH over ``max_payload`` is read past, never held (:class:`packets.Reader`), and
handed on with an empty payload and its size, to be acknowledged like any message.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from . import mqtt_packets as packets
from .mqtt_packets import Connack, Oversized, ProtocolError

# topic, payload, qos, retain, mid, and the payload's size when it was over max_payload
PublishHandler = Callable[[str, bytes, int, bool, int, "int | None"], None]


# A read at least this large means more is waiting: pacing does not pause after it.
PACE_BELOW = 64 * 1024


class MqttError(Exception):
    """The connection failed, was refused or was lost."""


class Connection(asyncio.Protocol):
    """An MQTT 3.1.1 or 5 client connection; see the module docstring."""

    def __init__(self, v5: bool, keepalive: int, on_publish: PublishHandler,
                 max_payload: int | None = None) -> None:
        self.v5 = v5
        self.keepalive = keepalive
        self.on_publish = on_publish
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.connack: asyncio.Future[Connack] = self.loop.create_future()
        self.reading_paused = False
        # Seconds the socket rests after a small read (0: read as data arrives); see
        # :meth:`data_received`. Set once subscribed (bridge.sources.mqtt).
        self.pace = 0.0
        self._pace_timer: asyncio.TimerHandle | None = None
        self.dup = False
        self._reader = packets.Reader(max_payload=max_payload, v5=v5)
        self._waiting: dict[int, asyncio.Future[list[int]]] = {}
        self._next_mid = 0
        self._out = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        self._last_out = self.loop.time()
        self._ping_sent: float | None = None
        self._resumed_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.pace and self._pace_timer is None and len(data) < PACE_BELOW:
            # Pacing: at a low rate each message would cost the process a wake-up of its
            # own (on a small gateway that costs more CPU than handling the message), yet
            # its ack waits for the commit window anyway. So after a small read the socket
            # rests for ``pace`` (a share of that window: bridge.store.INTAKE_SHARE) and
            # the next read takes whatever arrived meanwhile. A large read means a high
            # rate: reading goes on at once.
            self._pace_timer = self.loop.call_later(self.pace, self._paced)
            if not self.reading_paused and self.transport is not None:
                self.transport.pause_reading()
        try:
            for first_byte, body in self._reader.feed(data):
                if self.closed.done():
                    return  # failed while handling an earlier packet of this read
                if isinstance(body, Oversized):
                    self.on_publish(body.topic, b"", body.qos, body.retain, body.mid,
                                    body.size)
                elif first_byte >> 4 == packets.PUBLISH:
                    # The DUP flag of the PUBLISH being handled (read by the handler).
                    self.dup = bool(first_byte & 0x08)
                    self.on_publish(*packets.parse_publish(first_byte, body, self.v5), None)
                else:
                    self._control_packet(first_byte >> 4, body)
        except ProtocolError as exc:
            self.fail(MqttError(f"invalid packet from the broker: {exc}"))
        except MqttError as exc:
            self.fail(exc)
        except Exception as exc:  # a handler bug: drop the connection, nothing is acked
            self.fail(MqttError(f"message handling failed: {type(exc).__name__}: {exc}"))

    def _paced(self) -> None:
        self._pace_timer = None
        if not self.reading_paused and self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        error = MqttError(f"connection lost: {exc}" if exc else "connection closed by the broker")
        self._settle(error)

    # -- packets from the broker ------------------------------------------------------

    def _control_packet(self, kind: int, body: bytes) -> None:
        if kind == packets.PUBREL:
            self.write(packets.ack(packets.PUBCOMP, packets.parse_mid(body)))
        elif kind in (packets.PUBACK, packets.SUBACK, packets.UNSUBACK):
            if kind == packets.PUBACK:
                mid = packets.parse_mid(body)
                codes = [body[2]] if len(body) > 2 else [0]
            else:
                mid, codes = packets.parse_suback(body, self.v5)
            waiter = self._waiting.pop(mid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(codes)
        elif kind == packets.PINGRESP:
            self._ping_sent = None
        elif kind == packets.CONNACK:
            if not self.connack.done():
                self.connack.set_result(packets.parse_connack(body, self.v5))
        elif kind == packets.DISCONNECT:
            reason, text = packets.parse_disconnect(body)
            raise MqttError(f"the broker disconnected us: {packets.reason_text(reason)}"
                            + (f": {text}" if text else ""))
        elif kind == packets.PUBREC:
            self.write(packets.ack(packets.PUBREL, packets.parse_mid(body)))
        else:
            raise ProtocolError(f"unexpected packet type {kind}")

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one event-loop pass goes out in one write."""
        self._out += data
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        transport = self.transport
        if self._out and transport is not None and not transport.is_closing():
            transport.write(bytes(self._out))
            self._last_out = self.loop.time()
        self._out.clear()

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message: PUBACK (QoS 1) or PUBREC (QoS 2)."""
        self.write(packets.ack(packets.PUBACK if qos == 1 else packets.PUBREC, mid))

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self._resumed_at = self.loop.time()
            if self._pace_timer is None:  # else the pace's end resumes
                self.transport.resume_reading()

    # -- requests that wait for an answer -----------------------------------------------

    def _mid(self) -> int:
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._waiting:
                return self._next_mid
        raise MqttError("no free packet identifier")

    async def _request(self, build: Callable[[int], bytes], timeout: float) -> list[int]:
        if self.closed.done():
            raise MqttError("not connected")
        mid = self._mid()
        waiter: asyncio.Future[list[int]] = self.loop.create_future()
        self._waiting[mid] = waiter
        self.write(build(mid))
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            raise MqttError(f"no answer from the broker within {timeout:g}s") from None
        finally:
            self._waiting.pop(mid, None)

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0
                        ) -> list[int]:
        """Subscribe; returns the broker's reason code (granted QoS or >= 0x80) per filter."""
        return await self._request(lambda mid: packets.subscribe(mid, filters, v5=self.v5),
                                   timeout)

    async def unsubscribe(self, filters: list[str], timeout: float = 10.0) -> list[int]:
        return await self._request(lambda mid: packets.unsubscribe(mid, filters, v5=self.v5),
                                   timeout)

    async def publish(self, topic: str, payload: bytes, retain: bool = False,
                      timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        codes = await self._request(
            lambda mid: packets.publish(topic, payload, qos=1, retain=retain, mid=mid,
                                        v5=self.v5), timeout)
        if codes and codes[0] >= 0x80:
            raise MqttError(f"publish to {topic} refused: {packets.reason_text(codes[0])}")

    # -- lifetime -----------------------------------------------------------------------

    def start_keepalive(self, keepalive: int) -> None:
        self.keepalive = keepalive
        if keepalive > 0:
            self._timer = self.loop.call_later(keepalive / 2, self._tick)

    def _tick(self) -> None:
        if self.closed.done():
            return
        now = self.loop.time()
        since = max(self._ping_sent or now, self._resumed_at)
        if self._ping_sent is not None and not self.reading_paused \
                and now - since > self.keepalive:
            self.fail(MqttError(f"no PINGRESP from the broker within {self.keepalive}s"))
            return
        if now - self._last_out >= self.keepalive / 2 and self._ping_sent is None:
            self.write(packets.PINGREQ_PACKET)
            self._ping_sent = now
        self._timer = self.loop.call_later(self.keepalive / 2, self._tick)

    def fail(self, error: MqttError) -> None:
        """Drop the connection at once (no DISCONNECT: the broker keeps the session and
        redelivers whatever was not acknowledged)."""
        self._settle(error)
        if self.transport is not None:
            self.transport.abort()

    def _settle(self, error: MqttError) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._pace_timer is not None:
            self._pace_timer.cancel()
        if not self.closed.done():
            self.closed.set_exception(error)
            self.closed.exception()  # retrieved: a lost connection is not an unhandled error
        if not self.connack.done():
            self.connack.set_exception(error)
            self.connack.exception()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        self._waiting.clear()

    def disconnect(self) -> None:
        """Send what is queued and a DISCONNECT, then close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out += packets.disconnect(v5=self.v5)
        self._flush()
        self._settle(MqttError("disconnected"))
        self.transport.close()


async def open_connection(host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                          client_id: str, v5: bool, keepalive: int, clean_start: bool,
                          username: str | None, password: str | None, session_expiry: int,
                          receive_maximum: int, on_publish: PublishHandler,
                          on_made: Callable[[Connection], None] | None = None,
                          timeout: float = 10.0, max_payload: int | None = None
                          ) -> tuple[Connection, Connack]:
    """Connect and wait for the CONNACK; raises :class:`MqttError` if refused.
    ``on_made`` sees the connection before any packet arrives."""
    loop = asyncio.get_running_loop()

    def make() -> Connection:
        connection = Connection(v5, keepalive, on_publish, max_payload)
        if on_made is not None:
            on_made(connection)
        return connection

    async def establish() -> tuple[Connection, Connack]:
        _, connection = await loop.create_connection(
            make, host, port, ssl=ssl_context,
            server_hostname=host if ssl_context is not None else None)
        connection.write(packets.connect(
            client_id, v5=v5, keepalive=keepalive, clean_start=clean_start,
            username=username, password=password, session_expiry=session_expiry,
            receive_maximum=receive_maximum if v5 else None))
        try:
            return connection, await connection.connack
        except BaseException:
            connection.fail(MqttError("connect abandoned"))
            raise

    try:
        connection, connack = await asyncio.wait_for(establish(), timeout)
    except asyncio.TimeoutError:
        raise MqttError(f"no CONNACK from {host}:{port} within {timeout:g}s") from None
    if connack.reason != 0:
        connection.fail(MqttError("refused"))
        raise MqttError(f"the broker refused the connection: "
                        f"{packets.reason_text(connack.reason, v5)}")
    server_keepalive = connack.properties.get(packets.PROP_SERVER_KEEP_ALIVE)
    connection.start_keepalive(server_keepalive if isinstance(server_keepalive, int)
                               else keepalive)
    return connection, connack
