"""The ingest path (bridge/ingest.py) against a real store: the isolation boundary, the
envelope built once, and bounded metric labels."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bridge.config import SourceConfig, WebhookConfig
from bridge.events import Event
from bridge.ingest import Ingest
from bridge.metrics import DYNAMIC_TYPES, OTHER_TYPE, Metrics
from bridge.registry import Registry
from bridge.rules import RuleSet
from bridge.sources.decode import SourceDecoder
from bridge.sources.mqtt import Message
from bridge.store import Store

SOURCE = SourceConfig(name="t", topic="devices/{device_id}/telemetry", type="{payload.kind}")
HOOK = WebhookConfig(name="all", url="https://example.test/", events=("*", "invalid"))


def rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        return [json.loads(r[0]) for r in
                conn.execute("SELECT event FROM deliveries ORDER BY id").fetchall()]


async def ingest_all(tmp: Path, messages: list[Message], *, source: SourceConfig = SOURCE,
                     hooks: tuple[WebhookConfig, ...] = (HOOK,), metrics: Metrics | None = None,
                     break_registry: bool = False) -> Ingest:
    store = Store(str(tmp / "q.db"), "process_crash")
    await store.start()
    registry = Registry()
    if break_registry:
        def boom(events: list[Event]) -> Any:
            raise RecursionError("maximum recursion depth exceeded")
        registry.observe = boom  # type: ignore[method-assign]
    ingest = Ingest([SourceDecoder(source)], RuleSet(hooks), registry, store,
                    metrics or Metrics(), backpressure=False)
    try:
        await asyncio.wait_for(asyncio.gather(*(ingest.take(m) for m in messages)), 10)
    finally:
        await store.close()
    return ingest


def msg(payload: bytes, device: str = "d1") -> Message:
    return Message(f"devices/{device}/telemetry", payload, 1, False)


def test_a_failing_step_makes_one_invalid_event_that_is_committed(tmp_path: Path) -> None:
    ingest = asyncio.run(ingest_all(tmp_path, [msg(b'{"kind": "a"}')], break_registry=True))
    (event,) = rows(tmp_path / "q.db")
    assert event["type"] == "invalid"
    assert event["decode_error"] == ("message could not be processed: RecursionError: "
                                     "maximum recursion depth exceeded")
    assert base64.b64decode(event["payload_raw"]) == b'{"kind": "a"}'
    assert (ingest.accepted, ingest.isolated) == (1, 1)


@pytest.mark.parametrize(("payload", "error"), [
    (b'{"v": ' + b"9" * 6000 + b"}", "6000 digits, more than the 1000 allowed"),
    (b"[" * 5000, "nested deeper than 1024 levels (JSON_MAX_DEPTH)"),
    (b'{"s": "\\ud800"}', "no low surrogate"),
    (b'{"v": NaN}', "NaN is not a JSON number"),
    (b'{"v": 1e999}', "out of range"),
    (b'{"s": "\xff"}', "not valid UTF-8"),
])
def test_hostile_json_is_invalid_with_the_reason(tmp_path: Path, payload: bytes,
                                                 error: str) -> None:
    healthy = msg(b'{"kind": "ok"}', "d2")
    asyncio.run(ingest_all(tmp_path, [msg(payload), healthy]))
    events = [e for e in rows(tmp_path / "q.db") if e["type"] != "device.created"]
    assert [e["type"] for e in events] == ["invalid", "ok"]
    assert error in events[0]["decode_error"], events[0]["decode_error"]
    assert base64.b64decode(events[0]["payload_raw"]) == payload


def test_big_integers_within_the_bound_stay_exact(tmp_path: Path) -> None:
    big = 10**400 + 7
    asyncio.run(ingest_all(tmp_path, [msg(b'{"kind": "a", "v": %d}' % big)]))
    assert rows(tmp_path / "q.db")[-1]["payload"]["v"] == big


def test_oversized_message_is_invalid_with_its_size_and_no_payload(tmp_path: Path) -> None:
    oversized = Message("devices/d1/telemetry", b"", 1, False, oversize=16_000_000)
    asyncio.run(ingest_all(tmp_path, [oversized]))
    event = rows(tmp_path / "q.db")[-1]
    assert event["type"] == "invalid"
    assert event["payload_size"] == 16_000_000
    assert "payload_raw" not in event and "payload" not in event
    assert event["decode_error"] == "payload of 16000000 bytes is over mqtt.max_payload"


def test_the_envelope_is_built_once_per_event(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    original = Event.envelope

    def counting(self: Event) -> dict[str, Any]:
        built.append(self.type)
        return original(self)

    monkeypatch.setattr(Event, "envelope", counting)
    hook = WebhookConfig(name="f", url="https://example.test/", filter="payload.v > `1`")
    asyncio.run(ingest_all(tmp_path, [msg(b'{"kind": "a", "v": 2}')], hooks=(hook,)))
    # The type template, the filter and the stored JSON share one envelope; the
    # registry's device.created event has its own.
    assert sorted(built) == ["", "device.created"]
    assert [e["type"] for e in rows(tmp_path / "q.db")] == ["a"]


def test_device_chosen_types_are_bounded_metric_labels(tmp_path: Path) -> None:
    metrics = Metrics()
    messages = [msg(b'{"kind": "k%d"}' % i, f"d{i % 3}") for i in range(300)]
    asyncio.run(ingest_all(tmp_path, messages, metrics=metrics))
    labels = {s.labels["type"] for m in metrics.events.collect() for s in m.samples
              if s.name.endswith("_total")}
    assert len(labels) == DYNAMIC_TYPES + 1 + 1  # the dynamic ones, other, device.created
    assert OTHER_TYPE in labels and "device.created" in labels
    total = sum(s.value for m in metrics.events.collect() for s in m.samples
                if s.name.endswith("_total"))
    assert total == 300 + 3


def test_the_device_registry_is_bounded_and_counts_toward_the_quota(tmp_path: Path) -> None:
    from bridge.registry import DEVICE_ROW_COST, max_devices

    quota = 64 * 1024
    limit = max_devices(quota)
    assert limit == quota // 8 // DEVICE_ROW_COST == 32

    async def run() -> tuple[Ingest, int]:
        store = Store(str(tmp_path / "q.db"), "process_crash", quota)
        await store.start()
        metrics = Metrics()
        ingest = Ingest([SourceDecoder(SOURCE)], RuleSet((HOOK,)), Registry(limit), store,
                        metrics, backpressure=False)
        try:
            messages = [msg(b'{"kind": "a"}', f"dev{i}") for i in range(100)]
            await asyncio.wait_for(asyncio.gather(*(ingest.take(m) for m in messages)), 10)
            return ingest, store.max_size
        finally:
            await store.close()

    ingest, queue_quota = asyncio.run(run())
    assert len(ingest.registry.known) == limit
    assert ingest.registry.unrecorded == 100 - limit
    assert queue_quota == quota - limit * DEVICE_ROW_COST
    with sqlite3.connect(tmp_path / "q.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == limit
    types = [e["type"] for e in rows(tmp_path / "q.db")]
    assert types.count("a") == 100  # every device's events still flow
    assert types.count("device.created") == limit


def test_a_type_longer_than_the_bound_makes_the_message_invalid(tmp_path: Path) -> None:
    asyncio.run(ingest_all(tmp_path, [msg(b'{"kind": "%s"}' % (b"k" * 257)),
                                      msg(b'{"kind": "%s"}' % (b"k" * 256))]))
    events = [e for e in rows(tmp_path / "q.db") if e["type"] != "device.created"]
    assert events[0]["type"] == "invalid"
    assert events[0]["decode_error"] == ("source t: the type is longer than 256 characters "
                                         "(EVENT_TYPE_MAX)")
    assert events[1]["type"] == "k" * 256


def test_firmware_tracking_is_bounded_per_device() -> None:
    from bridge.registry import FIRMWARE_INSTANCES

    values = [{"path": f"/5/{i}/3", "object": 5, "instance": i, "resource": 3,
               "resource_instance": None, "value": 1, "type": "integer"}
              for i in range(1000)]
    event = Event(type="telemetry", source="lwm2m", topic="lwm2m/d/up/notify",
                  device_id="d", payload={"values": values},
                  extra={"lwm2m": {"path": "/5/0/3"}})
    _, change = Registry().observe([event])
    assert sorted(instance for _, instance in change.firmware) == list(
        range(FIRMWARE_INSTANCES))
