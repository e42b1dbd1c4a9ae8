"""Metrics: the Prometheus series of SPEC §7, in one registry per bridge.

Owns the names, help texts and labels. Stages increment counters; gauges that mirror
the store (queue depth and bytes, webhook state) are refreshed when ``/metrics`` is
scraped, so the hot path pays for none of them.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATES = ("ENABLED", "DISABLED", "DISABLED_DUE_TO_ERRORS")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
            "webhook_bridge_deliveries",
            "Delivery attempts by outcome (delivered, retry, dead, gone)",
            ["webhook", "outcome"], registry=r)
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
        self.webhook_state = Gauge(
            "webhook_bridge_webhook_state", "1 for the webhook's current state",
            ["webhook", "state"], registry=r)
        self.store_damaged = Gauge(
            "webhook_bridge_store_damaged",
            "1 when a damaged queue database was moved aside at start (store.on_damage)",
            registry=r)
        self.intake_paused = Gauge(
            "webhook_bridge_intake_paused",
            "1 while MQTT intake is paused because the store cannot be written (disk full)",
            registry=r)
        self.intake_pauses = Counter(
            "webhook_bridge_intake_pauses",
            "Times MQTT intake was paused because the store could not be written", registry=r)
        self.mqtt_connected = Gauge(
            "webhook_bridge_mqtt_connected", "1 while connected to the broker", registry=r)

    def forget(self, webhook: str) -> None:
        """Drop a removed webhook's gauges (its counters stay: Prometheus expects that)."""
        for gauge in (self.queue_depth, self.dead_letters):
            with contextlib.suppress(KeyError):
                gauge.remove(webhook)
        for state in STATES:
            with contextlib.suppress(KeyError):
                self.webhook_state.remove(webhook, state)

    def set_state(self, webhook: str, state: str) -> None:
        for candidate in STATES:
            self.webhook_state.labels(webhook, candidate).set(1 if candidate == state else 0)
