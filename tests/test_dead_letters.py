"""Dead letters: the id the endpoint saw, the last error in `status`, `dead show` of an
unknown id, and the bound of store.dead_letters (age and size)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from bridge.config import DeadLettersConfig, load_config
from bridge.store import (
    ROW_OVERHEAD,
    NewDelivery,
    Store,
    connect,
    prune_dead_letters,
    webhook_rows,
)

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    https_webhook,
    run_cli,
    started,
    wait_for,
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(str(tmp_path / "queue.db"))
    await opened.start()
    yield opened
    await opened.close()


def event(n: int, size: int = 200) -> bytes:
    """An event of exactly ``size`` bytes."""
    base = len(json.dumps({"id": f"evt_{n}", "pad": ""}))
    return json.dumps({"id": f"evt_{n}", "pad": "x" * (size - base)}).encode()


async def kill(store: Store, webhook: str, count: int, start: int = 0, now: float = 1000.0,
               response: str | None = "nope", attempted: bool = True) -> list[int]:
    await store.enqueue([NewDelivery(webhook, f"evt_{start + n}", "d1", event(start + n))
                         for n in range(count)])
    ids = await store.read(lambda c: [r[0] for r in c.execute(
        "SELECT id FROM deliveries WHERE webhook = ? ORDER BY id", (webhook,))])
    await store.write(store.op_dead(webhook, ids, "HTTP 422", 422, response, now,
                                    attempted=attempted))
    return ids


def letters(conn: sqlite3.Connection) -> list[tuple[str, str, str | None, int]]:
    return conn.execute("SELECT webhook, event_id, batch_id, size FROM dead_letters"
                        " ORDER BY id").fetchall()


async def test_a_dead_letter_keeps_the_batch_id_the_endpoint_saw_and_its_size(
        store: Store) -> None:
    await store.enqueue([NewDelivery("a", f"evt_{n}", "d1", event(n)) for n in range(2)])
    ids = await store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM deliveries")])
    await store.write(store.op_assign_batches([(ids, "bat_1")]))
    await store.write(store.op_dead("a", ids, "HTTP 400", 400, "bad", 5.0))
    rows = await store.read(letters)
    assert rows == [("a", "evt_0", "bat_1", 200 + 3 + ROW_OVERHEAD),
                    ("a", "evt_1", "bat_1", 200 + 3 + ROW_OVERHEAD)]


async def test_status_shows_why_deliveries_died_even_unsent(store: Store) -> None:
    await kill(store, "a", 1)
    assert (await store.read(webhook_rows))["a"]["last_error"] == "dead letter: HTTP 422"
    # Too old: dead without an attempt (no failure counted, the reason still shown).
    await store.enqueue([NewDelivery("b", "evt_9", "d1", event(9))])
    ids = await store.read(lambda c: [r[0] for r in c.execute(
        "SELECT id FROM deliveries WHERE webhook = 'b'")])
    await store.write(store.op_dead("b", ids, "older than retry.max_age (7d)", None, None,
                                    5.0, attempted=False))
    row = (await store.read(webhook_rows))["b"]
    assert (row["last_error"], row["dead"], row["failed"]) == (
        "dead letter: older than retry.max_age (7d)", 1, 0)


async def test_prune_deletes_what_is_too_old_then_the_oldest_past_the_size(
        store: Store) -> None:
    await kill(store, "a", 3, start=0, now=100.0)  # old
    await kill(store, "b", 4, start=10, now=900.0)
    await kill(store, "a", 4, start=20, now=950.0)
    size = 200 + 4 + ROW_OVERHEAD  # event, "nope", overhead
    # Age: the three that died at 100 are past 500 s at 1000.
    pruned = await store.write(lambda c: prune_dead_letters(c, 500.0, 10**9, 1000.0))
    assert pruned == {"a": 3}
    # Size: room for 5 letters leaves the 5 newest (3 of b's 4 are older than a's).
    pruned = await store.write(lambda c: prune_dead_letters(c, 500.0, 5 * size + 10,
                                                            1000.0))
    assert pruned == {"b": 3}
    assert [r[1] for r in await store.read(letters)] == [
        "evt_13", "evt_20", "evt_21", "evt_22", "evt_23"]
    # Within the bound: nothing more goes.
    assert await store.write(lambda c: prune_dead_letters(c, 500.0, 5 * size, 1000.0)) == {}
    assert await store.write(lambda c: prune_dead_letters(c, 500.0, 5 * size - 1,
                                                          1000.0)) == {"b": 1}


def test_a_letter_written_before_the_size_column_counts_by_its_event(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "queue.db"))
    conn.execute("INSERT INTO dead_letters (webhook, event_id, event, created, died,"
                 " attempts, reason) VALUES ('a', 'evt_0', ?, 1, 1, 1, 'x')", (b"{}" * 50,))
    assert prune_dead_letters(conn, 10**9, 100 + ROW_OVERHEAD, 2.0) == {}
    assert prune_dead_letters(conn, 10**9, 99 + ROW_OVERHEAD, 2.0) == {"a": 1}
    conn.close()


def write_config(tmp: Path, store: dict[str, object] | None = None) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(tmp / "queue.db"), **(store or {})},
        "sources": [{"name": "t", "topic": "d/{device_id}", "format": "json"}],
        "webhooks": [{"name": "a", "url": "https://example.com/x"}],
    }))
    return path


def test_the_bound_is_configurable(tmp_path: Path) -> None:
    assert load_config(str(write_config(tmp_path))).store.dead_letters == DeadLettersConfig(
        max_age=30 * 86400.0, max_size=32 * 1024 * 1024)
    config = load_config(str(write_config(tmp_path, {"dead_letters": {
        "max_age": "2d", "max_size": "1MB"}})))
    assert config.store.dead_letters == DeadLettersConfig(2 * 86400.0, 1024 * 1024)
    done = run_cli("check", "-c", str(write_config(tmp_path, {"dead_letters": {
        "max_age": "soon", "max_sise": 5}})))
    assert done.returncode == 78
    assert "store.dead_letters.max_age" in done.stderr
    assert "store.dead_letters.max_sise" in done.stderr and "max_size" in done.stderr


async def test_dead_list_shows_the_webhook_id_and_show_refuses_an_unknown_id(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    store = Store(str(tmp_path / "queue.db"))
    await store.start()
    try:
        await kill(store, "a", 1)
        await store.enqueue([NewDelivery("a", "evt_7", "d1", event(7))])
        ids = await store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM deliveries")])
        await store.write(store.op_assign_batches([(ids, "bat_7")]))
        await store.write(store.op_dead("a", ids, "HTTP 400", 400, None, 6.0))
        letter_ids = await store.read(lambda c: [r[0] for r in c.execute(
            "SELECT id FROM dead_letters ORDER BY id")])
    finally:
        await store.close()
    listed = run_cli("dead", "list", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "WEBHOOK-ID (EVENT)" in lines[0]
    assert lines[1].split()[:3] == [str(letter_ids[0]), "a", "evt_0"]
    assert lines[2].split()[:3] == [str(letter_ids[1]), "a", "bat_7"]
    as_json = json.loads(run_cli("dead", "list", "--json", "-c", str(config)).stdout)
    assert [(d["event_id"], d["batch_id"], d["webhook_id"]) for d in as_json] == [
        ("evt_0", None, "evt_0"), ("evt_7", "bat_7", "bat_7")]
    unknown = run_cli("dead", "show", "999", "-c", str(config))
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == ("webhook-bridge: no dead letter with id 999; webhook-bridge "
                              "dead list shows them\n")
    shown = run_cli("dead", "show", str(letter_ids[1]), "-c", str(config))
    assert shown.returncode == 0
    assert json.loads(shown.stdout)[0]["webhook_id"] == "bat_7"


async def test_a_dead_endpoint_cannot_fill_the_disk(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates
) -> None:
    """The running daemon keeps the dead letters within store.dead_letters.max_size,
    deleting the oldest, counted in a metric-backed log line."""
    from aiohttp import web

    endpoint.responder = lambda r: web.Response(status=400, text="no")
    config = base_config(tmp_path, mosquitto, [https_webhook("a", endpoint, certs,
                                                             failure_limit=0,
                                                             concurrency=1)])
    config["store"]["dead_letters"] = {"max_size": "1KB"}
    daemon = Daemon(tmp_path, config).start()
    publisher = Publisher(mosquitto.port)
    db = tmp_path / "state" / "queue.db"

    def dead() -> list[tuple[int, int]]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT json_extract(event, '$.payload.seq'), size"
                                " FROM dead_letters ORDER BY id").fetchall()

    try:
        await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": n}) for n in range(8)])
        await wait_for(lambda: len(endpoint.requests) == 8, 10, "8 rejected deliveries")
        # The bound is checked every 10 s.
        await wait_for(lambda: dead() and sum(size for _, size in dead()) <= 1024, 15,
                       "the dead letters pruned to 1KB")
        kept = [seq for seq, _ in dead()]
        assert kept == list(range(8 - len(kept), 8)) and 0 < len(kept) < 8
        assert '"dead letters deleted to stay within store.dead_letters"' in daemon.output()
        assert daemon.terminate() == 0
    finally:
        publisher.close()
