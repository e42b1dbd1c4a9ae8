"""The decoders' bounds on what a device may send, and the bounded JSON loader.

Owns the named limits of SPEC §8 that apply once a payload is in memory (the size of a
payload itself is ``mqtt.max_payload``, enforced by the MQTT client before it is): past
any of them the message becomes an ``invalid`` event whose ``decode_error`` names the
bound, and the values below are what the README's "Limits" section documents. They are
constants, not settings: each keeps a decoded event representable in the JSON the bridge
sends (orjson, UTF-8) and its memory proportional to the payload.

``load_json`` is the one JSON parser of the ``json``, ``senml`` and ``lwm2m-emqx``
formats: orjson (strict RFC 8259: no NaN/Infinity, no lone surrogates, valid UTF-8 only,
nesting up to ``JSON_MAX_DEPTH``), with integers beyond 64 bits kept exact (orjson would
turn them into floats) up to ``JSON_MAX_INT_DIGITS`` digits.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

JSON_MAX_DEPTH = 1024
"""Nesting of arrays and objects in a JSON payload (orjson's own limit)."""

JSON_MAX_INT_DIGITS = 1000
"""Digits of one JSON integer. Python refuses to print an integer of more than 4,300
digits, and the work to convert one grows with the square of its length."""

EVENT_TYPE_MAX = 256
"""Characters of an event type a ``type`` template makes from the payload (it travels in
headers and URLs, and is matched against every webhook's ``events``)."""

SENML_MAX_RECORDS = 5000
"""Records in one SenML pack (JSON or CBOR), base-field-only records included."""

SENML_MAX_NAME = 1024
"""Characters of a SenML base name, name, and of a resolved name (base name + name)."""

SENML_MAX_RESOLVED = 4 * 1024 * 1024
"""Bytes the resolved records of one pack may take, estimated as their names, units and
string values plus 64 bytes a record: a base name repeated into every record must not
turn a small pack into a huge event."""

CBOR_MAX_DEPTH = 64
"""Nesting of CBOR arrays and maps in a SenML CBOR pack (a pack is two levels deep)."""

# Integer literals orjson cannot keep exact: 20 digits or more (also found inside strings
# and fractions: then the slower exact parser runs, with the same result). Asked of every
# payload, so not a regex (a search for [0-9]{20,} cost more than orjson's parse): every
# digit becomes "0", every other byte a space, and a run of 20 digits is 20 "0"s.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_TWENTY_DIGITS = b"0" * 20


def _long_digits(data: bytes) -> bool:
    """Whether ``data`` has a run of 20 ASCII digits or more."""
    return data.translate(_DIGITS_AS_ZERO).find(_TWENTY_DIGITS) != -1


class JSONBoundError(ValueError):
    """A JSON payload past one of the bounds above, or not strict JSON."""


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > JSON_MAX_INT_DIGITS:
        raise JSONBoundError(f"an integer has {digits} digits, more than the "
                             f"{JSON_MAX_INT_DIGITS} allowed (JSON_MAX_INT_DIGITS)")
    return int(text)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JSONBoundError(f"a number is out of range: {text[:40]}")
    return number


def _no_constant(name: str) -> Any:
    raise JSONBoundError(f"{name} is not a JSON number")


def load_json(data: bytes) -> Any:
    """Parse strict JSON within the bounds; :class:`JSONBoundError` names what failed."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "depth limit" in reason or "recursion" in reason:
            raise JSONBoundError(f"nested deeper than {JSON_MAX_DEPTH} levels "
                                 "(JSON_MAX_DEPTH)") from None
        if "infinity" in reason:
            if _long_digits(data):  # maybe a long integer
                return _exact(data, checked=False)
            raise JSONBoundError(f"a number is out of range: {reason}") from None
        at = exc.doc[exc.pos:exc.pos + 9] if isinstance(exc.doc, str) else ""
        for constant in ("NaN", "Infinity"):  # -Infinity: orjson stops after the sign
            if at.startswith(constant):
                raise JSONBoundError(f"{constant} is not a JSON number") from None
        raise JSONBoundError(reason) from None
    # _long_digits(data), inlined: this runs for every JSON payload.
    if data.translate(_DIGITS_AS_ZERO).find(_TWENTY_DIGITS) == -1:
        return value
    return _exact(data, checked=True)


def _exact(data: bytes, checked: bool) -> Any:
    """Python's parser, for exact integers beyond 64 bits. ``checked``: orjson accepted
    the document, so only the integers are left to bound; otherwise the strings are
    checked here (Python accepts lone surrogates, which UTF-8 cannot carry)."""
    try:
        value = json.loads(data, parse_int=_bounded_int, parse_float=_finite_float,
                           parse_constant=_no_constant)
        if not checked:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except JSONBoundError:
        raise
    except RecursionError:
        raise JSONBoundError("nested too deeply for an exact integer parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeError: the message says which
        raise JSONBoundError(str(exc)[:200]) from None
    return value
