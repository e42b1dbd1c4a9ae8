"""A batch of stored events is rendered from their stored bytes (no parse, no re-encode):
the request must be exactly the one the general renderer builds from parsed events."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.config import BatchConfig, WebhookConfig
from bridge.events import Event, dumps
from bridge.render import Renderer

WEBHOOK = WebhookConfig(name="cloud", url="https://example.com/ingest/{device_id}?b=1",
                        headers={"X-Device": "{device_id}"}, batch=BatchConfig(10, 1.0))

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)


def stored(events: list[Event]) -> list[tuple[bytes, str]]:
    return [(dumps(e.envelope()), e.id) for e in events]


@given(st.lists(st.tuples(values, st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                  max_size=2)), min_size=1, max_size=10))
def test_stored_batch_is_byte_for_byte_the_rendered_batch(
        items: list[tuple[object, dict[str, str]]]) -> None:
    renderer = Renderer(WEBHOOK, "webhook-bridge/test")
    assert renderer.passes_stored_event
    events = [Event(type="telemetry", source="s", topic=f"devices/d{n}/t", payload=payload,
                    device_id=f"d{n} /?", labels=labels)
              for n, (payload, labels) in enumerate(items)]
    general = renderer.render(events, "bat_1")
    fast = renderer.render_stored_batch(stored(events), events[0].device_id, "bat_1")
    assert fast is not None
    assert (fast.method, fast.url, fast.headers) == (general.method, general.url,
                                                     general.headers)
    assert fast.body == general.body
    body = json.loads(fast.body)
    assert [item["id"] for item in body["result"]] == [str(n) for n in range(len(items))]
    assert [item["event_id"] for item in body["result"]] == [e.id for e in events]


def test_a_stored_event_that_does_not_begin_with_its_id_falls_back() -> None:
    renderer = Renderer(WEBHOOK, "webhook-bridge/test")
    event = Event(type="telemetry", source="s", topic="t", payload=1, device_id="d")
    reordered = json.dumps({"type": "telemetry", "id": event.id}).encode()
    assert renderer.render_stored_batch([(reordered, event.id)], "d", "bat_1") is None
    other_id = dumps(event.envelope())
    assert renderer.render_stored_batch([(other_id, "evt_other")], "d", "bat_1") is None


@given(st.sampled_from(["payload", "body"]), st.integers() | st.text(max_size=8))
def test_a_payload_key_never_replaces_the_ids_of_a_batch_item(shape: str, extra: object
                                                              ) -> None:
    """A device (or a body template fed by it) that sends ``id``/``event_id`` keys cannot
    change the ids an endpoint deduplicates on."""
    webhook = WebhookConfig(
        name="cloud", url="https://example.com/in", batch=BatchConfig(10, 1.0),
        envelope="payload" if shape == "payload" else "event",
        body={"id": "{payload.id}", "event_id": "{payload.event_id}", "x": "{payload.x}"}
        if shape == "body" else None)
    events = [Event(type="telemetry", source="s", topic="t", device_id="d",
                    payload={"id": "evil", "event_id": "evt_forged", "x": extra})
              for _ in range(3)]
    body = json.loads(Renderer(webhook, "ua").render(events, "bat_1").body)
    assert [(i["id"], i["event_id"]) for i in body["result"]] == [
        (str(n), e.id) for n, e in enumerate(events)]
