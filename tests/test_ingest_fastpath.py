"""The per-message path's shortcuts give the answers of the plain code they replace: topic
matching (one regular expression), the long-integer check of the JSON loader, event ids
(random parts fetched ahead), the rules' (source, type) answers, and the registry's
"nothing changed" result."""

from __future__ import annotations

import itertools
import os
import random
import re
from typing import Any

import pytest

from bridge import events as events_module
from bridge.config import SourceConfig, WebhookConfig
from bridge.events import Event
from bridge.registry import CREATED, DEREGISTRATION, REGISTRATION, Registry
from bridge.rules import RuleSet
from bridge.sources.bounds import _long_digits, load_json
from bridge.sources.decode import SourceDecoder
from bridge.sources.topics import TopicTemplate


def reference_match(template: str, topic: str) -> dict[str, str] | None:
    """Topic matching as it was before the compiled pattern (split and compare)."""
    parsed = TopicTemplate.parse(template)
    parts = topic.split("/")
    levels = parsed.levels
    if len(parts) < len(levels) or (not parsed.multi and len(parts) != len(levels)):
        return None
    if parsed.multi and parts and parts[0].startswith("$") and not levels:
        return None
    for want, got in zip(levels, parts):
        if want is not None and want != got:
            return None
    return {name: parts[index] for index, name in parsed.captures}


TEMPLATES = ["bench/{device_id}/data", "devices/{device_id}/{kind}/x", "#", "a/#", "+/#",
             "a/+/#", "/#", "a/{x}/{x}", "", "a.b/{device_id}", "$SYS/{device_id}",
             "{device_id}", "+", "a/+", "(x)*/{device_id}"]
TOPICS = ["bench/dev-1/data", "bench//data", "bench/dev-1/data/", "bench/dev-1", "a", "a/",
          "a/b", "a/b/c", "/", "", "$SYS/x", "$SYS", "devices/d/k/x", "devices/d/k/y",
          "a/1/2", "aXb/d", "a.b/d", "x\n/y", "a/b\n", "(x)*/d", "xx/d", "é/ü/data"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_topic_match_is_the_level_by_level_answer(template: str) -> None:
    parsed = TopicTemplate.parse(template)
    for topic in TOPICS:
        assert parsed.match(topic) == reference_match(template, topic), (template, topic)


def test_topic_match_exact_values() -> None:
    assert TopicTemplate.parse("devices/{device_id}/{kind}/x").match("devices/d7/k/x") == {
        "device_id": "d7", "kind": "k"}
    assert TopicTemplate.parse("a/{x}/{x}").match("a/1/2") == {"x": "2"}  # the last wins
    assert TopicTemplate.parse("#").match("$SYS/broker") is None
    assert TopicTemplate.parse("+/#").match("$SYS/broker") == {}
    assert TopicTemplate.parse("a/#").match("a") == {}
    assert TopicTemplate.parse("a.b/{device_id}").match("aXb/d") is None


@pytest.mark.parametrize("data", [
    b"", b"1" * 19, b"1" * 20, b"x" + b"9" * 25 + b"x", b"12345678901234567890",
    b"1234567890.1234567890", b'{"a": "' + b"0" * 19 + b'", "b": 1' + b"0" * 19 + b"}",
    b"\xff" * 30, bytes(range(256)) * 2, b"0123456789" * 2,
])
def test_long_digits_is_the_regex_answer(data: bytes) -> None:
    assert _long_digits(data) is (re.search(rb"[0-9]{20,}", data) is not None)


def test_long_digits_random_payloads() -> None:
    rng = random.Random(7)
    alphabet = b"0123456789 .\"-eE"
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert _long_digits(data) is (re.search(rb"[0-9]{20,}", data) is not None), data


def test_json_payloads_keep_their_values() -> None:
    assert load_json(b'{"seq": 1, "ts": 1733389200.125, "s": "12345678901234567890"}') == {
        "seq": 1, "ts": 1733389200.125, "s": "12345678901234567890"}
    assert load_json(b"[123456789012345678901]") == [123456789012345678901]
    with pytest.raises(ValueError, match="a number is out of range: 1e9999"):
        load_json(b"[1e999999999999999999999]")  # orjson's infinity: the exact parser


def _crockford(value: int, length: int) -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(length)))


def test_ids_are_ulids_of_the_random_bytes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = random.Random(3).randbytes(16 * 200)
    taken = 0

    def urandom(n: int) -> bytes:
        nonlocal taken
        taken += n
        return stream[taken - n:taken]

    monkeypatch.setattr(events_module.os, "urandom", urandom)
    ulid = events_module._Ulid()
    ms0 = 1_733_389_200_123
    ms = [ms0 + 40_000 * (i // 50) + i for i in range(100)]  # a new ms each: fresh random
    ids = [ulid.new(m, "evt_") for m in ms]
    rands = []
    for i, made in enumerate(ids):
        chunk = stream[16 * i:16 * i + 16]
        # 5 random bits a byte, 16 bytes; the top bit is clear (room to increment).
        rand = sum((b & 31) << (5 * (15 - k)) for k, b in enumerate(chunk)) & ((1 << 79) - 1)
        rands.append(rand)
        assert made == "evt_" + _crockford((ms[i] << 80) | rand, 26)
    assert taken == 16 * events_module._Ulid.POOL * 2  # two fetches for 100 draws
    # Within one ms the random part counts up, across carries (and a clock step back
    # keeps the last ms).
    same = [ulid.new(ms[-1]) for _ in range(70)] + [ulid.new(ms0)]
    assert same == [_crockford((ms[-1] << 80) | (rands[-1] + k), 26) for k in range(1, 72)]


def test_increments_carry() -> None:
    for text, after in [("0000000000000000", "0000000000000001"),
                        ("000000000000000Z", "0000000000000010"),
                        ("7ZZZZZZZZZZZZZZZ", "8000000000000000"),
                        ("0123456789ABCDEZ", "0123456789ABCDF0"),
                        ("ABCDEFGHJKMNPQRS", "ABCDEFGHJKMNPQRT")]:
        assert events_module._increment(text) == after


def test_a_forked_child_draws_new_random_bytes() -> None:
    ulid = events_module._ulid
    ulid.new()
    ulid.forget_pool()
    assert ulid._pool == "" and ulid._taken == 0
    assert len(ulid.new(None, "evt_")) == 30


def test_event_ids_sort_in_order_of_making() -> None:
    made = [Event(type="t", source="s", topic="t").id for _ in range(3000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(re.fullmatch(r"evt_[0-9A-HJKMNP-TV-Z]{26}", i) for i in made)


def _event(source: str, type_: str, payload: Any = None, labels: dict[str, str] | None = None
           ) -> Event:
    return Event(type=type_, source=source, topic="t", payload=payload, labels=labels or {})


def test_rules_answers_per_source_and_type_are_those_of_each_rule() -> None:
    hooks = (WebhookConfig(name="all", url="https://e.test/"),
             WebhookConfig(name="a-only", url="https://e.test/", sources=("a",)),
             WebhookConfig(name="globs", url="https://e.test/", events=("t*", "invalid")),
             WebhookConfig(name="created", url="https://e.test/", events=(CREATED,)))
    rules = RuleSet(hooks)
    cases = list(itertools.product(["a", "b"], ["telemetry", "x", "invalid", CREATED]))
    for source, type_ in cases * 2:  # the second time from the kept answers
        event = _event(source, type_)
        expected = [r.name for r in rules.rules if r.matches(event)]
        assert list(rules.match(event)) == expected, (source, type_)
    assert list(rules.match(_event("a", "telemetry"))) == ["all", "a-only", "globs"]
    assert list(rules.match(_event("b", "invalid"))) == ["globs"]
    assert list(rules.match(_event("b", CREATED))) == ["created"]


def test_rules_looking_at_the_event_are_asked_every_time() -> None:
    hooks = (WebhookConfig(name="all", url="https://e.test/"),
             WebhookConfig(name="fleet", url="https://e.test/", fleets=("f1",)))
    rules = RuleSet(hooks)
    assert list(rules.match(_event("a", "t", labels={"fleet": "f1"}))) == ["all", "fleet"]
    assert list(rules.match(_event("a", "t", labels={"fleet": "f2"}))) == ["all"]


def test_rules_keep_a_bounded_number_of_answers() -> None:
    rules = RuleSet((WebhookConfig(name="all", url="https://e.test/"),))
    for i in range(RuleSet.KEPT + 50):
        assert list(rules.match(_event("s", f"type-{i}"))) == ["all"]
    assert len(rules._answers or {}) == RuleSet.KEPT


def test_registry_reports_no_change_for_a_known_devices_plain_event() -> None:
    registry = Registry()
    first = Event(type="telemetry", source="s", topic="t/d", device_id="d", labels={"k": "1"})
    out, change = registry.observe([first])
    assert [e.type for e in out] == [CREATED, "telemetry"] and change is not None
    assert change.seen == {"d": ("s", "t/d")}
    again = Event(type="telemetry", source="s2", topic="u/d", device_id="d", labels={"k": "2"})
    out, change = registry.observe([again])
    assert out == [again] and change is None
    assert registry.sources["d"] == ("s2", "u/d") and registry.labels["d"] == {"k": "2"}
    out, change = registry.observe([Event(type="telemetry", source="s", topic="t")])
    assert change is None and len(out) == 1  # no device id
    out, change = registry.observe([Event(type=REGISTRATION, source="s", topic="t",
                                          device_id="d", payload={"lifetime": 60})])
    assert change is not None and change.registered == {"d": 60}
    assert change.first_registered == {"d"}
    out, change = registry.observe([Event(type=DEREGISTRATION, source="s", topic="t",
                                          device_id="d")])
    assert change is not None and change.deregistered == {"d"} and not change.seen


def test_decoder_labels_from_the_topic_and_the_fixed_type() -> None:
    plain = SourceDecoder(SourceConfig(name="b", topic="bench/{device_id}/data"))
    (event,) = plain.events("bench/d1/data", b'{"v": 1}', {"device_id": "d1"})
    assert (event.type, event.labels, event.device_id, event.payload) == (
        "telemetry", {}, "d1", {"v": 1})
    assert event._body is None  # nothing rendered: no envelope built yet
    labelled = SourceDecoder(SourceConfig(name="b", topic="f/{fleet}/{device_id}",
                                          type="{payload.k}"))
    (event,) = labelled.events("f/x/d1", b'{"k": "up"}', {"fleet": "x", "device_id": "d1"})
    assert (event.type, event.labels) == ("up", {"fleet": "x"})
    (event,) = labelled.events("f/x/d1", b'{"k": "up"}', {"fleet": "x"})
    assert (event.type, event.labels, event.device_id) == ("up", {"fleet": "x"}, None)


def test_fork_hook_is_registered() -> None:
    # os.register_at_fork has no query API: check a child gets fresh random parts.
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    events_module._ulid.new()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its pool state, exit at once
        os.write(write, b"%d" % len(events_module._ulid._pool))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"0"
    os.close(read)
    os.close(write)


@pytest.mark.parametrize(("ts", "text"), [
    (1733389200.0, "2024-12-05T09:00:00.000Z"), (1733389200.1239, "2024-12-05T09:00:00.123Z"),
    (1733389259.9995, "2024-12-05T09:00:59.999Z"), (0.0, "1970-01-01T00:00:00.000Z"),
    (-1.5, "1969-12-31T23:59:58.500Z"),
    (-1e-20, "1969-12-31T23:59:59.1000Z"),  # as the format gave it: 1 - 1e-20 == 1.0
])
def test_iso_now_exact_text(ts: float, text: str) -> None:
    assert events_module.iso_now(ts) == text
