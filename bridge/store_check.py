"""Owns the store's integrity at open: damaged, emptied or missing queue files.

Before the queue database is opened for use, :func:`check` looks for damage: a file that
is not a SQLite database (the 100-byte header), a schema without the queue's tables, pages
that ``PRAGMA quick_check`` finds broken (bounded in time: a check that does not finish
within its bound is skipped with a warning, so a large store on a slow card still starts).
It also tells a store that never existed from one that was lost: once a store has been
opened, a marker file beside it (``.<name>.created``) remembers that it existed, so a
store that is now zero bytes or missing, or a ``-wal`` left without its database, is
damage too and never silently replaced by an empty queue.

What damage does depends on ``store.on_damage``: ``fail`` (default) raises
:class:`StoreDamaged` (one line, exit 1); ``move_aside`` renames the files to
``<name>.damaged-<UTC time>`` (and ``...-wal``, so SQLite can still open the pair for
forensics) and returns a note, which the caller records in the fresh store's ``meta`` for
``status`` and the metrics while the moved-aside file is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from enum import StrEnum

import structlog

from .store import StoreError

log = structlog.get_logger("bridge.store")

HEADER = b"SQLite format 3\x00"
QUICK_CHECK_SECONDS = 5.0  # the time bound of PRAGMA quick_check at start
REQUIRED_TABLES = ("deliveries", "dead_letters", "webhooks", "meta")
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


class OnDamage(StrEnum):
    FAIL = "fail"
    MOVE_ASIDE = "move_aside"


class StoreDamaged(StoreError):
    """The queue database is damaged, emptied or missing (reported as one line)."""


def marker_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.created")


def mark(path: str) -> None:
    """Remember that the store at ``path`` exists (call after it opened fine)."""
    marker = marker_path(path)
    if os.path.exists(marker):
        return
    # A read-only state dir only loses the warning.
    with contextlib.suppress(OSError), open(marker, "w", encoding="utf-8") as f:
        f.write(f"the queue {os.path.basename(path)} was created here; if it is ever "
                "missing or empty, webhook-bridge reports it instead of starting empty\n")


def find_damage(path: str, bound: float = QUICK_CHECK_SECONDS) -> str | None:
    """What is wrong with the store at ``path``, or None when it is sound or new."""
    existed = os.path.exists(marker_path(path))
    wal = path + "-wal"
    if not os.path.exists(path):
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            return f"{wal} exists without its database {path} (the queue was lost)"
        if existed:
            return f"{path} is missing, but a queue existed here"
        return None
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise StoreError(f"cannot read the queue database {path}: {exc.strerror or exc}"
                         ) from exc
    if not header:
        return f"{path} is empty (0 bytes), but a queue existed here" if existed else None
    if len(header) < 100 or not header.startswith(HEADER):
        return f"{path} is not a SQLite database (its header is damaged)"
    return _check_contents(path, bound)


def _check_contents(path: str, bound: float) -> str | None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            return f"{path} lacks the queue's tables ({', '.join(missing)})"
        # quick_check runs as one VDBE step (a progress handler is not called inside it),
        # so the bound is an interrupt from a timer thread.
        timer = threading.Timer(bound, conn.interrupt)
        timer.start()
        try:
            problems = [" ".join(line.strip() for line in r[0].splitlines() if line.strip())
                        for r in conn.execute("PRAGMA quick_check(3)")]
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            log.warning("store check skipped: quick_check did not finish in time",
                        path=path, bound_s=bound)
            return None
        finally:
            timer.cancel()
        if problems != ["ok"]:
            return f"{path} is damaged (quick_check: {'; '.join(problems)[:200]})"
        return None
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES or type(
                exc) is sqlite3.DatabaseError:
            return f"{path} is damaged ({exc})"
        raise StoreError(f"cannot read the queue database {path}: {exc}") from exc
    finally:
        conn.close()


def check(path: str, on_damage: OnDamage = OnDamage.FAIL,
          bound: float = QUICK_CHECK_SECONDS) -> str | None:
    """Check the store before use. Damage raises :class:`StoreDamaged` with ``fail``;
    with ``move_aside`` the files are moved aside and a note (JSON) is returned, to be
    recorded with :func:`record` in the fresh store."""
    damage = find_damage(path, bound)
    if damage is None:
        return None
    fix = ("restore it from a backup, or set store.on_damage: move_aside to keep the "
           "damaged file aside and start an empty queue")
    if on_damage == OnDamage.FAIL:
        raise StoreDamaged(f"queue database damaged: {damage}; {fix}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.damaged-{stamp}"
    moved = []
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            try:
                os.replace(path + suffix, aside + suffix)
            except OSError as exc:
                raise StoreDamaged(f"queue database damaged: {damage}; and it cannot be "
                                   f"moved aside: {exc.strerror or exc}") from exc
            moved.append(aside + suffix)
    log.error("queue database damaged: moved aside, starting an empty queue",
              damage=damage, moved_to=moved or None,
              fix="deliveries queued in the damaged file are not sent; inspect or delete it")
    return json.dumps({"at": time.time(), "damage": damage, "moved_to": aside})


def record(path: str, note: str) -> None:
    """Keep ``note`` (from :func:`check`) in the fresh store at ``path`` (its schema made)
    for status and metrics."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('damage', ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = excluded.value", (note,))


def recorded(conn: sqlite3.Connection) -> dict[str, object] | None:
    """The damage note while the moved-aside file is still there (deleting it clears the
    note: the operator has dealt with it)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'damage'").fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    with contextlib.suppress(ValueError, TypeError):
        note = json.loads(row[0])
        if os.path.exists(str(note.get("moved_to"))):
            return note
    return None
