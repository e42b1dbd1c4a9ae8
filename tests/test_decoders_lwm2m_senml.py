"""Decoders for the EMQX LwM2M gateway (``bridge.sources.lwm2m``) and SenML
(``bridge.sources.senml``): exact events for real gateway messages, firmware-update and
lifetime tracking, RFC 8428 examples, and fuzzing (only DecodeError may escape).

Fixture sources (see the ``lwm2m.py`` docstring): ``apps/emqx_gateway_lwm2m/test/
emqx_lwm2m_SUITE.erl`` in emqx/emqx for the 5.x shapes, the emqx/emqx-lwm2m README for
``read_legacy_4x.json``; the SenML fixtures are RFC 8428 sections 5.1.x and 6 verbatim.
"""

from __future__ import annotations

import json
import time
from datetime import timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.sources.lwm2m import (
    DecodeError,
    FirmwareTracker,
    Lwm2mDecoder,
    Lwm2mEvent,
    RegistrationTracker,
    decode_emqx,
    deregistration_event,
)
from bridge.sources.senml import (
    DecodeError as SenmlDecodeError,
)
from bridge.sources.senml import (
    decode_senml_cbor,
    decode_senml_json,
    lwm2m_path_in_name,
    parse_lwm2m_path,
)

FIXTURES = Path(__file__).parent / "fixtures"
LWM2M = FIXTURES / "lwm2m"
SENML = FIXTURES / "senml"
NOW = 1_700_000_000.0


def path(text: str) -> dict[str, Any]:
    ids: list[int | None] = [int(p) for p in text.strip("/").split("/")]
    ids += [None] * (4 - len(ids))
    return {
        "path": text,
        "object": ids[0],
        "instance": ids[1],
        "resource": ids[2],
        "resource_instance": ids[3],
    }


def value(text: str, val: Any, kind: str) -> dict[str, Any]:
    return {**path(text), "value": val, "type": kind}


def command(
    request: str | None,
    code: str | None,
    code_msg: str | None,
    req_path: str | None,
    request_id: Any,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "request": request,
        "code": code,
        "code_msg": code_msg,
        "request_path": req_path,
        "request_id": request_id,
        **extra,
    }


def telemetry(
    request: str, req_path: str | None, request_id: Any, values: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {**command(request, "2.05", "content", req_path, request_id), "values": values, **extra}


def load(name: str) -> bytes:
    return (LWM2M / name).read_bytes()


# --- EMQX gateway messages -> exact events -----------------------------------------------

EXPECTED: dict[str, list[Lwm2mEvent]] = {
    "register.json": [
        Lwm2mEvent(
            "device.registration",
            {
                "endpoint": "urn:oma:lwm2m:oma:3",
                "lifetime": 345,
                "lwm2m_version": "1",
                "binding": "U",
                "objects": ["/1/0", "/2/0", "/3/0"],
                "alternate_path": "/lwm2m",
                "parameters": {},
            },
        )
    ],
    "register_with_parameters.json": [
        Lwm2mEvent(
            "device.registration",
            {
                "endpoint": "urn:oma:lwm2m:oma:3",
                "lifetime": 345,
                "lwm2m_version": "1.0",
                "binding": "UQ",
                "objects": ["/1", "/2", "/3", "/4", "/5"],
                "alternate_path": "/",
                "parameters": {
                    "apn": "psmA.eDRX0.ctnb",
                    "ct": "1.4",
                    "cust_opt": "shawn",
                    "im": "123",
                    "mt": "mdm9620",
                    "mv": "1.2",
                },
            },
        )
    ],
    "update.json": [
        Lwm2mEvent(
            "device.registration_update",
            {
                "endpoint": "urn:oma:lwm2m:oma:3",
                "lifetime": 345,
                "lwm2m_version": "1",
                "objects": ["/1", "/2", "/3", "/4", "/5"],
                "alternate_path": "/",
            },
        )
    ],
    "update_lifetime_string.json": [
        Lwm2mEvent(
            "device.registration_update", {"endpoint": "urn:oma:lwm2m:oma:9", "lifetime": 789}
        )
    ],
    "deregister.json": [
        Lwm2mEvent(
            "device.deregistration", {"reason": "deregistered", "endpoint": "urn:oma:lwm2m:oma:3"}
        )
    ],
    "notify_single_resource.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry("notify", "/3/0/10", 307, [value("/3/0/10", 4096, "int")], seq_num=3),
            path("/3/0/10"),
        )
    ],
    "notify_temperature.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "notify", "/3303/0/5700", 12, [value("/3303/0/5700", 21.5, "float")], seq_num=7
            ),
            path("/3303/0/5700"),
        )
    ],
    "notify_object_instance.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "notify",
                "/3303/0",
                13,
                [
                    value("/3303/0/5700", 21.5, "float"),
                    value("/3303/0/5701", "Cel", "string"),
                    value("/3303/0/5601", 18.25, "float"),
                    value("/3303/0/5602", 24.0, "float"),  # integer JSON, float resource
                    value("/3303/0/5750", "boiler room", "string"),
                ],
                seq_num=8,
            ),
            path("/3303/0"),
        )
    ],
    "notify_object_instances.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "notify",
                "/3303",
                14,
                [value("/3303/0/5700", 21.5, "float"), value("/3303/1/5700", 19.75, "float")],
                seq_num=9,
            ),
            path("/3303"),
        )
    ],
    "notify_string_values.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "notify",
                "/3303/0",
                15,
                [
                    value("/3303/0/5700", 21.0, "float"),  # table: Sensor Value is Float
                    value("/3303/0/5750", "42", "string"),  # table: Application Type
                    value("/3303/0/9999", 42, "int"),  # unknown: by shape
                    value("/3303/0/9998", 21.5, "float"),
                    value("/3303/0/9997", True, "bool"),
                    value("/3303/0/9996", "hello", "string"),
                ],
                seq_num=10,
            ),
            path("/3303/0"),
        )
    ],
    "observe_response.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry("observe", "/3/0/10", 307, [value("/3/0/10", 2048, "int")]),
            path("/3/0/10"),
        )
    ],
    "read_opaque.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "read",
                "/6/0",
                322,
                [
                    value("/6/0/0", 1.5, "float"),
                    value("/6/0/4", "AQID", "opaque"),
                    value("/6/0/5", 20, "time"),
                ],
            ),
            path("/6/0"),
        )
    ],
    "read_octet_stream.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry("read", "/3/0/8", 206, [value("/3/0/8", "FBUWFw==", "opaque")]),
            path("/3/0/8"),
        )
    ],
    "read_object_json.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "read",
                "/3/0",
                206,
                [
                    value("/3/0/0", "Open Mobile Alliance", "string"),
                    value("/3/0/1", "Lightweight M2M Client", "string"),
                    value("/3/0/2", "345000123", "string"),  # a String: never made a number
                    value("/3/0/13", 1700000000, "time"),
                    value("/3/0/6", True, "bool"),
                    value("/3/0/22", {"object": 1, "instance": 2}, "objlnk"),
                    value("/3/0/15", 123, "int"),
                    value("/3/0/99", None, "null"),
                ],
            ),
            path("/3/0"),
        )
    ],
    "read_legacy_4x.json": [
        Lwm2mEvent(
            "telemetry",
            telemetry(
                "read",
                None,
                "2",
                [value("/3303/0/5700", 21.5, "float"), value("/3303/0/5701", "Cel", "string")],
            ),
            path("/3303/0"),
        )
    ],
    "read_error_404.json": [
        Lwm2mEvent(
            "device.command_failed",
            command("read", "4.04", "not_found", "/3/0/0", 1, reason="error_response"),
            path("/3/0/0"),
        )
    ],
    "write_204.json": [
        Lwm2mEvent(
            "device.write",
            command("write", "2.04", "changed", "/3/0/13", 307, success=True),
            path("/3/0/13"),
        )
    ],
    "write_error_400.json": [
        Lwm2mEvent(
            "device.write",
            command("write", "4.00", "bad_request", "/3/0/1", 307, success=False),
            path("/3/0/1"),
        )
    ],
    "execute_204.json": [
        Lwm2mEvent(
            "device.write",
            command("execute", "2.04", "changed", "/3/0/4", 307, success=True),
            path("/3/0/4"),
        )
    ],
    "discover.json": [
        Lwm2mEvent(
            "device.command_response",
            command(
                "discover",
                "2.05",
                "content",
                "/3/0/7",
                307,
                success=True,
                links=["</3/0/7>;dim=8;pmin=10;pmax=60;gt=50;lt=42.2", "</3/0/8>"],
            ),
            path("/3/0/7"),
        )
    ],
    "ack.json": [
        Lwm2mEvent(
            "device.command_response",
            command("ack", None, None, "/3/0/0", 206, success=True),
            path("/3/0/0"),
        )
    ],
    "coap_timeout.json": [
        Lwm2mEvent(
            "device.command_failed",
            command(None, None, None, "/3/0/0", 206, reason="coap_timeout"),
            path("/3/0/0"),
        )
    ],
    "coap_reset.json": [
        Lwm2mEvent(
            "device.command_failed",
            command(None, None, None, "/3/0/0", 612, reason="coap_reset"),
            path("/3/0/0"),
        )
    ],
}


def test_every_fixture_is_covered() -> None:
    names = {p.name for p in LWM2M.glob("*.json")}
    assert names == set(EXPECTED) | {"malformed_json.json", "missing_msgtype.json"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gateway_message_decodes_to_exact_events(name: str) -> None:
    events = decode_emqx("urn:oma:lwm2m:oma:3", load(name))
    assert events == EXPECTED[name]
    for event in events:
        json.dumps(event.payload, allow_nan=False)  # JSON-able, strictly


@pytest.mark.parametrize(
    ("name", "message"),
    [("malformed_json.json", "not valid JSON"), ("missing_msgtype.json", "no 'msgType'")],
)
def test_broken_fixture_raises_decode_error(name: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_emqx("d1", load(name))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"msgType": "reboot"}', "unknown LwM2M msgType 'reboot'"),
        (b'{"msgType": 3}', "no 'msgType'"),
        (b'{"msgType": "read", "data": {"reqPath": "/3/0/0"}}', "no CoAP code"),
        (b'{"msgType": "read"}', "no 'data' object"),
        (b'{"msgType": "notify", "data": {"code": "2.05", "content": {}}}', "not a list"),
        (
            b'{"msgType": "notify", "data": {"code": "2.05", "content": [{"path": "/3/x"}]}}',
            "not a resource path",
        ),
        (
            b'{"msgType": "notify", "data": {"code": "2.05", "content": [{"path": "/3/0"}]}}',
            "not a resource path",
        ),
        (
            b'{"msgType": "notify", "data": {"code": "2.05", "content": '
            b'[{"path": "/3/0/1", "value": [1]}]}}',
            "not a scalar",
        ),
        (
            b'{"msgType": "notify", "data": {"code": "2.05", "content": '
            b'[{"path": "/3/0/1", "value": NaN}]}}',
            "NaN is not a JSON number",
        ),
        (
            b'{"msgType": "notify", "data": {"code": "2.05", "content": '
            b'[{"path": "/3303/0/5700", "value": 1e999}]}}',
            "out of range",
        ),
        (b'{"msgType": "register", "data": {"ep": "e", "lt": "soon"}}', "lifetime"),
        (b'{"msgType": "register", "data": {"ep": 5}}', "'ep' must be a string"),
        (b'{"msgType": "register", "data": {"objectList": [1]}}', "objectList"),
    ],
)
def test_malformed_messages_raise_decode_error(payload: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_emqx("d1", payload)


def test_decode_error_is_shared_and_a_value_error() -> None:
    assert DecodeError is SenmlDecodeError
    assert issubclass(DecodeError, ValueError)


def test_read_success_without_content_is_a_command_response() -> None:
    payload = b'{"requestID": 9, "msgType": "read", "data": {"reqPath": "/3/0/", "code": "2.05"}}'
    assert decode_emqx("d1", payload) == [
        Lwm2mEvent(
            "device.command_response",
            command("read", "2.05", None, "/3/0", 9, success=True),
            path("/3/0"),
        )
    ]


def test_observe_error_and_delete_and_legacy_ack_without_data() -> None:
    observe = b'{"reqID": 4, "msgType": "observe", "data": {"reqPath": "/3/0/10", '
    observe += b'"code": "4.01", "codeMsg": "unauthorized"}}'
    assert decode_emqx("d1", observe) == [
        Lwm2mEvent(
            "device.command_failed",
            command("observe", "4.01", "unauthorized", "/3/0/10", 4, reason="error_response"),
            path("/3/0/10"),
        )
    ]
    delete = b'{"requestID": 307, "msgType": "delete", "data": {"reqPath": "/5/0", '
    delete += b'"code": "2.02", "codeMsg": "deleted"}}'
    assert decode_emqx("d1", delete)[0].payload == command(
        "delete", "2.02", "deleted", "/5/0", 307, success=True
    )
    assert decode_emqx("d1", b'{"reqID": 7, "msgType": "ack"}') == [
        Lwm2mEvent(
            "device.command_response", command("ack", None, None, None, 7, success=True), None
        )
    ]


def test_deregistration_event_for_lifetime_expiry() -> None:
    assert deregistration_event("lifetime_expired") == Lwm2mEvent(
        "device.deregistration", {"reason": "lifetime_expired"}
    )


# --- firmware update (Object 5) ----------------------------------------------------------


def fw_notify(state: int | None = None, result: int | None = None, seq: int = 1) -> bytes:
    content = []
    if state is not None:
        content.append({"path": "/5/0/3", "value": state})
    if result is not None:
        content.append({"path": "/5/0/5", "value": result})
    message = {
        "requestID": 611,
        "cacheID": 611,
        "msgType": "notify",
        "seqNum": seq,
        "data": {"reqPath": "/5/0", "code": "2.05", "codeMsg": "content", "content": content},
    }
    return json.dumps(message).encode()


def firmware_events(decoder: Lwm2mDecoder, *messages: bytes) -> list[Lwm2mEvent]:
    events = [e for m in messages for e in decoder.decode("dev-1", m)]
    return [e for e in events if e.type == "device.firmware_update"]


def test_firmware_success_yields_exactly_one_event() -> None:
    decoder = Lwm2mDecoder()
    events = firmware_events(
        decoder,
        fw_notify(state=1, result=0),
        fw_notify(state=2),
        fw_notify(state=3),
        fw_notify(state=0, result=1),
        fw_notify(state=0, result=1),  # repeated: not reported again
        fw_notify(result=1),
    )
    assert events == [
        Lwm2mEvent(
            "device.firmware_update",
            {
                "success": True,
                "state": 0,
                "result": 1,
                "result_text": "Firmware updated successfully",
            },
            path("/5/0/5"),
        )
    ]


def test_firmware_failure_result_8() -> None:
    decoder = Lwm2mDecoder()
    events = firmware_events(
        decoder, fw_notify(state=1), fw_notify(state=2), fw_notify(state=3), fw_notify(result=8)
    )
    assert events == [
        Lwm2mEvent(
            "device.firmware_update",
            {"success": False, "state": 3, "result": 8, "result_text": "Firmware update failed"},
            path("/5/0/5"),
        )
    ]


def test_firmware_event_comes_after_the_telemetry_that_completes_it() -> None:
    decoder = Lwm2mDecoder()
    decoder.decode("dev-1", fw_notify(state=3))
    events = decoder.decode("dev-1", fw_notify(state=0, result=4))
    assert [e.type for e in events] == ["telemetry", "device.firmware_update"]
    assert events[1].payload == {
        "success": False,
        "state": 0,
        "result": 4,
        "result_text": "Connection lost during downloading process",
    }


def test_firmware_same_result_again_after_a_new_update_cycle() -> None:
    tracker = FirmwareTracker()

    def feed(resource: int, number: int) -> Lwm2mEvent | None:
        return tracker.feed("d", [value(f"/5/0/{resource}", number, "int")])

    assert feed(3, 1) is None
    assert feed(5, 1) is not None
    assert feed(5, 1) is None
    assert feed(3, 1) is None  # a new download starts
    assert feed(3, 3) is None
    assert feed(5, 1) is not None


def test_firmware_first_result_seen_is_remembered_not_reported() -> None:
    tracker = FirmwareTracker()
    assert tracker.feed("d", [value("/5/0/5", 1, "int")]) is None  # e.g. read after restart
    event = tracker.feed("d", [value("/5/0/5", 7, "int")])  # changed: the update ran unseen
    assert event is not None and event.payload["result_text"] == "Invalid URI"


def test_firmware_tracker_is_per_device_and_ignores_other_objects() -> None:
    tracker = FirmwareTracker()
    assert tracker.feed("a", [value("/5/0/3", 3, "int")]) is None
    assert tracker.feed("b", [value("/5/0/5", 1, "int")]) is None
    assert tracker.feed("a", [value("/3303/0/5700", 1.0, "float")]) is None
    assert tracker.feed("a", [value("/5/0/5", 1, "int")]) is not None
    tracker.feed("c", [value("/5/0/3", 2, "int")])
    tracker.forget("c")
    assert tracker.feed("c", [value("/5/0/5", 1, "int")]) is None


# --- registration lifetimes --------------------------------------------------------------


def test_registration_expires_after_lifetime_without_update() -> None:
    clock = 1000.0
    tracker = RegistrationTracker()
    tracker.register("d1", 2, clock)
    tracker.register("d2", 10, clock)
    assert tracker.next_deadline() == 1002.0
    assert tracker.expired(1001.9) == []
    assert tracker.expired(1002.0) == ["d1"]
    assert "d1" not in tracker and "d2" in tracker
    assert tracker.expired(1002.0) == []
    assert tracker.next_deadline() == 1010.0


def test_registration_update_extends_and_can_change_lifetime() -> None:
    tracker = RegistrationTracker()
    tracker.register("d1", 2, 0.0)
    assert tracker.update("d1", None, 1.5)  # keeps lifetime 2
    assert tracker.expired(3.0) == []
    assert tracker.deadline("d1") == 3.5
    assert tracker.update("d1", 60, 3.4)
    assert tracker.expired(10.0) == []
    assert tracker.expired(63.4) == ["d1"]
    assert not tracker.update("ghost", None, 0.0)
    assert tracker.update("late", 5, 0.0)  # an update for an unknown device registers it
    assert tracker.expired(5.0) == ["late"]


def test_deregister_and_lifetime_without_deadline() -> None:
    tracker = RegistrationTracker()
    tracker.register("d1", 2, 0.0)
    tracker.register("forever", 0, 0.0)  # lt=0: the gateway's lifetime_max applies
    assert tracker.deregister("d1")
    assert not tracker.deregister("d1")
    assert tracker.next_deadline() is None
    assert tracker.expired(1e12) == []
    assert "forever" in tracker and len(tracker) == 1


def test_registration_tracker_stays_small_under_many_updates() -> None:
    tracker = RegistrationTracker()
    for i in range(10_000):
        tracker.update(f"d{i % 10}", 30, float(i))
    assert len(tracker._heap) <= 2 * 10 + 64 + 1
    assert tracker.expired(10_000.0 + 30) == [f"d{i}" for i in range(10)]


def test_registration_snapshot_and_restore() -> None:
    tracker = RegistrationTracker()
    tracker.register("d1", 300, 100.0)
    tracker.register("d2", None, 100.0)
    snapshot = tracker.snapshot()
    assert snapshot == {
        "d1": {"lifetime": 300, "deadline": 400.0},
        "d2": {"lifetime": None, "deadline": None},
    }
    restored = RegistrationTracker()
    for device, entry in snapshot.items():
        restored.restore(device, entry["lifetime"], entry["deadline"])
    assert restored.next_deadline() == 400.0
    assert restored.expired(400.0) == ["d1"]


# --- SenML (RFC 8428) --------------------------------------------------------------------


def senml(name: str) -> bytes:
    return (SENML / name).read_bytes()


def rfc_cbor() -> bytes:
    return bytes.fromhex((SENML / "rfc8428_section6_cbor.hex").read_text())


URN = "urn:dev:ow:10e2073a01080063"
URN_5_1_2 = "urn:dev:ow:10e2073a0108006:"  # sic: the RFC's second 5.1.2 example drops a 3
RESOLVED_5_1_2 = [
    {"n": URN_5_1_2 + "voltage", "u": "V", "v": 120.1, "t": 1276020076.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.2, "t": 1276020071.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.3, "t": 1276020072.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.4, "t": 1276020073.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.5, "t": 1276020074.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.6, "t": 1276020075.001, "bver": 5},
    {"n": URN_5_1_2 + "current", "u": "A", "v": 1.7, "t": 1276020076.001, "bver": 5},
]


def test_rfc8428_5_1_3_resolves_to_the_rfc_5_1_4_records() -> None:
    expected = json.loads(senml("rfc8428_5.1.4_resolved.json"))
    assert decode_senml_json(senml("rfc8428_5.1.3_multiple_measurements.json"), now=NOW) == expected
    # Resolved records resolve to themselves.
    assert decode_senml_json(senml("rfc8428_5.1.4_resolved.json"), now=NOW) == expected


def test_rfc8428_section6_cbor_bytes_match_the_rfc_diagnostic_notation() -> None:
    data = rfc_cbor()
    assert len(data) == 0xC3
    assert cbor2.loads(data) == [
        {-2: URN_5_1_2, -3: 1276020076.001, -4: "A", -1: 5, 0: "voltage", 1: "V", 2: 120.1},
        {0: "current", 6: -5, 2: 1.2},
        {0: "current", 6: -4, 2: 1.3},
        {0: "current", 6: -3, 2: 1.4},
        {0: "current", 6: -2, 2: 1.5},
        {0: "current", 6: -1, 2: 1.6},
        {0: "current", 6: 0, 2: 1.7},
    ]


def test_rfc8428_section6_cbor_and_its_json_twin_resolve_identically() -> None:
    assert decode_senml_cbor(rfc_cbor(), now=NOW) == RESOLVED_5_1_2
    assert decode_senml_json(senml("rfc8428_5.1.2_multiple_times.json"), now=NOW) == RESOLVED_5_1_2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rfc8428_5.1.1_single.json", [{"n": URN, "u": "Cel", "v": 23.1, "t": NOW}]),
        (
            "rfc8428_5.1.2_multiple_now.json",
            [
                {"n": URN + ":voltage", "u": "V", "v": 120.1, "t": NOW},
                {"n": URN + ":current", "u": "A", "v": 1.2, "t": NOW},
            ],
        ),
        (
            "rfc8428_5.1.5_data_types.json",
            [
                {"n": URN + ":temp", "u": "Cel", "v": 23.1, "t": NOW},
                {"n": URN + ":label", "vs": "Machine Room", "t": NOW},
                {"n": URN + ":open", "vb": False, "t": NOW},
                {"n": URN + ":nfv-reader", "vd": "aGkgCg", "t": NOW},
            ],
        ),
        (
            "rfc8428_5.1.6_collection.json",
            [
                {"n": "2001:db8::2/temperature", "u": "Cel", "v": 25.2, "t": 1320078429.0},
                {"n": "2001:db8::2/humidity", "u": "%RH", "v": 30, "t": 1320078429.0},
                {"n": "2001:db8::1/temperature", "u": "Cel", "v": 12.3, "t": 1320078429.0},
                {"n": "2001:db8::1/humidity", "u": "%RH", "v": 67, "t": 1320078429.0},
            ],
        ),
        (
            "rfc8428_5.1.7_actuator.json",  # the bn-only first record yields no record
            [
                {"n": URN + ":temp", "u": "Cel", "v": 23.1, "t": NOW},
                {"n": URN + ":heat", "u": "/", "v": 1, "t": NOW},
                {"n": URN + ":fan", "u": "/", "v": 0, "t": NOW},
            ],
        ),
    ],
)
def test_rfc8428_examples_resolve(name: str, expected: list[dict[str, Any]]) -> None:
    assert decode_senml_json(senml(name), now=NOW) == expected


def test_senml_json_and_cbor_agree_on_every_rfc_example() -> None:
    for file in sorted(SENML.glob("*.json")):
        pack = json.loads(file.read_bytes())
        labels = {
            v: k
            for k, v in {
                -1: "bver",
                -2: "bn",
                -3: "bt",
                -4: "bu",
                0: "n",
                1: "u",
                2: "v",
                3: "vs",
                4: "vb",
                6: "t",
            }.items()
        }
        cbor_pack = []
        for record in pack:
            cbor_record = {labels[k]: v for k, v in record.items() if k != "vd"}
            if "vd" in record:
                cbor_record[8] = b"hi \n"  # "aGkgCg" decoded
            cbor_pack.append(cbor_record)
        assert decode_senml_cbor(cbor2.dumps(cbor_pack), now=NOW) == decode_senml_json(
            file.read_bytes(), now=NOW
        ), file.name


def test_relative_times_use_the_clock_when_now_is_not_given() -> None:
    (record,) = decode_senml_json(b'[{"n": "x", "v": 1, "t": -10}]')
    assert abs(record["t"] - (time.time() - 10)) < 60


def test_lwm2m_senml_names_get_lwm2m_paths() -> None:
    records = decode_senml_json(senml("lwm2m_senml.json"), now=NOW)
    assert records == [
        {"n": "/3303/0/5700", "v": 21.5, "t": 1.7e9, "lwm2m": path("/3303/0/5700")},
        {"n": "/3303/0/5701", "vs": "Cel", "t": 1.7e9, "lwm2m": path("/3303/0/5701")},
        {"n": "/3/0/13", "v": 1.7e9, "t": 1.7e9, "lwm2m": path("/3/0/13")},
        {
            "n": "urn:dev:imei:490154203237518:/3304/0/5700",
            "v": 45,
            "t": 1.7e9 + 60,
            "lwm2m": path("/3304/0/5700"),
        },
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/3303/0/5700", "/3303/0/5700"),
        ("3303/0/5700", "/3303/0/5700"),
        ("3303/0/5700/1", "/3303/0/5700/1"),
        ("urn:dev:ow:10e2073a01080063:/3303/0/5700", "/3303/0/5700"),
        ("urn:dev:ow:10e2073a01080063:3303/0/5700", "/3303/0/5700"),
        ("/3303", "/3303"),
        ("urn:dev:ow:10e2073a01080063", None),
        ("2001:db8::3", None),
        ("2001:db8::2/temperature", None),
        ("3303/0", None),
        ("/70000/0/1", None),
        ("/1/2/3/4/5", None),
        ("", None),
    ],
)
def test_lwm2m_path_in_name(name: str, expected: str | None) -> None:
    found = lwm2m_path_in_name(name)
    assert (found["path"] if found else None) == expected


def test_parse_lwm2m_path_normalises() -> None:
    assert parse_lwm2m_path("/3/0/") == path("/3/0")
    assert parse_lwm2m_path("03/00/0013") == path("/3/0/13")
    assert parse_lwm2m_path("/٣/0") is None  # non-ASCII digits are not ids


def test_senml_sum_base_value_update_time_and_extensions() -> None:
    pack = [
        {
            "bn": "meter:",
            "bt": 1.7e9,
            "bu": "W",
            "bv": 100,
            "bs": 5000,
            "n": "p",
            "v": 1.5,
            "s": 20,
            "ut": 60,
            "custom": {"ignored": True},
        },
        {"n": "e", "u": "J"},  # sum only: base sum applies
    ]
    assert decode_senml_json(json.dumps(pack).encode(), now=NOW) == [
        {"n": "meter:p", "u": "W", "v": 101.5, "s": 5020, "t": 1.7e9, "ut": 60},
        {"n": "meter:e", "u": "J", "s": 5000, "t": 1.7e9},
    ]


def test_senml_cbor_data_value_bytes_become_base64url() -> None:
    data = cbor2.dumps([{0: "blob", 8: b"\xfb\xff\x00", 6: 1.7e9}])
    assert decode_senml_cbor(data) == [{"n": "blob", "vd": "-_8A", "t": 1.7e9}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"n": "x"}', "array"),
        (b"[1]", "not a map"),
        (b'[{"n": "x", "v": 1, "vs": "a"}]', "several value fields"),
        (b'[{"n": "x", "v": "1"}]', "'v' must be a number"),
        (b'[{"n": "x", "v": true}]', "'v' must be a number"),
        (b'[{"n": 5, "v": 1}]', "'n' must be a string"),
        (b'[{"n": "x", "vb": 1}]', "'vb' must be a boolean"),
        (b'[{"n": "x", "vd": "not base64!"}]', "base64url"),
        (b'[{"bver": 11, "n": "x", "v": 1}]', "version 11"),
        (b'[{"bver": 0, "n": "x", "v": 1}]', "positive integer"),
        (b'[{"n": "x", "v": 1, "must_": 1}]', "must be understood"),
        (b'[{"n": "x", "v": NaN}]', "NaN"),
        (b'[{"n": "x", "v": 1e999}]', "out of range"),
        (b'[{"n": "x", "v": 100000000000000000000000}]', "out of range"),
        (b'[{"n": "x", "v": 1e308, "bv": 1e308}]', "overflows"),
        (b"[{", "not valid JSON"),
        (b"\xc3\x28", "not UTF-8"),
    ],
)
def test_senml_json_errors(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_senml_json(data, now=NOW)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cbor2.dumps([{0: "x", 2: 1}]) + b"\x00", "trailing"),
        (b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "not valid CBOR"),
        (cbor2.dumps([{0: "x", 8: "aGk"}]), "byte string"),
        (cbor2.dumps([{0: "x", 2: 1, 0.5: 1, 99: 1}])[:-1], "not valid CBOR"),
        (cbor2.dumps({0: "x"}), "array"),
    ],
)
def test_senml_cbor_errors(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_senml_cbor(data, now=NOW)


def test_senml_cbor_ignores_unknown_integer_labels_and_accepts_decimal_fractions() -> None:
    data = cbor2.dumps([{0: "x", 2: Decimal("273.15"), 99: "future"}])
    assert decode_senml_cbor(data, now=NOW) == [{"n": "x", "v": 273.15, "t": NOW}]


# --- fuzzing: only DecodeError may escape, and results are strict JSON -------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
lwm2m_keys = st.sampled_from(
    [
        "msgType",
        "data",
        "requestID",
        "reqID",
        "seqNum",
        "code",
        "codeMsg",
        "reqPath",
        "content",
        "path",
        "value",
        "type",
        "ep",
        "lt",
        "lwm2m",
        "b",
        "objectList",
        "alternatePath",
    ]
)
msg_types = st.sampled_from(
    [
        "register",
        "update",
        "deregister",
        "notify",
        "read",
        "observe",
        "cancel-observe",
        "write",
        "execute",
        "discover",
        "write-attr",
        "create",
        "delete",
        "ack",
        "coap_timeout",
        "coap_reset",
        "other",
    ]
)
content_entries = st.fixed_dictionaries(
    {"path": st.sampled_from(["/3/0/0", "3303/1/5700", "/5/0/3", "/5/0/5", "/3/0/22", "x"])},
    optional={"value": json_values, "type": st.sampled_from(["Float", "Objlnk", "Integer"])},
)
gateway_messages = st.fixed_dictionaries(
    {"msgType": msg_types},
    optional={
        "data": st.fixed_dictionaries(
            {},
            optional={
                "code": st.sampled_from(["2.05", "2.04", "4.04", "bad", 5]),
                "reqPath": st.sampled_from(["/3/0", "/3303/0/5700", "/x", 3]),
                "content": st.lists(content_entries, max_size=4) | json_values,
                "lt": json_values,
                "ep": json_values,
                "objectList": json_values,
            },
        )
        | json_values,
        "seqNum": json_values,
        "requestID": json_values,
    },
)


def check_lwm2m(payload: bytes, decoder: Lwm2mDecoder | None = None) -> None:
    try:
        events = (decoder or Lwm2mDecoder()).decode("d1", payload)
    except DecodeError:
        return
    for event in events:
        json.dumps([event.payload, event.lwm2m], allow_nan=False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.binary(max_size=300))
def test_fuzz_lwm2m_arbitrary_bytes(payload: bytes) -> None:
    check_lwm2m(payload)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.lists(gateway_messages, min_size=1, max_size=4))
def test_fuzz_lwm2m_gateway_shaped_messages(messages: list[dict[str, Any]]) -> None:
    decoder = Lwm2mDecoder()
    for message in messages:
        check_lwm2m(json.dumps(message).encode(), decoder)


senml_records = st.dictionaries(
    st.sampled_from(
        [
            "bn",
            "bt",
            "bu",
            "bv",
            "bs",
            "bver",
            "n",
            "u",
            "v",
            "vs",
            "vb",
            "vd",
            "s",
            "t",
            "ut",
            "x_",
            "ext",
        ]
    ),
    json_values,
    max_size=6,
)


def check_senml(decode: Any, data: bytes) -> None:
    try:
        records = decode(data, now=NOW)
    except DecodeError:
        return
    json.dumps(records, allow_nan=False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.binary(max_size=300))
def test_fuzz_senml_arbitrary_bytes(data: bytes) -> None:
    check_senml(decode_senml_json, data)
    check_senml(decode_senml_cbor, data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.lists(senml_records, max_size=5))
def test_fuzz_senml_record_shaped_json(pack: list[dict[str, Any]]) -> None:
    check_senml(decode_senml_json, json.dumps(pack).encode())


cbor_values = st.recursive(
    json_scalars
    | st.binary(max_size=8)
    | st.decimals(allow_nan=True)
    | st.datetimes(timezones=st.just(timezone.utc)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-8, 9) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(cbor_values)
def test_fuzz_senml_cbor_structures(pack: Any) -> None:
    check_senml(decode_senml_cbor, cbor2.dumps(pack))
