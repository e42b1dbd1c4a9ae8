"""EMQX's Object 5 (Firmware Update) notifications on ``<mountpoint>/v1/up/dm`` with the
shipped ``config/lwm2m.yaml`` sources: one ``device.firmware_update`` per update, across
sources and across a restart of the daemon (the progress lives in the store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bridge.registry import Registry, apply_change
from bridge.sources.lwm2m import decode_emqx, split_links
from bridge.store import connect

from .support import (
    ROOT,
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    https_webhook,
    queued,
    started,
    wait_for,
)

SHIPPED = yaml.safe_load((ROOT / "config" / "lwm2m.yaml").read_text())


def dm_topic(endpoint: str) -> str:
    """Where EMQX publishes Object 5 notifications with the default mountpoint
    ``lwm2m/${endpoint_name}/``: the mountpoint, then the fixed ``/v1/up/dm``."""
    return f"lwm2m/{endpoint}/" + "/v1/up/dm"


def notify(path: str, value: int, seq: int) -> dict[str, Any]:
    """An observe notification exactly as EMQX 5 publishes it (coap_to_mqtt of an observe
    response, msgType corrected to ``notify``)."""
    return {"requestID": 51, "cacheID": 51, "msgType": "notify", "seqNum": seq,
            "data": {"reqPath": path, "code": "2.05", "codeMsg": "content",
                     "content": [{"path": path, "value": value}]}}


def states(*values: int, seq: int = 1) -> list[dict[str, Any]]:
    return [notify("/5/0/3", v, seq + i) for i, v in enumerate(values)]


def result(value: int, seq: int) -> dict[str, Any]:
    return notify("/5/0/5", value, seq)


def _config(tmp: Path, broker: Mosquitto, endpoint: Endpoint, certs: Certificates
            ) -> dict[str, Any]:
    sources = SHIPPED["sources"]
    assert [s["topic"] for s in sources] == ["lwm2m/{device_id}/up/#",
                                             "lwm2m/{device_id}//v1/up/dm"]
    names = [s["name"] for s in sources]
    return base_config(tmp, broker, [
        https_webhook("fota", endpoint, certs, path="/fota", sources=names,
                      events=["device.firmware_update"]),
        https_webhook("values", endpoint, certs, path="/values", sources=names,
                      events=["telemetry"]),
    ], sources=sources)


def _bodies(endpoint: Endpoint, path: str) -> list[dict[str, Any]]:
    return [r.json() for r in endpoint.requests if r.path == path]


def _outcomes(endpoint: Endpoint) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for body in _bodies(endpoint, "/fota"):
        out.setdefault(body["device_id"], []).append(body)
    return out


async def _publish(publisher: Publisher, items: list[tuple[str, dict[str, Any]]]) -> None:
    await publisher.publish_all(items, qos=0)  # EMQX publishes /v1/up/dm at QoS 0


async def _settled(tmp: Path, endpoint: Endpoint, telemetry: int) -> None:
    """Every telemetry event delivered and nothing left in the queue: all firmware events
    (committed with their telemetry) have been delivered too."""
    await wait_for(lambda: len(_bodies(endpoint, "/values")) >= telemetry, 20,
                   f"{telemetry} telemetry events")
    await wait_for(lambda: queued(tmp) == 0, 20, "an empty queue")


SUCCESS = {"success": True, "state": 3, "result": 1,
           "result_text": "Firmware updated successfully"}
FAILURE = {"success": False, "state": 0, "result": 4,
           "result_text": "Connection lost during downloading process"}


def _check(bodies: list[dict[str, Any]], device: str, payload: dict[str, Any]) -> None:
    assert len(bodies) == 1, bodies
    body = bodies[0]
    assert body["type"] == "device.firmware_update"
    assert body["source"] == "lwm2m-firmware"
    assert body["topic"] == dm_topic(device)
    assert body["device_id"] == device
    assert body["payload"] == payload
    assert body["lwm2m"] == {"path": "/5/0/5", "object": 5, "instance": 0, "resource": 5,
                             "resource_instance": None}


async def test_dm_notifications_yield_one_firmware_update_each(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    daemon = Daemon(tmp_path, _config(tmp_path, mosquitto, endpoint, certs)).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        ok, bad = "urn:imei:350000000000001", "urn:imei:350000000000002"
        await _publish(publisher, [
            *[(dm_topic(ok), m) for m in states(1, 2, 3)],
            (dm_topic(ok), result(1, 4)),
            # Download failed: back to Idle, Update Result 4.
            *[(dm_topic(bad), m) for m in states(1, 0)],
            (dm_topic(bad), result(4, 3)),
            # The same result notified again is not a second update.
            (dm_topic(ok), result(1, 5)),
        ])
        await _settled(tmp_path, endpoint, telemetry=8)
        outcomes = _outcomes(endpoint)
        _check(outcomes[ok], ok, SUCCESS)
        _check(outcomes[bad], bad, FAILURE)
        assert sorted(outcomes) == sorted([ok, bad])
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


async def test_firmware_progress_survives_a_restart(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    daemon = Daemon(tmp_path, _config(tmp_path, mosquitto, endpoint, certs)).start()
    publisher = Publisher(mosquitto.port)
    ok, bad = "fw-ok", "fw-bad"
    try:
        await started(daemon)
        await _publish(publisher, [*[(dm_topic(ok), m) for m in states(1, 2, 3)],
                                   *[(dm_topic(bad), m) for m in states(1, 0)]])
        await _settled(tmp_path, endpoint, telemetry=5)
        assert daemon.terminate() == 0
        daemon.start()  # a new process: only the store remembers the progress
        await started(daemon)
        # Only the results after the restart: a tracker that forgot the progress would
        # take each for the first value it ever saw and report nothing.
        await _publish(publisher, [(dm_topic(ok), result(1, 4)),
                                   (dm_topic(bad), result(4, 3))])
        await _settled(tmp_path, endpoint, telemetry=7)
        outcomes = _outcomes(endpoint)
        _check(outcomes[ok], ok, SUCCESS)
        _check(outcomes[bad], bad, FAILURE)
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


# -- the registry's firmware tracking, in-process ------------------------------------------

def _events(registry: Registry, source: str, topic: str, message: dict[str, Any]) -> Any:
    from bridge.config import SourceConfig
    from bridge.sources.decode import SourceDecoder

    decoder = SourceDecoder(SourceConfig(name=source, topic="lwm2m/{device_id}/#",
                                         format="lwm2m-emqx"))
    decoded = decoder.events(topic, json.dumps(message).encode(), {"device_id": "d1"})
    return registry.observe(decoded)


def test_progress_across_sources_and_a_failed_commit(tmp_path: Path) -> None:
    registry = Registry()
    conn = connect(str(tmp_path / "q.db"))
    registry.load(conn)
    # Progress on the dm source, the result read on the response source.
    for message in states(1, 2, 3):
        _, change = _events(registry, "lwm2m-firmware", dm_topic("d1"), message)
        apply_change(conn, change, 0.0)
    read = {"requestID": 9, "cacheID": 9, "msgType": "read",
            "data": {"reqPath": "/5/0/5", "code": "2.05", "codeMsg": "content",
                     "content": [{"path": "/5/0/5", "value": 1}]}}
    events, change = _events(registry, "lwm2m", "lwm2m/d1/up/resp", read)
    assert [e.type for e in events] == ["telemetry", "device.firmware_update"]
    assert events[1].source == "lwm2m" and events[1].payload == SUCCESS
    # Its transaction failed: the broker sends the message again, and the event must
    # come again.
    registry.revert(change)
    events, change = _events(registry, "lwm2m", "lwm2m/d1/up/resp", read)
    assert [e.type for e in events] == ["telemetry", "device.firmware_update"]
    apply_change(conn, change, 0.0)
    assert conn.execute("SELECT device, instance, state, result, armed FROM firmware"
                        ).fetchall() == [("d1", 0, 3, 1, 0)]
    # A new process: the same read is not a second update.
    fresh = Registry()
    fresh.load(conn)
    events, _ = _events(fresh, "lwm2m", "lwm2m/d1/up/resp", read)
    assert [e.type for e in events] == ["telemetry"]
    conn.close()


def test_emqx4_discover_links_are_split_again() -> None:
    # EMQX 4.x splits the link-format answer only at its first comma.
    answer = {"requestID": 3, "cacheID": 3, "msgType": "discover",
              "data": {"reqPath": "/3/0", "code": "2.05", "codeMsg": "content",
                       "content": ["</3/0>;pmin=10", "</3/0/1>,</3/0/2>, </3/0/7>;dim=2,"
                                   "</3/0/9>;title=\"a,b\""]}}
    (event,) = decode_emqx("d1", json.dumps(answer).encode())
    assert event.payload["links"] == ["</3/0>;pmin=10", "</3/0/1>", "</3/0/2>",
                                      "</3/0/7>;dim=2", "</3/0/9>;title=\"a,b\""]
    # EMQX 5 sends one link per item: unchanged.
    assert split_links(["</1/0>", "</3/0/1>;dim=2"]) == ["</1/0>", "</3/0/1>;dim=2"]


def test_lifetime_zero_never_expires() -> None:
    register = {"msgType": "register", "data": {"ep": "d1", "lt": 0, "lwm2m": "1.1",
                                                "objectList": ["/1/0", "/3/0"]}}
    registry = Registry()
    _events(registry, "lwm2m", "lwm2m/d1/up/resp", register)
    assert "d1" in registry.lifetimes
    assert registry.next_deadline() is None
    assert registry.expire(10.0 ** 12)[0] == []
