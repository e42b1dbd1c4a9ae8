"""Ingest: one MQTT message -> its deliveries, committed; the isolation boundary.

Owns the per-message path, in one place and in this order: decode (the sources whose
topic matches), registry (the lifecycle events the message implies), match (which
webhooks want each event), stored form (each event's JSON, built once), enqueue (one
operation of the store's next group commit, whose future releases the MQTT ack), and
the queue quota's backpressure (``store.overflow: backpressure`` holds the ack).

:meth:`Ingest.take` is the only entry and the isolation boundary of SPEC §8: whatever
fails in those steps for one message (a decoder bug, a hostile payload past a bound, a
value the JSON encoder refuses, a RecursionError or MemoryError) makes that message one
``invalid`` event naming the failure, committed and acknowledged like any other. No
exception from the per-message path ever reaches the MQTT connection, so no device can
make the bridge reconnect.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from .events import INVALID, Event, dumps
from .metrics import Metrics
from .registry import DeviceChange, Registry, registry_op
from .rules import RuleSet
from .sources.decode import SourceDecoder
from .sources.mqtt import Message
from .store import ROW_OVERHEAD, NewDelivery, Store

log = structlog.get_logger("bridge.ingest")


@dataclass(slots=True)
class _CommitGroup:
    """The messages whose deliveries one group commit stores."""

    future: asyncio.Future[Any]
    messages: int = 0
    size: int = 0
    changes: list[DeviceChange] = field(default_factory=list)


@dataclass(slots=True)
class _Held:
    items: list[NewDelivery]
    size: int
    change: DeviceChange | None
    future: asyncio.Future[Any]
    ack: tuple[int, str, bytes] | None = None


class Ingest:
    """The per-message path for one configuration's sources and rules.

    ``decoders`` and ``rules`` are replaced on a live reload (:meth:`reconfigure`); the
    registry, the store and the metrics live as long as the bridge.
    """

    def __init__(self, decoders: list[SourceDecoder], rules: RuleSet, registry: Registry,
                 store: Store, metrics: Metrics, backpressure: bool) -> None:
        self.decoders = decoders
        self.rules = rules
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.backpressure = backpressure
        self.accepted = 0
        self.isolated = 0  # messages the boundary turned into `invalid` events
        self.quota = store.max_size  # the configured store.max_size (0: none)
        self._unrecorded = 0
        self._held: deque[_Held] = deque()
        self._commit_group: _CommitGroup | None = None
        self.unrouted = UnroutedInvalid(metrics)
        # Set when a message registered or updated an LwM2M lifetime (the daemon's
        # expiry timer then looks at the new deadline).
        self.lifetimes_changed = asyncio.Event()
        metrics.set_known_types(_configured_types(decoders, rules))

    def reconfigure(self, decoders: list[SourceDecoder], rules: RuleSet) -> None:
        self.decoders, self.rules = decoders, rules
        self.metrics.set_known_types(_configured_types(decoders, rules))

    # -- the boundary -------------------------------------------------------------------

    def take(self, message: Message) -> asyncio.Future[Any]:
        """Decode, register, match and queue ``message``; the returned future resolves
        once its deliveries are committed (the MQTT ack waits on it). Never raises for
        anything the message contains."""
        self.metrics.messages_received.inc()
        if message.oversize is not None:
            self.metrics.oversized.inc()
        ack = None
        if message.qos:
            # An oversized message kept no payload: its size stands in for it.
            digest = hashlib.blake2b(message.payload if message.oversize is None
                                     else b"oversize:%d" % message.oversize,
                                     digest_size=16).digest()
            if message.dup and self.store.redelivered(message.mid, message.topic, digest):
                # Committed before a crash took its ack (SPEC §5): ack it, queue nothing,
                # so the endpoint sees the first copy's event id only.
                self.metrics.redelivered.inc()
                done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            ack = (message.mid, message.topic, digest)
        change: DeviceChange | None = None
        try:
            events = self.decode(message)
            events, change = self.registry.observe(events)
            if change is not None:  # None: nothing to record (a known device's event)
                if change.seen:
                    self.sync_quota()
                if change.registered:
                    self.lifetimes_changed.set()
            if self.registry.unrecorded != self._unrecorded:
                self._registry_full()
            items = self.route(events)
        except Exception as exc:  # the isolation boundary: see the module docstring
            if change:
                self.registry.revert(change)
                self.sync_quota()
            items, change = self._isolated(message, exc)
        return self.queue(items, change, ack)

    def _isolated(self, message: Message, exc: BaseException
                  ) -> tuple[list[NewDelivery], DeviceChange | None]:
        """The message as one ``invalid`` event naming the step that failed."""
        self.isolated += 1
        self.metrics.isolated.inc()
        error = f"message could not be processed: {type(exc).__name__}: {str(exc)[:200]}"
        log.warning("message isolated as an invalid event", topic=message.topic[:200],
                    size=len(message.payload), cause=error)
        decoder = next((d for d in self.decoders if d.topic.match(message.topic) is not None),
                       None)
        source = decoder.source.name if decoder is not None else ""
        event = Event(type=INVALID, source=source, topic=message.topic,
                      payload_raw=message.payload, decode_error=error)
        try:  # no registry step: the device id is what may have failed
            return self.route([event]), None
        except Exception as again:  # a broken rule: still commit and ack the message
            log.error("invalid event not routed", cause=f"{type(again).__name__}: {again}")
            return [], None

    def sync_quota(self) -> None:
        """The recorded devices count toward store.max_size: the queue gets the rest."""
        if self.quota:
            self.store.max_size = max(self.quota - self.registry.bytes, 1)

    def _registry_full(self) -> None:
        new = self.registry.unrecorded - self._unrecorded
        self.metrics.devices_unrecorded.inc(new)
        if self._unrecorded == 0 or self.registry.unrecorded // 1000 > self._unrecorded // 1000:
            log.warning("device registry full: new devices are not recorded (their events "
                        "flow without device.created)", limit=self.registry.limit,
                        unrecorded_messages=self.registry.unrecorded,
                        fix="webhook-bridge devices delete <id>, or raise store.max_size")
        self._unrecorded = self.registry.unrecorded

    # -- the steps ----------------------------------------------------------------------

    def decode(self, message: Message) -> list[Event]:
        events: list[Event] | None = None
        topic = message.topic
        for decoder in self.decoders:
            captures = decoder.topic.match(topic)
            if captures is not None:
                found = decoder.events(topic, message.payload, captures, message.oversize)
                if events is None:
                    events = found  # a new list: the common case of one matching source
                else:
                    events.extend(found)
        return [] if events is None else events

    def route(self, events: list[Event]) -> list[NewDelivery]:
        """One delivery per event and matching webhook, carrying the event's JSON (the
        envelope is built once per event: the same dict serves the filter and the body)."""
        items: list[NewDelivery] = []
        for event in events:
            self.metrics.count_event(event.source, event.type)
            names = self.rules.match(event)
            if not names:
                if event.type == INVALID:
                    self.unrouted.add(event)
                continue
            body = dumps(event.body())
            for name in names:
                items.append(NewDelivery(name, event.id, event.device_id, body))
        return items

    # -- enqueue and backpressure ---------------------------------------------------------

    def queue(self, items: list[NewDelivery], change: DeviceChange | None,
              ack: tuple[int, str, bytes] | None = None) -> asyncio.Future[Any]:
        size = _size(items)
        if self._held or (items and self.backpressure and not self.store.has_room(size)
                          and self._queue_in_use()):
            return self._hold(items, size, change, ack)
        return self._enqueue(items, size, change, ack)

    def enqueue_events(self, events: list[Event], change: DeviceChange | None
                       ) -> asyncio.Future[Any]:
        """Queue events no message carries (registrations that expired)."""
        items = self.route(events)
        return self._enqueue(items, _size(items), change)

    def _queue_in_use(self) -> bool:
        return bool(self.store.bytes_queued or self.store.bytes_pending)

    def _enqueue(self, items: list[NewDelivery], size: int, change: DeviceChange | None,
                 ack: tuple[int, str, bytes] | None = None) -> asyncio.Future[Any]:
        self.store.bytes_pending += size
        future = self.store.enqueue(items, registry_op(change) if change else None, ack)
        # Messages stored by one commit share its future: account for them together.
        group = self._commit_group
        if group is None or group.future is not future:
            group = self._commit_group = _CommitGroup(future)
            future.add_done_callback(lambda f, g=group: self._committed(f, g))
        group.messages += 1
        group.size += size
        if change:
            group.changes.append(change)
        return future

    def _committed(self, future: asyncio.Future[Any], group: _CommitGroup) -> None:
        if self._commit_group is group:
            self._commit_group = None
        self.store.bytes_pending -= group.size
        if future.cancelled() or future.exception() is not None:
            for change in reversed(group.changes):
                self.registry.revert(change)  # the redelivery must see the device as new
            self.sync_quota()
            self.metrics.messages_rejected.inc(group.messages)
            log.error("messages not stored; the broker will send them again",
                      messages=group.messages, cause=str(future.exception()))
            return
        self.metrics.messages_accepted.inc(group.messages)
        self.accepted += group.messages

    def _hold(self, items: list[NewDelivery], size: int, change: DeviceChange | None,
              ack: tuple[int, str, bytes] | None = None) -> asyncio.Future[Any]:
        """Backpressure: keep the message unacknowledged until the queue has room, so the
        broker holds the rest (it stops sending once our receive window is full)."""
        if not self._held:
            log.warning("queue full: holding MQTT acknowledgements until deliveries free "
                        "room (store.overflow: backpressure)",
                        queued_bytes=self.store.bytes_queued, max_size=self.store.max_size)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._held.append(_Held(items, size, change, future, ack))
        return future

    async def release_held(self) -> None:
        """Runs for the bridge's life: enqueue held messages as deliveries free room."""
        while True:
            await self.store.space_freed.wait()
            self.store.space_freed.clear()
            released = 0
            while self._held and (self.store.has_room(self._held[0].size)
                                  or not self._queue_in_use()):
                held = self._held.popleft()
                _chain(self._enqueue(held.items, held.size, held.change, held.ack),
                       held.future)
                released += 1
            if released and not self._held:
                log.info("queue has room again: acknowledging MQTT messages")


class UnroutedInvalid:
    """Invalid events no webhook takes would vanish silently: each is counted
    (``webhook_bridge_invalid_unrouted_events_total{source}``) and logged, the first of a
    source at once and then at most one line a minute per source, with the count since
    the last line (a flood of junk cannot flood the log)."""

    INTERVAL = 60.0

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[str, Any] = {}
        self._since: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def add(self, event: Event) -> None:
        source = event.source
        counter = self._counters.get(source)
        if counter is None:  # sources come from the configuration: a bounded label
            counter = self._counters[source] = self.metrics.invalid_unrouted.labels(source)
        counter.inc()
        self._since[source] = self._since.get(source, 0) + 1
        now = time.monotonic()
        last = self._logged.get(source)
        if last is not None and now - last < self.INTERVAL:
            return
        self._logged[source] = now
        log.warning("invalid events reached no webhook", source=source,
                    count=self._since.pop(source), topic=event.topic[:200],
                    decode_error=(event.decode_error or "")[:200],
                    fix="add a webhook with events: [invalid] to keep them, or fix the "
                        "device or the source's format")


def _size(items: list[NewDelivery]) -> int:
    """What ``items`` count toward ``store.max_size``."""
    size = 0
    for item in items:  # a loop, not sum() of a generator: this runs once per message
        size += len(item.event)
    return size + ROW_OVERHEAD * len(items)


def _configured_types(decoders: list[SourceDecoder], rules: RuleSet) -> set[str]:
    types: set[str] = set()
    for decoder in decoders:
        types.update(decoder.type_map.values())
        if decoder.fixed_type is not None:
            types.add(decoder.fixed_type)
    for rule in rules.rules:
        types.update(t for t in rule.type_names if not any(c in t for c in "*?["))
    return types


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    def copy(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
