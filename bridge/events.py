"""The Event: the one data type that flows from a source through rules to delivery.

Owns the envelope of SPEC §3 and the ids: ``evt_`` + a ULID (48-bit millisecond time,
80 random bits, Crockford base32), monotonic within a millisecond so ids sort in the
order they were made even when many arrive at once.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

try:
    import orjson
except ImportError:  # optional: a little faster on the hot path
    orjson = None  # type: ignore[assignment]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10-bit value
INVALID = "invalid"

# The random part of an id is made and incremented as text, not as an 80-bit integer
# (each big-integer operation is an allocation, and an id took ~30 of them): a random
# byte is one character (its low 5 bits), +1 changes the last character.
_RANDOM_CHARS = bytes(ord(_CROCKFORD[b & 31]) for b in range(256))
_LOW_HALF = {c: _CROCKFORD[i & 15] for i, c in enumerate(_CROCKFORD)}  # top bit cleared
_NEXT_CHAR = {c: _CROCKFORD[i + 1] for i, c in enumerate(_CROCKFORD[:-1])}
_AS_DIGITS = str.maketrans(_CROCKFORD, "0123456789abcdefghijklmnopqrstuv")  # for int(, 32)


class _Ulid:
    """Monotonic ULID generator (a second id in the same ms increments the random part).

    The 80-bit random part is kept as its 16 characters; a fresh one has its top bit clear
    (room to increment), so 79 bits are random."""

    POOL = 64  # random parts fetched per getrandom() call: one system call per 64 ids

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = ""  # the last random part, 16 characters
        self._pool = ""  # random characters for POOL random parts, taken in order
        self._taken = 0
        # The first 7 characters of the time part, which change every 32.768 s.
        self._head: tuple[int, str] = (-1, "")

    def new(self, now_ms: int | None = None, prefix: str = "") -> str:
        """``prefix`` + a ULID (the prefix joins the one concatenation: no second call)."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if ms <= self._last_ms:
                ms = self._last_ms
                random = _increment(self._last_random)
            else:
                taken = self._taken
                if taken >= len(self._pool):
                    self._pool = os.urandom(16 * self.POOL).translate(_RANDOM_CHARS).decode()
                    taken = 0
                self._taken = taken + 16
                random = _LOW_HALF[self._pool[taken]] + self._pool[taken + 1:taken + 16]
            self._last_ms, self._last_random = ms, random
        # 48-bit time (10 characters, 5 bits each) then the 80-bit random part.
        key, head = self._head
        if ms >> 15 != key:
            head = (_CROCKFORD[ms >> 45] + _PAIRS[(ms >> 35) & 1023]
                    + _PAIRS[(ms >> 25) & 1023] + _PAIRS[(ms >> 15) & 1023])
            self._head = (ms >> 15, head)
        return prefix + head + _PAIRS[(ms >> 5) & 1023] + _CROCKFORD[ms & 31] + random

    def forget_pool(self) -> None:
        """A forked child must not make the ids its parent makes from the same bytes."""
        self._pool, self._taken = "", 0


def _increment(random: str) -> str:
    """A random part plus one."""
    last = random[-1]
    if last != "Z":
        return random[:-1] + _NEXT_CHAR[last]
    value = int(random.translate(_AS_DIGITS), 32) + 1  # a carry: once in 32
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(75, -1, -5))


_ulid = _Ulid()
os.register_at_fork(after_in_child=_ulid.forget_pool)
# Event ids: one Python call per event (the dataclass's default factory).
_new_event_id = partial(_ulid.new, None, "evt_")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the same bytes whichever encoder is installed (orjson, when
    present, except for values it cannot encode such as integers beyond 64 bits)."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def new_id(prefix: str = "evt_") -> str:
    """A unique, time-sortable id such as ``evt_01JD7X4Q3V5ZK8...``."""
    return _ulid.new(None, prefix)


def iso_now(ts: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``: ``2026-11-22T10:00:00.123Z``."""
    ts = time.time() if ts is None else ts
    seconds = int(ts // 1)
    global _second_text
    cached_second, text = _second_text
    if seconds != cached_second:  # formatting the date costs more than the message
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_text = (seconds, text)
    millis = int((ts - seconds) * 1000)
    # The table rather than a format per message; 1000 when a tiny negative ts rounds up.
    return text + (_MILLIS[millis] if millis < 1000 else f".{millis:03d}Z")


_second_text: tuple[int, str] = (-1, "")
_MILLIS = [f".{millis:03d}Z" for millis in range(1000)]


@dataclass(slots=True)
class Event:
    """One decoded message (or one of several a message yields), ready for matching."""

    type: str
    source: str
    topic: str
    payload: Any = None
    device_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=_new_event_id)
    received_at: str = field(default_factory=iso_now)
    payload_raw: bytes | None = None
    decode_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Further top-level envelope fields a decoder adds (e.g. ``lwm2m``)."""
    payload_size: int | None = None
    """Set (and ``payload_raw`` left empty) when the payload was over ``mqtt.max_payload``."""
    _body: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def body(self) -> dict[str, Any]:
        """The envelope, built once and then shared by the type and label templates, the
        JMESPath filters and the stored JSON (the ingest path's one copy)."""
        if self._body is None:
            self._body = self.envelope()
        return self._body

    def reassign_id(self, new_id: str) -> None:
        self.id = new_id
        if self._body is not None:
            self._body["id"] = new_id

    def envelope(self) -> dict[str, Any]:
        """The SPEC §3 JSON object for this event (``envelope: event``)."""
        body: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "topic": self.topic,
            "device_id": self.device_id,
            "received_at": self.received_at,
            "labels": self.labels,
        }
        if self.extra:
            body.update(self.extra)
        if self.decode_error is not None:
            if self.payload_size is not None:
                body["payload_size"] = self.payload_size
            else:
                body["payload_raw"] = base64.b64encode(self.payload_raw or b"").decode("ascii")
            body["decode_error"] = self.decode_error
        else:
            body["payload"] = self.payload
        return body

    @classmethod
    def from_envelope(cls, body: dict[str, Any]) -> Event:
        """Rebuild an event from its stored envelope (the inverse of :meth:`envelope`)."""
        known = {"id", "type", "source", "topic", "device_id", "received_at", "labels",
                 "payload", "payload_raw", "decode_error", "payload_size"}
        raw = body.get("payload_raw")
        return cls(
            id=body["id"],
            type=body["type"],
            source=body.get("source", ""),
            topic=body.get("topic", ""),
            device_id=body.get("device_id"),
            received_at=body.get("received_at", ""),
            labels=dict(body.get("labels") or {}),
            payload=body.get("payload"),
            payload_raw=base64.b64decode(raw) if raw is not None else None,
            decode_error=body.get("decode_error"),
            payload_size=body.get("payload_size"),
            extra={k: v for k, v in body.items() if k not in known},
        )
