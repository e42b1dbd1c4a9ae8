"""The device registry: which devices the gateway has seen, and their LwM2M registrations.

Owns the lifecycle events no single message carries: ``device.created`` the first time a
device id appears on any source, ``device.first_registration`` the first time an LwM2M
endpoint registers, ``device.deregistration`` (reason ``lifetime_expired``) when a
registration's lifetime passes with no update (EMQX publishes nothing on deregister), and
``device.deleted`` when an operator deletes a device. The registry's rows live in the
store's ``devices`` table and are written in the same transaction as the deliveries of
the message that changed them, so a crash can neither lose nor invent one of these events.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from .events import Event
from .sources.lwm2m import RegistrationTracker

CREATED = "device.created"
REGISTRATION = "device.registration"
FIRST_REGISTRATION = "device.first_registration"
REGISTRATION_UPDATE = "device.registration_update"
DEREGISTRATION = "device.deregistration"
DELETED = "device.deleted"


@dataclass
class DeviceChange:
    """What one message did to the registry (applied inside its enqueue transaction)."""

    seen: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (source, topic)
    registered: dict[str, int | None] = field(default_factory=dict)  # id -> lifetime
    deregistered: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.seen or self.registered or self.deregistered)


class Registry:
    """In-memory view of the ``devices`` table, kept in step with it."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.ever_registered: set[str] = set()
        self.sources: dict[str, tuple[str, str]] = {}
        self.lifetimes = RegistrationTracker()

    def load(self, conn: sqlite3.Connection, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.known.clear()
        self.ever_registered.clear()
        self.sources.clear()
        self.lifetimes = RegistrationTracker()
        rows = conn.execute("SELECT id, source, topic, ever_registered, registered, lifetime,"
                            " last_registration FROM devices").fetchall()
        for device, source, topic, ever, registered, lifetime, last in rows:
            self.known.add(device)
            self.sources[device] = (source or "", topic or "")
            if ever:
                self.ever_registered.add(device)
            if registered and lifetime:
                self.lifetimes.register(device, lifetime, last or now)

    def observe(self, events: list[Event]) -> tuple[list[Event], DeviceChange]:
        """The events plus the lifecycle events they imply, and the registry change."""
        change = DeviceChange()
        out: list[Event] = []
        now = time.time()
        for event in events:
            device = event.device_id
            if device and device not in self.known:
                self.known.add(device)
                change.seen[device] = (event.source, event.topic)
                out.append(_derived(event, CREATED, {"device_id": device,
                                                     "source": event.source}))
            out.append(event)
            if not device:
                continue
            self.sources[device] = (event.source, event.topic)
            if event.type in (REGISTRATION, REGISTRATION_UPDATE):
                lifetime = _lifetime(event.payload)
                if event.type == REGISTRATION or device not in self.lifetimes:
                    self.lifetimes.register(device, lifetime, now)
                else:
                    self.lifetimes.update(device, lifetime, now)
                change.registered[device] = lifetime
                if event.type == REGISTRATION and device not in self.ever_registered:
                    self.ever_registered.add(device)
                    out.append(_derived(event, FIRST_REGISTRATION, event.payload))
            elif event.type == DEREGISTRATION:
                self.lifetimes.deregister(device)
                change.deregistered.add(device)
        return out, change

    def expire(self, now: float) -> tuple[list[Event], DeviceChange]:
        """Deregistration events for registrations whose lifetime has passed."""
        change = DeviceChange()
        events = []
        for device in self.lifetimes.expired(now):
            source, topic = self.sources.get(device, ("", ""))
            events.append(Event(type=DEREGISTRATION, source=source, topic=topic,
                                device_id=device,
                                payload={"reason": "lifetime_expired", "endpoint": device}))
            change.deregistered.add(device)
        return events, change

    def next_deadline(self) -> float | None:
        return self.lifetimes.next_deadline()


def _lifetime(payload: Any) -> int | None:
    value = payload.get("lifetime") if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _derived(event: Event, type_: str, payload: Any) -> Event:
    return Event(type=type_, source=event.source, topic=event.topic,
                 device_id=event.device_id, labels=dict(event.labels), payload=payload,
                 received_at=event.received_at)


def apply_change(conn: sqlite3.Connection, change: DeviceChange, now: float) -> None:
    """Write a :class:`DeviceChange` (runs inside the enqueue transaction)."""
    for device, (source, topic) in change.seen.items():
        conn.execute("INSERT OR IGNORE INTO devices (id, source, topic, first_seen)"
                     " VALUES (?, ?, ?, ?)", (device, source, topic, now))
    for device, lifetime in change.registered.items():
        conn.execute("UPDATE devices SET ever_registered = 1, registered = 1,"
                     " lifetime = COALESCE(?, lifetime), last_registration = ? WHERE id = ?",
                     (lifetime, now, device))
    for device in change.deregistered:
        conn.execute("UPDATE devices SET registered = 0 WHERE id = ?", (device,))


# -- for the `devices` command (any process) --------------------------------------------

_COLUMNS = ("id", "source", "topic", "first_seen", "ever_registered",
            "registered", "lifetime", "last_registration")


def list_devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM devices ORDER BY id").fetchall()
    return [dict(zip(_COLUMNS, r)) for r in rows]


def get_device(conn: sqlite3.Connection, device: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM devices WHERE id = ?",
                       (device,)).fetchone()
    return dict(zip(_COLUMNS, row)) if row else None


def deleted_event(device: dict[str, Any]) -> Event:
    return Event(type=DELETED, source=device["source"] or "", topic=device["topic"] or "",
                 device_id=device["id"],
                 payload={"device_id": device["id"], "reason": "deleted by operator"})


def encode(event: Event) -> bytes:
    return json.dumps(event.envelope(), separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
