"""MQTT 3.1.1 and 5 packets: the bytes of the packets a subscriber sends, and the parsing
of the packets a broker sends it.

Only what a bridge needs: CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH (both ways), the
acknowledgements, PINGREQ and DISCONNECT. Properties of incoming packets are skipped
except the few the client acts on (CONNACK, DISCONNECT, SUBACK reasons). Pure functions
and one incremental reader; no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NoReturn

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

PINGREQ_PACKET = b"\xc0\x00"
MAX_REMAINING = 268_435_455  # the largest length four varint bytes can say

# MQTT 5 property identifiers used here (spec 2.2.2.2).
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_SERVER_REFERENCE = 0x1C

# The width of each property's value: 1, 2 or 4 bytes, "v" varint, "s" UTF-8 string,
# "b" binary data, "p" string pair (spec 2.2.2.2).
_PROPERTY_KIND: dict[int, int | str] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "b", 0x0B: "v", 0x11: 4, 0x12: "s",
    0x13: 2, 0x15: "s", 0x16: "b", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4,
    0x28: 1, 0x29: 1, 0x2A: 1,
}

CONNACK_REASONS_V3 = {
    1: "unacceptable protocol version", 2: "client identifier rejected",
    3: "server unavailable", 4: "bad user name or password", 5: "not authorized",
}
REASONS_V5 = {
    0x04: "disconnect with will message", 0x80: "unspecified error",
    0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x91: "packet identifier in use",
    0x93: "receive maximum exceeded", 0x94: "topic alias invalid", 0x95: "packet too large",
    0x96: "message rate too high", 0x97: "quota exceeded", 0x98: "administrative action",
    0x99: "payload format invalid", 0x9A: "retain not supported", 0x9B: "QoS not supported",
    0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded",
    0xA0: "maximum connect time", 0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


class ProtocolError(Exception):
    """The broker sent bytes that are not a valid MQTT packet."""


def reason_text(code: int, v5: bool = True) -> str:
    if not v5:
        return CONNACK_REASONS_V3.get(code, f"refused (code {code})")
    return f"{REASONS_V5.get(code, 'error')} (reason 0x{code:02X})"


# -- encoding ---------------------------------------------------------------------------

def varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING:
        raise ValueError(f"{value} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string is at most 65,535 bytes")
    return struct.pack("!H", len(data)) + data


def binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("MQTT binary data is at most 65,535 bytes")
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def _properties(pairs: list[tuple[int, bytes]]) -> bytes:
    data = b"".join(bytes([identifier]) + value for identifier, value in pairs)
    return varint(len(data)) + data


def connect(client_id: str, *, v5: bool, keepalive: int, clean_start: bool,
            username: str | None = None, password: str | None = None,
            session_expiry: int = 0, receive_maximum: int | None = None) -> bytes:
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = utf8("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keepalive)
    if v5:
        props = [(PROP_SESSION_EXPIRY, struct.pack("!I", session_expiry))]
        if receive_maximum is not None:
            props.append((PROP_RECEIVE_MAXIMUM, struct.pack("!H", receive_maximum)))
        body += _properties(props)
    body += utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += binary(password.encode("utf-8"))
    return packet(CONNECT << 4, body)


def subscribe(mid: int, filters: list[tuple[str, int]], *, v5: bool) -> bytes:
    body = struct.pack("!H", mid) + (b"\x00" if v5 else b"")
    for topic_filter, qos in filters:
        body += utf8(topic_filter) + bytes([qos])
    return packet(SUBSCRIBE << 4 | 0x02, body)


def unsubscribe(mid: int, filters: list[str], *, v5: bool) -> bytes:
    body = struct.pack("!H", mid) + (b"\x00" if v5 else b"")
    for topic_filter in filters:
        body += utf8(topic_filter)
    return packet(UNSUBSCRIBE << 4 | 0x02, body)


def publish(topic: str, payload: bytes, *, qos: int, retain: bool, mid: int | None,
            v5: bool, dup: bool = False) -> bytes:
    first = PUBLISH << 4 | qos << 1 | (0x01 if retain else 0) | (0x08 if dup else 0)
    body = utf8(topic)
    if qos:
        assert mid is not None
        body += struct.pack("!H", mid)
    if v5:
        body += b"\x00"
    return packet(first, body + payload)


def ack(kind: int, mid: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP with success (no reason code: valid in both
    versions)."""
    return bytes([kind << 4 | (0x02 if kind == PUBREL else 0), 2, mid >> 8, mid & 0xFF])


def disconnect(*, v5: bool) -> bytes:
    return b"\xe0\x00" if not v5 else b"\xe0\x01\x00"


# -- decoding ---------------------------------------------------------------------------

@dataclass(slots=True)
class Oversized:
    """A PUBLISH whose body was over the reader's ``max_payload``: its header was read,
    its payload skipped as it arrived (never held). ``size`` is the payload's size."""

    topic: str
    qos: int
    retain: bool
    mid: int
    size: int


def _oversized_head(first_byte: int, buffer: bytearray, start: int, end: int, length: int,
                    v5: bool) -> tuple[Oversized, int] | None:
    """The header of an over-limit PUBLISH whose body starts at ``start`` (topic, packet
    id, the properties' length: at most 65,543 bytes), and the header's size; None while
    those bytes have not all arrived. The properties themselves are skipped unread."""
    if end - start < 2:
        return None
    qos = (first_byte >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    offset = start + 2 + ((buffer[start] << 8) | buffer[start + 1])
    if qos:
        offset += 2
    if offset > end:
        return None if offset - start <= length else _truncated()
    try:
        topic = bytes(buffer[start + 2:offset - (2 if qos else 0)]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("PUBLISH topic is not UTF-8") from exc
    mid = (buffer[offset - 2] << 8) | buffer[offset - 1] if qos else 0
    if v5:
        properties, shift = 0, 0
        while True:
            if offset >= end:
                return None
            byte = buffer[offset]
            offset += 1
            properties |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("malformed variable byte integer")
        offset += properties
    head = offset - start
    if head > length:
        _truncated()
    return Oversized(topic, qos, bool(first_byte & 0x01), mid, length - head), head


def _truncated() -> NoReturn:
    raise ProtocolError("truncated PUBLISH")


class Reader:
    """Cuts a byte stream into packets: ``feed`` returns ``(first_byte, body)`` for every
    packet completed by the new bytes.

    A PUBLISH whose body is longer than ``max_payload`` is not buffered: once its header
    is in, the rest of its bytes are dropped as they arrive, and ``feed`` returns
    ``(first_byte, Oversized(...))`` when the last of them has passed (not before: a
    connection lost halfway must not have the message taken, the broker sends it again).
    """

    __slots__ = ("_buffer", "_pending", "_skip", "max_payload", "max_size", "v5")

    def __init__(self, max_size: int = MAX_REMAINING, max_payload: int | None = None,
                 v5: bool = False) -> None:
        self._buffer = bytearray()
        self.max_size = max_size
        self.max_payload = max_payload
        self.v5 = v5
        self._skip = 0  # bytes of an oversized PUBLISH still to drop
        self._pending: tuple[int, Oversized] | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes | Oversized]]:
        packets: list[tuple[int, bytes | Oversized]] = []
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]  # a copy of what is left of this read only
            if self._skip:
                return packets
            assert self._pending is not None
            packets.append(self._pending)
            self._pending = None
        buffer = self._buffer
        buffer += data
        position, end = 0, len(buffer)
        limit = self.max_payload
        while end - position >= 2:
            length, multiplier, index, complete = 0, 1, position + 1, False
            while index < end:
                byte = buffer[index]
                index += 1
                length += (byte & 0x7F) * multiplier
                if not byte & 0x80:
                    complete = True
                    break
                multiplier <<= 7
                if multiplier > 0x200000:
                    raise ProtocolError("malformed remaining length")
            if not complete:
                break  # the length itself is not complete yet
            if length > self.max_size:
                raise ProtocolError(f"packet of {length} bytes exceeds the limit")
            first = buffer[position]
            if limit is not None and length > limit and first >> 4 == PUBLISH:
                head = _oversized_head(first, buffer, index, end, length, self.v5)
                if head is None:
                    break  # wait for the rest of the header
                oversized, _ = head
                if index + length <= end:  # all of it came in this read
                    packets.append((first, oversized))
                    position = index + length
                    continue
                self._skip = index + length - end
                self._pending = (first, oversized)
                position = end
                break
            if index + length > end:
                break
            packets.append((first, bytes(buffer[index:index + length])))
            position = index + length
        if position:
            del buffer[:position]
        return packets


def _property_skip(data: bytes, offset: int, identifier: int) -> int:
    kind = _PROPERTY_KIND.get(identifier)
    if kind is None:
        raise ProtocolError(f"unknown property 0x{identifier:02X}")
    if isinstance(kind, int):
        return offset + kind
    if kind == "v":
        _, offset = read_varint(data, offset)
        return offset
    if kind == "p":
        offset += 2 + int.from_bytes(data[offset:offset + 2], "big")
    return offset + 2 + int.from_bytes(data[offset:offset + 2], "big")


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(data):
            raise ProtocolError("truncated variable byte integer")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 21:
            raise ProtocolError("malformed variable byte integer")


def read_properties(data: bytes, offset: int) -> tuple[dict[int, object], int]:
    """The properties at ``offset``: {identifier: int | str | bytes} (the last one wins
    for repeated identifiers), and the offset after them."""
    length, offset = read_varint(data, offset)
    end = offset + length
    if end > len(data):
        raise ProtocolError("truncated properties")
    found: dict[int, object] = {}
    while offset < end:
        identifier = data[offset]
        start = offset + 1
        after = _property_skip(data, start, identifier)
        kind = _PROPERTY_KIND[identifier]
        if isinstance(kind, int):
            found[identifier] = int.from_bytes(data[start:after], "big")
        elif kind == "v":
            found[identifier] = read_varint(data, start)[0]
        elif kind == "s":
            found[identifier] = data[start + 2:after].decode("utf-8", "replace")
        elif kind == "b":
            found[identifier] = bytes(data[start + 2:after])
        offset = after
    if offset != end:
        raise ProtocolError("malformed properties")
    return found, end


def skip_properties(data: bytes, offset: int) -> int:
    length, offset = read_varint(data, offset)
    if offset + length > len(data):
        raise ProtocolError("truncated properties")
    return offset + length


def parse_publish(first_byte: int, body: bytes, v5: bool
                  ) -> tuple[str, bytes, int, bool, int]:
    """(topic, payload, qos, retain, mid) of a PUBLISH; mid is 0 for QoS 0."""
    qos = (first_byte >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if len(body) < 2:
        raise ProtocolError("truncated PUBLISH")
    length = (body[0] << 8) | body[1]
    offset = 2 + length
    try:
        topic = body[2:offset].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("PUBLISH topic is not UTF-8") from exc
    # The packet id (QoS >= 1) and the properties length (MQTT 5) must be there.
    if offset + (2 if qos else 0) + (1 if v5 else 0) > len(body):
        raise ProtocolError("truncated PUBLISH")
    mid = 0
    if qos:
        mid = (body[offset] << 8) | body[offset + 1]
        offset += 2
    if v5:
        props = body[offset]
        offset = offset + 1 if props == 0 else skip_properties(body, offset)
    if offset > len(body):
        raise ProtocolError("truncated PUBLISH")
    return topic, body[offset:], qos, bool(first_byte & 0x01), mid


@dataclass
class Connack:
    session_present: bool
    reason: int
    properties: dict[int, object] = field(default_factory=dict)


def parse_connack(body: bytes, v5: bool) -> Connack:
    if len(body) < 2:
        raise ProtocolError("truncated CONNACK")
    properties: dict[int, object] = {}
    if v5 and len(body) > 2:
        properties, _ = read_properties(body, 2)
    return Connack(bool(body[0] & 0x01), body[1], properties)


def parse_mid(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolError("truncated acknowledgement")
    return (body[0] << 8) | body[1]


def parse_suback(body: bytes, v5: bool) -> tuple[int, list[int]]:
    """(mid, reason codes); for UNSUBACK too (3.1.1 UNSUBACK has no codes)."""
    mid = parse_mid(body)
    offset = skip_properties(body, 2) if v5 and len(body) > 2 else 2
    return mid, list(body[offset:])


def parse_disconnect(body: bytes) -> tuple[int, str | None]:
    """A broker's DISCONNECT (MQTT 5 only): reason code and reason string."""
    if not body:
        return 0, None
    reason = body[0]
    text = None
    if len(body) > 1:
        properties, _ = read_properties(body, 1)
        value = properties.get(PROP_REASON_STRING)
        text = value if isinstance(value, str) else None
    return reason, text
