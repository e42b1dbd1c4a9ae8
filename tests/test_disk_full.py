"""Issue 13: a full disk is a state, not an error storm. On a small tmpfs made by the
test: nothing is sent that was not committed, no delivery is resent for a failed
delivered mark, MQTT intake pauses (the connection stays) with one log line and a metric,
and everything resumes on its own when space returns, with nothing lost."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

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

FIRST, TOTAL = 100, 700
PAD = "x" * 2000  # big messages fill the disk quickly


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _publish(publisher: Publisher, seqs: range) -> None:
    infos = [publisher.publish("devices/d1/telemetry", {"seq": n, "pad": PAD})
             for n in seqs]
    for info in infos:
        info.wait_for_publish(30)


async def test_disk_full_pauses_intake_and_resumes(small_fs: Path, tmp_path: Path,
                                                   mosquitto: Mosquitto,
                                                   certs: Certificates) -> None:
    endpoint = await Endpoint(ssl_context=certs.server_context()).start()
    config = base_config(tmp_path, mosquitto, [https_webhook("hook", endpoint, certs)])
    admin = free_port()
    config["admin"] = {"listen": f"127.0.0.1:{admin}"}
    config["log"]["level"] = "debug"
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        await asyncio.to_thread(_publish, publisher, range(FIRST))
        await wait_for(lambda: len(endpoint.requests) >= FIRST, 20, "the first messages")

        assert "MQTT intake paused" not in daemon.output()
        filler = _fill(small_fs)
        await asyncio.to_thread(_publish, publisher, range(FIRST, TOTAL))
        await wait_for(lambda: "MQTT intake paused" in daemon.output(), 30, "intake to pause")
        assert _metric(admin, "webhook_bridge_intake_paused") == 1.0
        assert _metric(admin, "webhook_bridge_mqtt_connected") == 1.0
        sent_while_full = Counter(r.json()["id"] for r in endpoint.requests)
        assert max(sent_while_full.values()) == 1  # no resend of a failed delivered mark

        filler.unlink()
        await wait_for(lambda: "MQTT intake resumed" in daemon.output(), 30, "intake to resume")
        await wait_for(lambda: len(endpoint.requests) >= TOTAL, 60, "every message")
        await wait_for(lambda: _metric(admin, "webhook_bridge_queue_bytes") == 0, 20,
                       "the queue to empty")
    finally:
        code = daemon.terminate()
        publisher.close()
        await endpoint.stop()
    assert code == 0
    bodies = [r.json() for r in endpoint.requests]
    # Nothing that was not committed, nothing twice, nothing lost.
    assert len(bodies) == TOTAL
    assert sorted(b["payload"]["seq"] for b in bodies) == list(range(TOTAL))
    assert len({b["id"] for b in bodies}) == TOTAL
    log = daemon.output()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    paused = [x for x in lines if "MQTT intake paused" in x.get("event", "")]
    assert len(paused) == 1, paused
    assert _count(lines, "mqtt connection lost") == 0
    assert "Future exception was never retrieved" not in log
    assert "Traceback" not in log


def _count(lines: list[dict[str, object]], event: str) -> int:
    return sum(1 for x in lines if x.get("event") == event)
