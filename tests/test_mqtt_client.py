"""The MQTT codec (pure) and the connection protocol against a real Mosquitto, with
paho-mqtt as the independent peer on the publishing side."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.sources import mqtt_packets as packets
from bridge.sources.mqtt_client import Connection, MqttError, open_connection

from .support import Mosquitto, Publisher, wait_for

# -- codec ------------------------------------------------------------------------------


@given(st.integers(0, packets.MAX_REMAINING))
def test_varint_round_trip(value: int) -> None:
    encoded = packets.varint(value)
    assert len(encoded) == (1 if value < 128 else 2 if value < 16384
                            else 3 if value < 2097152 else 4)
    assert packets.read_varint(encoded + b"tail", 0) == (value, len(encoded))


def test_varint_limits() -> None:
    assert packets.varint(127) == b"\x7f"
    assert packets.varint(128) == b"\x80\x01"
    assert packets.varint(16383) == b"\xff\x7f"
    with pytest.raises(ValueError):
        packets.varint(packets.MAX_REMAINING + 1)
    with pytest.raises(packets.ProtocolError):
        packets.read_varint(b"\xff\xff\xff\xff\x01", 0)


publishes = st.lists(st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=300),
                               st.integers(0, 2), st.booleans(), st.integers(1, 65535)),
                     min_size=1, max_size=12)


@given(publishes, st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_reader_cuts_any_split_of_a_stream_into_the_same_packets(
        items: list[tuple[str, bytes, int, bool, int]], cuts: list[int]) -> None:
    stream = b"".join(
        packets.publish(topic, payload, qos=qos, retain=retain, mid=mid if qos else None,
                        v5=True) for topic, payload, qos, retain, mid in items)
    reader = packets.Reader()
    got: list[tuple[str, bytes, int, bool, int]] = []
    position, index = 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        index += 1
        for first, body in reader.feed(stream[position:position + size]):
            got.append(packets.parse_publish(first, body, True))
        position += size
    assert got == [(t, p, q, r, m if q else 0) for t, p, q, r, m in items]


def test_publish_with_properties_is_parsed_past_them() -> None:
    # PUBLISH QoS 1, topic "a/b", mid 7, properties: payload format indicator (0x01) = 1
    # and a user property (0x26) ("k", "v"), then the payload.
    props = b"\x01\x01" + b"\x26\x00\x01k\x00\x01v"
    body = b"\x00\x03a/b\x00\x07" + packets.varint(len(props)) + props + b'{"t":1}'
    assert packets.parse_publish(0x32, body, True) == ("a/b", b'{"t":1}', 1, False, 7)
    # The same message under MQTT 3.1.1 has no properties at all.
    assert packets.parse_publish(0x33, b"\x00\x03a/b\x00\x07{}", False) == \
        ("a/b", b"{}", 1, True, 7)
    with pytest.raises(packets.ProtocolError):
        packets.parse_publish(0x36, body, True)  # QoS 3 does not exist


@pytest.mark.parametrize(("first", "body", "v5"), [
    (0x32, b"\x00\x03a/b", True),  # QoS 1: no packet id
    (0x32, b"\x00\x03a/b\x00", False),  # half a packet id
    (0x32, b"\x00\x03a/b\x00\x07", True),  # MQTT 5: no properties length
    (0x30, b"\x00\x03a/b", True),  # QoS 0, MQTT 5: no properties length
    (0x30, b"\x00\x09a/b", False),  # the topic runs past the packet
])
def test_a_truncated_publish_is_a_protocol_error(first: int, body: bytes, v5: bool) -> None:
    with pytest.raises(packets.ProtocolError, match="truncated PUBLISH"):
        packets.parse_publish(first, body, v5)


def test_connect_bytes_v311_and_v5() -> None:
    v311 = packets.connect("cid", v5=False, keepalive=30, clean_start=False,
                           username="u", password="p")
    assert v311 == (b"\x10\x15" + b"\x00\x04MQTT\x04\xc0\x00\x1e" + b"\x00\x03cid"
                    + b"\x00\x01u" + b"\x00\x01p")
    v5 = packets.connect("cid", v5=True, keepalive=30, clean_start=False,
                         session_expiry=86400, receive_maximum=1000)
    properties = b"\x11" + struct.pack("!I", 86400) + b"\x21" + struct.pack("!H", 1000)
    body = (b"\x00\x04MQTT\x05\x00\x00\x1e" + bytes([len(properties)]) + properties
            + b"\x00\x03cid")
    assert v5 == b"\x10" + bytes([len(body)]) + body


def test_connack_and_disconnect_properties() -> None:
    props = b"\x12\x00\x03abc" + b"\x13\x00\x3c" + b"\x21\x00\x0a"
    connack = packets.parse_connack(b"\x01\x00" + bytes([len(props)]) + props, True)
    assert connack.session_present and connack.reason == 0
    assert connack.properties == {0x12: "abc", 0x13: 60, 0x21: 10}
    reason = b"\x1f\x00\x05taken"
    assert packets.parse_disconnect(b"\x8e" + bytes([len(reason)]) + reason) == \
        (0x8E, "taken")
    assert packets.reason_text(0x8E) == "session taken over (reason 0x8E)"
    assert packets.reason_text(5, v5=False) == "not authorized"


@given(publishes, st.lists(st.integers(1, 50), min_size=1, max_size=30),
       st.integers(0, 200), st.booleans())
def test_reader_reads_past_publishes_over_max_payload(
        items: list[tuple[str, bytes, int, bool, int]], cuts: list[int], limit: int,
        v5: bool) -> None:
    """Whatever the split, a PUBLISH whose body is over the limit comes out as Oversized
    (topic, mid, payload size) and the others as before; nothing over the limit is ever
    buffered beyond its header."""
    encoded = [packets.publish(topic, payload, qos=qos, retain=retain,
                               mid=mid if qos else None, v5=v5)
               for topic, payload, qos, retain, mid in items]
    stream = b"".join(encoded)
    reader = packets.Reader(max_payload=limit, v5=v5)
    got: list[object] = []
    position, index = 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        index += 1
        for first, body in reader.feed(stream[position:position + size]):
            got.append(body if isinstance(body, packets.Oversized)
                       else packets.parse_publish(first, body, v5))
        assert len(reader._buffer) <= 2 + 2 + 160 + 2 + 4 + 50  # a header and a read
        position += size
    expected: list[object] = []
    for topic, payload, qos, retain, mid in items:
        header = len(topic.encode()) + 2 + (2 if qos else 0) + (1 if v5 else 0)
        body_length = header + len(payload)
        if body_length > limit:
            expected.append(packets.Oversized(topic, qos, retain, mid if qos else 0,
                                              len(payload)))
        else:
            expected.append((topic, payload, qos, retain, mid if qos else 0))
    assert got == expected


def test_acks_are_four_bytes() -> None:
    assert packets.ack(packets.PUBACK, 0x1234) == b"\x40\x02\x12\x34"
    assert packets.ack(packets.PUBREC, 1) == b"\x50\x02\x00\x01"
    assert packets.ack(packets.PUBREL, 1) == b"\x62\x02\x00\x01"
    assert packets.ack(packets.PUBCOMP, 1) == b"\x70\x02\x00\x01"


# -- against Mosquitto --------------------------------------------------------------------

Received = list[tuple[str, bytes, int, bool, int]]


async def connect(broker: Mosquitto | ScriptedBroker, received: Received, client_id: str = "bridge",
                  v5: bool = True, keepalive: int = 30, max_payload: int | None = None,
                  oversized: list[tuple[str, int, int]] | None = None) -> Connection:
    def on_publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int,
                   oversize: int | None) -> None:
        if oversize is None:
            received.append((topic, payload, qos, retain, mid))
        else:
            assert payload == b"" and oversized is not None
            oversized.append((topic, oversize, mid))

    connection, _ = await open_connection(
        "127.0.0.1", broker.port, ssl_context=None, client_id=client_id, v5=v5,
        keepalive=keepalive, clean_start=False, username=None, password=None,
        session_expiry=3600, receive_maximum=100, on_publish=on_publish,
        max_payload=max_payload)
    return connection


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("qos", [1, 2])
async def test_unacked_messages_come_back_and_acked_ones_do_not(
        mosquitto: Mosquitto, qos: int, v5: bool) -> None:
    received: Received = []
    connection = await connect(mosquitto, received, v5=v5)
    assert await connection.subscribe([("t/#", qos)]) == [qos]
    publisher = Publisher(mosquitto.port)
    try:
        await publisher.publish_all([(f"t/{n}", {"n": n}) for n in range(10)], qos=qos)
        await wait_for(lambda: len(received) == 10, 10, "10 messages")
        assert [topic for topic, *_ in received] == [f"t/{n}" for n in range(10)]
        for _, _, got_qos, _, mid in received[:4]:
            assert got_qos == qos
            connection.ack(mid, qos)
        if qos == 2:  # the broker's PUBREL for each PUBREC is answered with PUBCOMP
            await wait_for(lambda: connection._out == bytearray(), 5, "PUBCOMPs sent")
        await connection.subscribe([("sync/#", 1)])  # a round trip: the acks have arrived
        connection.fail(MqttError("simulated crash"))

        again: Received = []
        connection = await connect(mosquitto, again, v5=v5)
        await wait_for(lambda: len(again) == 6, 10, "the 6 unacknowledged messages")
        assert [topic for topic, *_ in again] == [f"t/{n}" for n in range(4, 10)]
        for *_, mid in again:
            connection.ack(mid, qos)
        await connection.subscribe([("sync/#", 1)])
        connection.disconnect()

        final: Received = []
        connection = await connect(mosquitto, final, v5=v5)
        await connection.subscribe([("sync/#", 1)])
        assert final == []
        connection.disconnect()
    finally:
        publisher.close()


async def test_paused_reading_outlasts_the_keepalive(mosquitto: Mosquitto) -> None:
    """A bridge that stops reading for backpressure keeps its connection: it still pings
    and does not count the unread PINGRESP as a dead broker."""
    received: Received = []
    connection = await connect(mosquitto, received, keepalive=1)
    await connection.subscribe([("t/#", 1)])
    connection.pause_reading()
    publisher = Publisher(mosquitto.port)
    try:
        await publisher.publish_all([(f"t/{n}", {"n": n}) for n in range(20)])
        # Three keepalive periods with the socket unread: the connection must stay.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(connection.closed), 3.5)
        assert received == []
        connection.resume_reading()
        await wait_for(lambda: len(received) == 20, 10, "the 20 messages after resuming")
        for *_, mid in received:
            connection.ack(mid, 1)
        assert not connection.closed.done()
        connection.disconnect()
    finally:
        publisher.close()


async def test_refused_connect_says_why(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true",
                                                           "allow_anonymous false"))
    broker.start()
    try:
        with pytest.raises(MqttError, match="refused the connection: not authorized"):
            await connect(broker, [])
    finally:
        broker.stop()


class ScriptedBroker:
    """A real TCP peer that answers CONNECT and SUBSCRIBE the way a test needs (Mosquitto
    2.0 grants every subscription and closes a taken-over session without a reason)."""

    def __init__(self, suback_codes: list[int]) -> None:
        self.suback_codes = suback_codes
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> ScriptedBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        stream = packets.Reader()
        while data := await reader.read(4096):
            for first, body in stream.feed(data):
                if first >> 4 == packets.CONNECT:
                    writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK, no properties
                elif first >> 4 == packets.SUBSCRIBE:
                    writer.write(packets.packet(packets.SUBACK << 4, body[:2] + b"\x00"
                                                + bytes(self.suback_codes)))

    def disconnect_all(self, reason: int, text: str) -> None:
        string = b"\x1f" + packets.utf8(text)
        for writer in self.writers:
            writer.write(packets.packet(packets.DISCONNECT << 4, bytes([reason])
                                        + packets.varint(len(string)) + string))

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


async def test_a_refused_subscription_and_a_broker_disconnect_say_why() -> None:
    broker = await ScriptedBroker([0x01, 0x87]).start()
    try:
        connection = await connect(broker, [])
        assert await connection.subscribe([("allowed/#", 1), ("denied/#", 1)]) == [1, 0x87]
        broker.disconnect_all(0x8E, "another client took the id")
        with pytest.raises(MqttError, match=r"the broker disconnected us: session taken over "
                           r"\(reason 0x8E\): another client took the id"):
            await asyncio.wait_for(connection.closed, 5)
    finally:
        await broker.stop()




class DroppingBroker(ScriptedBroker):
    """Accepts every connection and subscription, then closes it at once."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        stream = packets.Reader()
        while data := await reader.read(4096):
            for first, body in stream.feed(data):
                if first >> 4 == packets.CONNECT:
                    writer.write(b"\x20\x03\x00\x00\x00")
                elif first >> 4 == packets.SUBSCRIBE:
                    writer.write(packets.packet(packets.SUBACK << 4, body[:2] + b"\x00\x01"))
                    await writer.drain()
                    writer.close()
                    return


@pytest.mark.parametrize(("stable_after", "expected"), [
    (30.0, [1.0, 2.0, 4.0, 8.0, 16.0]),  # dropped at once: the backoff keeps growing
    (0.0, [1.0, 1.0, 1.0, 1.0, 1.0]),  # a connection that held resets it
])
async def test_a_connection_dropped_at_once_does_not_reset_the_backoff(
        monkeypatch: pytest.MonkeyPatch, stable_after: float, expected: list[float]) -> None:
    from bridge.config import MQTTConfig
    from bridge.sources import mqtt

    broker = await DroppingBroker([]).start()
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: object) -> None:
        if delay >= 0.5:  # the reconnect wait (jitter fixed at 1.0 below)
            delays.append(delay)
            delay = 0
        await real_sleep(delay)

    monkeypatch.setattr(mqtt.random, "uniform", lambda a, b: b)
    monkeypatch.setattr(mqtt.asyncio, "sleep", sleep)
    monkeypatch.setattr(mqtt, "STABLE_AFTER", stable_after)
    monkeypatch.setattr(mqtt, "FIRST_RETRY", 1.0)
    source = mqtt.MqttSource(MQTTConfig(port=broker.port, client_id="c"), [("t/#", 1)],
                             lambda message: asyncio.get_running_loop().create_future())
    task = source.start()
    try:
        await wait_for(lambda: len(delays) >= 5, 20, "five reconnects")
        assert delays[:5] == expected
        assert source.connects >= 5
    finally:
        await source.stop()
        task.cancel()
        await broker.stop()


async def test_the_first_reconnects_are_fast() -> None:
    """A broker that restarts is back within a second, and what is published before we
    subscribe again may be lost (a broker killed before it saved our session): the first
    attempt waits 0.1-0.2 s, then the wait doubles (jittered down to half)."""
    from bridge.config import MQTTConfig
    from bridge.sources import mqtt

    broker = await DroppingBroker([]).start()
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: object) -> None:
        if delay >= 0.05:  # the reconnect wait (the source sleeps for nothing else)
            waits.append(delay)
            delay = 0
        await real_sleep(delay)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mqtt.asyncio, "sleep", sleep)
        source = mqtt.MqttSource(MQTTConfig(port=broker.port, client_id="c"), [("t/#", 1)],
                                 lambda message: asyncio.get_running_loop().create_future())
        task = source.start()
        try:
            await wait_for(lambda: len(waits) >= 4, 20, "four reconnects")
        finally:
            await source.stop()
            task.cancel()
            await broker.stop()
    for attempt, wait in enumerate(waits[:4]):
        nominal = mqtt.FIRST_RETRY * 2 ** attempt
        assert nominal / 2 <= wait <= nominal, (attempt, waits)
    assert waits[0] <= 0.2


@pytest.mark.parametrize("pace", [0.0, 0.3], ids=["unpaced", "paced"])
async def test_a_paced_connection_takes_a_trickle_in_one_read(
        mosquitto: Mosquitto, pace: float) -> None:
    """At a low rate every message would cost the process a wake-up of its own: a paced
    connection rests after a small read and takes what arrived meanwhile in one read."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, float]] = []

    def on_publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int,
                   oversize: int | None) -> None:
        seen.append((topic, loop.time()))

    connection, _ = await open_connection(
        "127.0.0.1", mosquitto.port, ssl_context=None, client_id="paced", v5=True,
        keepalive=30, clean_start=True, username=None, password=None, session_expiry=0,
        receive_maximum=100, on_publish=on_publish)
    await connection.subscribe([("p/#", 0)])
    connection.pace = pace
    publisher = Publisher(mosquitto.port, client_id="paced-publisher")
    try:
        publisher.publish("p/0", b"0", qos=0)
        await wait_for(lambda: len(seen) == 1, 10, "the first message")
        for n in range(1, 5):  # a trickle: 4 messages 30 ms apart (the stimulus)
            await asyncio.sleep(0.03)
            publisher.publish(f"p/{n}", b"n", qos=0)
        await wait_for(lambda: len(seen) == 5, 10, "the trickle")
    finally:
        publisher.close()
        connection.disconnect()
    assert [topic for topic, _ in seen] == [f"p/{n}" for n in range(5)]
    times = [t for _, t in seen]
    if pace:
        assert times[1] - times[0] >= pace - 0.01  # rested after the first read
        assert times[4] - times[1] < 0.01  # then the four in one read
    else:
        assert times[4] - times[1] >= 0.06  # each as it arrived


@pytest.mark.parametrize(("keepalive", "pace"), [(2, 0.5), (60, 10.0)])
async def test_the_pace_stays_under_a_quarter_of_the_keepalive(
        mosquitto: Mosquitto, keepalive: int, pace: float) -> None:
    """A long commit window must not make the bridge miss its broker's PINGRESP."""
    from bridge.config import MQTTConfig
    from bridge.sources.mqtt import MqttSource

    source = MqttSource(MQTTConfig(port=mosquitto.port, client_id="pace", keepalive=keepalive),
                        [("t/#", 1)], lambda m: asyncio.get_running_loop().create_future(),
                        pace=10.0)
    task = source.start()
    try:
        await wait_for(lambda: source._connection is not None and source._connection.pace > 0,
                       10, "subscribed")
        assert source._connection is not None and source._connection.pace == pace
    finally:
        await source.stop()
        task.cancel()
