"""Hostile device input through a real Mosquitto into the real daemon (SPEC §8).

One device sends what breaks parsers (a 6,000-digit integer, 5,000 nested brackets, a
lone surrogate, NaN, invalid UTF-8, a SenML pack that expands to hundreds of megabytes,
a 16 MB message, 3,000 self-chosen event types, hypothesis-fuzzed payloads) while a
healthy device publishes. Every healthy message must arrive, every hostile one must be
accounted for exactly once (an event or an ``invalid`` event), the daemon's peak RSS must
stay bounded, its single MQTT connection must never drop, and /metrics must stay small.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    free_port,
    https_webhook,
    started,
    wait_for,
)

HEALTHY = 300
PEAK_RSS_LIMIT = 150 * 1024 * 1024  # SPEC §8, with a 16 MB message
METRICS_LIMIT = 40_000  # bytes of /metrics after 3,000 device-chosen types

SOURCES = [
    {"name": "json", "topic": "devices/{device_id}/json/{n}", "format": "json",
     "type": "{payload.kind}"},
    {"name": "senml", "topic": "devices/{device_id}/senml/{n}", "format": "senml"},
    {"name": "cbor", "topic": "devices/{device_id}/cbor/{n}", "format": "senml-cbor"},
    {"name": "text", "topic": "devices/{device_id}/text/{n}", "format": "text"},
]


def fuzzed(count: int) -> list[bytes]:
    """``count`` payloads drawn by hypothesis: bytes, text, and JSON-ish documents."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
    payloads = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps({"kind": "k", "v": v}).encode()))
    drawn: list[bytes] = []

    @settings(max_examples=count, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payloads)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn[:count]


def hostile_messages() -> list[tuple[str, bytes]]:
    """(format, payload) of every hostile message, in publishing order."""
    huge_pack = json.dumps([{"bn": "x" * 100_000, "n": "a", "v": 1}]
                           + [{"n": f"r{i}", "v": i} for i in range(2000)]).encode()
    cbor_pack = cbor2.dumps([{-2: "y" * 100_000, 0: "a", 2: 1}]
                            + [{0: f"r{i}", 2: i} for i in range(2000)])
    cases: list[tuple[str, bytes]] = [
        ("json", b'{"kind": "k", "v": ' + b"9" * 6000 + b"}"),
        ("json", b"[" * 5000),
        ("json", b'{"kind": "k", "s": "\\ud800"}'),
        ("json", b'{"kind": "k", "v": NaN}'),
        ("json", b'{"kind": "k", "s": "\xff\xfe"}'),
        ("text", b"\xed\xa0\x80"),  # a surrogate encoded as UTF-8: not UTF-8
        ("senml", huge_pack),
        ("cbor", cbor_pack),
        ("senml", b"[" * 5000),
        ("cbor", b"\x81" * 5000 + b"\x00"),
        ("json", b'{"kind": "k", "big": "' + b"a" * (16 * 1024 * 1024) + b'"}'),
    ]
    cases += [("json", b'{"kind": "type-%d"}' % i) for i in range(3000)]
    formats = ["json", "senml", "cbor", "text"]
    cases += [(formats[i % 4], p) for i, p in enumerate(fuzzed(40))]
    return cases


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


async def test_hostile_device_never_stops_the_healthy_one(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates
) -> None:
    admin_port = free_port()
    config = base_config(tmp_path, mosquitto, [https_webhook(
        "all", endpoint, certs, events=["*", "invalid"], batch={"max_events": 500,
                                                                  "max_wait": "200ms"})],
        sources=SOURCES)
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    daemon = await started(Daemon(tmp_path, config).start())
    hostile = hostile_messages()
    publisher = Publisher(mosquitto.port, "hostile")
    healthy = Publisher(mosquitto.port, "healthy")
    try:
        def publish_healthy() -> None:
            infos = [healthy.publish(f"devices/good/json/{n}", {"kind": "telemetry", "seq": n})
                     for n in range(HEALTHY)]
            for info in infos:
                info.wait_for_publish(60)

        thread = threading.Thread(target=publish_healthy)
        thread.start()
        await publisher.publish_all(
            [(f"devices/evil/{fmt}/{n}", payload) for n, (fmt, payload) in enumerate(hostile)])
        await asyncio.to_thread(thread.join, 60)

        def items() -> list[dict[str, Any]]:
            return [i for r in endpoint.requests for i in r.json()["result"]
                    if i["type"] != "device.created"]

        total = HEALTHY + len(hostile)
        await wait_for(lambda: len(items()) >= total, 120,
                       f"{total} events at the endpoint")
        got = items()
        good = [i for i in got if i["device_id"] == "good"]
        evil = [i for i in got if i["device_id"] == "evil"]
        assert sorted(i["payload"]["seq"] for i in good) == list(range(HEALTHY))
        assert sorted(int(i["labels"]["n"]) for i in evil) == list(range(len(hostile)))

        by_n = {int(i["labels"]["n"]): i for i in evil}
        expected_errors = {
            0: "more than the 1000 allowed (JSON_MAX_INT_DIGITS)",
            1: "nested deeper than 1024 levels (JSON_MAX_DEPTH)",
            2: "no low surrogate",
            3: "NaN is not a JSON number",
            4: "not valid UTF-8",
            5: "not UTF-8 text",
            6: "longer than 1024 characters (SENML_MAX_NAME)",
            7: "longer than 1024 characters (SENML_MAX_NAME)",
            8: "nested deeper than 1024 levels (JSON_MAX_DEPTH)",
            9: "not valid CBOR",
            10: "over mqtt.max_payload",
        }
        for n, error in expected_errors.items():
            assert by_n[n]["type"] == "invalid", by_n[n]
            assert error in by_n[n]["decode_error"], by_n[n]["decode_error"]
        assert by_n[10]["payload_size"] == len(hostile[10][1])
        assert "payload_raw" not in by_n[10]
        assert {by_n[11 + i]["type"] for i in range(3000)} == {f"type-{i}" for i in range(3000)}

        # The one connection held throughout; memory and metrics stayed bounded.
        assert daemon.output().count('"mqtt connected"') == 1, daemon.output()[-3000:]
        assert "mqtt connection lost" not in daemon.output()
        rss = peak_rss(daemon.proc.pid)
        assert rss < PEAK_RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MB"
        metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin_port}/metrics")
        assert len(metrics) < METRICS_LIMIT, len(metrics)
        text = metrics.decode()
        assert "webhook_bridge_mqtt_connects_total 1.0" in text
        assert "webhook_bridge_oversized_messages_total 1.0" in text
        assert 'type="other"' in text
        assert f"webhook_bridge_messages_accepted_total {float(total)}" in text
    finally:
        publisher.close()
        healthy.close()
        assert daemon.terminate() == 0
