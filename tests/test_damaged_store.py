"""Issue 13: a damaged, emptied or missing queue database is reported (one line, exit 1)
or, with store.on_damage: move_aside, moved aside and shown in status and metrics; never
a traceback, never an empty queue started silently in place of a lost one."""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import store_check
from bridge.store import connect

from .support import Daemon, Mosquitto, base_config, free_port, run_cli, started, wait_for

ROWS = 400


def _config(tmp: Path, **store: Any) -> Path:
    config = {
        "mqtt": {"host": "127.0.0.1", "port": 1, "client_id": "wb-damage"},
        "store": {"path": str(tmp / "state" / "queue.db"), **store},
        "admin": {"listen": None},
        "log": {"format": "json"},
        "sources": [{"name": "t", "topic": "devices/{device_id}/telemetry"}],
        "webhooks": [{"name": "hook", "url": "https://127.0.0.1:9/x"}],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _populated(tmp: Path) -> Path:
    """A store of ROWS queued deliveries (many pages), closed (WAL checkpointed), marked
    as existing the way the daemon marks it."""
    path = tmp / "state" / "queue.db"
    conn = connect(str(path))
    event = json.dumps({"payload": "x" * 300}).encode()
    conn.executemany("INSERT INTO deliveries (webhook, event_id, event, size, created, due)"
                     " VALUES ('hook', ?, ?, 400, 1.0, 1.0)",
                     [(f"evt_{i}", event) for i in range(ROWS)])
    conn.close()
    store_check.mark(str(path))
    assert not Path(str(path) + "-wal").exists()
    return path


def _zero_pages(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:  # pages 3 to 10 (4096 bytes each): deliveries' b-tree
        f.seek(2 * 4096)
        f.write(b"\0" * 8 * 4096)
    assert path.stat().st_size == size


def _garbage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(os.urandom(100))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _missing(path: Path) -> None:
    path.unlink()


def _wal_only(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("DELETE FROM deliveries WHERE id < 10")  # lands in the -wal
    wal = Path(str(path) + "-wal").read_bytes()
    conn.close()
    path.unlink()
    Path(str(path) + "-wal").write_bytes(wal)
    Path(str(path) + "-shm").unlink(missing_ok=True)


CASES = {
    "zeroed_pages": (_zero_pages, "is damaged"),
    "garbage_header": (_garbage_header, "is not a SQLite database"),
    "empty": (_empty, "is empty (0 bytes), but a queue existed here"),
    "missing": (_missing, "is missing, but a queue existed here"),
    "wal_without_database": (_wal_only, "-wal exists without its database"),
}


def _assert_one_line(result: Any, expected: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    if line.startswith("{"):  # `run` logs JSON (log.format: json): one critical line
        record = json.loads(line)
        assert record["level"] == "critical"
        line = "webhook-bridge: " + record["event"]
    assert line.startswith("webhook-bridge: queue database damaged: ")
    assert expected in line
    assert "store.on_damage: move_aside" in line


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_fails_run_and_status_with_one_line(tmp_path: Path, case: str) -> None:
    damage, expected = CASES[case]
    path = _populated(tmp_path)
    damage(path)
    before = sorted(os.listdir(path.parent))
    config = _config(tmp_path)
    for command in ("status", "run"):
        _assert_one_line(run_cli(command, "-c", str(config), timeout=60), expected)
    # Nothing was replaced: the damaged files are exactly as they were.
    assert sorted(os.listdir(path.parent)) == before


def test_a_new_store_is_not_damage(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = run_cli("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert Path(store_check.marker_path(str(tmp_path / "state" / "queue.db"))).exists()
    # An empty file where no store ever was is a new store too (no marker: nothing lost).
    other = tmp_path / "other" / "queue.db"
    other.parent.mkdir()
    other.write_bytes(b"")
    assert store_check.find_damage(str(other)) is None


async def test_move_aside_starts_fresh_and_reports(tmp_path: Path, mosquitto: Mosquitto
                                                   ) -> None:
    path = _populated(tmp_path)
    _zero_pages(path)
    damaged = path.read_bytes()
    config = base_config(tmp_path, mosquitto, [{"name": "hook", "url": "https://127.0.0.1:9/x"}])
    config["store"]["on_damage"] = "move_aside"
    port = free_port()
    config["admin"] = {"listen": f"127.0.0.1:{port}"}
    daemon = Daemon(tmp_path, config).start()
    try:
        await started(daemon)
        aside = [n for n in os.listdir(path.parent) if n.startswith("queue.db.damaged-")]
        assert len(aside) == 1, os.listdir(path.parent)
        assert (path.parent / aside[0]).read_bytes() == damaged
        errors = [json.loads(line) for line in daemon.output().splitlines()
                  if 'moved aside, starting an empty queue' in line]
        assert len(errors) == 1 and errors[0]["level"] == "error"
        assert "Traceback" not in daemon.output()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "webhook_bridge_store_damaged 1.0" in metrics
        status = daemon.cli("status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("STORE DAMAGED at ")
        assert aside[0] in status.stdout
        report = json.loads(daemon.cli("status", "--json").stdout)
        assert report["store"]["damage"]["moved_to"] == str(path.parent / aside[0])
        # Deleting the moved-aside file is the operator's "dealt with it".
        (path.parent / aside[0]).unlink()
        await wait_for(lambda: "STORE DAMAGED" not in daemon.cli("status").stdout, 10,
                       "the note to clear")
    finally:
        assert daemon.terminate() == 0
