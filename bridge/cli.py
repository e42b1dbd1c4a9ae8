"""Commands (SPEC §6) and exit codes: 0 ok, 1 fatal, 78 configuration error.

Owns argument parsing and what each command prints. Commands that read or change state
open the store directly, so they work whether or not the daemon runs; the daemon picks
their changes up within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import structlog

from . import __version__, logs, store_check, wear
from .config import (
    EX_CONFIG,
    Config,
    ConfigError,
    default_config_path,
    load_config,
    parse_duration,
)
from .errors import StartError
from .events import iso_now
from .registry import deleted_event, encode, get_device, list_devices
from .rules import RuleSet
from .store import (
    DISABLED,
    ENABLED,
    ROW_OVERHEAD,
    StoreError,
    bump_generation,
    connect,
    dead_list,
    dead_purge,
    dead_replay,
    read_failed_change,
    set_state,
    transaction,
    webhook_rows,
)

EX_OK, EX_FAIL = 0, 1
CLI_CHECK_SECONDS = 1.0  # quick_check bound for commands (the daemon's is longer)


class Fatal(Exception):
    """A fatal error reported as one clear line and exit 1."""


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config or default_config_path())
    # Rows stored by an older version (or before a secret was configured) may hold a
    # secret an endpoint echoed: what is shown is redacted again.
    logs.register_secrets(logs.config_secrets(config))
    return config


def _redacted(text: str | None) -> str | None:
    return logs.redact(text) if text else text


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:  # `run` too: a key may be "\e]0;..." in quotes
        print(logs.printable(problem), file=sys.stderr)
    count = len(error.problems)
    print(f"{count} configuration problem{'s' if count != 1 else ''}; nothing was started",
          file=sys.stderr)


# -- commands --------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from .checks import warnings

    config = _load(args)
    found = warnings(config)
    for warning in found:
        print(f"{config.path}: warning: {warning}", file=sys.stderr)
    if found and args.strict:
        print(f"{len(found)} warning{'s' if len(found) != 1 else ''} (--strict); nothing "
              "was started", file=sys.stderr)
        return EX_CONFIG
    note = f", {len(found)} warning{'s' if len(found) != 1 else ''}" if found else ""
    print(f"{config.path}: ok ({len(config.sources)} sources, "
          f"{len(config.webhooks)} webhooks{note})")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run

    config = _load(args)
    logs.setup(config.log.format, args.log_level or config.log.level)
    logs.register_secrets(logs.config_secrets(config))
    return asyncio.run(run(config))


def _open_store(config: Config) -> sqlite3.Connection:
    # A command never moves a damaged store aside (only `run` does, with
    # store.on_damage: move_aside): it reports the damage and exits 1.
    store_check.check(config.store.path, bound=CLI_CHECK_SECONDS)
    conn = connect(config.store.path, config.store.durability)
    store_check.mark(config.store.path)
    return conn


def _webhook_names(config: Config, conn: sqlite3.Connection) -> list[str]:
    names = [w.name for w in config.webhooks]
    names += sorted(set(webhook_rows(conn)) - set(names))
    return names


def status_rows(config: Config, conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = webhook_rows(conn)
    result = []
    for name in _webhook_names(config, conn):
        row = rows.get(name, {})
        webhook = config.webhook(name)
        state = row.get("state", ENABLED)
        if webhook is not None and not webhook.enabled:
            state = DISABLED
        result.append({
            "name": name,
            "configured": webhook is not None,
            "state": state,
            "queued": row.get("queued", 0),
            "in_flight": row.get("in_flight", 0),
            "delivered": row.get("delivered", 0),
            "failed": row.get("failed", 0),
            "dead": row.get("dead_letters", 0),
            "dropped": row.get("dropped", 0),
            "attempts": row.get("attempts", 0),
            "consecutive_failures": row.get("consecutive_failures", 0),
            "last_triggered": _ms(row.get("last_triggered")),
            "last_error": _redacted(row.get("last_error")),
        })
    return result


def _ms(ts: float | None) -> int | None:
    return int(ts * 1000) if ts is not None else None


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError:
        # A running daemon keeps its previous configuration meanwhile (/readyz says so).
        print("CHANGE NOT APPLIED: the configuration on disk does not load; a running "
              "daemon keeps the previous one. Fix these problems:", file=sys.stderr)
        raise
    conn = _open_store(config)
    try:
        rows = status_rows(config, conn)
        damage = store_check.recorded(conn)
        writes = wear.recorded(conn)
        failed = read_failed_change(conn)
    finally:
        conn.close()
    if args.json:
        print(json.dumps({"webhooks": rows, "store": {"damage": damage, "writes": writes},
                          "failed_change": failed}, indent=2))
        return EX_OK
    if failed is not None:
        print(f"CHANGE NOT APPLIED at {_iso(failed['at'] / 1000)} ({failed['change']}): "
              f"{'; '.join(failed['problems'])}; still running the previous configuration")
    if writes is not None:
        print(f"disk writes: {writes['bytes_per_s'] / 1024:.1f} KB/s, about "
              f"{writes['gb_per_day']:.2f} GB/day at this rate (see README: SD cards and "
              "flash wear)")
    if damage is not None:
        print(f"STORE DAMAGED at {_iso(float(damage['at']))}: {damage['damage']}; moved aside "
              f"to {damage['moved_to']} (deliveries queued there were not sent; delete it "
              "once dealt with)")
    print("\n".join(status_table(rows, wide=args.wide, now=time.time())))
    return EX_OK


STATUS_WIDTH = 100  # the default table fits a 100-column terminal; --wide shows it all
_COLUMNS = (("QUEUED", "queued", 7), ("FLIGHT", "in_flight", 6), ("DELIVERED", "delivered", 9),
            ("FAILED", "failed", 6), ("DEAD", "dead", 5), ("ATTEMPTS", "attempts", 8),
            ("FAILS", "consecutive_failures", 5))


def _ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at a word boundary, with an ellipsis."""
    text = " ".join(text.split())  # an error's newlines and runs of spaces: one line
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    space = cut.rfind(" ")
    if space > width // 2:  # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def _ago(ms: int | None, now: float) -> str:
    if ms is None:
        return "-"
    seconds = max(now - ms / 1000, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def status_table(rows: list[dict[str, Any]], wide: bool, now: float) -> list[str]:
    """``status``'s table: one line per webhook within 100 columns, its last error on an
    indented line below (cut with an ellipsis); ``wide``: everything on one line."""
    name_width = max([7, *(len(r["name"]) for r in rows)]) if wide else 18
    numbers = " ".join(f"{title:>{width}}" for title, _, width in _COLUMNS)
    if wide:
        lines = [f"{'WEBHOOK':{name_width}} {'STATE':22} {numbers} {'DROPPED':>7} "
                 f"{'LAST TRIGGERED':24}  LAST ERROR"]
    else:
        lines = [f"{'WEBHOOK':18} {'STATE':22} {numbers} {'LAST':>5}"]
    for r in rows:
        values = " ".join(f"{r[key]:>{width}}" for _, key, width in _COLUMNS)
        if wide:
            last = _iso(r["last_triggered"] / 1000) if r["last_triggered"] else "-"
            lines.append(f"{r['name']:{name_width}} {r['state']:22} {values} "
                         f"{r['dropped']:>7} {last:24}  {r['last_error'] or '-'}")
            continue
        lines.append(f"{_ellipsis(r['name'], 18):18} {r['state']:22} {values} "
                     f"{_ago(r['last_triggered'], now):>5}")
        if r["last_error"]:
            prefix = "  last error: "
            lines.append(prefix + _ellipsis(r["last_error"], STATUS_WIDTH - len(prefix)))
    return lines


def _set_state(args: argparse.Namespace, state: str) -> int:
    config = _load(args)
    if config.webhook(args.name) is None:
        raise Fatal(f"no webhook named {args.name!r} in {config.path}")
    conn = _open_store(config)
    try:
        set_state(conn, args.name, state)
    finally:
        conn.close()
    print(f"{args.name}: {state}")
    return EX_OK


def cmd_enable(args: argparse.Namespace) -> int:
    return _set_state(args, ENABLED)


def cmd_disable(args: argparse.Namespace) -> int:
    return _set_state(args, DISABLED)


def _since(text: str | None) -> float | None:
    """``--since``: a duration ago (``2h``, ``7d``) or an ISO 8601 time."""
    if text is None:
        return None
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Fatal(f"--since {text!r}: give a duration such as 2h or 7d, or an ISO time "
                    "such as 2026-11-22T10:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _iso(ts: float | None) -> str | None:
    return iso_now(ts) if ts is not None else None


def cmd_dead(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.webhook is not None and config.webhook(args.webhook) is None:
        print(f"note: {args.webhook!r} is not in {config.path} (listing stored rows anyway)",
              file=sys.stderr)
    conn = _open_store(config)
    try:
        since = _since(args.since)
        ids = [int(i) for i in args.ids] if args.ids else None
        if args.action in ("list", "show"):
            rows = dead_list(conn, args.webhook, since, ids, with_event=args.action == "show")
            missing = sorted(set(ids or ()) - {r["id"] for r in rows})
            if args.action == "show" and missing:
                raise Fatal(f"no dead letter with id {', '.join(map(str, missing))}"
                            + (f" for webhook {args.webhook!r}" if args.webhook else "")
                            + "; webhook-bridge dead list shows them")
            _print_dead(rows, args.action, args.json)
        elif args.action == "replay":
            count = dead_replay(conn, args.webhook, since, ids)
            print(f"re-queued {count} dead letter{'s' if count != 1 else ''}")
        else:
            if not (args.webhook or since or ids or args.all):
                raise Fatal("purge deletes dead letters for good: name --webhook, --since, "
                            "ids, or --all")
            count = dead_purge(conn, args.webhook, since, ids)
            print(f"purged {count} dead letter{'s' if count != 1 else ''}")
    finally:
        conn.close()
    return EX_OK


def _print_dead(rows: list[dict[str, Any]], action: str, as_json: bool) -> None:
    for row in rows:
        # The id the endpoint saw in webhook-id: the batch's when it went in a batch.
        row["webhook_id"] = row["batch_id"] or row["event_id"]
        row["created"], row["died"] = _iso(row["created"]), _iso(row["died"])
        row["reason"], row["response"] = _redacted(row["reason"]), _redacted(row["response"])
        if "event" in row:
            row["event"] = json.loads(row["event"])
    if as_json or action == "show":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print(f"{'ID':>6} {'WEBHOOK':16} {'WEBHOOK-ID (EVENT)':30} {'DIED':24} {'TRIES':>5} "
          f"{'STATUS':>6}  REASON / RESPONSE")
    for r in rows:
        response = (r["response"] or "").replace("\n", " ")[:40]
        print(f"{r['id']:>6} {r['webhook'][:16]:16} {r['webhook_id']:30} {r['died']:24} "
              f"{r['attempts']:>5} {r['last_status'] or '-':>6}  {r['reason']}"
              + (f" / {response}" if response else ""))
    print(f"{len(rows)} dead letter{'s' if len(rows) != 1 else ''}")


def cmd_devices(args: argparse.Namespace) -> int:
    """``devices list|show ID|delete ID``; delete yields ``device.deleted``."""
    config = _load(args)
    conn = _open_store(config)
    try:
        if args.action == "list":
            rows = list_devices(conn)
            if args.json:
                print(json.dumps(rows, indent=2))
                return EX_OK
            print(f"{'DEVICE':32} {'SOURCE':16} {'FIRST SEEN':24} {'LWM2M':12}")
            for r in rows:
                lwm2m = ("registered" if r["registered"] else
                         "deregistered" if r["ever_registered"] else "-")
                print(f"{r['id'][:32]:32} {(r['source'] or '-')[:16]:16} "
                      f"{_iso(r['first_seen']):24} {lwm2m:12}")
            print(f"{len(rows)} device{'s' if len(rows) != 1 else ''}")
            return EX_OK
        if not args.id:
            raise Fatal(f"devices {args.action} needs a device ID")
        device = get_device(conn, args.id)
        if device is None:
            raise Fatal(f"no device {args.id!r} in the registry "
                        "(webhook-bridge devices list shows them)")
        if args.action == "show":
            print(json.dumps(device, indent=2))
            return EX_OK
        count = _delete_device(config, conn, device)
        print(f"deleted {args.id}; device.deleted queued for {count} webhook"
              f"{'s' if count != 1 else ''}")
    finally:
        conn.close()
    return EX_OK


def _delete_device(config: Config, conn: sqlite3.Connection, device: dict[str, Any]) -> int:
    """Remove the device and queue its ``device.deleted`` event in one transaction (the
    running daemon picks the deliveries up within a second)."""
    event = deleted_event(device)
    names = RuleSet(tuple(w for w in config.webhooks if w.enabled)).match(event)
    body = encode(event)
    now = time.time()
    with transaction(conn):
        conn.executemany(
            "INSERT INTO deliveries (webhook, event_id, device_id, event, size, created, due)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(n, event.id, event.device_id, body, len(body) + ROW_OVERHEAD, now, now)
             for n in names])
        conn.execute("DELETE FROM devices WHERE id = ?", (device["id"],))
        conn.execute("DELETE FROM firmware WHERE device = ?", (device["id"],))
        bump_generation(conn)
    return len(names)


# -- parser -----------------------------------------------------------------------------

def _tool(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of :mod:`bridge.tools`, imported only when it runs: the store commands
    (``status``, ``dead``...) never load the HTTP client, aiohttp or the receiver."""
    def command(args: argparse.Namespace) -> int:
        from . import tools

        return int(getattr(tools, name)(args))

    return command


CONFIG_HELP = ("config file (default: $WEBHOOK_BRIDGE_CONFIG, then "
               "/etc/webhook-bridge/config.yaml); before or after the command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhook-bridge",
        description="MQTT to webhook bridge with a durable SQLite queue.",
        epilog="Run 'webhook-bridge COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -c before the command sets it here; after the command the subparser's copy sets it,
    # and SUPPRESS keeps the subparser from overwriting a value given before.
    parser.add_argument("-c", "--config", metavar="PATH", help=CONFIG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", help=CONFIG_HELP,
                        default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    run = add("run", cmd_run, "run the daemon (systemd Type=notify; SIGHUP reloads)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override log.level")
    check = add("check", cmd_check, "validate the configuration and print every problem "
                "(exit 0 ok, 78 problems), then warn about placeholders no event can fill "
                "and requests that do not render for a sample event")
    check.add_argument("--strict", action="store_true",
                       help="treat warnings as problems (exit 78)")
    status = add("status", cmd_status, "per-webhook state and counters, and the last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--wide", action="store_true",
                        help="every column and the whole last error on one line per webhook "
                             "(the default fits 100 columns)")
    for name, func, text in (("enable", cmd_enable, "enable a webhook (resume delivery)"),
                             ("disable", cmd_disable, "disable a webhook (queue, send nothing)")):
        add(name, func, text).add_argument("name", metavar="NAME", help="the webhook's name")

    dead = add("dead", cmd_dead, "inspect and re-queue dead letters")
    dead.add_argument("action", choices=["list", "show", "replay", "purge"],
                      help="list them, show them with their events, re-queue them, or "
                           "delete them")
    dead.add_argument("ids", nargs="*", metavar="ID", help="only these dead letters")
    dead.add_argument("--webhook", metavar="NAME", help="only this webhook's")
    dead.add_argument("--since", metavar="WHEN", help="a duration ago (2h, 7d) or ISO time")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.add_argument("--all", action="store_true", help="purge: every dead letter")

    devices = add("devices", cmd_devices, "the device registry: list, show, delete")
    devices.add_argument("action", choices=["list", "show", "delete"],
                         help="list the devices, show one, or delete one (queues "
                              "device.deleted)")
    devices.add_argument("id", nargs="?", metavar="ID", help="the device id (show, delete)")
    devices.add_argument("--json", action="store_true", help="machine-readable output")

    test = add("test", _tool("cmd_test"), "send one sample event through a webhook and print "
               "the request and the response")
    test.add_argument("name", metavar="NAME", help="the webhook's name")
    test.add_argument("--event", metavar="FILE", help="a JSON event (or payload) to send")
    test.add_argument("--dry-run", action="store_true", help="print the request, send nothing")
    secret = add("secret", _tool("cmd_secret"), "show or rotate a webhook's signing secret")
    secret.add_argument("action", choices=["show", "rotate"],
                        help="print the secret, or replace it (the old one stays valid 24h)")
    secret.add_argument("name", metavar="NAME", help="the webhook's name")
    listen = add("listen", _tool("cmd_listen"), "a local receiver that prints deliveries and "
                 "verifies their signatures")
    listen.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    listen.add_argument("--secret", metavar="S", help="verify signatures with this secret")
    add("demo", _tool("cmd_demo"), "embedded broker + bridge + receiver + simulated device, live")
    return parser


class _Printable:
    """A command's stdout or stderr: what it prints may hold text from devices and
    endpoints (dead letters, errors, device ids), so terminal control characters are
    escaped (see :func:`logs.printable`) before they reach the terminal."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(logs.printable(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("run", "demo"):  # their logs are escaped by logs.py itself
        return _main(args)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Printable(stdout), _Printable(stderr)
    try:
        return _main(args)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _main(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ConfigError as error:
        _print_problems(error)
        return EX_CONFIG
    except (Fatal, StoreError, StartError) as error:
        logs.fatal(str(error))
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL
    except Exception:
        if not logs.json_active():
            raise
        # A bug: still one JSON line (with the traceback in a field), not a raw dump.
        structlog.get_logger("bridge").critical("crashed", exc_info=True)
        return EX_FAIL


if __name__ == "__main__":
    sys.exit(main())
