"""Metrics: the Prometheus series of SPEC §7, in one registry per bridge.

Owns the names, help texts and labels. Stages increment counters; gauges that mirror
the store (queue depth and bytes, webhook state) are refreshed when ``/metrics`` is
scraped, so the hot path pays for none of them.

Every label value comes from the configuration or from a bounded set, never freely from
a device (SPEC §8): an event type is its own label when the SPEC or the configuration
names it, or while fewer than ``DYNAMIC_TYPES`` other types have been seen; any further
type (and any type longer than ``TYPE_LABEL_MAX``) counts under ``OTHER_TYPE``.
"""

from __future__ import annotations

import contextlib
import platform
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__
from .attempts import Activity

if TYPE_CHECKING:
    from .delivery import Outcome

STATES = ("ENABLED", "DISABLED", "DISABLED_DUE_TO_ERRORS")
SPEC_TYPES = frozenset({
    "telemetry", "alarm", "connection", "disconnection", "invalid", "device.registration",
    "device.first_registration", "device.registration_update", "device.deregistration",
    "device.write", "device.firmware_update", "device.created", "device.deleted"})
DYNAMIC_TYPES = 64  # types neither the SPEC nor the configuration names, each its own label
TYPE_LABEL_MAX = 64  # characters
OTHER_TYPE = "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.activity = Activity()  # recent attempts and per-minute counts, for the console
        r = self.registry
        self.messages_received = Counter(
            "webhook_bridge_messages_received", "MQTT messages received", registry=r)
        self.messages_accepted = Counter(
            "webhook_bridge_messages_accepted",
            "MQTT messages committed to the queue and acknowledged", registry=r)
        self.messages_rejected = Counter(
            "webhook_bridge_messages_rejected",
            "MQTT messages that could not be stored (redelivered by the broker)", registry=r)
        self.events = Counter(
            "webhook_bridge_events", "Events decoded from messages", ["source", "type"],
            registry=r)
        self.deliveries = Counter(
            "webhook_bridge_delivery_attempts",
            "Delivery attempts by outcome (delivered, retry, dead, gone), one per event an "
            "attempt carried (a batch of N events counts N)",
            ["webhook", "outcome"], registry=r)
        self.oldest_queued = Gauge(
            "webhook_bridge_oldest_queued_seconds",
            "Age of the oldest delivery waiting in the queue (0 when none waits)",
            ["webhook"], registry=r)
        self.attempt_seconds = Histogram(
            "webhook_bridge_attempt_duration_seconds", "Duration of one HTTP attempt",
            ["webhook"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.dropped = Counter(
            "webhook_bridge_dropped_deliveries",
            "Deliveries dropped by the queue quota (store.overflow: drop_oldest)",
            ["webhook"], registry=r)
        self.queue_depth = Gauge(
            "webhook_bridge_queue_depth", "Deliveries waiting in the queue", ["webhook"],
            registry=r)
        self.queue_bytes = Gauge(
            "webhook_bridge_queue_bytes", "Bytes the queued deliveries take", registry=r)
        self.dead_letters = Gauge(
            "webhook_bridge_dead_letters", "Deliveries in the dead letters", ["webhook"],
            registry=r)
        self.dead_letters_pruned = Counter(
            "webhook_bridge_dead_letters_pruned",
            "Dead letters deleted to keep store.dead_letters' bound (age and size)",
            ["webhook"], registry=r)
        self.webhook_state = Gauge(
            "webhook_bridge_webhook_state", "1 for the webhook's current state",
            ["webhook", "state"], registry=r)
        self.store_damaged = Gauge(
            "webhook_bridge_store_damaged",
            "1 when a damaged queue database was moved aside at start (store.on_damage)",
            registry=r)
        self.bytes_written = Counter(
            "webhook_bridge_store_bytes_written",
            "Bytes the bridge process wrote to disk (/proc/self/io write_bytes: the queue's "
            "WAL and checkpoints, nearly all of it)", registry=r)
        self.redelivered = Counter(
            "webhook_bridge_messages_redelivered",
            "Broker redeliveries (DUP) of messages already committed: acknowledged, not "
            "queued again", registry=r)
        self.intake_paused = Gauge(
            "webhook_bridge_intake_paused",
            "1 while MQTT intake is paused because the store cannot be written (disk full)",
            registry=r)
        self.intake_pauses = Counter(
            "webhook_bridge_intake_pauses",
            "Times MQTT intake was paused because the store could not be written", registry=r)
        self.mqtt_connected = Gauge(
            "webhook_bridge_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_connects = Counter(
            "webhook_bridge_mqtt_connects", "Connections made to the broker", registry=r)
        self.oversized = Counter(
            "webhook_bridge_oversized_messages",
            "MQTT messages over mqtt.max_payload (queued as invalid events without payload)",
            registry=r)
        self.isolated = Counter(
            "webhook_bridge_isolated_messages",
            "Messages whose processing failed, queued as one invalid event", registry=r)
        self.devices_unrecorded = Counter(
            "webhook_bridge_devices_unrecorded",
            "Messages from new devices the full device registry did not record", registry=r)
        self.invalid_unrouted = Counter(
            "webhook_bridge_invalid_unrouted_events",
            "Invalid events (payloads that did not decode) that no webhook takes: logged "
            "once a minute per source with a count", ["source"], registry=r)
        # The process (CPU, memory, open files) and the Python runtime, as every
        # Prometheus client exports them by default; and what is running.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("webhook_bridge_build", "The running webhook-bridge", registry=r).info(
            {"version": __version__, "python": platform.python_version()})
        self.known_types: frozenset[str] = SPEC_TYPES
        self._dynamic_types: set[str] = set()
        self._event_counters: dict[tuple[str, str], Counter] = {}
        self._attempt_metrics: dict[str, AttemptMetrics] = {}

    def attempts(self, webhook: str) -> AttemptMetrics:
        """What records ``webhook``'s attempts (the same object for the same name): a
        worker takes it once and calls :meth:`AttemptMetrics.record` per attempt."""
        recorder = self._attempt_metrics.get(webhook)
        if recorder is None:
            recorder = self._attempt_metrics[webhook] = AttemptMetrics(self, webhook)
        return recorder

    def set_known_types(self, types: set[str]) -> None:
        """Types the configuration names (fixed source types, ``type_map`` values,
        webhook ``events`` without wildcards): always their own label."""
        self.known_types = SPEC_TYPES | {t for t in types if len(t) <= TYPE_LABEL_MAX}

    def type_label(self, type_: str) -> str:
        if type_ in self.known_types or type_ in self._dynamic_types:
            return type_
        if len(type_) <= TYPE_LABEL_MAX and len(self._dynamic_types) < DYNAMIC_TYPES:
            self._dynamic_types.add(type_)
            return type_
        return OTHER_TYPE

    def count_event(self, source: str, type_: str) -> None:
        counter = self._event_counters.get((source, type_))
        if counter is None:  # labels() takes a lock and builds a key: once per pair
            counter = self.events.labels(source, self.type_label(type_))
            if len(self._event_counters) < 4 * (len(self.known_types) + DYNAMIC_TYPES):
                self._event_counters[(source, type_)] = counter  # a bounded cache
        counter.inc()

    def forget(self, webhook: str) -> None:
        """Drop a removed webhook's gauges (its counters stay: Prometheus expects that)."""
        self._attempt_metrics.pop(webhook, None)
        for gauge in (self.queue_depth, self.dead_letters, self.oldest_queued):
            with contextlib.suppress(KeyError):
                gauge.remove(webhook)
        for state in STATES:
            with contextlib.suppress(KeyError):
                self.webhook_state.remove(webhook, state)

    def set_state(self, webhook: str, state: str) -> None:
        for candidate in STATES:
            self.webhook_state.labels(webhook, candidate).set(1 if candidate == state else 0)


class AttemptMetrics:
    """One webhook's attempt metrics: the delivery counter by outcome, the attempt
    duration histogram and the console's :class:`Activity`. The Prometheus children are
    looked up once (``labels()`` takes a lock and builds a key, and this runs once per
    attempt), each at its first use, so a series appears with the first attempt as
    before."""

    __slots__ = ("_activity", "_counters", "_deliveries", "_histogram", "_seconds", "name")

    def __init__(self, metrics: Metrics, webhook: str) -> None:
        self.name = webhook
        self._deliveries = metrics.deliveries
        self._histogram = metrics.attempt_seconds
        self._activity = metrics.activity
        self._counters: dict[str, Counter] = {}  # by Outcome.kind: at most 4
        self._seconds: Histogram | None = None

    def record(self, event_id: str, outcome: Outcome, events: int = 1) -> None:
        """One attempt that carried ``events`` events (``event_id``: the webhook-id sent)."""
        kind = outcome.kind
        counter = self._counters.get(kind)
        if counter is None:
            counter = self._counters[kind] = self._deliveries.labels(self.name, kind)
        counter.inc(events)
        seconds = self._seconds
        if seconds is None:
            seconds = self._seconds = self._histogram.labels(self.name)
        seconds.observe(outcome.elapsed)
        self._activity.record(self.name, event_id, outcome, events)
