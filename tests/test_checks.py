"""``check``'s warnings (placeholders no event can fill, a sample render per webhook) and
the log line and counter for invalid events that reach no webhook."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from bridge.checks import warnings
from bridge.config import load_config
from bridge.events import INVALID, Event
from bridge.ingest import UnroutedInvalid
from bridge.metrics import Metrics

from .support import (
    ROOT,
    Daemon,
    Mosquitto,
    Publisher,
    base_config,
    run_cli,
    started,
    wait_for,
)

SOURCE = {"name": "t", "topic": "plants/{site}/devices/{device_id}/t",
          "labels": {"fleet": "flt-1"}}


def _config(tmp: Path, webhook: dict[str, Any], sources: list[dict[str, Any]] | None = None
            ) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"store": {"path": str(tmp / "q.db")},
                                    "sources": sources or [SOURCE],
                                    "webhooks": [{"name": "w", **webhook}]}))
    return path


def _warnings(tmp: Path, webhook: dict[str, Any], **kw: Any) -> list[str]:
    return warnings(load_config(str(_config(tmp, webhook, **kw))))


def test_misspelt_placeholders_are_named_with_a_did_you_mean(tmp_path: Path) -> None:
    found = _warnings(tmp_path, {
        "url": "https://x.example.com/in/{devce_id}?site={labels.sit}",
        "headers": {"X-Fleet": "{fleat}", "X-Ok": "{labels.fleet} {site} {payload.t}"},
        "body": {"device": "{device_id}", "s": "{sitee}", "t": "{payload.a.b}"}})
    assert found == [
        "webhooks.w.url: placeholder {devce_id} can never be filled: it is not an event "
        "field (device_id, type, payload..., labels...) nor a topic capture or label of "
        "this webhook's sources; every delivery would fail and go to the dead letters; "
        "did you mean 'device_id'?",
        "webhooks.w.url: placeholder {labels.sit} can never be filled: no source of this "
        "webhook has a label or topic capture 'sit'; every delivery would fail and go to "
        "the dead letters; did you mean 'labels.site'?",
        "webhooks.w.headers.X-Fleet: placeholder {fleat} can never be filled: it is not an "
        "event field (device_id, type, payload..., labels...) nor a topic capture or label "
        "of this webhook's sources; every delivery would fail and go to the dead letters; "
        "did you mean 'fleet'?",
        "webhooks.w.body.s: placeholder {sitee} can never be filled: it is not an event "
        "field (device_id, type, payload..., labels...) nor a topic capture or label of "
        "this webhook's sources; every delivery would fail and go to the dead letters; "
        "did you mean 'site'?",
    ]


def test_labels_of_other_sources_do_not_count(tmp_path: Path) -> None:
    other = {"name": "other", "topic": "x/{room}/{device_id}"}
    found = _warnings(tmp_path, {"url": "https://x.example.com/{room}", "sources": ["t"]},
                      sources=[SOURCE, other])
    assert len(found) == 1 and found[0].startswith("webhooks.w.url: placeholder {room}")
    # Every source's events (no `sources`): {room} is filled for one source's events, the
    # other's fail; the sample render (of the first source's event) shows it.
    assert _warnings(tmp_path, {"url": "https://x.example.com/{room}"},
                     sources=[SOURCE, other]) == [
        "webhooks.w: the request does not render for a sample event (webhook-bridge test "
        "w --dry-run shows it): the event has no value for {room}"]
    assert _warnings(tmp_path, {"url": "https://x.example.com/{room}", "sources": ["other"]},
                     sources=[SOURCE, other]) == []


def test_every_shipped_example_is_clean() -> None:
    for path in sorted((ROOT / "config").glob("*.yaml")):
        assert warnings(load_config(str(path))) == [], path.name


def test_a_request_that_never_renders_is_shown(tmp_path: Path) -> None:
    # lwm2m exists only on lwm2m-emqx sources' events: on a json source it never renders.
    found = _warnings(tmp_path, {"url": "https://x.example.com/{lwm2m.path}"})
    assert found == ["webhooks.w: the request does not render for a sample event "
                     "(webhook-bridge test w --dry-run shows it): the event has no value "
                     "for {lwm2m.path}"]
    lwm2m = {"name": "t", "topic": "lwm2m/{device_id}/up/#", "format": "lwm2m-emqx"}
    assert _warnings(tmp_path, {"url": "https://x.example.com/{lwm2m.path}"},
                     sources=[lwm2m]) == []
    invalid = {"url": "https://x.example.com/bad", "events": ["invalid"],
               "body": {"error": "{decode_error}", "raw": "{payload_raw}"}}
    assert _warnings(tmp_path, invalid) == []


def test_check_prints_warnings_and_strict_fails(tmp_path: Path) -> None:
    path = _config(tmp_path, {"url": "https://x.example.com/in/{devce_id}"})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0
    assert result.stdout == f"{path}: ok (1 sources, 1 webhooks, 1 warning)\n"
    assert result.stderr.startswith(f"{path}: warning: webhooks.w.url: placeholder "
                                    "{devce_id} can never be filled")
    strict = run_cli("check", "--strict", "-c", str(path))
    assert strict.returncode == 78
    assert strict.stderr.splitlines()[-1] == "1 warning (--strict); nothing was started"


# -- invalid events no webhook takes ----------------------------------------------------------

def _invalid(source: str = "t") -> Event:
    return Event(type=INVALID, source=source, topic="plants/p/devices/d/t",
                 payload_raw=b"\xff", decode_error="payload is not JSON: ...")


def _count(metrics: Metrics, source: str) -> float:
    return metrics.registry.get_sample_value("webhook_bridge_invalid_unrouted_events_total",
                                             {"source": source}) or 0.0


def test_unrouted_invalid_events_are_counted_and_logged_once_a_minute(
        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    reporter = UnroutedInvalid(metrics)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    with capture_logs() as logs:
        for _ in range(5):
            reporter.add(_invalid())
        reporter.add(_invalid("other"))
        now[0] += 59.0
        reporter.add(_invalid())
        now[0] += 1.0
        reporter.add(_invalid())
    assert _count(metrics, "t") == 7 and _count(metrics, "other") == 1
    assert [(entry["source"], entry["count"]) for entry in logs] == [
        ("t", 1), ("other", 1), ("t", 6)]
    assert logs[0]["event"] == "invalid events reached no webhook"
    assert logs[0]["decode_error"] == "payload is not JSON: ..."
    assert logs[0]["log_level"] == "warning"


async def test_daemon_logs_an_invalid_event_no_webhook_takes(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = base_config(tmp_path, mosquitto, [
        {"name": "w", "url": "http://127.0.0.1:9/x", "allow_insecure_http": True}])
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", b"not json")] * 3)
        line = await wait_for(lambda: next(
            (json.loads(x) for x in daemon.output().splitlines()
             if "invalid events reached no webhook" in x), None), 10, "the log line")
        assert line["source"] == "telemetry" and line["count"] == 1
        assert line["topic"] == "devices/d1/telemetry"
        assert daemon.terminate() == 0
        assert daemon.output().count("invalid events reached no webhook") == 1
    finally:
        publisher.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
