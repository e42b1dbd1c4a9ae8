"""SenML (RFC 8428) decoding: JSON and CBOR packs to resolved records.

Owns:

- ``decode_senml_json`` / ``decode_senml_cbor``: parse a SenML Pack and return its records
  *resolved* as RFC 8428 section 4.6 defines it: base name + name concatenated, base time
  added and times relative to "now" (below 2**28) made absolute, base unit applied when a
  record has none, base value / base sum added, the version kept only when it is not 10.
  Records are returned in pack order, one dict each::

      {"n": "urn:dev:ow:10e2073a01080063:temp", "u": "Cel", "v": 23.1, "t": 1700000000.0}

  with exactly one of ``v`` / ``vs`` / ``vb`` / ``vd`` (``vd`` stays a base64url string,
  also when CBOR carried raw bytes), ``s`` and ``ut`` when present, ``bver`` when the pack
  is not version 10, and ``lwm2m`` when the resolved name is an LwM2M path.
- ``parse_lwm2m_path`` / ``lwm2m_path_in_name``: the ``{"path", "object", "instance",
  "resource", "resource_instance"}`` dict both decoders attach to values.
- ``DecodeError`` and ``strict_json``, shared with :mod:`bridge.sources.lwm2m` (the two
  decoders live in two files and one has to host what they share).

Choices where the RFC leaves room:

- A record with no value field and no sum (``[{"bn": "urn:dev:x:"}, ...]``, RFC 5.1.7)
  only carries base fields and yields no resolved record.
- A record whose resolved name is empty is accepted: devices publishing on a per-sensor
  topic often omit names, and the topic still identifies the sender.
- Unknown fields are ignored, fields whose label ends in ``_`` are an error (section 4.4),
  a version above 10 is refused (section 4.4), non-finite numbers are refused (the records
  must stay JSON).
- A resolved name uses only the characters of RFC 8428 4.5.1 (``A-Z a-z 0-9 - : . / _``)
  and starts with a letter or digit, or with ``/`` (LwM2M's SenML names are paths such as
  ``/3303/0/5700``, which OMA uses against the RFC's letter rule).
- Bounds (:mod:`bridge.sources.bounds`): at most ``SENML_MAX_RECORDS`` records, names of at
  most ``SENML_MAX_NAME`` characters, and ``SENML_MAX_RESOLVED`` bytes of resolved records,
  checked record by record so a hostile pack fails before it is expanded.

Pure: no I/O; the only clock is ``time.time()`` when ``now`` is not injected.
"""

from __future__ import annotations

import base64
import io
import math
import re
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import cbor2

from .bounds import (
    CBOR_MAX_DEPTH,
    SENML_MAX_NAME,
    SENML_MAX_RECORDS,
    SENML_MAX_RESOLVED,
    JSONBoundError,
    load_json,
)

__all__ = [
    "CBOR_LABELS",
    "DecodeError",
    "decode_senml_cbor",
    "decode_senml_json",
    "lwm2m_path_in_name",
    "parse_lwm2m_path",
    "strict_json",
]


class DecodeError(ValueError):
    """A payload that does not decode in its declared format (the caller keeps it raw)."""


SENML_VERSION = 10
RELATIVE_TIME_LIMIT = 2**28
MAX_LWM2M_ID = 65535
_MAX_INT = 2**64

# RFC 8428 Table 4; the table is declared conclusive, extensions use text keys.
CBOR_LABELS: dict[int, str] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}

_TEXT_FIELDS = frozenset({"bn", "bu", "n", "u", "vs"})
_NUMBER_FIELDS = frozenset({"bt", "bv", "bs", "v", "s", "t", "ut"})
_KNOWN_FIELDS = frozenset(CBOR_LABELS.values())
_VALUE_FIELDS = ("v", "vs", "vb", "vd")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_NAME = re.compile(r"[A-Za-z0-9/][A-Za-z0-9:./_-]*")  # RFC 8428 4.5.1, and "/" first
_RECORD_COST = 64  # bytes a resolved record counts beyond its text (SENML_MAX_RESOLVED)

# [0-9], not \d: \d also matches non-ASCII digits that int() would happily accept.
_PATH = re.compile(r"/?([0-9]{1,5}(?:/[0-9]{1,5}){0,3})/?")


# --- LwM2M paths -------------------------------------------------------------------------


def parse_lwm2m_path(path: str) -> dict[str, Any] | None:
    """``"/3303/0/5700"``, ``"3303/0/5700"`` or ``"/3/0/"`` -> ids; None if not a path."""
    match = _PATH.fullmatch(path)
    if match is None:
        return None
    ids: list[int | None] = [int(part) for part in match.group(1).split("/")]
    if any(i is not None and i > MAX_LWM2M_ID for i in ids):
        return None
    normalized = "/" + "/".join(str(i) for i in ids)
    ids += [None] * (4 - len(ids))
    return {
        "path": normalized,
        "object": ids[0],
        "instance": ids[1],
        "resource": ids[2],
        "resource_instance": ids[3],
    }


def lwm2m_path_in_name(name: str) -> dict[str, Any] | None:
    """The LwM2M path a SenML name ends with: ``/3303/0/5700``, ``urn:dev:x:/3303/0/5700``.

    Without a leading ``/`` the tail must reach a resource (``3303/0/5700``) so that names
    such as ``2001:db8::3`` (RFC 8428 5.1.7) are not mistaken for object paths.
    """
    tail = name.rsplit(":", 1)[-1]
    parsed = parse_lwm2m_path(tail)
    if parsed is None or tail.startswith("/"):
        return parsed
    return parsed if parsed["resource"] is not None else None


# --- shared JSON parsing -----------------------------------------------------------------


def strict_json(data: bytes, what: str) -> Any:
    """UTF-8 JSON within the bounds of :mod:`bridge.sources.bounds` (no NaN/Infinity),
    every failure a DecodeError naming ``what``."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        return load_json(data)
    except JSONBoundError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}") from exc


# --- field checks ------------------------------------------------------------------------


def _number(value: Any, label: str, index: int) -> int | float:
    # bool is an int subclass, and CBOR decimal fractions (tag 4) arrive as Decimal.
    if isinstance(value, Decimal):
        value = float(value) if value.is_finite() else math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError(f"record {index}: {label!r} must be a number, not {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError(f"record {index}: {label!r} is not a finite number")
    if isinstance(value, int) and abs(value) > _MAX_INT:
        # Beyond this, float arithmetic with the clock would overflow.
        raise DecodeError(f"record {index}: {label!r} is out of range")
    return value


def _kind(value: Any) -> str:
    return type(value).__name__


def _data_value(value: Any, index: int, cbor: bool) -> str:
    if cbor:
        if not isinstance(value, bytes):
            raise DecodeError(f"record {index}: 'vd' must be a CBOR byte string")
        return base64.urlsafe_b64encode(value).decode("ascii").rstrip("=")
    if not isinstance(value, str) or not _BASE64URL.fullmatch(value):
        raise DecodeError(f"record {index}: 'vd' must be a base64url string")
    return value


def _version(value: Any, index: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DecodeError(f"record {index}: 'bver' must be a positive integer")
    if value > SENML_VERSION:
        raise DecodeError(f"record {index}: SenML version {value} is newer than {SENML_VERSION}")
    return value


def _checked(label: str, value: Any, index: int, cbor: bool) -> Any:
    if label in _TEXT_FIELDS:
        if not isinstance(value, str):
            raise DecodeError(f"record {index}: {label!r} must be a string, not {_kind(value)}")
        if label in ("bn", "n") and len(value) > SENML_MAX_NAME:
            raise DecodeError(f"record {index}: {label!r} is longer than {SENML_MAX_NAME} "
                              "characters (SENML_MAX_NAME)")
        return value
    if label in _NUMBER_FIELDS:
        return _number(value, label, index)
    if label == "vb":
        if not isinstance(value, bool):
            raise DecodeError(f"record {index}: 'vb' must be a boolean, not {_kind(value)}")
        return value
    if label == "vd":
        return _data_value(value, index, cbor)
    return _version(value, index)


def _record_fields(raw: Any, index: int, cbor: bool) -> dict[str, Any]:
    """One record's known fields, checked; labels normalised to their JSON names."""
    if not isinstance(raw, Mapping):
        raise DecodeError(f"record {index} is a {_kind(raw)}, not a map")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        label = CBOR_LABELS.get(key) if cbor and type(key) is int else key
        if not isinstance(label, str):
            continue  # unknown CBOR integer label: ignored like any unknown field
        if label.endswith("_"):
            raise DecodeError(f"record {index}: field {label!r} must be understood (RFC 8428 4.4)")
        if label not in _KNOWN_FIELDS:
            continue
        if label in fields:
            raise DecodeError(f"record {index}: field {label!r} appears twice")
        fields[label] = _checked(label, value, index, cbor)
    return fields


# --- resolution (RFC 8428 section 4.6) ---------------------------------------------------


def _finite(value: int | float, label: str, index: int) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError(f"record {index}: resolved {label!r} overflows")
    return value


def _resolve_one(
    fields: dict[str, Any], base: dict[str, Any], index: int, now: float
) -> dict[str, Any] | None:
    present = [label for label in _VALUE_FIELDS if label in fields]
    if len(present) > 1:
        raise DecodeError(f"record {index} has several value fields: {', '.join(present)}")
    has_sum = "s" in fields or base["bs"] is not None
    if not present and not has_sum:
        return None  # a record that only sets base fields
    name = base["bn"] + fields.get("n", "")
    if len(name) > SENML_MAX_NAME:
        raise DecodeError(f"record {index}: the resolved name is longer than "
                          f"{SENML_MAX_NAME} characters (SENML_MAX_NAME)")
    if name and _NAME.fullmatch(name) is None:
        raise DecodeError(f"record {index}: name {name[:60]!r} has characters RFC 8428 "
                          "4.5.1 does not allow (A-Z a-z 0-9 - : . / _)")
    record: dict[str, Any] = {"n": name}
    unit = fields.get("u", base["bu"])
    if unit is not None:
        record["u"] = unit
    if present:
        label = present[0]
        value = fields[label]
        if label == "v" and base["bv"] is not None:
            value = _finite(base["bv"] + value, "v", index)
        record[label] = value
    if has_sum:
        record["s"] = _finite((base["bs"] or 0) + fields.get("s", 0), "s", index)
    when = _finite(base["bt"] + fields.get("t", 0), "t", index)
    record["t"] = _finite(now + when, "t", index) if when < RELATIVE_TIME_LIMIT else when
    if "ut" in fields:
        record["ut"] = fields["ut"]
    if base["bver"] != SENML_VERSION:
        record["bver"] = base["bver"]  # RFC 8428 4.6: kept only for other versions
    path = lwm2m_path_in_name(name)
    if path is not None:
        record["lwm2m"] = path
    return record


def _resolve(pack: Any, now: float | None, cbor: bool) -> list[dict[str, Any]]:
    if not isinstance(pack, list):
        raise DecodeError(f"a SenML pack is an array, not a {_kind(pack)}")
    if len(pack) > SENML_MAX_RECORDS:
        raise DecodeError(f"the pack has {len(pack)} records, more than "
                          f"{SENML_MAX_RECORDS} (SENML_MAX_RECORDS)")
    clock = time.time() if now is None else now
    base: dict[str, Any] = {
        "bn": "",
        "bt": 0,
        "bu": None,
        "bv": None,
        "bs": None,
        "bver": SENML_VERSION,
    }
    resolved: list[dict[str, Any]] = []
    size = 0
    for index, raw in enumerate(pack):
        fields = _record_fields(raw, index, cbor)
        # Base fields apply to their own record and every later one (RFC 8428 4).
        base.update({label: fields[label] for label in base if label in fields})
        record = _resolve_one(fields, base, index, clock)
        if record is not None:
            size += _RECORD_COST + sum(len(v) for v in record.values() if isinstance(v, str))
            if size > SENML_MAX_RESOLVED:
                raise DecodeError(f"record {index}: the resolved records exceed "
                                  f"{SENML_MAX_RESOLVED} bytes (SENML_MAX_RESOLVED)")
            resolved.append(record)
    return resolved


# --- entry points ------------------------------------------------------------------------


def decode_senml_json(data: bytes, now: float | None = None) -> list[dict[str, Any]]:
    """application/senml+json -> resolved records; ``now`` anchors relative times."""
    return _resolve(strict_json(data, "SenML JSON"), now, cbor=False)


def _cbor_decoder(stream: io.BytesIO) -> cbor2.CBORDecoder:
    try:
        return cbor2.CBORDecoder(stream, max_depth=CBOR_MAX_DEPTH)
    except TypeError:  # cbor2 before 6 has no max_depth: its recursion guard applies
        return cbor2.CBORDecoder(stream)


def decode_senml_cbor(data: bytes, now: float | None = None) -> list[dict[str, Any]]:
    """application/senml+cbor -> resolved records; ``now`` anchors relative times."""
    stream = io.BytesIO(bytes(data))
    try:
        pack = _cbor_decoder(stream).decode()
    except Exception as exc:  # cbor2 raises many unrelated types for hostile input
        raise DecodeError(f"SenML CBOR is not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise DecodeError(f"SenML CBOR has {len(data) - stream.tell()} trailing bytes")
    return _resolve(pack, now, cbor=True)
