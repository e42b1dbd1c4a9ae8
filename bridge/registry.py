"""The device registry: which devices the gateway has seen, and their LwM2M registrations.

Owns the lifecycle events no single message carries: ``device.created`` the first time a
device id appears on any source, ``device.first_registration`` the first time an LwM2M
endpoint registers, ``device.deregistration`` (reason ``lifetime_expired``) when a
registration's lifetime passes with no update (EMQX publishes nothing on deregister), and
``device.deleted`` when an operator deletes a device, and ``device.firmware_update``
from the LwM2M Firmware Update object (5), whose progress is tracked per device whichever
source carried it (EMQX publishes Object 5 notifications on their own topic,
``<mountpoint>/v1/up/dm``). The registry's rows live in the store's ``devices`` and
``firmware`` tables and are written in the same transaction as the deliveries of the
message that changed them, so a crash or restart can neither lose nor invent one of these
events.

The registry is bounded (SPEC §8: device ids are chosen by devices): it records at most
:func:`max_devices` devices, which takes ``DEVICE_SHARE`` of ``store.max_size`` at most,
counted at ``DEVICE_ROW_COST`` bytes a device, and never more than ``MAX_DEVICES``. The
bytes it takes come off the queue's quota (:attr:`Registry.bytes`), so devices and
deliveries together stay within ``store.max_size`` and a flood of device ids can take
the queue's room only up to that share. Once full, a device never seen before is not
recorded: its events flow as usual, without ``device.created`` or registration tracking,
and it is counted (:attr:`Registry.unrecorded`) until ``devices delete`` makes room.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .events import Event, dumps
from .sources.lwm2m import FirmwareTracker, RegistrationTracker

CREATED = "device.created"
REGISTRATION = "device.registration"
FIRST_REGISTRATION = "device.first_registration"
REGISTRATION_UPDATE = "device.registration_update"
DEREGISTRATION = "device.deregistration"
DELETED = "device.deleted"
FIRMWARE_UPDATE = "device.firmware_update"

FirmwareKey = tuple[str, int]  # (device, Object 5 instance)
FirmwareProgress = tuple[int | None, int | None, bool] | None  # (state, result, armed)

FIRMWARE_INSTANCES = 4  # Object 5 instances tracked per device (0..3; the object has one)
MAX_DEVICES = 50_000  # devices recorded at most, whatever the quota (memory bound)
DEVICE_ROW_COST = 256  # bytes a device counts toward store.max_size (row, index, memory)
DEVICE_SHARE = 8  # the registry takes at most 1/8 of store.max_size


def max_devices(store_max_size: int) -> int:
    """How many devices the registry records for a store quota (0: no quota)."""
    if not store_max_size:
        return MAX_DEVICES
    return min(MAX_DEVICES, store_max_size // DEVICE_SHARE // DEVICE_ROW_COST)


@dataclass
class DeviceChange:
    """What one message did to the registry (applied inside its enqueue transaction)."""

    seen: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (source, topic)
    registered: dict[str, int | None] = field(default_factory=dict)  # id -> lifetime
    deregistered: set[str] = field(default_factory=set)
    first_registered: set[str] = field(default_factory=set)  # memory only (for revert)
    firmware: dict[FirmwareKey, FirmwareProgress] = field(default_factory=dict)  # after
    firmware_before: dict[FirmwareKey, FirmwareProgress] = field(default_factory=dict)
    applied: bool = False
    """Set by :func:`apply_change` (in the store's writer thread); until then the change is
    certainly not in the database."""

    def __bool__(self) -> bool:
        return bool(self.seen or self.registered or self.deregistered or self.firmware)


class Registry:
    """In-memory view of the ``devices`` table, kept in step with it.

    The daemon owns the in-memory state; the table is its durable copy (written in the
    same transaction as the deliveries of the message that changed it). :meth:`load`
    runs in the store's reader thread, once at start-up (everything) and again whenever
    a command changed the store (then only devices deleted by ``devices delete`` are
    forgotten), so it works under a lock and never empties the view while messages are
    being observed.
    """

    def __init__(self, limit: int = MAX_DEVICES) -> None:
        self.limit = limit
        self.unrecorded = 0  # messages from devices the full registry did not record
        self.known: set[str] = set()
        self.ever_registered: set[str] = set()
        self.sources: dict[str, tuple[str, str]] = {}
        self.labels: dict[str, dict[str, str]] = {}  # the last labels seen (memory only)
        self.lifetimes = RegistrationTracker()
        self.firmware = FirmwareTracker()
        self._lock = threading.RLock()
        self._loaded = False
        # Changes that introduced devices and may not be committed yet: load() must not
        # take such a device for one deleted by a command.
        self._unsettled: list[DeviceChange] = []

    def load(self, conn: sqlite3.Connection, now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = conn.execute("SELECT id, source, topic, ever_registered, registered, lifetime,"
                            " last_registration FROM devices").fetchall()
        with self._lock:
            if not self._loaded:
                self._loaded = True
                for device, source, topic, ever, registered, lifetime, last in rows:
                    self.known.add(device)
                    self.sources[device] = (source or "", topic or "")
                    if ever:
                        self.ever_registered.add(device)
                    if registered and lifetime:
                        self.lifetimes.register(device, lifetime, last or now)
                for device, instance, state, result, armed in conn.execute(
                        "SELECT device, instance, state, result, armed FROM firmware"):
                    self.firmware.restore(device, instance, (state, result, bool(armed)))
                return
            present = {row[0] for row in rows}
            self._unsettled = [c for c in self._unsettled if not c.applied]
            pending = {device for change in self._unsettled for device in change.seen}
            for device in [d for d in self.known if d not in present and d not in pending]:
                self.forget(device)
            for device, source, topic, ever, _registered, _lifetime, _last in rows:
                if device not in self.known:  # written by another process
                    self.known.add(device)
                    self.sources[device] = (source or "", topic or "")
                    if ever:
                        self.ever_registered.add(device)

    def forget(self, device: str) -> None:
        """Drop a device (deleted by an operator): its next message makes it new again."""
        with self._lock:
            self.known.discard(device)
            self.ever_registered.discard(device)
            self.sources.pop(device, None)
            self.labels.pop(device, None)
            self.lifetimes.deregister(device)
            self.firmware.forget(device)

    def revert(self, change: DeviceChange) -> None:
        """Undo what :meth:`observe` did for ``change`` when its transaction failed (the
        broker sends the message again, and its lifecycle events must come again)."""
        with self._lock:
            for device in change.seen:
                self.known.discard(device)
            self.ever_registered -= change.first_registered
            for (device, instance), saved in change.firmware_before.items():
                self.firmware.restore(device, instance, saved)

    def observe(self, events: list[Event]) -> tuple[list[Event], DeviceChange | None]:
        """The events plus the lifecycle events they imply, and the registry change (None
        when the message changed nothing to record: a known device's plain event)."""
        with self._lock:
            out, change = self._observe(events)
            if change is not None and change.seen:
                if len(self._unsettled) > 32:
                    self._unsettled = [c for c in self._unsettled if not c.applied]
                self._unsettled.append(change)
            return out, change

    def _observe(self, events: list[Event]) -> tuple[list[Event], DeviceChange | None]:
        # The change is made only when something is to be recorded: most messages come
        # from known devices with plain events, and need none.
        change: DeviceChange | None = None
        out: list[Event] = []
        now = time.time()
        for event in events:
            device = event.device_id
            if device and device not in self.known:
                if len(self.known) >= self.limit:
                    self.unrecorded += 1  # full: the event flows, the device is not kept
                    out.append(event)
                    continue
                self.known.add(device)
                if change is None:
                    change = DeviceChange()
                change.seen[device] = (event.source, event.topic)
                created = _derived(event, CREATED, {"device_id": device,
                                                    "source": event.source})
                # Ids sort in the order events are made; device.created goes first, so
                # it takes the (earlier) id of the event that revealed the device.
                first_id = event.id
                event.reassign_id(created.id)
                created.reassign_id(first_id)
                out.append(created)
            out.append(event)
            if not device:
                continue
            if event.type == "telemetry" and "lwm2m" in event.extra:
                if change is None:
                    change = DeviceChange()
                self._firmware(event, device, change, out)
            self.sources[device] = (event.source, event.topic)
            self.labels[device] = event.labels
            if event.type in (REGISTRATION, REGISTRATION_UPDATE):
                if change is None:
                    change = DeviceChange()
                lifetime = _lifetime(event.payload)
                if event.type == REGISTRATION or device not in self.lifetimes:
                    self.lifetimes.register(device, lifetime, now)
                else:
                    self.lifetimes.update(device, lifetime, now)
                change.registered[device] = lifetime
                if event.type == REGISTRATION and device not in self.ever_registered:
                    self.ever_registered.add(device)
                    change.first_registered.add(device)
                    out.append(_derived(event, FIRST_REGISTRATION, event.payload))
            elif event.type == DEREGISTRATION:
                if change is None:
                    change = DeviceChange()
                self.lifetimes.deregister(device)
                change.deregistered.add(device)
        return out, change

    def _firmware(self, event: Event, device: str, change: DeviceChange,
                  out: list[Event]) -> None:
        """Feed an LwM2M telemetry event's Object 5 values to the firmware tracker; the
        event that completes an update is followed by its ``device.firmware_update``."""
        values = event.payload.get("values") if isinstance(event.payload, dict) else None
        if not isinstance(values, list):
            return
        # Object 5 is single-instance (LwM2M 1.x): a device naming thousands of instances
        # must not grow the tracker and its table without bound (SPEC §8).
        values = [v for v in values if not (isinstance(v, dict) and v.get("object") == 5
                                            and isinstance(v.get("instance"), int)
                                            and v["instance"] >= FIRMWARE_INSTANCES)]
        instances = {v.get("instance") for v in values if isinstance(v, dict)
                     and v.get("object") == 5 and isinstance(v.get("instance"), int)}
        if not instances:
            return
        for instance in instances:
            change.firmware_before.setdefault((device, instance),
                                              self.firmware.progress(device, instance))
        completed = self.firmware.feed(device, values)
        for instance in instances:
            change.firmware[(device, instance)] = self.firmware.progress(device, instance)
        if completed is not None:
            out.append(Event(type=FIRMWARE_UPDATE, source=event.source, topic=event.topic,
                             device_id=device, labels=dict(event.labels),
                             payload=completed.payload, received_at=event.received_at,
                             extra={"lwm2m": completed.lwm2m}))

    def expire(self, now: float) -> tuple[list[Event], DeviceChange]:
        """Deregistration events for registrations whose lifetime has passed."""
        change = DeviceChange()
        events = []
        with self._lock:
            expired = self.lifetimes.expired(now)
        for device in expired:
            source, topic = self.sources.get(device, ("", ""))
            events.append(Event(type=DEREGISTRATION, source=source, topic=topic,
                                device_id=device, labels=dict(self.labels.get(device, {})),
                                payload={"reason": "lifetime_expired", "endpoint": device}))
            change.deregistered.add(device)
        return events, change

    @property
    def bytes(self) -> int:
        """What the recorded devices count toward ``store.max_size``."""
        return len(self.known) * DEVICE_ROW_COST

    def next_deadline(self) -> float | None:
        with self._lock:
            return self.lifetimes.next_deadline()


def _lifetime(payload: Any) -> int | None:
    value = payload.get("lifetime") if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _derived(event: Event, type_: str, payload: Any) -> Event:
    return Event(type=type_, source=event.source, topic=event.topic,
                 device_id=event.device_id, labels=dict(event.labels), payload=payload,
                 received_at=event.received_at)


def registry_op(change: DeviceChange) -> Any:
    """The store operation writing ``change`` (joins the enqueue transaction)."""
    return lambda conn: apply_change(conn, change, time.time())


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
    for (device, instance), saved in change.firmware.items():
        if saved is None:
            conn.execute("DELETE FROM firmware WHERE device = ? AND instance = ?",
                         (device, instance))
        else:
            conn.execute("INSERT OR REPLACE INTO firmware (device, instance, state, result,"
                         " armed) VALUES (?, ?, ?, ?, ?)", (device, instance, *saved))
    change.applied = True


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
    return dumps(event.envelope())
