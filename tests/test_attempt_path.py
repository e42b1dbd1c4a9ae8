"""The per-attempt work around the HTTP request, with its cached shortcuts: the URL and
headers of a stored event, percent-encoding, the outcome of a 2xx answer, redaction and
the attempt metrics. Each shortcut must give exactly what the general path gives."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

import pytest
from prometheus_client import generate_latest

from bridge import http1, logs
from bridge.attempts import Attempt
from bridge.config import AuthConfig, WebhookConfig
from bridge.delivery import USER_AGENT, Outcome, Sender
from bridge.metrics import Metrics
from bridge.render import Renderer, RenderError, encode_url_value
from bridge.templates import TemplateError, compile_template


def reference_encode(text: str) -> str:
    """encode_url_value as it was: urllib's quote for every value."""
    encoded = urllib.parse.quote(text, safe="")
    if encoded and set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    return encoded


VALUES = ["dev-042", "A_z.0~9", "", ".", "..", "...", ".a", "a.", "a/b", "a b", "a%2F",
          "?x=1#f", "@host", "dévice", "日本", "a\nb", "~", "-", "_", "a+b", "a;b", "%"]


@pytest.mark.parametrize("text", VALUES + [chr(c) for c in range(0x250)])
def test_encode_url_value_matches_quote(text: str) -> None:
    assert encode_url_value(text) == reference_encode(text)


def test_encode_url_value_examples() -> None:
    assert encode_url_value("dev-042") == "dev-042"
    assert encode_url_value("..") == "%2E%2E"
    assert encode_url_value("a/../b") == "a%2F..%2Fb"
    assert encode_url_value("dé v") == "d%C3%A9%20v"


def general_url(renderer: Renderer, context: dict[str, Any]) -> str:
    """Renderer.url without its cached pieces: the templates rendered one by one."""
    url = renderer._origin + renderer._path.render(context, encode_url_value)
    if renderer._query is not None:
        url += "?" + renderer._query.render(context, encode_url_value)
    return url


URLS = ["https://api.example.com/in/{device_id}",
        "https://api.example.com/in/{device_id}/x?d={device_id}&s=1",
        "https://api.example.com:8443",
        "https://api.example.com/in?",
        "https://api.example.com/{{literal}}/{device_id}#frag",
        "https://api.example.com/fixed?a=b"]


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("device_id", ["dev-1", "a/b", "..", "", "dé"])
def test_stored_url_is_the_templates_url(url: str, device_id: str) -> None:
    renderer = Renderer(WebhookConfig(name="w", url=url), USER_AGENT)
    assert renderer._url_pieces is not None
    request = renderer.render_stored(b"{}", device_id)
    assert request.url == general_url(renderer, {"device_id": device_id})


def test_stored_url_examples() -> None:
    renderer = Renderer(WebhookConfig(
        name="w", url="https://h.example/in/{device_id}?d={device_id}&s=1"), USER_AGENT)
    assert renderer.render_stored(b"{}", "a/b").url == "https://h.example/in/a%2Fb?d=a%2Fb&s=1"
    assert renderer.render_stored(b"{}", "..").url == "https://h.example/in/%2E%2E?d=%2E%2E&s=1"
    fixed = Renderer(WebhookConfig(name="w", url="https://h.example"), USER_AGENT)
    assert fixed.render_stored(b"{}", None).url == "https://h.example/"


def test_missing_device_id_is_refused_as_before() -> None:
    renderer = Renderer(WebhookConfig(name="w", url="https://h.example/{device_id}"),
                        USER_AGENT)
    with pytest.raises(RenderError, match=r"^the event has no value for \{device_id\}$"):
        renderer.render_stored(b"{}", None)


def test_other_placeholders_take_the_general_path() -> None:
    renderer = Renderer(WebhookConfig(
        name="w", url="https://h.example/{labels.site}/{device_id}"), USER_AGENT)
    assert renderer._url_pieces is None
    context = {"device_id": "d/1", "labels": {"site": "s 1"}}
    assert renderer.url(context) == "https://h.example/s%201/d%2F1"
    # A device id only in the labels (no top-level key) is still found there.
    assert Renderer(WebhookConfig(name="w", url="https://h.example/{device_id}"), USER_AGENT
                    ).url({"labels": {"device_id": "x"}}) == "https://h.example/x"


def test_literal_headers_are_cached_in_order_and_copied() -> None:
    renderer = Renderer(WebhookConfig(name="w", url="https://h.example/",
                                      headers={"X-A": "1", "X-B": "{{2}}"}), USER_AGENT)
    first = renderer.render_stored(b"{}", "d").headers
    assert list(first.items()) == [("Content-Type", "application/json"),
                                   ("User-Agent", USER_AGENT), ("X-A", "1"), ("X-B", "{2}")]
    first["X-A"] = "changed"
    assert renderer.render_stored(b"{}", "d").headers["X-A"] == "1"


def test_header_placeholders_and_refused_values_stay_per_message() -> None:
    renderer = Renderer(WebhookConfig(name="w", url="https://h.example/",
                                      headers={"X-Dev": "d={device_id}"}), USER_AGENT)
    assert renderer._fixed_headers is None
    assert renderer.render_stored(b"{}", "d1").headers["X-Dev"] == "d=d1"
    bad = Renderer(WebhookConfig(name="w", url="https://h.example/",
                                 headers={"X-Bad": "a\r\nb"}), USER_AGENT)
    for _ in range(2):
        with pytest.raises(RenderError, match="header X-Bad: the value contains CR"):
            bad.render_stored(b"{}", "d")
    assert compile_template("x").is_literal


class _Pool:
    def __init__(self, status: int, body: bytes = b"", **headers: str) -> None:
        response_headers = http1.Headers()
        for name, value in headers.items():
            response_headers.add(name.replace("_", "-"), value)
        self.response = http1.Response(status, "", "HTTP/1.1", response_headers)
        self.response.body = body
        self.sent: list[tuple[str, str, dict[str, str], bytes]] = []

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes
                      ) -> http1.Response:
        self.sent.append((method, url, headers, body))
        return self.response


def send(sender: Sender, pool: _Pool, msg_id: str = "evt_1") -> Outcome:
    sender.pool = pool  # type: ignore[assignment]
    renderer = Renderer(sender.webhook, USER_AGENT)
    coroutine = sender.send(renderer.render_stored(b'{"id":"evt_1"}', "d1"), msg_id)
    with pytest.raises(StopIteration) as stop:
        coroutine.send(None)
    return stop.value.value  # type: ignore[no-any-return]


def test_a_2xx_outcome_and_the_request_headers_in_order() -> None:
    sender = Sender(WebhookConfig(name="w", url="https://h.example/{device_id}",
                                  headers={"X-A": "1"},
                                  auth=AuthConfig(type="bearer", token="tok-12345")))
    pool = _Pool(204, Date="x")
    outcome = send(sender, pool)
    assert (outcome.kind, outcome.status, outcome.cause, outcome.retry_after,
            outcome.counts_as_failure, outcome.response) == ("delivered", 204, "", None,
                                                             False, "")
    assert outcome.headers is pool.response.headers
    assert 0 <= outcome.elapsed < 1
    method, url, headers, body = pool.sent[0]
    assert (method, url, body) == ("POST", "https://h.example/d1", b'{"id":"evt_1"}')
    assert list(headers) == ["Content-Type", "User-Agent", "X-A", "webhook-id",
                             "webhook-timestamp", "Authorization"]
    assert headers["webhook-id"] == "evt_1"
    assert headers["Authorization"] == "Bearer tok-12345"
    assert headers["webhook-timestamp"].isdigit()


def test_a_2xx_body_is_kept_and_redacted() -> None:
    logs.register_secrets(["echoed-secret-2xx"])
    sender = Sender(WebhookConfig(name="w", url="https://h.example/"))
    outcome = send(sender, _Pool(200, b"ok echoed-secret-2xx"))
    assert (outcome.kind, outcome.response) == ("delivered", "ok ***")


def test_a_failure_is_classified_and_redacted() -> None:
    logs.register_secrets(["echoed-secret-5xx"])
    sender = Sender(WebhookConfig(name="w", url="https://h.example/"))
    outcome = send(sender, _Pool(503, b"down echoed-secret-5xx", Retry_After="7",
                                 X_Echo="echoed-secret-5xx"))
    assert (outcome.kind, outcome.status, outcome.cause, outcome.retry_after,
            outcome.counts_as_failure, outcome.response) == ("retry", 503, "HTTP 503", 7.0,
                                                             True, "down ***")
    assert outcome.headers is not None and outcome.headers["X-Echo"] == "***"


def test_attempt_metrics_count_time_and_remember_each_attempt() -> None:
    metrics = Metrics()
    recorder = metrics.attempts("w")
    assert metrics.attempts("w") is recorder
    text = generate_latest(metrics.registry).decode()
    assert 'webhook="w"' not in text  # no series before the first attempt, as before
    recorder.record("evt_1", Outcome("delivered", 200, elapsed=0.02))
    recorder.record("bat_1", Outcome("retry", 503, "HTTP 503", elapsed=0.2), events=3)
    recorder.record("evt_2", Outcome("delivered", 200, elapsed=0.004))
    lines = generate_latest(metrics.registry).decode().splitlines()
    for line in ('webhook_bridge_delivery_attempts_total{outcome="delivered",webhook="w"} 2.0',
                 'webhook_bridge_delivery_attempts_total{outcome="retry",webhook="w"} 3.0',
                 'webhook_bridge_attempt_duration_seconds_count{webhook="w"} 3.0',
                 'webhook_bridge_attempt_duration_seconds_bucket{le="0.005",webhook="w"} 1.0',
                 'webhook_bridge_attempt_duration_seconds_bucket{le="0.025",webhook="w"} 2.0',
                 'webhook_bridge_attempt_duration_seconds_bucket{le="0.25",webhook="w"} 3.0'):
        assert line in lines, line
    kept = metrics.activity.attempts("w")
    assert [(a.event_id, a.events, a.outcome, a.status, a.latency_ms, a.cause)
            for a in kept] == [("evt_2", 1, "delivered", 200, 4, ""),
                               ("bat_1", 3, "retry", 503, 200, "HTTP 503"),
                               ("evt_1", 1, "delivered", 200, 20, "")]
    series = metrics.activity.series("w")[-1]
    assert (series["delivered"], series["retried"], series["failed"]) == (2, 3, 0)
    metrics.forget("w")
    assert metrics.attempts("w") is not recorder


def test_an_attempt_is_read_only() -> None:
    attempt = Attempt(1.0, "evt_1", 1, "delivered", 200, 3, "", None)
    with pytest.raises(AttributeError):
        attempt.status = 500  # type: ignore[misc]


@pytest.mark.parametrize("url", ["https://h.example/{labels.site}/{device_id}?t={type}&x=1",
                                 "https://h.example/a{payload.n}b?{payload.s}",
                                 "https://h.example:81/{payload.s}"])
def test_a_general_url_is_the_templates_url(url: str) -> None:
    renderer = Renderer(WebhookConfig(name="w", url=url), USER_AGENT)
    context = {"device_id": "d/1", "type": "alarm", "labels": {"site": "s 1"},
               "payload": {"n": 1.5, "s": "é?&"}}
    assert renderer.url(context) == general_url(renderer, context)
    # A value missing: the same error as the templates one by one.
    missing = {"device_id": "d", "type": "t", "labels": {}, "payload": {}}
    with pytest.raises(TemplateError) as error:
        renderer.url(missing)
    with pytest.raises(TemplateError, match=f"^{re.escape(str(error.value))}$"):
        general_url(renderer, missing)
    assert str(error.value).startswith("the event has no value for {")
