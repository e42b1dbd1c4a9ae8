"""Issue 5: LwM2M and device events, end to end. EMQX LwM2M gateway messages (the JSON
shapes of tests/fixtures/lwm2m/), SenML, Zerynth and MQTT status topics flow through a real
Mosquitto and the daemon as a real subprocess to real HTTPS endpoints; the device registry
is checked across restarts and through the ``devices`` command.

Every assertion is on what the endpoint received: exact bodies (but for ``id`` and
``received_at``) and exact counts, with a later message or a later expiry as the sentinel
that proves nothing else is still coming."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from bridge.config import SourceConfig
from bridge.events import Event
from bridge.registry import Registry, apply_change
from bridge.sources.decode import SourceDecoder
from bridge.store import connect

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    https_webhook,
    started,
    wait_for,
)

FIXTURES = Path(__file__).parent / "fixtures"
EVENT_ID = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

LWM2M_SOURCE = {"name": "lwm2m", "topic": "lwm2m/{device_id}/up/#", "qos": 1,
                "format": "lwm2m-emqx"}
EP = "urn:oma:lwm2m:oma:3"  # the endpoint name of the fixtures; the mountpoint's level


# -- helpers ------------------------------------------------------------------------------

def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def received(endpoint: Endpoint, path: str) -> list[dict[str, Any]]:
    """Bodies posted to ``path``, in arrival order, each with its id checked and removed
    along with ``received_at``."""
    out = []
    for request in [r for r in endpoint.requests if r.path == path]:
        body = request.json()
        assert EVENT_ID.match(body.pop("id")), body
        assert ISO_MS.match(body.pop("received_at")), body
        out.append(body)
    return out


def types(endpoint: Endpoint, path: str, device: str | None = None) -> list[str]:
    return [b["type"] for b in received(endpoint, path)
            if device is None or b["device_id"] == device]


def of_type(endpoint: Endpoint, path: str, type_: str) -> list[dict[str, Any]]:
    return [b for b in received(endpoint, path) if b["type"] == type_]


def register(lifetime: int, endpoint: str = EP) -> dict[str, Any]:
    return {"msgType": "register", "data": {"ep": endpoint, "lt": lifetime, "lwm2m": "1.0",
                                            "b": "U", "objectList": ["/1/0", "/3/0", "/5/0"]}}


def update(lifetime: int, endpoint: str = EP) -> dict[str, Any]:
    # EMQX publishes the merged registration on an update (update_msg_publish_condition
    # = always).
    return {"msgType": "update", "data": {**register(lifetime, endpoint)["data"]}}


def notify(path: str, value: Any, seq: int) -> dict[str, Any]:
    return {"requestID": 40, "cacheID": 40, "msgType": "notify", "seqNum": seq,
            "data": {"reqPath": path, "code": "2.05", "codeMsg": "content",
                     "content": [{"path": path, "value": value}]}}


def lwm2m_path(text: str) -> dict[str, Any]:
    ids: list[int | None] = [int(p) for p in text.strip("/").split("/")]
    ids += [None] * (4 - len(ids))
    return {"path": text, "object": ids[0], "instance": ids[1], "resource": ids[2],
            "resource_instance": ids[3]}


def value(path: str, val: Any, kind: str) -> dict[str, Any]:
    return {**lwm2m_path(path), "value": val, "type": kind}


def hook(name: str, endpoint: Endpoint, certs: Certificates, **extra: Any) -> dict[str, Any]:
    return https_webhook(name, endpoint, certs, path=f"/{name}", **extra)


def reap(daemon: Daemon) -> None:
    """A daemon a failed test left running is killed (never outlives its test)."""
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.kill()


async def cli(daemon: Daemon, *args: str) -> Any:
    """A command in a thread, so the endpoint in this event loop keeps answering."""
    return await asyncio.to_thread(daemon.cli, *args)


REGISTRATION_345 = {
    "endpoint": EP, "lifetime": 345, "lwm2m_version": "1", "binding": "U",
    "objects": ["/1/0", "/2/0", "/3/0"], "alternate_path": "/lwm2m", "parameters": {},
}


# -- a. first registration, once, across restarts ------------------------------------------

async def test_first_registration_once_across_restarts(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("lifecycle", endpoint, certs, events=["device.*", "telemetry"], ordered=True)],
        sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    topic = f"lwm2m/{EP}/up/resp"
    common = {"source": "lwm2m", "topic": topic, "device_id": EP, "labels": {}}
    try:
        await started(daemon)
        await publisher.publish_all([(topic, fixture("lwm2m/register.json"))])
        await wait_for(lambda: len(received(endpoint, "/lifecycle")) == 3, 10,
                       "created, registration, first_registration")
        assert received(endpoint, "/lifecycle") == [
            {**common, "type": "device.created", "payload": {"device_id": EP,
                                                             "source": "lwm2m"}},
            {**common, "type": "device.registration", "payload": REGISTRATION_345},
            {**common, "type": "device.first_registration", "payload": REGISTRATION_345},
        ]
        # An update and a second registration in the same run: no second "first".
        await publisher.publish_all([(f"lwm2m/{EP}/up/update", fixture("lwm2m/update.json")),
                                     (topic, fixture("lwm2m/register.json")),
                                     (f"lwm2m/{EP}/up/notify",
                                      fixture("lwm2m/notify_temperature.json"))])
        await wait_for(lambda: "telemetry" in types(endpoint, "/lifecycle"), 10,
                       "the telemetry sentinel")
        assert types(endpoint, "/lifecycle") == [
            "device.created", "device.registration", "device.first_registration",
            "device.registration_update", "device.registration", "telemetry"]
        assert daemon.terminate() == 0

        # Same store, new process: the registry remembers the endpoint.
        daemon.start()
        await started(daemon)
        await publisher.publish_all([(topic, fixture("lwm2m/register.json")),
                                     (f"lwm2m/{EP}/up/notify",
                                      fixture("lwm2m/notify_temperature.json"))])
        await wait_for(lambda: types(endpoint, "/lifecycle").count("telemetry") == 2, 10,
                       "the second telemetry sentinel")
        assert types(endpoint, "/lifecycle")[6:] == ["device.registration", "telemetry"]
        assert Counter(types(endpoint, "/lifecycle")) == {
            "device.created": 1, "device.first_registration": 1, "device.registration": 3,
            "device.registration_update": 1, "telemetry": 2}
        # Ids are time-sortable in the order the events were made (created first).
        ids = [r.json()["id"] for r in endpoint.requests if r.path == "/lifecycle"]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- the registry's reload (what the daemon does after a `devices delete`) ---------------

def test_registry_reload_forgets_deleted_devices_but_not_uncommitted_ones(
        tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "queue.db"))
    registry = Registry()
    registry.load(conn)

    def seen(device: str) -> tuple[list[str], Any]:
        events, change = registry.observe([Event(type="telemetry", source="s",
                                                 topic=f"t/{device}", device_id=device)])
        return [e.type for e in events], change

    assert seen("a")[0] == ["device.created", "telemetry"]
    committed = seen("b")[1]
    apply_change(conn, committed, time.time())
    # "a" is observed but its transaction has not run yet: a reload must keep it.
    registry.load(conn)
    assert seen("a")[0] == ["telemetry"]
    # "b" was committed, then deleted by a command: the reload forgets it.
    conn.execute("DELETE FROM devices WHERE id = 'b'")
    registry.load(conn)
    assert seen("b")[0] == ["device.created", "telemetry"]
    # A transaction that failed is reverted: the redelivered message is new again.
    types_, failed = seen("c")
    registry.revert(failed)
    assert seen("c")[0] == types_ == ["device.created", "telemetry"]
    conn.close()


# -- b. lifetimes: expiry, updates keep a registration, explicit deregister ---------------

async def test_lifetime_expiry_updates_and_explicit_deregister(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("lifecycle", endpoint, certs, events=["device.*"])], sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)

    def deregistrations(device: str) -> list[dict[str, Any]]:
        return [b["payload"] for b in of_type(endpoint, "/lifecycle", "device.deregistration")
                if b["device_id"] == device]

    def arrival(device: str, type_: str) -> float:
        return next(r.at for r in endpoint.requests
                    if r.json()["device_id"] == device and r.json()["type"] == type_)

    try:
        await started(daemon)
        await publisher.publish_all([("lwm2m/short/up/resp", register(2, "short")),
                                     ("lwm2m/kept/up/resp", register(2, "kept"))])
        # "kept" refreshes its registration well within its lifetime (as a device does)
        # while "short" stays silent.
        for _ in range(5):
            await asyncio.sleep(0.7)  # the device's update interval, not a synchronisation
            await publisher.publish_all([("lwm2m/kept/up/update", update(2, "kept"))])
            assert deregistrations("kept") == []
        await wait_for(lambda: deregistrations("short"), 10, "the lifetime to expire")
        assert deregistrations("short") == [{"reason": "lifetime_expired", "endpoint": "short"}]
        expired = next(b for b in of_type(endpoint, "/lifecycle", "device.deregistration"))
        assert expired == {"type": "device.deregistration", "source": "lwm2m",
                           "topic": "lwm2m/short/up/resp", "device_id": "short", "labels": {},
                           "payload": {"reason": "lifetime_expired", "endpoint": "short"}}
        waited = arrival("short", "device.deregistration") - arrival("short",
                                                                     "device.registration")
        assert 1.9 <= waited <= 6.0, waited
        assert deregistrations("kept") == []  # 3.5 s of updates, lifetime 2 s: still there

        # An explicit De-register ends "kept" at once and cancels its expiry; "probe"
        # registers at the same moment with the same lifetime, so its expiry proves that
        # kept's would have come by now.
        await publisher.publish_all([("lwm2m/kept/up/resp", {"msgType": "deregister",
                                                             "data": {"ep": "kept"}}),
                                     ("lwm2m/probe/up/resp", register(2, "probe"))])
        await wait_for(lambda: deregistrations("probe"), 10, "the probe's expiry")
        await wait_for(lambda: len(received(endpoint, "/lifecycle")) >= 17, 10, "17 events")
        assert deregistrations("kept") == [{"reason": "deregistered", "endpoint": "kept"}]
        assert deregistrations("short") == [{"reason": "lifetime_expired", "endpoint": "short"}]
        assert Counter(types(endpoint, "/lifecycle")) == {
            "device.created": 3, "device.registration": 3, "device.first_registration": 3,
            "device.registration_update": 5, "device.deregistration": 3}
        devices = json.loads((await cli(daemon, "devices", "list", "--json")).stdout)
        assert {d["id"]: (d["ever_registered"], d["registered"], d["lifetime"])
                for d in devices} == {"kept": (1, 0, 2), "probe": (1, 0, 2),
                                      "short": (1, 0, 2)}
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


async def test_a_lifetime_that_passes_while_the_bridge_is_down_expires_at_start(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("lifecycle", endpoint, certs,
             events=["device.registration", "device.deregistration"])],
        sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("lwm2m/sleepy/up/resp", register(2, "sleepy"))])
        await wait_for(lambda: received(endpoint, "/lifecycle"), 10, "the registration")
        assert daemon.terminate() == 0
        registered_at = endpoint.requests[0].at
        # The bridge stays down past the lifetime (the scenario itself, not a sync).
        await wait_for(lambda: time.time() > registered_at + 2.5, 10, "the lifetime to pass")
        daemon.start()
        await started(daemon)
        await wait_for(lambda: len(received(endpoint, "/lifecycle")) == 2, 10,
                       "the expiry after the restart")
        assert [(b["type"], b["payload"].get("reason")) for b in received(
            endpoint, "/lifecycle")] == [("device.registration", None),
                                         ("device.deregistration", "lifetime_expired")]
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- c. firmware update ---------------------------------------------------------------------

async def test_firmware_update_outcomes(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("fota", endpoint, certs, events=["device.firmware_update"]),
        hook("values", endpoint, certs, events=["telemetry"])], sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    read_initial = {"requestID": 7, "cacheID": 7, "msgType": "read", "data": {
        "reqPath": "/5/0", "code": "2.05", "codeMsg": "content",
        "content": [{"path": "/5/0/3", "value": 0}, {"path": "/5/0/5", "value": 0}]}}
    read_result = {"requestID": 8, "cacheID": 8, "msgType": "read", "data": {
        "reqPath": "/5/0/5", "code": "2.05", "codeMsg": "content",
        "content": [{"path": "/5/0/5", "value": 1}]}}

    def progress(seq: int) -> list[tuple[str, Any]]:
        """Notifications of State 1 (downloading), 2 (downloaded), 3 (updating)."""
        return [("lwm2m/fw1/up/notify", notify("/5/0/3", state, seq + i))
                for i, state in enumerate((1, 2, 3))]

    try:
        await started(daemon)
        # The first attempt's result is read by the server after the device rebooted.
        await publisher.publish_all([("lwm2m/fw1/up/resp", read_initial), *progress(1),
                                     ("lwm2m/fw1/up/resp", read_result)])
        await wait_for(lambda: len(received(endpoint, "/fota")) == 1, 10, "the first outcome")
        # Reading the same result again is not a second update; a new attempt is. The
        # second attempt's result comes as a notification.
        await publisher.publish_all([("lwm2m/fw1/up/resp", read_result), *progress(10),
                                     ("lwm2m/fw1/up/notify", notify("/5/0/5", 8, 13))])
        await wait_for(lambda: len(received(endpoint, "/values")) == 10, 10,
                       "all 10 telemetry events")
        await wait_for(lambda: len(received(endpoint, "/fota")) == 2, 10, "the second outcome")
        common = {"type": "device.firmware_update", "source": "lwm2m", "device_id": "fw1",
                  "labels": {}, "lwm2m": lwm2m_path("/5/0/5")}
        assert received(endpoint, "/fota") == [
            {**common, "topic": "lwm2m/fw1/up/resp",
             "payload": {"success": True, "state": 3, "result": 1,
                         "result_text": "Firmware updated successfully"}},
            {**common, "topic": "lwm2m/fw1/up/notify",
             "payload": {"success": False, "state": 3, "result": 8,
                         "result_text": "Firmware update failed"}},
        ]
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- d. telemetry: one event per notify, typed values, the lwm2m path ---------------------

async def test_notify_of_several_resources_is_one_typed_telemetry_event(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("values", endpoint, certs, events=["telemetry"])], sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([
            ("lwm2m/sensor-7/up/notify", fixture("lwm2m/notify_object_instance.json")),
            ("lwm2m/sensor-7/up/notify", fixture("lwm2m/notify_string_values.json")),
            ("lwm2m/sensor-7/up/resp", fixture("lwm2m/read_object_json.json"))])
        await wait_for(lambda: len(received(endpoint, "/values")) == 3, 10, "3 events")
        common = {"type": "telemetry", "source": "lwm2m", "device_id": "sensor-7",
                  "labels": {}}
        first, second, third = sorted(received(endpoint, "/values"),
                                      key=lambda b: b["payload"]["request_id"])
        assert first == {
            **common, "topic": "lwm2m/sensor-7/up/notify", "lwm2m": lwm2m_path("/3303/0"),
            "payload": {
                "request": "notify", "code": "2.05", "code_msg": "content",
                "request_path": "/3303/0", "request_id": 13, "seq_num": 8,
                "values": [value("/3303/0/5700", 21.5, "float"),
                           value("/3303/0/5701", "Cel", "string"),
                           value("/3303/0/5601", 18.25, "float"),
                           value("/3303/0/5602", 24.0, "float"),
                           value("/3303/0/5750", "boiler room", "string")]}}
        # Strings from the gateway are typed by the resource (IPSO 5700 is a float,
        # 5750 a string) and otherwise by their shape.
        assert second["payload"]["values"] == [
            value("/3303/0/5700", 21.0, "float"), value("/3303/0/5750", "42", "string"),
            value("/3303/0/9999", 42, "int"), value("/3303/0/9998", 21.5, "float"),
            value("/3303/0/9997", True, "bool"), value("/3303/0/9996", "hello", "string")]
        assert isinstance(second["payload"]["values"][2]["value"], int)
        assert isinstance(first["payload"]["values"][3]["value"], float)
        # A read of the Device object: OMA types, objlnk, time, null.
        assert third["lwm2m"] == lwm2m_path("/3/0")
        assert third["payload"]["request"] == "read"
        assert third["payload"]["values"] == [
            value("/3/0/0", "Open Mobile Alliance", "string"),
            value("/3/0/1", "Lightweight M2M Client", "string"),
            value("/3/0/2", "345000123", "string"),
            value("/3/0/13", 1700000000, "time"),
            value("/3/0/6", True, "bool"),
            value("/3/0/22", {"object": 1, "instance": 2}, "objlnk"),
            value("/3/0/15", 123, "int"),
            value("/3/0/99", None, "null")]
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- e. malformed gateway messages ----------------------------------------------------------

async def test_malformed_lwm2m_becomes_invalid_and_the_daemon_keeps_running(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    config = base_config(tmp_path, mosquitto, [
        hook("invalid", endpoint, certs, events=["invalid"], ordered=True),
        hook("everything", endpoint, certs, events=["*"], ordered=True)],
        sources=[LWM2M_SOURCE])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    malformed = fixture("lwm2m/malformed_json.json")
    no_type = fixture("lwm2m/missing_msgtype.json")
    try:
        await started(daemon)
        await publisher.publish_all([
            ("lwm2m/bad-1/up/resp", malformed), ("lwm2m/bad-1/up/resp", no_type),
            ("lwm2m/bad-1/up/resp", b"\xff\xfe not utf-8"),
            ("lwm2m/bad-1/up/resp", {"msgType": "teleport", "data": {}})])
        await wait_for(lambda: len(received(endpoint, "/invalid")) == 4, 10, "4 invalid")
        bodies = received(endpoint, "/invalid")
        common = {"type": "invalid", "source": "lwm2m", "topic": "lwm2m/bad-1/up/resp",
                  "device_id": "bad-1", "labels": {}}
        assert [{k: v for k, v in b.items() if k != "decode_error"} for b in bodies] == [
            {**common, "payload_raw": base64.b64encode(raw).decode()}
            for raw in (malformed, no_type, b"\xff\xfe not utf-8",
                        b'{"msgType": "teleport", "data": {}}')]
        errors = [b["decode_error"] for b in bodies]
        assert errors[0].startswith("LwM2M message is not valid JSON")
        assert errors[1] == "LwM2M message has no 'msgType'"
        assert errors[2].startswith("LwM2M message is not UTF-8")
        assert errors[3] == "unknown LwM2M msgType 'teleport'"
        # Still running: a good message after the bad ones goes through.
        await publisher.publish_all([("lwm2m/bad-1/up/resp", register(60, "bad-1"))])
        await wait_for(lambda: "device.first_registration" in types(endpoint, "/everything"),
                       10, "a registration after the bad messages")
        assert daemon.proc.poll() is None
        # A glob never sends invalid events (they are opt-in by name).
        assert "invalid" not in types(endpoint, "/everything")
        assert types(endpoint, "/everything") == [
            "device.created", "device.registration", "device.first_registration"]
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- f. SenML JSON and CBOR -------------------------------------------------------------------

RESOLVED_MULTIPLE_TIMES = [
    {"n": "urn:dev:ow:10e2073a0108006:voltage", "u": "V", "v": 120.1, "t": 1.276020076001e9,
     "bver": 5},
    *[{"n": "urn:dev:ow:10e2073a0108006:current", "u": "A", "v": v, "t": 1.276020076001e9 + t,
       "bver": 5}
      for t, v in ((-5, 1.2), (-4, 1.3), (-3, 1.4), (-2, 1.5), (-1, 1.6), (0, 1.7))],
]


async def test_senml_json_and_cbor_arrive_resolved(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    sources = [{"name": "senml", "topic": "senml/{device_id}", "format": "senml"},
               {"name": "senml-cbor", "topic": "senml-cbor/{device_id}",
                "format": "senml-cbor"}]
    config = base_config(tmp_path, mosquitto, [hook("values", endpoint, certs)],
                         sources=sources)
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    cbor = bytes.fromhex(fixture("senml/rfc8428_section6_cbor.hex").decode())
    try:
        await started(daemon)
        await publisher.publish_all([
            ("senml/ow-1", fixture("senml/rfc8428_5.1.3_multiple_measurements.json")),
            ("senml-cbor/ow-2", cbor),
            ("senml/ow-3", fixture("senml/rfc8428_5.1.2_multiple_times.json"))])
        await wait_for(lambda: len(received(endpoint, "/values")) == 3, 10, "3 packs")
        by_device = {b["device_id"]: b for b in received(endpoint, "/values")}
        # RFC 8428 5.1.4 is the resolved form of 5.1.3, verbatim.
        assert by_device["ow-1"] == {
            "type": "telemetry", "source": "senml", "topic": "senml/ow-1",
            "device_id": "ow-1", "labels": {},
            "payload": json.loads(fixture("senml/rfc8428_5.1.4_resolved.json"))}
        # RFC 8428 section 6 is 5.1.2 in CBOR: both resolve to the same records.
        assert by_device["ow-2"] == {
            "type": "telemetry", "source": "senml-cbor", "topic": "senml-cbor/ow-2",
            "device_id": "ow-2", "labels": {}, "payload": RESOLVED_MULTIPLE_TIMES}
        assert by_device["ow-3"]["payload"] == RESOLVED_MULTIPLE_TIMES
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- g. the devices command -----------------------------------------------------------------

async def test_devices_list_show_delete(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    sources = [LWM2M_SOURCE, {"name": "telemetry", "topic": "devices/{device_id}/telemetry"}]
    config = base_config(tmp_path, mosquitto, [
        hook("lifecycle", endpoint, certs, events=["device.*"], ordered=True),
        hook("plain", endpoint, certs)], sources=sources)
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("lwm2m/ep-1/up/resp", register(300, "ep-1")),
                                     ("devices/d1/telemetry", {"temp": 21.5})])
        await wait_for(lambda: len(received(endpoint, "/lifecycle")) == 4, 10,
                       "created x2, registration, first_registration")
        listed = json.loads((await cli(daemon, "devices", "list", "--json")).stdout)
        assert [(d["id"], d["source"], d["topic"], d["ever_registered"], d["registered"],
                 d["lifetime"]) for d in listed] == [
            ("d1", "telemetry", "devices/d1/telemetry", 0, 0, None),
            ("ep-1", "lwm2m", "lwm2m/ep-1/up/resp", 1, 1, 300)]
        assert all(abs(d["first_seen"] - time.time()) < 60 for d in listed)
        text = (await cli(daemon, "devices", "list")).stdout
        assert re.search(r"^ep-1 +lwm2m +\S+ +registered", text, re.M), text
        assert text.rstrip().endswith("2 devices")
        shown = await cli(daemon, "devices", "show", "ep-1")
        assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == "ep-1"

        deleted = await cli(daemon, "devices", "delete", "ep-1")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.strip() == "deleted ep-1; device.deleted queued for 1 webhook"
        await wait_for(lambda: of_type(endpoint, "/lifecycle", "device.deleted"), 5,
                       "device.deleted from the running daemon")
        assert of_type(endpoint, "/lifecycle", "device.deleted") == [{
            "type": "device.deleted", "source": "lwm2m", "topic": "lwm2m/ep-1/up/resp",
            "device_id": "ep-1", "labels": {},
            "payload": {"device_id": "ep-1", "reason": "deleted by operator"}}]
        listed = json.loads((await cli(daemon, "devices", "list", "--json")).stdout)
        assert [d["id"] for d in listed] == ["d1"]

        missing = await cli(daemon, "devices", "delete", "nope")
        assert missing.returncode == 1
        assert missing.stderr.strip() == ("webhook-bridge: no device 'nope' in the registry "
                                          "(webhook-bridge devices list shows them)")
        assert (await cli(daemon, "devices", "show", "nope")).returncode == 1

        # The daemon forgot it too: its next registration is a new device again.
        await publisher.publish_all([("lwm2m/ep-1/up/resp", register(300, "ep-1"))])
        await wait_for(lambda: types(endpoint, "/lifecycle", "ep-1").count(
            "device.first_registration") == 2, 10, "the registration after the delete")
        assert types(endpoint, "/lifecycle", "ep-1") == [
            "device.created", "device.registration", "device.first_registration",
            "device.deleted", "device.created", "device.registration",
            "device.first_registration"]
        # A webhook without `events` gets what devices publish, never the registry's own
        # events (created, first_registration, deleted).
        await wait_for(lambda: len(received(endpoint, "/plain")) >= 3, 10, "3 in /plain")
        assert sorted(types(endpoint, "/plain")) == [
            "device.registration", "device.registration", "telemetry"]
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- h. Zerynth data and event webhooks ---------------------------------------------------

async def test_zerynth_data_and_event_webhooks(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    sources = [
        {"name": "zdata", "topic": "zerynth/{workspace}/{fleet}/{device_id}/data",
         "labels": {"tag": "{payload.tag}"}},
        {"name": "zevents", "topic": "zerynth/{workspace}/{fleet}/{device_id}/events/{kind}",
         "type": "{kind}"},
    ]
    batch = {"max_events": 2, "max_wait": "200ms"}
    config = base_config(tmp_path, mosquitto, [
        hook("zdata", endpoint, certs, sources=["zdata"], fleets=["flt-1"], tags=["d1"],
             envelope="zerynth", batch=batch),
        hook("zevents", endpoint, certs, sources=["zevents"],
             events=["connection", "disconnection"], fleets=["flt-1"], envelope="zerynth",
             batch=batch)], sources=sources)
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    point = {"tag": "d1", "ts": 1701424260, "ex": [0, 0], "C": {}}
    try:
        await started(daemon)
        await publisher.publish_all([
            ("zerynth/wks-1/flt-1/dev-124/data", point),
            ("zerynth/wks-1/flt-2/dev-200/data", point),                      # other fleet
            ("zerynth/wks-1/flt-1/dev-124/data", {**point, "tag": "d2"}),     # other tag
            ("zerynth/wks-1/flt-1/dev-125/data", {"tag": "d1", "temp": 3.5}),
            ("zerynth/wks-1/flt-1/dev-124/events/connection",
             {"device_ip": "172.0.0.193", "connected_at": "2022-03-18T09:34:23.793Z"}),
            ("zerynth/wks-1/flt-2/dev-200/events/connection", {"device_ip": "10.0.0.2"}),
            ("zerynth/wks-1/flt-1/dev-124/events/fota", {"step": "start"}),  # not listed
        ])
        await wait_for(lambda: [r for r in endpoint.requests if r.path == "/zevents"], 10,
                       "the event batch (after max_wait)")
        await publisher.publish_all([("zerynth/wks-1/flt-1/dev-126/data",
                                      {"tag": "d1", "ts": 1701424261})])
        await wait_for(lambda: len([r for r in endpoint.requests if r.path == "/zdata"]) == 2,
                       10, "the second data batch")
        first, second = [r for r in endpoint.requests if r.path == "/zdata"]
        body = first.json()
        assert set(body) == {"batch_id", "result"}
        assert body["batch_id"].startswith("bat_") and first.headers["webhook-id"] == (
            body["batch_id"])
        items = body["result"]
        for item in items:
            assert EVENT_ID.match(item.pop("event_id"))  # extra field; Zerynth ignores it
            assert ISO_MS.match(item.pop("timestamp_in"))
        in_2 = items[1].pop("timestamp_device")
        assert ISO_MS.match(in_2)
        assert items == [
            {"id": "0", "timestamp_device": "2023-12-01T09:51:00.000Z", "tag": "d1",
             "device_id": "dev-124", "device_name": "dev-124", "workspace_id": "wks-1",
             "fleet_id": "flt-1", "payload": point},
            {"id": "1", "tag": "d1", "device_id": "dev-125",
             "device_name": "dev-125", "workspace_id": "wks-1", "fleet_id": "flt-1",
             "payload": {"tag": "d1", "temp": 3.5}},
        ]
        assert [(i["id"], i["device_id"]) for i in second.json()["result"]] == [
            ("0", "dev-126")]
        [events] = [r.json() for r in endpoint.requests if r.path == "/zevents"]
        assert events["batch_id"].startswith("bat_")
        [item] = events["result"]
        assert EVENT_ID.match(item.pop("event_id"))
        assert ISO_MS.match(item.pop("ts"))
        assert item == {"id": "0", "workspace_id": "wks-1", "fleet_id": "flt-1",
                        "device_id": "dev-124", "type": "connection", "direction": "d2c",
                        "payload": {"device_ip": "172.0.0.193",
                                    "connected_at": "2022-03-18T09:34:23.793Z"}}
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        reap(daemon)


# -- i. connection events from status topics and Last Wills ---------------------------------

def test_type_map_renames_the_rendered_type() -> None:
    decoder = SourceDecoder(SourceConfig(
        name="status", topic="devices/{device_id}/status", format="text", type="{payload}",
        type_map={"online": "connection", "offline": "disconnection"},
        labels={"was": "{type}"}))
    events = [decoder.events("devices/d1/status", raw, {"device_id": "d1"})[0]
              for raw in (b"online", b"offline", b"sleeping", b"ONLINE")]
    assert [(e.type, e.payload, e.labels) for e in events] == [
        ("connection", "online", {"was": "connection"}),
        ("disconnection", "offline", {"was": "disconnection"}),
        ("sleeping", "sleeping", {"was": "sleeping"}),  # not in the map: kept as is
        ("ONLINE", "ONLINE", {"was": "ONLINE"}),        # the map is exact
    ]
    fixed = SourceDecoder(SourceConfig(name="up", topic="up/{device_id}", type="up",
                                       type_map={"up": "connection"}))
    assert fixed.events("up/d2", b"{}", {"device_id": "d2"})[0].type == "connection"
    # A payload the type template cannot fill is invalid, never dropped.
    broken = SourceDecoder(SourceConfig(name="j", topic="j/{device_id}", type="{payload.s}",
                                        type_map={"on": "connection"}))
    [event] = broken.events("j/d3", b'{"x": 1}', {"device_id": "d3"})
    assert event.type == "invalid" and "payload.s" in (event.decode_error or "")


async def test_status_topics_and_last_will_become_connection_events(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    status_source = {"name": "status", "topic": "devices/{device_id}/status", "qos": 1,
                     "format": "text", "type": "{payload}",
                     "type_map": {"online": "connection", "offline": "disconnection"}}
    config = base_config(tmp_path, mosquitto, [
        hook("status", endpoint, certs, events=["connection", "disconnection"]),
        hook("all", endpoint, certs)], sources=[status_source])
    publisher = Publisher(mosquitto.port)
    # Retained states published before the bridge subscribes: replayed to it.
    await asyncio.to_thread(lambda: [
        publisher.publish("devices/dev-6/status", "offline", retain=True).wait_for_publish(5),
        publisher.publish("devices/dev-7/status", "online", retain=True).wait_for_publish(5)])
    daemon = Daemon(tmp_path, config).start()
    device = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-8",
                         protocol=paho.MQTTv311)
    try:
        await started(daemon)
        await wait_for(lambda: len(received(endpoint, "/status")) == 2, 10,
                       "the retained states")
        # A live device: Last Will "offline" (retained, QoS 1), then "online".
        device.will_set("devices/dev-8/status", "offline", qos=1, retain=True)
        device.connect("127.0.0.1", mosquitto.port, keepalive=30)
        device.loop_start()
        await asyncio.to_thread(device.publish("devices/dev-8/status", "online", qos=1,
                                               retain=True).wait_for_publish, 5)
        await wait_for(lambda: len(received(endpoint, "/status")) == 3, 10, "dev-8 online")
        # The connection drops without a DISCONNECT: the broker publishes the will.
        device.loop_stop()
        device.socket().close()
        await wait_for(lambda: len(received(endpoint, "/status")) == 4, 10, "the last will")
        await publisher.publish_all([("devices/dev-9/status", "sleeping")])
        await wait_for(lambda: "sleeping" in types(endpoint, "/all"), 10, "an unmapped state")
        await wait_for(lambda: len(received(endpoint, "/all")) >= 5, 10, "5 states in /all")

        def state(device_id: str, topic_type: str, payload: str) -> dict[str, Any]:
            return {"type": topic_type, "source": "status",
                    "topic": f"devices/{device_id}/status", "device_id": device_id,
                    "labels": {}, "payload": payload}

        bodies = received(endpoint, "/status")
        assert sorted(bodies[:2], key=lambda b: b["device_id"]) == [
            state("dev-6", "disconnection", "offline"), state("dev-7", "connection", "online")]
        assert bodies[2:] == [state("dev-8", "connection", "online"),
                              state("dev-8", "disconnection", "offline")]
        assert Counter(types(endpoint, "/all")) == {"connection": 2, "disconnection": 2,
                                                    "sleeping": 1}
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        device.loop_stop()
        reap(daemon)
