"""LwM2M through the EMQX LwM2M gateway: its MQTT JSON messages to bridge events.

Owns:

- ``decode_emqx``: one message published by the gateway (``format: lwm2m-emqx``) ->
  ``Lwm2mEvent`` list. Stateless; dispatches on the JSON ``msgType``, never on the topic
  (the gateway's topics are configurable and several message types share ``up/resp``).
- the typing of resource values (``typed_value``) with a small table of OMA / IPSO
  resource types, used when the gateway hands over strings or a read bypassed its XML
  object definitions;
- ``FirmwareTracker``: Firmware Update (Object 5) State / Update Result -> one
  ``device.firmware_update`` event per update; ``Lwm2mDecoder`` = decode + tracker;
- ``RegistrationTracker``: registration lifetimes (the gateway publishes nothing when a
  registration lapses, so the daemon drives this to emit ``device.deregistration``).

What the gateway publishes (EMQX 5.x source ``apps/emqx_gateway_lwm2m/src/`` in
emqx/emqx: ``emqx_lwm2m_session.erl`` (register/update/ack/coap_timeout/coap_reset,
``send_to_mqtt`` sets ``msgType``), ``emqx_lwm2m_cmd.erl`` (responses: ``make_response``,
``code/1``), ``emqx_lwm2m_message.erl`` (content values); expected payloads in
``apps/emqx_gateway_lwm2m/test/emqx_lwm2m_SUITE.erl``; EMQX 4.x plugin emqx/emqx-lwm2m
``README.md`` and ``src/emqx_lwm2m_cmd_handler.erl``):

- register / update, topic ``translators.register`` / ``.update`` (default ``up/resp``)::

    {"msgType": "register", "data": {"ep": "urn:oma:lwm2m:oma:3", "lt": 345, "lwm2m": "1",
     "alternatePath": "/", "objectList": ["/1", "/2", "/3/0"], "b": "UQ", ...}}

  ``data`` is the Register query (``ep``, ``lt``, ``lwm2m``, ``b``, ``sms`` and any extra
  such as ``apn``, ``imei``) plus the parsed object links; ``lt`` is an integer in 5.x
  (``fix_reg_info``), may be a string elsewhere, and is 0 when the device asked for the
  gateway's ``lifetime_max``. An update carries the merged registration (all fields).
  Nothing is published on De-register or lifetime expiry.
- responses to downlink commands, topic ``translators.response`` (``up/resp``): the
  command's own fields echoed (``requestID`` and ``cacheID`` in 5.x, ``reqID`` in 4.x and
  the 4.x README; ``imei``/``imsi``/``mheaders``/``encoding`` when the command had them)
  with ``msgType`` = the command and ``data``::

    {"requestID": 206, "cacheID": 206, "msgType": "read", "data": {"reqPath": "/3/0/0",
     "code": "2.05", "codeMsg": "content", "content": [{"path": "/3/0/0", "value": "EMQ"}]}}

  ``read`` / ``observe`` / ``cancel-observe`` success carries ``content``; errors and
  ``write`` / ``execute`` / ``write-attr`` / ``create`` / ``delete`` carry only ``code``
  (``"2.04"``, ``"4.04"``, ...), ``codeMsg`` (``changed``, ``not_found``) and ``reqPath``;
  ``discover`` content is a list of link strings (``"</3/0/7>;dim=8"``).
- notify, topic ``translators.notify`` (``up/notify``; Object 5 notifications go to
  ``/v1/up/dm``): an observe response with ``msgType`` ``notify`` and ``seqNum``.
- ``ack`` (empty CoAP ACK of a separate response): the command echoed with ``msgType``
  ``ack`` and the command's own ``data`` (``{"path": "/3/0/0"}``); no code. 4.x: no data.
- ``coap_timeout`` / ``coap_reset``: the command echoed the same way; the original
  command type is lost.

Content values (``emqx_lwm2m_message.erl``): typed by the gateway's XML object definitions
for TLV (String -> string, Integer/Time -> integer, Float -> float, Boolean -> bool,
Opaque -> base64 string, Objlnk -> ``"3:0"``); text/plain parsed by the same definitions;
application/octet-stream always base64; OMA-JSON passed through (``null`` when an entry
has no value). Paths are ``/3/0/0``, but ``3/0/0`` (no leading slash) when a TLV held
several object instances. The 4.x README also shows ``name`` and ``type`` per entry.

Events (``Lwm2mEvent.type``): ``device.registration``, ``device.registration_update``,
``device.deregistration`` (explicit ``{"msgType": "deregister"}``; lifetime expiry comes
from ``RegistrationTracker`` via ``deregistration_event``), ``telemetry`` (successful
notify/read/observe/cancel-observe with content), ``device.write`` (write and execute
responses, success or not), ``device.command_response`` (ack, and other successful
responses: discover, write-attr, create, delete, content-less reads),
``device.command_failed`` (other error responses, coap_timeout, coap_reset),
``device.firmware_update`` (``FirmwareTracker``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.sources.senml import DecodeError, parse_lwm2m_path, strict_json

__all__ = [
    "FIRMWARE_RESULTS",
    "FIRMWARE_STATES",
    "DecodeError",
    "FirmwareTracker",
    "Lwm2mDecoder",
    "Lwm2mEvent",
    "RegistrationTracker",
    "decode_emqx",
    "deregistration_event",
    "parse_lwm2m_path",
    "resource_type",
    "typed_value",
]


@dataclass
class Lwm2mEvent:
    """One event a gateway message yields; ``lwm2m`` is set when it concerns one path."""

    type: str
    payload: dict[str, Any]
    lwm2m: dict[str, Any] | None = None


# --- resource types ----------------------------------------------------------------------

# OMA objects whose resources only mean something inside their object (LwM2M 1.0/1.1 TS).
_OMA_RESOURCE_TYPES: dict[tuple[int, int], str] = {
    # 1 Server
    (1, 0): "int", (1, 1): "int", (1, 2): "int", (1, 3): "int", (1, 5): "int",
    (1, 6): "bool", (1, 7): "string",
    # 3 Device
    (3, 0): "string", (3, 1): "string", (3, 2): "string", (3, 3): "string",
    (3, 6): "int", (3, 7): "int", (3, 8): "int", (3, 9): "int", (3, 10): "int",
    (3, 11): "int", (3, 13): "time", (3, 14): "string", (3, 15): "string",
    (3, 16): "string", (3, 17): "string", (3, 18): "string", (3, 19): "string",
    (3, 20): "int", (3, 21): "int", (3, 22): "objlnk",
    # 4 Connectivity Monitoring
    (4, 0): "int", (4, 1): "int", (4, 2): "int", (4, 3): "int", (4, 4): "string",
    (4, 5): "string", (4, 6): "int", (4, 7): "string", (4, 8): "int", (4, 9): "int",
    (4, 10): "int",
    # 5 Firmware Update
    (5, 0): "opaque", (5, 1): "string", (5, 3): "int", (5, 4): "bool", (5, 5): "int",
    (5, 6): "string", (5, 7): "string", (5, 8): "int", (5, 9): "int",
    # 6 Location
    (6, 0): "float", (6, 1): "float", (6, 2): "float", (6, 3): "float",
    (6, 4): "opaque", (6, 5): "time", (6, 6): "float",
    # 7 Connectivity Statistics
    (7, 0): "int", (7, 1): "int", (7, 2): "int", (7, 3): "int", (7, 4): "int",
    (7, 5): "int", (7, 8): "int",
}  # fmt: skip

# IPSO reusable resources keep their type whatever object (3200+) carries them:
# 3301 illuminance, 3303 temperature, 3304 humidity, 3315 barometer, 3316 voltage, ...
_IPSO_RESOURCE_TYPES: dict[int, str] = {
    5500: "bool", 5501: "int", 5502: "bool", 5503: "int", 5504: "int",
    5518: "time", 5550: "bool", 5551: "bool",
    5600: "float", 5601: "float", 5602: "float", 5603: "float", 5604: "float",
    5650: "float",
    5700: "float", 5701: "string", 5702: "float", 5703: "float", 5704: "float",
    5705: "float", 5706: "string",
    5750: "string", 5751: "string",
    5800: "float", 5801: "float", 5802: "float", 5803: "float", 5804: "float",
    5805: "float",
    5850: "bool", 5851: "int", 5852: "int", 5853: "string",
    5900: "float",
}  # fmt: skip

_FIRST_NON_OMA_OBJECT = 2048  # LwM2M registry: 0-1023 OMA, 2048+ third parties (IPSO)

# The names the 4.x README uses in a content entry's "type".
_DECLARED_TYPES: dict[str, str] = {
    "String": "string",
    "Integer": "int",
    "Unsigned Integer": "int",
    "Float": "float",
    "Boolean": "bool",
    "Opaque": "opaque",
    "Time": "time",
    "Objlnk": "objlnk",
}


def resource_type(obj: int, resource: int) -> str | None:
    """The known value type of ``/obj/*/resource``, or None."""
    known = _OMA_RESOURCE_TYPES.get((obj, resource))
    if known is None and obj >= _FIRST_NON_OMA_OBJECT:
        known = _IPSO_RESOURCE_TYPES.get(resource)
    return known


# --- value typing ------------------------------------------------------------------------

_INT = re.compile(r"[+-]?[0-9]{1,19}")  # LwM2M Integer is 64-bit
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_OBJLNK = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_TRUE_FALSE = {"true": True, "false": False}


def _parse_int(text: str) -> int | None:
    return int(text) if _INT.fullmatch(text) else None


def _parse_float(text: str) -> float | None:
    if len(text) > 64 or not _FLOAT.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def _parse_bool(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        return {"true": True, "false": False, "1": True, "0": False}.get(raw)
    return None


def _as_integer(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return _parse_int(raw) if isinstance(raw, str) else None


def _as_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return float(raw)
    return _parse_float(raw) if isinstance(raw, str) else None


def _as_objlnk(raw: Any) -> dict[str, int] | None:
    match = _OBJLNK.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        return None
    return {"object": int(match.group(1)), "instance": int(match.group(2))}


def _coerce(kind: str, raw: Any) -> tuple[Any, str] | None:
    """``raw`` as a value of the known type ``kind``; None when it is not one."""
    if kind == "string":
        converted: Any = raw if isinstance(raw, str) else None
    elif kind in ("int", "time"):
        converted = _as_integer(raw)
    elif kind == "float":
        converted = _as_float(raw)
    elif kind == "bool":
        converted = _parse_bool(raw)
    elif kind == "opaque":
        converted = raw if isinstance(raw, str) else None
    else:
        converted = _as_objlnk(raw)
    if converted is not None:
        return converted, kind
    # An application/octet-stream read is base64 whatever the resource's type.
    if isinstance(raw, str) and kind != "string" and _BASE64.fullmatch(raw):
        return raw, "opaque"
    return None


def _by_shape(raw: Any) -> tuple[Any, str]:
    if isinstance(raw, bool):
        return raw, "bool"
    if isinstance(raw, int):
        return raw, "int"
    if isinstance(raw, float):
        return raw, "float"
    if not isinstance(raw, str):
        raise DecodeError(f"resource value {raw!r:.60} is not a scalar")
    if raw in _TRUE_FALSE:
        return _TRUE_FALSE[raw], "bool"
    number: int | float | None = _parse_int(raw)
    if number is not None:
        return number, "int"
    number = _parse_float(raw)
    if number is not None:
        return number, "float"
    return raw, "string"


def typed_value(path: Mapping[str, Any], raw: Any, declared: str | None = None) -> tuple[Any, str]:
    """(value, type) for a resource value at ``path`` (a ``parse_lwm2m_path`` dict).

    Types: int, float, bool, string, opaque (base64 text), objlnk
    (``{"object", "instance"}``), time (Unix seconds), null. The declared type (4.x
    ``type``) or the table decides when it can; otherwise the value's shape does.
    """
    if raw is None:
        return None, "null"
    kind = _DECLARED_TYPES.get(declared) if declared else None
    if kind is None and path["resource"] is not None:
        kind = resource_type(path["object"], path["resource"])
    if kind is not None:
        converted = _coerce(kind, raw)
        if converted is not None:
            return converted
    return _by_shape(raw)


# --- message fields ----------------------------------------------------------------------

_CODE = re.compile(r"[0-9]\.[0-9]{2}")
_REQUEST_ID_KEYS = ("requestID", "reqID", "cacheID")


def _data(message: Mapping[str, Any], required: bool = True) -> dict[str, Any]:
    data = message.get("data")
    if data is None and not required:
        return {}
    if not isinstance(data, dict):
        raise DecodeError(f"{message['msgType']!r} message has no 'data' object")
    return data


def _request_id(message: Mapping[str, Any]) -> Any:
    for key in _REQUEST_ID_KEYS:
        value = message.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value
    return None


def _code(data: Mapping[str, Any], msg_type: str) -> tuple[str, str | None]:
    code = data.get("code")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise DecodeError(f"{msg_type!r} response has no CoAP code like '2.05' (got {code!r:.40})")
    code_msg = data.get("codeMsg")
    return code, code_msg if isinstance(code_msg, str) else None


def _path_text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _request_path(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(request path as reported, normalised when it parses; its parsed form)."""
    raw = _path_text(data.get("reqPath"), "reqPath")
    if raw is None:
        raw = _path_text(data.get("path", data.get("basePath")), "request path")
    if raw is None:
        return None, None
    parsed = parse_lwm2m_path(raw.split("?", 1)[0])
    return (parsed["path"], parsed) if parsed else (raw, None)


def _seq_num(value: Any) -> int | None:
    number = _as_integer(value)
    if number is None and value is not None:
        raise DecodeError(f"seqNum {value!r:.40} is not an integer")
    return number


def _value_entry(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DecodeError(f"content entry {item!r:.60} is not an object")
    raw_path = _path_text(item.get("path"), "content path")
    path = parse_lwm2m_path(raw_path) if raw_path is not None else None
    if path is None or path["resource"] is None:
        raise DecodeError(f"content path {raw_path!r:.60} is not a resource path")
    declared = item.get("type")
    value, kind = typed_value(
        path, item.get("value"), declared if isinstance(declared, str) else None
    )
    return {**path, "value": value, "type": kind}


def _values(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise DecodeError("response 'content' is not a list")
    return [_value_entry(item) for item in content]


def _common_path(values: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The deepest path every value lies under (4.x responses carry no reqPath)."""
    levels = ("object", "instance", "resource", "resource_instance")
    common: list[int] = []
    for level in levels:
        ids = {value[level] for value in values}
        if len(ids) != 1 or None in ids:
            break
        common.append(ids.pop())
    return parse_lwm2m_path("/".join(map(str, common))) if common else None


# --- registration ------------------------------------------------------------------------


def _lifetime(value: Any) -> int | None:
    lifetime = _as_integer(value)
    if value is not None and (lifetime is None or lifetime < 0):
        raise DecodeError(f"registration lifetime {value!r:.40} is not a number of seconds")
    return lifetime


def _object_links(value: Any) -> list[str]:
    # 5.x sends a list; accept the raw CoRE link string too ("</1>, </3/0>").
    links = value.split(",") if isinstance(value, str) else value
    if not isinstance(links, list) or not all(isinstance(link, str) for link in links):
        raise DecodeError("registration objectList is not a list of paths")
    cleaned = (link.split(";", 1)[0].strip().strip("<>") for link in links)
    return ["/" + link.lstrip("/") for link in cleaned if link]


def _text_field(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if name == "lwm2m" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DecodeError(f"registration {name!r} must be a string")


_REGISTRATION_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "ep": ("endpoint", lambda v: _text_field(v, "ep")),
    "lt": ("lifetime", _lifetime),
    "lwm2m": ("lwm2m_version", lambda v: _text_field(v, "lwm2m")),
    "b": ("binding", lambda v: _text_field(v, "b")),
    "objectList": ("objects", _object_links),
    "alternatePath": ("alternate_path", lambda v: _text_field(v, "alternatePath")),
}
_REGISTRATION_DEFAULTS: dict[str, Any] = {
    "endpoint": None,
    "lifetime": None,
    "lwm2m_version": None,
    "binding": "U",  # LwM2M default binding when the Register omits b=
    "objects": [],
    "alternate_path": "/",
}


def _registration_payload(data: Mapping[str, Any], complete: bool) -> dict[str, Any]:
    """Register fields; ``complete`` fills absent ones with LwM2M defaults (Register)."""
    payload: dict[str, Any] = dict(_REGISTRATION_DEFAULTS) if complete else {}
    for key, (name, convert) in _REGISTRATION_FIELDS.items():
        if key in data:
            payload[name] = convert(data[key])
    parameters = {k: v for k, v in data.items() if k not in _REGISTRATION_FIELDS}
    if complete or parameters:
        payload["parameters"] = parameters
    return payload


def _registration(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    complete = msg_type == "register"
    payload = _registration_payload(_data(message), complete)
    kind = "device.registration" if complete else "device.registration_update"
    return [Lwm2mEvent(kind, payload)]


def deregistration_event(reason: str, endpoint: str | None = None) -> Lwm2mEvent:
    """``device.deregistration``; reason ``deregistered`` or ``lifetime_expired``."""
    payload: dict[str, Any] = {"reason": reason}
    if endpoint is not None:
        payload["endpoint"] = endpoint
    return Lwm2mEvent("device.deregistration", payload)


def _deregistration(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    endpoint = _text_field(_data(message, required=False).get("ep"), "ep")
    return [deregistration_event("deregistered", endpoint)]


# --- responses ---------------------------------------------------------------------------


def _command_payload(
    request: str | None, code: str | None, code_msg: str | None, path: str | None, request_id: Any
) -> dict[str, Any]:
    return {
        "request": request,
        "code": code,
        "code_msg": code_msg,
        "request_path": path,
        "request_id": request_id,
    }


def _failed(base: dict[str, Any], reason: str, lwm2m: dict[str, Any] | None) -> Lwm2mEvent:
    return Lwm2mEvent("device.command_failed", {**base, "reason": reason}, lwm2m)


def _response(msg_type: str, message: Mapping[str, Any]
              ) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any] | None]:
    """What every command response carries: its data, code, common payload and path."""
    data = _data(message)
    code, code_msg = _code(data, msg_type)
    path, parsed = _request_path(data)
    return data, code, _command_payload(msg_type, code, code_msg, path,
                                        _request_id(message)), parsed


def _content_response(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    """notify / read / observe / cancel-observe: telemetry on success."""
    data, code, base, parsed = _response(msg_type, message)
    if not code.startswith("2."):
        return [_failed(base, "error_response", parsed)]
    if data.get("content") is None:
        return [Lwm2mEvent("device.command_response", {**base, "success": True}, parsed)]
    values = _values(data["content"])
    payload = {**base, "values": values}
    if "seqNum" in message:
        payload["seq_num"] = _seq_num(message["seqNum"])
    return [Lwm2mEvent("telemetry", payload, parsed or _common_path(values))]


def _write_response(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    """write / execute: one device.write whatever the outcome."""
    _, code, base, parsed = _response(msg_type, message)
    return [Lwm2mEvent("device.write", {**base, "success": code.startswith("2.")}, parsed)]


_LINK_SEPARATOR = re.compile(r",\s*(?=<)")


def split_links(items: list[str]) -> list[str]:
    """One CoRE link per item: EMQX 4.x splits a discover answer only at its first comma
    (``["</3/0>", "</3/0/1>,</3/0/2>;dim=2"]``); a comma followed by ``<`` starts a link
    (a comma inside a quoted attribute value is not followed by one)."""
    return [link for item in items for link in _LINK_SEPARATOR.split(item.strip()) if link]


def _other_response(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    """discover / write-attr / create / delete."""
    data, code, base, parsed = _response(msg_type, message)
    if not code.startswith("2."):
        return [_failed(base, "error_response", parsed)]
    payload = {**base, "success": True}
    content = data.get("content")
    if msg_type == "discover" and content is not None:
        if not isinstance(content, list) or not all(isinstance(c, str) for c in content):
            raise DecodeError("discover content is not a list of links")
        payload["links"] = split_links(content)
    return [Lwm2mEvent("device.command_response", payload, parsed)]


def _ack(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    """The device acknowledged a command; its response follows separately."""
    path, parsed = _request_path(_data(message, required=False))
    base = _command_payload(msg_type, None, None, path, _request_id(message))
    return [Lwm2mEvent("device.command_response", {**base, "success": True}, parsed)]


def _transport_failure(msg_type: str, message: Mapping[str, Any]) -> list[Lwm2mEvent]:
    """coap_timeout / coap_reset: the command never got an answer; its type is lost."""
    path, parsed = _request_path(_data(message, required=False))
    base = _command_payload(None, None, None, path, _request_id(message))
    return [_failed(base, msg_type, parsed)]


_Handler = Callable[[str, Mapping[str, Any]], list[Lwm2mEvent]]
_HANDLERS: dict[str, _Handler] = {
    "register": _registration,
    "update": _registration,
    "deregister": _deregistration,
    "notify": _content_response,
    "read": _content_response,
    "observe": _content_response,
    "cancel-observe": _content_response,
    "write": _write_response,
    "execute": _write_response,
    "discover": _other_response,
    "write-attr": _other_response,
    "create": _other_response,
    "delete": _other_response,
    "ack": _ack,
    "coap_timeout": _transport_failure,
    "coap_reset": _transport_failure,
}


def decode_emqx(device_id: str, payload: bytes) -> list[Lwm2mEvent]:
    """One EMQX LwM2M gateway message -> its events; DecodeError when it is not one.

    ``device_id`` (from the topic) is not needed to decode: the message says everything,
    and the topic's last level is deliberately not trusted.
    """
    message = strict_json(payload, "LwM2M message")
    if not isinstance(message, dict):
        raise DecodeError("LwM2M message is not a JSON object")
    msg_type = message.get("msgType")
    if not isinstance(msg_type, str):
        raise DecodeError("LwM2M message has no 'msgType'")
    handler = _HANDLERS.get(msg_type)
    if handler is None:
        raise DecodeError(f"unknown LwM2M msgType {msg_type!r:.40}")
    return handler(msg_type, message)


# --- firmware update (Object 5) ----------------------------------------------------------

FIRMWARE_OBJECT = 5
FIRMWARE_STATE = 3
FIRMWARE_RESULT = 5
FIRMWARE_STATES: dict[int, str] = {0: "Idle", 1: "Downloading", 2: "Downloaded", 3: "Updating"}
FIRMWARE_RESULTS: dict[int, str] = {
    0: "Initial value",
    1: "Firmware updated successfully",
    2: "Not enough flash memory for the new firmware package",
    3: "Out of RAM during downloading process",
    4: "Connection lost during downloading process",
    5: "Integrity check failure for new downloaded package",
    6: "Unsupported package type",
    7: "Invalid URI",
    8: "Firmware update failed",
    9: "Unsupported protocol",
}
_UPDATE_IN_PROGRESS = frozenset({1, 2, 3})


@dataclass
class _FirmwareProgress:
    state: int | None = None
    result: int | None = None
    armed: bool = False  # a State of 1/2/3 was seen since the last reported outcome


class FirmwareTracker:
    """Object 5 State/Update Result values -> one ``device.firmware_update`` per update.

    An outcome (Update Result 1..9) is reported when an update was seen in progress (State
    1, 2 or 3) since the last report, or when the result changed from a known earlier one
    (the progress notifications were missed). A repeated result is not reported again
    until the State goes through 1/2/3 again; the first result ever seen for a device
    (e.g. a read after the bridge started) is only remembered. Pure and in memory.
    """

    def __init__(self) -> None:
        self._progress: dict[tuple[str, int], _FirmwareProgress] = {}

    def feed(self, device_id: str, values: Iterable[Mapping[str, Any]]) -> Lwm2mEvent | None:
        """Telemetry ``values`` (any objects) -> the firmware event they complete, if any."""
        event: Lwm2mEvent | None = None
        for value in values:
            number = self._firmware_number(value)
            if number is None:
                continue
            key = (device_id, value["instance"])
            progress = self._progress.setdefault(key, _FirmwareProgress())
            if value["resource"] == FIRMWARE_STATE:
                progress.state = number
                progress.armed = progress.armed or number in _UPDATE_IN_PROGRESS
            else:
                event = self._on_result(progress, number, value["instance"]) or event
        return event

    def progress(self, device_id: str, instance: int) -> tuple[int | None, int | None, bool] | None:
        """``(state, result, armed)`` of one device's Object 5 instance, for the store."""
        progress = self._progress.get((device_id, instance))
        return None if progress is None else (progress.state, progress.result, progress.armed)

    def restore(self, device_id: str, instance: int,
                saved: tuple[int | None, int | None, bool] | None) -> None:
        """Put back what :meth:`progress` returned (after a restart, or to undo a change
        whose transaction failed: the broker sends that message again)."""
        if saved is None:
            self._progress.pop((device_id, instance), None)
        else:
            state, result, armed = saved
            self._progress[(device_id, instance)] = _FirmwareProgress(state, result, bool(armed))

    def forget(self, device_id: str) -> None:
        """Drop a device's progress (e.g. when it is deleted).

        Not done on de-registration: devices often de-register to reboot into the new
        firmware and report the Update Result after registering again.
        """
        for key in [key for key in self._progress if key[0] == device_id]:
            del self._progress[key]

    @staticmethod
    def _firmware_number(value: Mapping[str, Any]) -> int | None:
        if (
            value.get("object") != FIRMWARE_OBJECT
            or value.get("instance") is None
            or value.get("resource") not in (FIRMWARE_STATE, FIRMWARE_RESULT)
            or value.get("resource_instance") is not None
        ):
            return None
        return _as_integer(value.get("value"))

    @staticmethod
    def _on_result(progress: _FirmwareProgress, result: int, instance: int) -> Lwm2mEvent | None:
        previous, progress.result = progress.result, result
        if result == 0:
            return None  # reset to "Initial value" when an update starts: no outcome yet
        if not progress.armed and (previous is None or previous == result):
            return None
        progress.armed = False
        payload = {
            "success": result == 1,
            "state": progress.state,
            "result": result,
            "result_text": FIRMWARE_RESULTS.get(result, f"Unknown update result {result}"),
        }
        path = parse_lwm2m_path(f"/{FIRMWARE_OBJECT}/{instance}/{FIRMWARE_RESULT}")
        return Lwm2mEvent("device.firmware_update", payload, path)


@dataclass
class Lwm2mDecoder:
    """``decode_emqx`` plus the firmware events its telemetry completes (``firmware``
    None: decode only; the daemon tracks firmware in its device registry instead, one
    tracker for all sources, kept in the store)."""

    firmware: FirmwareTracker | None = field(default_factory=FirmwareTracker)

    def decode(self, device_id: str, payload: bytes) -> list[Lwm2mEvent]:
        events = decode_emqx(device_id, payload)
        if self.firmware is None:
            return events
        completed = [
            self.firmware.feed(device_id, event.payload["values"])
            for event in events
            if event.type == "telemetry"
        ]
        return events + [event for event in completed if event is not None]


# --- registration lifetimes --------------------------------------------------------------


class RegistrationTracker:
    """Which registrations passed their lifetime with no update. Pure; clock injected.

    A registration with no usable lifetime (None or 0: "the gateway's lifetime_max") is
    tracked but never expires here. Deadlines sit in a heap with lazy deletion: updates
    push a new entry and stale ones are skipped (and compacted) when they surface.
    """

    def __init__(self) -> None:
        self._lifetimes: dict[str, float | None] = {}
        self._deadlines: dict[str, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._lifetimes

    def __len__(self) -> int:
        return len(self._lifetimes)

    def register(self, device_id: str, lifetime_s: float | None, now: float) -> None:
        """A Register: the lifetime starts now."""
        self._lifetimes[device_id] = lifetime_s
        self._schedule(device_id, lifetime_s, now)

    def update(self, device_id: str, lifetime_s: float | None, now: float) -> bool:
        """An Update (``lifetime_s`` None keeps the last one); False if not registered."""
        if device_id not in self._lifetimes:
            if lifetime_s is None:
                return False
            self.register(device_id, lifetime_s, now)
            return True
        if lifetime_s is not None:
            self._lifetimes[device_id] = lifetime_s
        self._schedule(device_id, self._lifetimes[device_id], now)
        return True

    def deregister(self, device_id: str) -> bool:
        """Forget a registration; False if there was none."""
        known = device_id in self._lifetimes
        self._lifetimes.pop(device_id, None)
        self._deadlines.pop(device_id, None)
        return known

    def deadline(self, device_id: str) -> float | None:
        entry = self._deadlines.get(device_id)
        return entry[0] if entry else None

    def next_deadline(self) -> float | None:
        """The earliest deadline still pending, or None."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float) -> list[str]:
        """Devices whose deadline is at or before ``now``, oldest first; they are removed."""
        lapsed: list[str] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return lapsed
            _, _, device_id = heapq.heappop(self._heap)
            del self._deadlines[device_id]
            del self._lifetimes[device_id]
            lapsed.append(device_id)

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """``{device_id: {"lifetime", "deadline"}}`` for the daemon to persist."""
        return {
            d: {"lifetime": lt, "deadline": self.deadline(d)} for d, lt in self._lifetimes.items()
        }

    def restore(self, device_id: str, lifetime_s: float | None, deadline: float | None) -> None:
        """Reload one persisted registration with its absolute deadline."""
        self._lifetimes[device_id] = lifetime_s
        self._deadlines.pop(device_id, None)
        if deadline is not None:
            self._push(device_id, deadline)

    def _schedule(self, device_id: str, lifetime_s: float | None, now: float) -> None:
        self._deadlines.pop(device_id, None)
        if lifetime_s is not None and lifetime_s > 0:
            self._push(device_id, now + lifetime_s)
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._compact()

    def _push(self, device_id: str, deadline: float) -> None:
        sequence = next(self._sequence)
        self._deadlines[device_id] = (deadline, sequence)
        heapq.heappush(self._heap, (deadline, sequence, device_id))

    def _is_current(self, entry: tuple[float, int, str]) -> bool:
        deadline, sequence, device_id = entry
        return self._deadlines.get(device_id) == (deadline, sequence)

    def _drop_stale(self) -> None:
        while self._heap and not self._is_current(self._heap[0]):
            heapq.heappop(self._heap)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._is_current(entry)]
        heapq.heapify(self._heap)
