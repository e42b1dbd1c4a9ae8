"""Decoder property tests (SPEC §8): for any bytes, every source format yields events or
one ``invalid`` event naming the reason, within a time and size bound, and never raises.
Each event that is not ``invalid`` encodes to the JSON the bridge sends."""

from __future__ import annotations

import json
import time

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import SourceConfig
from bridge.events import INVALID, dumps
from bridge.sources.bounds import JSON_MAX_INT_DIGITS, SENML_MAX_RESOLVED, load_json
from bridge.sources.decode import SourceDecoder

FORMATS = ("json", "text", "binary", "senml", "senml-cbor", "lwm2m-emqx")
TIME_BOUND = 2.0  # seconds for one message of a few KB, on a loaded CI machine


def size_bound(payload: bytes) -> int:
    """The most JSON one message's events may take: the payload in base64 (invalid or
    binary), or SenML resolved within its bound, plus the envelope."""
    return SENML_MAX_RESOLVED + 2 * len(payload) + 4096


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=5),
    max_leaves=30)

adversarial = st.one_of(
    st.binary(max_size=2000),
    st.integers(1, 6000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 8000).map(lambda n: b'{"kind": "k", "v": ' + b"9" * n + b"}"),
    st.text(max_size=30).map(lambda t: json.dumps({"kind": t}).encode()),  # \ud800 escapes
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),  # NaN and Infinity included
    json_values.map(lambda v: json.dumps([{"n": "x", "v": v}]).encode()),
    json_values.map(lambda v: json.dumps({"msgType": "notify", "data": {
        "code": "2.05", "content": [{"path": "/3/0/1", "value": v}]}}).encode()),
    json_values.map(lambda v: cbor2.dumps(v)),
    st.lists(st.dictionaries(st.integers(-6, 8), json_values, max_size=4), max_size=20)
    .map(cbor2.dumps),
    st.integers(1, 5000).map(lambda n: b"\x81" * n + b"\x00"),
)


@pytest.mark.parametrize("format_", FORMATS)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(payload=adversarial)
def test_every_decoder_returns_events_or_invalid_within_bounds(format_: str,
                                                               payload: bytes) -> None:
    source = SourceConfig(name="s", topic="d/{device_id}", format=format_,
                          type="{payload.kind}" if format_ == "json" else "telemetry")
    decoder = SourceDecoder(source)
    started = time.perf_counter()
    events = decoder.events("d/x", payload, {"device_id": "x"})
    took = time.perf_counter() - started
    assert took < TIME_BOUND, f"{format_}: {took:.2f}s"
    assert events
    size = 0
    for event in events:
        if event.type == INVALID:
            assert isinstance(event.decode_error, str) and event.decode_error
            assert event.payload_raw == payload
        body = dumps(event.envelope())  # what the store keeps: must encode, as UTF-8
        body.decode("utf-8")
        size += len(body)
    assert size <= size_bound(payload)


def test_the_json_bounds_are_exact() -> None:
    limit = JSON_MAX_INT_DIGITS
    assert load_json(b"[" + b"9" * limit + b"]") == [int("9" * limit)]
    assert load_json(b"[-" + b"9" * limit + b"]") == [-int("9" * limit)]
    with pytest.raises(ValueError, match="1001 digits"):
        load_json(b"[" + b"9" * (limit + 1) + b"]")
    assert load_json(b"[" * 1024 + b"]" * 1024) is not None
    with pytest.raises(ValueError, match="JSON_MAX_DEPTH"):
        load_json(b"[" * 1025 + b"]" * 1025)
    assert load_json(b'["\\ud83d\\ude00", 18446744073709551616]') == ["\U0001f600", 2**64]
    with pytest.raises(ValueError, match="surrogate"):
        load_json(b'["\\ud800", 1' + b"0" * 400 + b"]")  # the slow exact path checks too
