"""Issue 13 / SPEC §5: a message committed whose ack was lost to a crash is redelivered by
the broker (DUP); the bridge acknowledges the copy without queuing it again, so the
endpoint sees one delivery id. The crash is injected between the commit and the ack."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.request
from pathlib import Path

from bridge.store import Store

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    free_port,
    https_webhook,
    queued,
    started,
    wait_for,
)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_redelivery_after_a_crash_before_the_ack(tmp_path: Path, mosquitto: Mosquitto,
                                                        certs: Certificates) -> None:
    endpoint = await Endpoint(ssl_context=certs.server_context()).start()
    config = base_config(tmp_path, mosquitto, [https_webhook("hook", endpoint, certs)])
    admin = free_port()
    config["admin"] = {"listen": f"127.0.0.1:{admin}"}
    crashing = Daemon(tmp_path, config, env={"WEBHOOK_BRIDGE_TEST_CRASH_BEFORE_ACK": "1"})
    publisher = Publisher(mosquitto.port)
    daemon: Daemon | None = None
    try:
        await started(crashing.start())
        publisher.publish("devices/d1/telemetry", {"seq": 0}).wait_for_publish(10)
        await wait_for(lambda: crashing.proc.poll() is not None, 20, "the injected crash")
        assert crashing.proc.returncode == 70, crashing.output()
        crashing.log.close()
        assert queued(tmp_path) == 1  # committed, never acknowledged
        [first_mid] = _unacked(tmp_path)  # remembered in the same commit

        daemon = Daemon(tmp_path, config).start()
        await started(daemon)
        await wait_for(lambda: _metric(admin, "webhook_bridge_messages_redelivered_total")
                       == 1, 20, "the broker's redelivery")
        publisher.publish("devices/d1/telemetry", {"seq": 1}).wait_for_publish(10)
        await wait_for(lambda: len(endpoint.requests) >= 2, 20, "both deliveries")
        await wait_for(lambda: queued(tmp_path) == 0, 20, "the queue to empty")
        # The redelivered copy's ack went out, so its entry was forgotten in the next
        # commit (seq 1's); only seq 1's own entry waits for a later one.
        assert first_mid not in _unacked(tmp_path)
        assert len(_unacked(tmp_path)) == 1
    finally:
        if daemon is not None:
            assert daemon.terminate() == 0
        publisher.close()
        await endpoint.stop()
    bodies = [json.loads(r.body) for r in endpoint.requests]
    assert [b["payload"]["seq"] for b in bodies] == [0, 1]
    assert len({b["id"] for b in bodies}) == 2
    assert "Traceback" not in daemon.output()


def _unacked(tmp: Path) -> list[int]:
    with sqlite3.connect(tmp / "state" / "queue.db") as conn:
        return [r[0] for r in conn.execute("SELECT mid FROM unacked")]


async def test_redelivered_needs_same_packet_topic_and_digest(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "queue.db"))
    await store.start()
    try:
        await store.enqueue([], ack=(7, "a/b", b"d1"))
        assert store.redelivered(7, "a/b", b"d1")
        assert not store.redelivered(7, "a/c", b"d1")
        assert not store.redelivered(7, "a/b", b"d2")
        assert not store.redelivered(8, "a/b", b"d1")
        store.acked(7)
        assert not store.redelivered(7, "a/b", b"d1")
        await store.enqueue([], ack=(9, "a/b", b"d3"))
    finally:
        await store.close()
    reopened = Store(str(tmp_path / "queue.db"))  # entries survive a restart, acked ones not
    assert set(reopened.unacked) == {9}
    assert reopened.redelivered(9, "a/b", b"d3")
    assert not reopened.redelivered(9, "a/b", b"d1")
    reopened.new_session()
    assert reopened.unacked == {}
    await reopened.start()
    await reopened.enqueue([])
    await reopened.close()
    assert Store(str(tmp_path / "queue.db")).unacked == {}


def test_unacked_rows_are_small_and_old_rows_still_match(tmp_path: Path) -> None:
    """A row keeps an 8-byte key, not the topic (a commit's rows stay in one page); a row
    written by an older version (topic and 16-byte digest) still matches after an upgrade."""
    path = str(tmp_path / "queue.db")
    Store(path)  # creates the tables
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO unacked (mid, topic, digest) VALUES (5, 'old/topic', ?)",
                     (b"0123456789abcdef",))
    store = Store(path)
    assert store.redelivered(5, "old/topic", b"0123456789abcdef")
    assert not store.redelivered(5, "old/topic", b"0123456789abcdeX")

    async def remember() -> None:
        await store.start()
        await store.enqueue([], ack=(6, "a/long/topic/name/of/a/sensor", b"x" * 16))
        await store.close()

    asyncio.run(remember())
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT topic, length(digest) FROM unacked WHERE mid = 6").fetchone()
    assert row == ("", 8)
    assert Store(path).redelivered(6, "a/long/topic/name/of/a/sensor", b"x" * 16)
